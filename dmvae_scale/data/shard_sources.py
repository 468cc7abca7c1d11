"""Where shard conversion reads images from: an ImageNet-style folder tree, or a built-in set.

A source is a fixed, sorted list of samples (key, label, locator) plus a way to turn one locator into the encoded image
bytes that go into a shard. The order is deterministic so that a re-run assigns every sample to the same shard part.
Folder images keep their original bytes (never re-encoded); built-in arrays are stored as lossless PNG.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from dmvae_scale.errors import UserError

from .builtin import FASHION_MNIST_CLASSES, load_fashion_mnist

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".webp", ".bmp"}
BUILTIN_SETS = ("fashion-mnist",)

Locator = Union[str, int]  # a file path (folder source) or an array index (built-in source)


@dataclass(frozen=True)
class SourceSample:
    key: str  # stable sample key, e.g. "train/n01440764/n01440764_10026.JPEG" or "fashion-mnist/train/000123"
    label: int
    locator: Locator


@dataclass
class ImageSource:
    """A fixed list of samples and the facts needed to re-open them in a worker process."""

    name: str  # "fashion-mnist" or the folder path
    split: str
    classes: list[str]
    samples: list[SourceSample]

    def describe(self) -> dict:
        return {"source": self.name, "split": self.split, "num_samples": len(self.samples),
                "num_classes": len(self.classes)}


def open_source(src: str, split: str = "train", classes_file: str | None = None) -> ImageSource:
    """`src` is a built-in set name or a folder (either holding `<split>/<class>/img` or `<class>/img` directly)."""
    if src in BUILTIN_SETS:
        return _fashion_mnist_source(split)
    root = Path(src)
    if not root.is_dir():
        raise UserError(f"data source {src!r} is neither a built-in set ({', '.join(BUILTIN_SETS)}) nor a directory")
    return _folder_source(root, split, classes_file)


def _fashion_mnist_source(split: str) -> ImageSource:
    _, labels = load_fashion_mnist(split)
    samples = [SourceSample(f"fashion-mnist/{split}/{i:06d}", int(y), i) for i, y in enumerate(labels)]
    return ImageSource("fashion-mnist", split, list(FASHION_MNIST_CLASSES), samples)


def _folder_source(root: Path, split: str, classes_file: str | None) -> ImageSource:
    split_dir = root / split if (root / split).is_dir() else root
    class_dirs = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not class_dirs:
        raise UserError(f"{split_dir}: no class folders found; expected {root}/{split}/<class>/<image> "
                        f"(ImageNet layout, e.g. train/n01440764/n01440764_10026.JPEG)")
    if classes_file:
        # A fixed class list keeps labels identical across splits even when a split lacks some classes.
        classes = [line.strip() for line in Path(classes_file).read_text().splitlines() if line.strip()]
        unknown = sorted(set(class_dirs) - set(classes))
        if unknown:
            raise UserError(f"{split_dir}: class folders {unknown[:5]} are not in --classes file {classes_file}")
    else:
        classes = class_dirs  # sorted synset ids: the ILSVRC-2012 class-index order
    label_of = {c: i for i, c in enumerate(classes)}
    samples = []
    for cls in class_dirs:
        for dirpath, _, files in os.walk(split_dir / cls):
            for fname in files:
                if Path(fname).suffix.lower() in IMAGE_SUFFIXES:
                    path = Path(dirpath) / fname
                    key = f"{split}/{path.relative_to(split_dir).as_posix()}"
                    samples.append(SourceSample(key, label_of[cls], str(path)))
    samples.sort(key=lambda s: s.key)
    if not samples:
        raise UserError(f"{split_dir}: class folders hold no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return ImageSource(str(root), split, classes, samples)


_FMNIST_CACHE: dict[str, np.ndarray] = {}


def read_encoded(source_name: str, split: str, locator: Locator) -> bytes:
    """The bytes that go into the shard: a file's original bytes, or a built-in image as PNG."""
    if source_name == "fashion-mnist":
        if split not in _FMNIST_CACHE:  # one load per worker process
            _FMNIST_CACHE[split] = load_fashion_mnist(split)[0]
        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(_FMNIST_CACHE[split][int(locator)]).save(buf, format="PNG")
        return buf.getvalue()
    with open(locator, "rb") as f:
        return f.read()
