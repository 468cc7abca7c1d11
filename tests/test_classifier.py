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
