"""Built-in real image sets read from local files (no downloads): Fashion-MNIST from Debian's package.

Every stage consumes batches of {"image": float (3, S, S) in [-1, 1], "label": long}; ImageArrayDataset serves
an in-memory array in that contract, with a horizontal flip that is a pure function of (seed, epoch, index).
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dmvae_scale.errors import UserError
from dmvae_scale.seeds import sample_seed

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILE_PREFIX = {"train": "train", "test": "t10k"}
# A validation split carved from the training images, for choices a study makes (KL weight, generator length, teacher
# settings) without looking at the test split: "val" is the last 10,000 training images, "train-fit" the other 50,000.
# "train" stays all 60,000 (what earlier runs read); a run that chooses on "val" trains on "train-fit".
VAL_IMAGES = 10_000
_CARVED = {"train-fit": slice(0, 60_000 - VAL_IMAGES), "val": slice(60_000 - VAL_IMAGES, 60_000)}
SPLITS = (*_FILE_PREFIX, *_CARVED)


class DatasetMissingError(UserError):
    """A built-in data set's files are not on this machine."""


def _read_idx(path: Path, magic: int) -> np.ndarray:
    if not path.is_file():
        raise DatasetMissingError(
            f"Fashion-MNIST file {path} not found; install it with `apt-get install dataset-fashion-mnist`")
    with gzip.open(path, "rb") as f:
        raw = f.read()
    got_magic, count = struct.unpack(">II", raw[:8])
    if got_magic != magic:
        raise DatasetMissingError(f"{path} is not an IDX file (magic {got_magic:#x}, expected {magic:#x})")
    if magic == 0x803:  # images: count, rows, cols, then bytes
        rows, cols = struct.unpack(">II", raw[8:16])
        return np.frombuffer(raw, np.uint8, count * rows * cols, offset=16).reshape(count, rows, cols).copy()
    return np.frombuffer(raw, np.uint8, count, offset=8).astype(np.int64)


def load_fashion_mnist(split: str = "train", root: Path | str = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels int64 (N,) of split "train" (60k), "test" (10k), or the training images'
    two disjoint parts "train-fit" (the first 50k) and "val" (the last 10k)."""
    if split not in SPLITS:
        raise UserError(f"Fashion-MNIST split {split!r} is unknown; use one of {', '.join(SPLITS)} ('val': the last "
                        f"{VAL_IMAGES:,} training images, 'train-fit': the rest)")
    if split in _CARVED:
        images, labels = load_fashion_mnist("train", root)
        part = _CARVED[split]
        if len(images) != 60_000:
            raise DatasetMissingError(f"Fashion-MNIST train under {root}: {len(images)} images, not 60,000; the "
                                      f"'{split}' split is carved from the full training set")
        return images[part].copy(), labels[part].copy()
    root = Path(root)
    prefix = _FILE_PREFIX[split]
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 0x803)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 0x801)
    if len(images) != len(labels):
        raise DatasetMissingError(f"Fashion-MNIST {split} under {root}: {len(images)} images but {len(labels)} labels")
    return images, labels


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether sample `index` is mirrored in `epoch`: a hash of the three, so any worker layout agrees."""
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, index))
    return bool(torch.rand((), generator=g) < 0.5)


def uint8_to_model_range(image: torch.Tensor) -> torch.Tensor:
    """uint8 HW / HWC / CHW-ish tensor -> float in [-1, 1]."""
    return image.float().div(127.5).sub(1.0)


class ImageArrayDataset(Dataset):
    """An in-memory uint8 image array (N, H, W) or (N, H, W, 3) served as {"image": (3, S, S) in [-1, 1], "label"}.

    Grayscale is replicated to RGB; images are resized to `image_size` (bicubic, antialiased, clamped). The flip is
    decided by flip_decision(seed, epoch, index); call set_epoch() at the start of each epoch.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int, hflip: bool = True, seed: int = 0):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise UserError(f"images must be uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise UserError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size = int(image_size)
        self.hflip = hflip
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        array = self.images[index]
        x = torch.from_numpy(np.ascontiguousarray(array))
        x = x.unsqueeze(0).expand(3, -1, -1) if x.ndim == 2 else x.permute(2, 0, 1)
        x = uint8_to_model_range(x)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bicubic",
                              align_corners=False, antialias=True)[0].clamp_(-1.0, 1.0)
        if self.hflip and flip_decision(self.seed, self.epoch, int(index)):
            x = x.flip(-1)
        return {"image": x.contiguous(), "label": torch.tensor(int(self.labels[index]), dtype=torch.long)}
