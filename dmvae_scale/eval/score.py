"""Scoring a generator, for the pipeline's eval steps and the scaling sweep alike: the real images' FID statistics
computed once per image set and shared by every score, then FID (and the rest of `eval samples`) of a sample set, and
the evaluator classifier's accuracy on it (the share of class-conditional samples it labels as the class they were
drawn for; the classifier is trained on real images only, eval/classifier.py) and the Frechet distance on its
penultimate features against the same real images (fd_classifier).

    real = RealImages("fashion-mnist", "test", limit=2000, image_size=32)
    stats = real_statistics(real, cache_dir)
    metrics = score_samples("samples/samples.npz", stats, "eval/out", classifier="eval/classifier", real=real)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..log import say
from .evaluate import EvalOptions


@dataclass(frozen=True)
class RealImages:
    """The real images a gFID compares against: a set (built-in name, folder or shards), its split, how many, and
    the size they are brought to (the ADM centre crop, as training data is; None: as stored)."""

    source: str = "fashion-mnist"
    split: str = "test"
    limit: Optional[int] = None
    image_size: Optional[int] = None

    def key(self) -> str:
        """A file name that differs for every set."""
        return f"{self.source.replace('/', '_').replace(':', '_')}-{self.split}-{self.limit}-{self.image_size}"


def real_statistics(images: RealImages, cache_dir: str | Path, *, device: Optional[str] = None,
                    opts: EvalOptions = EvalOptions(allow_few_samples=True)) -> Path:
    """The FID statistics of `images`, computed once into cache_dir/<key>.npz and reused after (Inception runs at
    ~12 img/s on 2 CPU cores: 2,000 images cost ~3 minutes each time they would be redone). An interrupted
    computation leaves only a partial file, which the next call redoes."""
    from .commands import eval_ref
    path = Path(cache_dir) / f"{images.key()}.npz"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.stem + ".partial.npz")
        eval_ref(images.source, str(partial), split=images.split, image_size=images.image_size, limit=images.limit,
                 device=device, opts=opts)
        partial.replace(path)
    return path


def classifier_accuracy(classifier_dir: str | Path, samples_npz: str | Path) -> dict:
    """The evaluator classifier's accuracy on class-conditional samples (an ADM .npz: arr_0 images, arr_1 labels)."""
    import numpy as np

    from .classifier import accuracy, load_classifier
    model, info = load_classifier(classifier_dir)
    with np.load(samples_npz) as z:
        images, labels = z["arr_0"], z["arr_1"]
    acc = accuracy(model, images, labels)
    say("eval", f"evaluator classifier: {acc:.1%} of {len(images)} samples are classified as the class they were drawn "
                f"for (it scores {info['test_accuracy']:.1%} on real test images)")
    return {"classifier_accuracy": acc, "classifier_real_test_accuracy": info["test_accuracy"]}


CLASSIFIER_NETWORK = "eval-classifier-penultimate"


def classifier_fd(classifier_dir: str | Path, sample_images, real_images, *, device: Optional[str] = None) -> dict:
    """The Frechet distance between the evaluator classifier's penultimate features of the samples and of the real
    images (uint8 arrays), through metrics.fid (which refuses complex or NaN results), with its protocol.

    The rank rule of the Inception FID holds here strictly: a set with no more images than the feature dimension
    gives no number, "fd_classifier": None and the reason in "fd_classifier_not_computed"."""
    from ..artifacts import sha256_of_file
    from .classifier import features, load_classifier
    from .metrics import fid, min_samples_for_fid
    from .stats import FeatureStats
    model, _ = load_classifier(classifier_dir)
    ident = sha256_of_file(Path(classifier_dir) / "classifier.safetensors")
    fake = features(model, sample_images, device=device)
    real = features(model, real_images, device=device)
    protocol = {"feature_dim": int(fake.shape[1]), "num_samples": len(fake), "num_real": len(real),
                "classifier_sha256": ident}
    need = min_samples_for_fid(protocol["feature_dim"])
    if min(len(fake), len(real)) < need:
        reason = (f"FD-classifier not computed: {len(fake)} samples and {len(real)} real images for "
                  f"{protocol['feature_dim']}-d classifier features; a full-rank covariance needs at least {need} of "
                  f"each (the rank rule of the FID)")
        say("eval", reason)
        return {"fd_classifier": None, "fd_classifier_not_computed": reason, "fd_classifier_protocol": protocol}
    value = fid(*[FeatureStats.from_features(f, CLASSIFIER_NETWORK, ident, source=role)
                  for f, role in ((fake, "samples"), (real, "real images"))])
    say("eval", f"FD on the evaluator classifier's {protocol['feature_dim']}-d penultimate features: {value:.3f} "
                f"({len(fake)} samples against {len(real)} real images)")
    return {"fd_classifier": value, "fd_classifier_protocol": protocol}


def real_images(images: RealImages):
    """The real images of a set as one uint8 array (what the FID statistics are computed from)."""
    from .sources import open_image_set
    return open_image_set(images.source, images.split, images.image_size, images.limit).array()


def score_samples(samples: str | Path, real_stats: str | Path, out_dir: str | Path, *,
                  classifier: Optional[str | Path] = None, real: Optional[RealImages] = None,
                  device: Optional[str] = None, opts: EvalOptions = EvalOptions(allow_few_samples=True)) -> dict:
    """gFID (IS, precision/recall where available) of a sample set against real statistics, written to out_dir
    (metrics.json, report.md, grid.png); with `classifier`, its accuracy on the samples too, and with `real` (the
    set the statistics are of) the Frechet distance on its features (classifier_fd). Returns the metrics."""
    from .commands import eval_samples
    metrics = eval_samples(str(samples), str(real_stats), str(out_dir), device=device, opts=opts)
    if classifier is not None:
        samples_npz = Path(samples)
        if samples_npz.is_dir():
            from .sources import SAMPLES_FILE
            samples_npz = samples_npz / SAMPLES_FILE
        metrics.update(classifier_accuracy(classifier, samples_npz))
        if real is not None:
            import numpy as np
            with np.load(samples_npz) as z:
                sample_images = z["arr_0"]
            metrics.update(classifier_fd(classifier, sample_images, real_images(real), device=device))
            metrics["fd_classifier_protocol"]["real_images"] = real.key()
    return metrics
