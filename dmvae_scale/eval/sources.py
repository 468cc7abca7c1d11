"""Image sets to evaluate or to take reference statistics from, each read as uint8 N x H x W x 3 batches.

A set is named by one string:
  samples.npz            ADM layout: arr_0 uint8 N x H x W x 3, optional arr_1 labels (also ADM reference batches)
  DIR with samples.npz   the output directory of `dmvae-scale sample`
  DIR of image files     read in sorted file-name order
  DIR with index.json    image shards of `dmvae-scale data shards` (local or s3://), streamed in stored order
  fashion-mnist / DIR    a built-in set or an ImageNet-style folder (with `split`), as `data shards` reads them
Real data is brought to `image_size` exactly as training data is (ADM centre crop); without image_size it is used at
its own size.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from dmvae_scale.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
SAMPLES_FILE = "samples.npz"
SAMPLING_SETTINGS_FILE = "sampling.json"


@dataclass
class ImageSet:
    description: str
    total: int
    batches: Callable[[int], Iterator[np.ndarray]]  # batch_size -> uint8 N x H x W x 3 batches, in a fixed order
    labels: Optional[np.ndarray] = None
    settings: dict = field(default_factory=dict)  # how the images were made (sampling.json), when known

    def array(self, batch_size: int = 1024) -> np.ndarray:
        """Every image at once, uint8 N x H x W x 3 (for sets small enough to hold: a classifier's data)."""
        return np.concatenate(list(self.batches(batch_size)))


def _array_set(images: np.ndarray, description: str, labels=None, settings=None) -> ImageSet:
    def batches(batch_size: int):
        for start in range(0, len(images), batch_size):
            yield images[start:start + batch_size]
    return ImageSet(description, len(images), batches, labels, settings or {})


def _read_npz(path: Path, limit: Optional[int]) -> ImageSet:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"{path}: not a readable .npz file ({exc})") from None
    if "arr_0" not in data.files:
        raise UserError(f"{path}: no arr_0 images (keys: {data.files}); expected ADM's layout, uint8 N x H x W x 3")
    images = data["arr_0"][:limit]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{path}: arr_0 is {images.dtype} {images.shape}; ADM's layout is uint8 N x H x W x 3")
    labels = data["arr_1"][:limit] if "arr_1" in data.files else None
    settings_file = path.parent / SAMPLING_SETTINGS_FILE
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    return _array_set(images, str(path), labels, settings)


def _read_image_files(files: list[Path], description: str) -> ImageSet:
    from PIL import Image

    def batches(batch_size: int):
        for start in range(0, len(files), batch_size):
            arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files[start:start + batch_size]]
            if len({a.shape for a in arrays}) > 1:
                raise UserError(f"{description}: images of different sizes; give image_size to resize them")
            yield np.stack(arrays)
    return ImageSet(description, len(files), batches)


def _uint8_from_model_range(x) -> np.ndarray:
    """Inverse of data.transforms.to_model_range (exact for values that came from uint8)."""
    return (x.add(1.0).mul(127.5).round().clamp(0, 255).byte()).permute(1, 2, 0).numpy()


def _shard_set(url: str, image_size: Optional[int], limit: Optional[int]) -> ImageSet:
    from dmvae_scale.data.shards import read_dataset_info
    from dmvae_scale.data.stream import ImageStreamDataset

    if image_size is None:
        raise UserError(f"{url}: shards hold images of any size; give image_size (--image-size) for the reference")
    count = int(read_dataset_info(url)["images"])

    def batches(batch_size: int):
        ds = ImageStreamDataset(url, batch_size=batch_size, image_size=image_size, crop="adm", hflip=False,
                                shuffle=False)
        n = len(ds) if limit is None else min(limit, len(ds))
        for start in range(0, n, batch_size):
            yield np.stack([_uint8_from_model_range(ds[i]["image"]) for i in range(start, min(n, start + batch_size))])
    total = count if limit is None else min(limit, count)
    return ImageSet(f"shards {url}", total, batches)


def _data_source_set(spec: str, split: str, image_size: Optional[int], limit: Optional[int]) -> ImageSet:
    from dmvae_scale.data.shard_sources import open_source, read_encoded
    from dmvae_scale.data.transforms import ImageTransform, decode_image, sample_rng

    source = open_source(spec, split)
    samples = source.samples[:limit]
    transform = ImageTransform(image_size, crop="adm", hflip=False) if image_size else None

    def load(sample) -> np.ndarray:
        img = decode_image(read_encoded(source.name, source.split, sample.locator))
        if transform is None:
            return np.asarray(img)
        return _uint8_from_model_range(transform(img, sample_rng(0, 0, 0)))

    def batches(batch_size: int):
        for start in range(0, len(samples), batch_size):
            arrays = [load(s) for s in samples[start:start + batch_size]]
            if len({a.shape for a in arrays}) > 1:
                raise UserError(f"{spec}: images of different sizes; give image_size (--image-size)")
            yield np.stack(arrays)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return ImageSet(f"{spec} ({split})", len(samples), batches, labels)


def open_image_set(spec: str, split: str = "train", image_size: Optional[int] = None,
                   limit: Optional[int] = None) -> ImageSet:
    path = Path(spec)
    if spec.endswith(".npz"):
        if not path.is_file():
            raise UserError(f"image set {spec}: file not found")
        return _read_npz(path, limit)
    if spec.startswith("s3://") or (path / "index.json").is_file():
        return _shard_set(spec, image_size, limit)
    if (path / SAMPLES_FILE).is_file():
        return _read_npz(path / SAMPLES_FILE, limit)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            if image_size is not None:
                raise UserError(f"{spec}: a directory of generated images is evaluated at its own size; "
                                f"drop image_size (--image-size)")
            return _read_image_files(files[:limit], spec)
    return _data_source_set(spec, split, image_size, limit)
