"""Scoring a generator, for the pipeline's eval steps and the scaling sweep alike: the real images' FID statistics
computed once per image set and shared by every score, then FID (and the rest of `eval samples`) of a sample set, and
the evaluator classifier's accuracy on it (the share of class-conditional samples it labels as the class they were
drawn for; the classifier is trained on real images only, eval/classifier.py).

    stats = real_statistics(RealImages("fashion-mnist", "test", limit=2000, image_size=32), cache_dir)
    metrics = score_samples("samples/samples.npz", stats, "eval/out", classifier="eval/classifier")
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


def score_samples(samples: str | Path, real_stats: str | Path, out_dir: str | Path, *,
                  classifier: Optional[str | Path] = None, device: Optional[str] = None,
                  opts: EvalOptions = EvalOptions(allow_few_samples=True)) -> dict:
    """gFID (IS, precision/recall where available) of a sample set against real statistics, written to out_dir
    (metrics.json, report.md, grid.png); with `classifier`, its accuracy on the samples too. Returns the metrics."""
    from .commands import eval_samples
    metrics = eval_samples(str(samples), str(real_stats), str(out_dir), device=device, opts=opts)
    if classifier is not None:
        samples_npz = Path(samples)
        if samples_npz.is_dir():
            from .sources import SAMPLES_FILE
            samples_npz = samples_npz / SAMPLES_FILE
        metrics.update(classifier_accuracy(classifier, samples_npz))
    return metrics
