"""The TF-Inception network on real images: our features vs the bundled TorchScript network, our FID vs
torch-fidelity's end-to-end FID, and FID ordering on real data sets (Fashion-MNIST vs handwritten digits).

CPU-sized: 32 images per set (FID with the low-rank allowance; the ordering is still wide), features computed once;
torch-fidelity's own run takes 16 + 16 images and one 2048 x 2048 eigenproblem (the slowest part on CPU).
"""
import shutil

import numpy as np
import pytest
import torch

from dmvae_scale.data.builtin import load_fashion_mnist
from dmvae_scale.eval import inception as inception_mod
from dmvae_scale.eval.features import array_batches, extract_features
from dmvae_scale.eval.inception import (BUNDLED_SHA256, InceptionWeightsError, bundled_torchscript_path,
                                        load_inception, sha256_file)
from dmvae_scale.eval.metrics import fid
from dmvae_scale.eval.stats import FeatureStats

pytestmark = pytest.mark.integration

N = 32


def _digits(n: int) -> np.ndarray:
    """scikit-learn's bundled real handwritten digits (8x8, values 0..16) as uint8 images."""
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn bundles the real digits set")
    return np.round(datasets.load_digits().images[:n] * (255 / 16)).astype(np.uint8)


@pytest.fixture(scope="module")
def net():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return load_inception()


@pytest.fixture(scope="module")
def image_sets():
    train, _ = load_fashion_mnist("train")
    test, _ = load_fashion_mnist("test")
    return {"fmnist_train": train[:N], "fmnist_test": test[:N], "digits": _digits(N)}


@pytest.fixture(scope="module")
def features(net, image_sets):
    return {name: extract_features(net, array_batches(images, 16), len(images), desc=name, progress=False)["pool"]
            for name, images in image_sets.items()}


def _stats(net, feats):
    return FeatureStats.from_features(feats, net.name, net.fingerprint)


def test_bundled_file_is_the_documented_one():
    assert sha256_file(bundled_torchscript_path()) == BUNDLED_SHA256


def test_features_equal_the_bundled_torchscript_network(net, image_sets, features):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    script = torch.jit.load(str(bundled_torchscript_path()), map_location="cpu").eval()
    images = torch.from_numpy(image_sets["fmnist_test"][:8])[:, None].expand(-1, 3, -1, -1).float()
    # The TorchScript network takes 299 px input scaled to [-1, 1) (fid-helper's TF input range): resize as TF1 does.
    x299 = interpolate_bilinear_2d_like_tensorflow1x(images, size=(299, 299), align_corners=False)
    with torch.no_grad():
        theirs = script((x299 - 128) / 128).numpy()
    ours = features["fmnist_test"][:8]
    assert ours.shape == (8, 2048)
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(theirs).max() > 1.0  # real activations, not a degenerate all-zero comparison


def test_features_come_from_a_copy_with_batch_norms_folded_and_are_the_graphs_to_float_rounding(net, image_sets,
                                                                                                   features):
    """forward runs a copy whose batch norms are folded into the convolutions (~1.1x on a CPU thread); the standard
    graph (its state dict and fingerprint, what weights files and statistics are checked against) is untouched."""
    from dmvae_scale.eval.inception import _conv_blocks, feature_fingerprint
    x = torch.from_numpy(image_sets["fmnist_test"][:8])[:, None].expand(-1, 3, -1, -1).contiguous()
    with torch.no_grad():
        unfolded = net.graph(x)[0].numpy()
    assert np.abs(features["fmnist_test"][:8] - unfolded).max() < 5e-5
    assert np.abs(unfolded).max() > 1.0
    blocks = len(_conv_blocks(net.graph))
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.graph.modules()) == blocks > 90
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net._folded.modules())
    assert all(k.startswith("graph.") for k in net.state_dict())  # the folded copy is not saved with the module
    assert feature_fingerprint(net.graph) == net.fingerprint


def test_fid_equals_torch_fidelity_end_to_end(net, image_sets, features, tmp_path):
    """torch-fidelity runs its own pipeline (datasets, batching, its feature extractor from a weights file holding the
    same weights) on the same two image sets; our path must give the same FID."""
    import torch_fidelity

    class GrayAsRGB(torch.utils.data.Dataset):
        def __init__(self, images):
            self.images = images

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return torch.from_numpy(self.images[i])[None].expand(3, -1, -1).contiguous()

    n = 16
    weights = tmp_path / "inception.pth"
    torch.save(net.graph.state_dict(), weights)
    theirs = torch_fidelity.calculate_metrics(
        input1=GrayAsRGB(image_sets["fmnist_test"][:n]), input2=GrayAsRGB(image_sets["digits"][:n]), fid=True,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights), cuda=False,
        cache=False, verbose=False, batch_size=16)["frechet_inception_distance"]
    ours = fid(_stats(net, features["fmnist_test"][:n]), _stats(net, features["digits"][:n]), allow_low_rank=True)
    assert ours == pytest.approx(theirs, abs=1e-3)


def test_fid_orders_real_data(net, features):
    same = fid(_stats(net, features["fmnist_test"]), _stats(net, features["fmnist_train"]), allow_low_rank=True)
    other = fid(_stats(net, features["fmnist_test"]), _stats(net, features["digits"]), allow_low_rank=True)
    print(f"FID Fashion-MNIST test vs train: {same:.1f}; vs handwritten digits: {other:.1f} ({N} images each)")
    assert same < 0.6 * other


def test_standard_weights_file_layout_loads_with_classifier(net, image_sets, features, tmp_path):
    """A state dict in the pt_inception-2015-12-05 layout (here: the bundled weights + a seeded classifier) loads
    strictly, gives the same pool features and fingerprint, and unbiased logits = pool @ W^T."""
    state = net.graph.state_dict()
    g = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.01
    state["fc.bias"] = torch.randn(1008, generator=g)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    with_fc = load_inception(path)
    assert with_fc.has_logits and with_fc.fingerprint == net.fingerprint
    out = extract_features(with_fc, [image_sets["fmnist_test"][:8]], progress=False)
    assert np.abs(out["pool"] - features["fmnist_test"][:8]).max() < 1e-4
    expected_logits = out["pool"] @ state["fc.weight"].numpy().T  # no bias, as in the original IS code
    assert np.abs(out["logits"] - expected_logits).max() < 1e-3


def test_wrong_weights_files_are_refused(tmp_path, monkeypatch):
    bad = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(InceptionWeightsError, match=r"does not fit the TF-Inception graph.*missing keys"):
        load_inception(bad)
    with pytest.raises(InceptionWeightsError, match="not found"):
        load_inception(tmp_path / "absent.pth")
    # An altered bundled file is refused by its hash.
    altered = tmp_path / "default_1.pt"
    shutil.copyfile(bundled_torchscript_path(), altered)
    with open(altered, "r+b") as f:
        f.seek(-100, 2)
        f.write(b"\x00" * 8)
    monkeypatch.setattr(inception_mod, "bundled_torchscript_path", lambda: altered)
    with pytest.raises(InceptionWeightsError, match="sha256 .* is not the expected"):
        load_inception()
