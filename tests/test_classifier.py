"""The evaluator classifier: trained on real images only, it scores real test images far above chance, survives a
save/load round trip bit for bit, and refuses inputs it cannot judge."""
import numpy as np
import pytest

from dmvae_scale.data.builtin import load_fashion_mnist
from dmvae_scale.errors import UserError
from dmvae_scale.eval.classifier import accuracy, load_classifier, predict, save_classifier, train_classifier

pytestmark = pytest.mark.unit


def test_classifier_learns_real_images_and_round_trips(tmp_path):
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    model, report = train_classifier(train_x[:2000], train_y[:2000], test_x[:500], test_y[:500], epochs=2)
    assert report.test_accuracy > 0.6  # chance is 0.1
    rgb = np.repeat(test_x[:64, :, :, None], 3, axis=-1)  # samples arrive as RGB: gray is their mean
    assert (predict(model, rgb) == predict(model, test_x[:64])).all()
    save_classifier(model, report, tmp_path / "clf")
    again, info = load_classifier(tmp_path / "clf")
    assert info["test_accuracy"] == pytest.approx(report.test_accuracy)
    assert accuracy(again, test_x[:500], test_y[:500]) == pytest.approx(report.test_accuracy)
    with pytest.raises(UserError, match="as many labels as images"):
        accuracy(again, test_x[:10], test_y[:9])
    with pytest.raises(UserError, match="no classifier.json"):
        load_classifier(tmp_path / "nothing")


def _seeded_classifier(directory):
    """An untrained, seeded classifier: its penultimate features are a fixed function of the images, which is all
    the Frechet-distance arithmetic needs."""
    import torch

    from dmvae_scale.eval.classifier import ClassifierReport, EvalClassifier
    torch.manual_seed(0)
    save_classifier(EvalClassifier().eval(), ClassifierReport(0, 0, 0, 0.0, 0.0, 0), directory)
    return directory


def _scipy_fd(x, y):
    """The textbook Frechet distance with scipy's sqrtm. An untrained net has dead ReLU channels (zero-variance
    features), so the covariances are singular and sqrtm warns; the distance stays defined."""
    import warnings

    from scipy import linalg
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fd_on_classifier_features_is_zero_for_a_set_against_itself_and_matches_scipy_between_classes(tmp_path):
    from dmvae_scale.eval.classifier import features
    from dmvae_scale.eval.score import classifier_fd
    clf = _seeded_classifier(tmp_path / "clf")
    x, y = load_fashion_mnist("test")
    first, second = x[y < 5][:400], x[y >= 5][:400]  # classes 0-4 vs 5-9
    model, _ = load_classifier(clf)
    f1, f2 = features(model, first, batch_size=128), features(model, second)
    assert f1.shape == (400, 128) and np.isfinite(f1).all()
    same = classifier_fd(clf, first, first)
    apart = classifier_fd(clf, first, second)
    scale = float(np.trace(np.cov(f1, rowvar=False)))
    assert abs(same["fd_classifier"]) < 1e-6 * scale, (same["fd_classifier"], scale)
    assert apart["fd_classifier"] > 0.05 * scale, (apart["fd_classifier"], scale)
    assert apart["fd_classifier"] == pytest.approx(_scipy_fd(f1, f2), rel=1e-6)
    proto = apart["fd_classifier_protocol"]
    assert {k: proto[k] for k in ("feature_dim", "num_samples", "num_real")} == {"feature_dim": 128,
                                                                                   "num_samples": 400, "num_real": 400}
    assert len(proto["classifier_sha256"]) == 64


def test_fd_on_classifier_features_is_not_computed_for_fewer_samples_than_its_dimension_plus_one(tmp_path, capsys):
    from dmvae_scale.eval.score import classifier_fd
    clf = _seeded_classifier(tmp_path / "clf")
    x, _ = load_fashion_mnist("test")
    out = classifier_fd(clf, x[:128], x[:500])
    assert out["fd_classifier"] is None
    assert out["fd_classifier_not_computed"] == ("FD-classifier not computed: 128 samples and 500 real images for "
                                                 "128-d classifier features; a full-rank covariance needs at least "
                                                 "129 of each (the rank rule of the FID)")
    assert out["fd_classifier_not_computed"] in capsys.readouterr().out
    assert classifier_fd(clf, x[:129], x[:500])["fd_classifier"] > 0
