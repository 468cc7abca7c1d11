"""Quality bar of the self-supervised teacher: a linear probe on its pooled features must beat one on raw pixels.

    python tools/ssl_probe.py runs/demo/teacher/artifact [--train-images 10000] [--weights ema] [--out probe.json]

The artifact may be local or on the object store (s3://...). Both probes (and one on a randomly initialised network
of the same architecture, for scale) are fit on the same seeded random Fashion-MNIST training images and scored on
the whole test split (10,000 images), in this one run; see dmvae_scale/eval/ssl_probe.py. The pipeline's `probe`
step runs the same measurement. Prints a table whose last line is the headline (SSL minus pixels, in accuracy
points), and writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dmvae_scale


def main() -> None:
    from dmvae_scale.eval.ssl_probe import format_probe, probe_teacher

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", help="a `teacher` stage artifact directory (local or s3://)")
    p.add_argument("--train-images", type=int, default=10_000)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    report = probe_teacher(args.artifact, args.train_images, args.weights, args.seed)
    print(format_probe(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
