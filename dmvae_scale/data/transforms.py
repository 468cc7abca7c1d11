"""Decoding and the paper's image transforms, with every random choice drawn from a given generator.

crop modes
    "random"  resize the short side to S (bicubic), take a random S x S window     (tokenizer training)
    "center"  resize the short side to S (bicubic), take the central S x S window
    "adm"     ADM / guided-diffusion center crop: halve with box filtering while the short side is >= 2S, bicubic
              to short side S, central window                                     (generator training, evaluation)
then an optional horizontal flip with probability 1/2. Output: float (3, S, S) in [-1, 1].
The generator passed in is seeded from (seed, epoch, sample id) by the caller, so a sample's augmentation does not
depend on which worker reads it or when.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dmvae_scale.errors import UserError
from dmvae_scale.seeds import sample_seed

CROP_MODES = ("random", "center", "adm")


# The most pixels an image may have before it is decoded: 2**27 (134 megapixels, e.g. 11585 x 11585; 384 MiB as RGB),
# far above any photo of ImageNet and its like. DMVAE_MAX_IMAGE_PIXELS changes it. PIL's own bound is set to it and
# its DecompressionBombWarning made an error, so a bomb is refused wherever PIL opens an image in this process.
MAX_IMAGE_PIXELS = 2 ** 27
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
warnings.simplefilter("error", Image.DecompressionBombWarning)


class ImageTooLargeError(UserError):
    """An image whose header declares more pixels than the bound: refused before it is decoded."""


def max_image_pixels() -> int:
    value = os.environ.get("DMVAE_MAX_IMAGE_PIXELS")
    if not value:
        return MAX_IMAGE_PIXELS
    try:
        return int(value)
    except ValueError:
        raise UserError(f"DMVAE_MAX_IMAGE_PIXELS: must be a whole number of pixels, got {value!r}") from None


def open_image(data: bytes) -> Image.Image:
    """Encoded bytes -> a PIL image, opened (header read) but refused before decoding when it has more pixels than
    max_image_pixels() (a decompression bomb: a few KiB that decode to gigabytes)."""
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    bound = max_image_pixels()
    if w * h > bound:
        raise ImageTooLargeError(f"image of {w} x {h} = {w * h} pixels exceeds the bound of {bound} pixels (a "
                                 f"decompression bomb?); refusing to decode it (DMVAE_MAX_IMAGE_PIXELS raises it)")
    return img


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> RGB PIL image (grayscale is replicated to three channels); refused beyond the pixel bound."""
    img = open_image(data)
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img if new == (w, h) else img.resize(new, resample=Image.BICUBIC)


def adm_resize(img: Image.Image, size: int) -> Image.Image:
    """ADM's resize: repeated 2x box downsampling keeps large photos from aliasing, then one bicubic step."""
    while min(img.size) >= 2 * size:
        img = img.resize((img.size[0] // 2, img.size[1] // 2), resample=Image.BOX)
    scale = size / min(img.size)
    return img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), resample=Image.BICUBIC)


def to_model_range(img: Image.Image) -> torch.Tensor:
    """uint8 RGB HWC -> float CHW in [-1, 1]."""
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def sample_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    """One sample's augmentation draws in an epoch (seeds.sample_seed): the same on any worker, at any time."""
    return np.random.default_rng(sample_seed(seed, epoch, sample_id))


@dataclass(frozen=True)
class ImageTransform:
    image_size: int
    crop: str = "random"
    hflip: bool = True

    def __post_init__(self):
        if self.crop not in CROP_MODES:
            from dmvae_scale.errors import UserError
            raise UserError(f"crop mode {self.crop!r} is unknown; use one of {', '.join(CROP_MODES)}")

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        s = self.image_size
        img = adm_resize(img, s) if self.crop == "adm" else resize_short_side(img, s)
        w, h = img.size
        if self.crop == "random":
            left, top = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        else:
            left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
        # Draw the flip bit even when unused, so turning the flip off does not shift other draws.
        flip = bool(rng.integers(0, 2))
        if self.hflip and flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_model_range(img)
