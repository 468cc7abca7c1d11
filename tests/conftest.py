"""Shared test set-up: GPU tests skip cleanly without CUDA; torch uses few threads on the 2-core machines."""
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu); run tools/gpu_check.sh where one is lent")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

# A SeaweedFS S3 server on 127.0.0.1 (session) and a fresh bucket per test; see tests/s3_server.py.
from s3_server import s3_bucket, s3_server  # noqa: E402,F401


@pytest.fixture(scope="session")
def imagenet_folder(tmp_path_factory):
    """A small ImageNet-style tree of real JPEG/PNG files (Fashion-MNIST pixels, tinted and resized to odd sizes):
    root/{train,val}/<wnid>/<file>, 3 classes; train also holds one truncated (corrupt) JPEG. Returns
    (root, {"corrupt": path})."""
    import numpy as np
    from PIL import Image

    from dmvae_scale.data.builtin import load_fashion_mnist

    root = tmp_path_factory.mktemp("imagenet")
    images, _ = load_fashion_mnist("test")
    wnids = ["n01440764", "n01443537", "n01484850"]
    rng = np.random.default_rng(0)
    k = 0
    for split, per_class in (("train", 5), ("val", 2)):
        for wnid in wnids:
            d = root / split / wnid
            d.mkdir(parents=True)
            for j in range(per_class):
                gray = images[k]
                k += 1
                tint = rng.uniform(0.5, 1.0, 3)
                rgb = (gray[..., None] * tint).astype(np.uint8)
                size = (int(rng.integers(36, 60)), int(rng.integers(36, 60)))
                img = Image.fromarray(rgb).resize(size, Image.BILINEAR)
                if j == 0:
                    img.save(d / f"{wnid}_{j:05d}.png")
                else:
                    img.save(d / f"{wnid}_{j:05d}.JPEG", quality=90)
    good = (root / "train" / wnids[1] / f"{wnids[1]}_00001.JPEG").read_bytes()
    corrupt = root / "train" / wnids[1] / f"{wnids[1]}_99999.JPEG"
    corrupt.write_bytes(good[: len(good) // 2])  # truncated mid-scan: opens, fails to decode
    return root, {"corrupt": str(corrupt)}
