"""What every metric takes as images: uint8 in [0, 255], N x 3 x H x W. This module checks and converts inputs.

Feature networks were defined on 8-bit images (ADM and the TF reference code quantise samples to uint8 before the
network), so floats are quantised the same way, and only when the caller says which range they are in: a float image
in [-1, 1] read as [0, 1] gives a plausible-looking but wrong FID, so guessing is refused.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from dmvae_scale.errors import UserError


class ImageFormatError(UserError, ValueError):
    """Images of the wrong dtype, shape or value range for a metric."""


_FLOAT_HINT = "give uint8 images in [0, 255], or float images together with value_range=(-1, 1) or (0, 1)"


def _to_tensor(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images.detach()
    if isinstance(images, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(images))
    raise ImageFormatError(f"images: expected a numpy array or torch tensor, got {type(images).__name__}")


def _to_nchw(x: torch.Tensor, layout: str, what: str) -> torch.Tensor:
    if x.dim() == 3:  # N x H x W grayscale
        return x.unsqueeze(1)
    if x.dim() != 4:
        raise ImageFormatError(f"{what}: expected N x H x W, N x H x W x C or N x C x H x W, "
                               f"got shape {tuple(x.shape)}")
    if layout == "auto":
        channels_first = x.shape[1] in (1, 3)
        channels_last = x.shape[-1] in (1, 3)
        if channels_first == channels_last:
            raise ImageFormatError(f"{what}: cannot tell the channel axis of shape {tuple(x.shape)}; "
                                   f"pass layout='NCHW' or 'NHWC'")
        layout = "NCHW" if channels_first else "NHWC"
    if layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    elif layout != "NCHW":
        raise ImageFormatError(f"layout must be 'auto', 'NCHW' or 'NHWC', got {layout!r}")
    if x.shape[1] not in (1, 3):
        raise ImageFormatError(f"{what}: {x.shape[1]} channels; expected 1 (grayscale) or 3 (RGB)")
    return x


def as_uint8_nchw(images, value_range: Optional[Sequence[float]] = None, layout: str = "auto",
                  what: str = "images") -> torch.Tensor:
    """Checked uint8 N x 3 x H x W tensor (grayscale repeated to RGB) on the input's device.

    uint8 input must be in [0, 255] (value_range None or (0, 255)); float input needs `value_range=(lo, hi)` and
    must lie inside it; it is then quantised to 8 bits exactly as saving a PNG would.
    """
    x = _to_nchw(_to_tensor(images), layout, what)
    if x.shape[0] == 0:
        raise ImageFormatError(f"{what}: no images (N = 0)")
    if x.dtype == torch.uint8:
        if value_range is not None and tuple(value_range) != (0, 255):
            raise ImageFormatError(f"{what}: uint8 images are in [0, 255], but value_range={tuple(value_range)} "
                                   f"was declared; {_FLOAT_HINT}")
        if int(x.max()) <= 1:
            # [0, 1] floats cast to uint8 become a black image of 0s and 1s; no real batch looks like that.
            raise ImageFormatError(f"{what}: uint8 images whose maximum is {int(x.max())}: this looks like [0, 1] "
                                   f"data cast to uint8; scale to [0, 255] first")
    elif x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        if value_range is None:
            raise ImageFormatError(f"{what}: float images ({str(x.dtype).replace('torch.', '')}) need a declared "
                                   f"value range; {_FLOAT_HINT}")
        lo, hi = float(value_range[0]), float(value_range[1])
        if not lo < hi:
            raise ImageFormatError(f"{what}: value_range must be (lo, hi) with lo < hi, got {tuple(value_range)}")
        xf = x.float()
        if not torch.isfinite(xf).all():
            raise ImageFormatError(f"{what}: images contain NaN or infinite values")
        got_lo, got_hi = float(xf.min()), float(xf.max())
        tol = 1e-3 * (hi - lo)
        if got_lo < lo - tol or got_hi > hi + tol:
            raise ImageFormatError(f"{what}: values span [{got_lo:.3g}, {got_hi:.3g}], outside the declared "
                                   f"value_range ({lo:g}, {hi:g}); declare the range the images are really in "
                                   f"(e.g. (-1, 1) for decoder outputs) or clamp them")
        x = ((xf - lo) * (255.0 / (hi - lo))).round_().clamp_(0, 255).to(torch.uint8)
    else:
        raise ImageFormatError(f"{what}: dtype {str(x.dtype).replace('torch.', '')} is not accepted; {_FLOAT_HINT}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


def to_uint8_nhwc(images, value_range: Optional[Sequence[float]] = None, layout: str = "auto") -> np.ndarray:
    """The ADM `.npz` layout: uint8 N x H x W x 3 numpy array."""
    return as_uint8_nchw(images, value_range, layout).permute(0, 2, 3, 1).cpu().numpy()
