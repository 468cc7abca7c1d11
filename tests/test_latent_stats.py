"""Latent statistics are measured on a seeded random sample that covers the classes, not the first N images.

ImageNet shards (and folders) are sorted by class; Fashion-MNIST is re-sorted here the same way."""
import numpy as np
import pytest
import torch

from dmvae_scale.data.builtin import ImageArrayDataset, load_fashion_mnist
from dmvae_scale.train.batches import stats_batches, stats_indices

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def sorted_by_class():
    images, labels = load_fashion_mnist("test")
    order = np.argsort(labels, kind="stable")
    return ImageArrayDataset(images[order], labels[order], 28, hflip=True, seed=3)


def _labels(batches):
    return torch.cat([b["label"] for b in batches]).numpy()


def test_stats_sample_of_class_sorted_data_is_class_balanced_and_seeded(sorted_by_class):
    labels = _labels(stats_batches(sorted_by_class, 32, 100))
    assert len(labels) == 100
    assert np.bincount(labels, minlength=10).tolist() == [10] * 10  # the first 100 would all be class 0
    # The same images on every call (every rank, every run); another seed picks others.
    again = torch.cat([b["image"] for b in stats_batches(sorted_by_class, 50, 100)])
    first = torch.cat([b["image"] for b in stats_batches(sorted_by_class, 32, 100)])
    assert torch.equal(first, again)
    other = torch.cat([b["image"] for b in stats_batches(sorted_by_class, 32, 100, seed=4)])
    assert not torch.equal(first, other)
    assert sorted_by_class.hflip  # the flip is off only while measuring


def test_stats_sample_is_unflipped_and_capped_at_the_data_set(sorted_by_class):
    idx = stats_indices(len(sorted_by_class), 20, seed=0, labels=sorted_by_class.labels)
    batch = next(stats_batches(sorted_by_class, 20, 20, seed=0))
    want = torch.stack([ImageArrayDataset(sorted_by_class.images, sorted_by_class.labels, 28, hflip=False)[i]["image"]
                        for i in idx])
    assert torch.equal(batch["image"], want)
    assert len(stats_indices(50, 4096, seed=0)) == 50 and len(set(stats_indices(50, 4096, seed=0))) == 50


def test_without_labels_a_uniform_random_sample_still_covers_the_classes(sorted_by_class):
    idx = stats_indices(len(sorted_by_class), 500, seed=0)
    counts = np.bincount(sorted_by_class.labels[idx], minlength=10)
    assert counts.min() >= 25, counts  # expected 50 per class; the first 500 would be class 0 only
