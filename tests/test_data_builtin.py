"""Built-in Fashion-MNIST and the in-memory dataset: the batch contract and deterministic flips; transforms."""
import numpy as np
import pytest
import torch
from PIL import Image

from dmvae_scale.data.builtin import (FASHION_MNIST_CLASSES, DatasetMissingError, ImageArrayDataset,
                                      load_fashion_mnist)
from dmvae_scale.data.transforms import ImageTransform, adm_resize, sample_rng, to_model_range
from dmvae_scale.errors import UserError

pytestmark = pytest.mark.unit


def test_fashion_mnist_test_split_is_the_real_set():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10  # the published test split: 1000 per class
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"
    assert 60 < images.mean() < 90  # real pixels, not zeros


def test_missing_files_name_the_path_and_the_package(tmp_path):
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist") as err:
        load_fashion_mnist("train", root=tmp_path)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in str(err.value)
    with pytest.raises(UserError, match=r"^Fashion-MNIST split 'valid' is unknown; use one of train, test, "
                                        r"train-fit, val \('val': the last 10,000 training images"):
        load_fashion_mnist("valid")


def test_the_validation_split_is_carved_from_training_images_disjoint_from_the_fit_part():
    train, train_labels = load_fashion_mnist("train")
    fit, fit_labels = load_fashion_mnist("train-fit")
    val, val_labels = load_fashion_mnist("val")
    assert (len(fit), len(val)) == (50_000, 10_000)
    assert np.array_equal(np.concatenate([fit, val]), train)
    assert np.array_equal(np.concatenate([fit_labels, val_labels]), train_labels)
    # no test image is in it (the published test split is another file), and every class is there in number
    assert min(np.bincount(val_labels, minlength=10)) > 900


def test_image_array_dataset_contract_and_deterministic_flip():
    images, labels = load_fashion_mnist("test")
    ds = ImageArrayDataset(images[:64], labels[:64], image_size=32, hflip=True, seed=3)
    item = ds[5]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.long and int(item["label"]) == labels[5]
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert torch.equal(item["image"][0], item["image"][1])  # grayscale replicated to RGB

    plain = ImageArrayDataset(images[:64], labels[:64], image_size=32, hflip=False, seed=3)
    flipped = [i for i in range(64) if not torch.equal(ds[i]["image"], plain[i]["image"])]
    assert 16 < len(flipped) < 48  # about half
    for i in flipped[:5]:
        assert torch.equal(ds[i]["image"], plain[i]["image"].flip(-1))
    again = ImageArrayDataset(images[:64], labels[:64], image_size=32, hflip=True, seed=3)
    assert all(torch.equal(ds[i]["image"], again[i]["image"]) for i in range(64))
    again.set_epoch(1)
    assert any(not torch.equal(ds[i]["image"], again[i]["image"]) for i in range(64))


def test_native_size_keeps_pixels_exactly():
    images, labels = load_fashion_mnist("test")
    ds = ImageArrayDataset(images[:4], labels[:4], image_size=28, hflip=False)
    expected = torch.from_numpy(images[2]).float() / 127.5 - 1.0
    assert torch.equal(ds[2]["image"][0], expected)


def test_adm_crop_and_random_crop():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (300, 520, 3), dtype=np.uint8)
    img = Image.fromarray(array)
    assert min(adm_resize(img, 64).size) == 64
    adm = ImageTransform(64, "adm", hflip=False)(img, sample_rng(0, 0, 0))
    assert adm.shape == (3, 64, 64) and adm.min() >= -1 and adm.max() <= 1
    # a square image at the target size passes through unchanged
    square = Image.fromarray(array[:64, :64])
    exact = ImageTransform(64, "center", hflip=False)(square, sample_rng(0, 0, 0))
    assert torch.equal(exact, to_model_range(square))
    # random crops: a pure function of (seed, epoch, sample id)
    t = ImageTransform(64, "random", hflip=True)
    a, b = t(img, sample_rng(1, 2, 3)), t(img, sample_rng(1, 2, 3))
    assert torch.equal(a, b)
    crops = {t(img, sample_rng(1, 2, i)).sum().item() for i in range(8)}
    assert len(crops) > 4
    with pytest.raises(UserError, match="crop mode 'middle'"):
        ImageTransform(64, "middle")


def test_dataset_from_run_config():
    from dmvae_scale.config import load_config
    from dmvae_scale.data.datasets import in_memory_dataset, latent_dataset
    cfg = load_config(None, ["data.split=test", "data.image_size=32", "tokenizer.image_size=32", "data.limit=10"])
    ds = in_memory_dataset(cfg)
    assert len(ds) == 10 and ds[0]["image"].shape == (3, 32, 32)
    with pytest.raises(UserError, match="data.latents: not set"):
        latent_dataset(cfg, 4)
