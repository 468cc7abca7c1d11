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
