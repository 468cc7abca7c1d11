"""Differences between two arms of a study, paired by chain seed, with their intervals.

A study runs every arm with the same chain seeds (teacher through generator), so arm A's seed k and arm B's seed k share
their data order and their generator's noise and labels; the difference of one metric between them, seed by seed, is
the quantity a claim is about ("DMVAE's gFID is lower than the lambda=0 arm's"). `paired_difference` reports its mean
over seeds and two intervals:

- a paired bootstrap: whole seed pairs resampled with replacement (the pairing kept), percentile interval of the mean;
- Student's t on the per-seed differences (n - 1 degrees of freedom).

At three seeds the bootstrap has only 10 distinct resample means and its percentile interval is too narrow, so the
verdict is read from the wider of the two intervals, and a claim holds only when that interval lies wholly on the
claimed side of zero. With fewer than two shared seeds there is no interval and no verdict.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Optional

import numpy as np

from ..errors import UserError


@dataclass
class PairedDifference:
    metric: str
    a: str
    b: str
    seeds: list[int]
    differences: list[float]  # a - b, per shared seed, in `seeds` order
    mean: float
    bootstrap: tuple[float, float]  # percentile interval of the mean difference (nan when < 2 seeds)
    t_interval: tuple[float, float]
    level: float
    lower_is_better: bool

    @property
    def interval(self) -> tuple[float, float]:
        """The wider of the two intervals: what a verdict is read from."""
        lo = min(self.bootstrap[0], self.t_interval[0])
        hi = max(self.bootstrap[1], self.t_interval[1])
        return lo, hi

    def verdict(self) -> str:
        """'holds' when the interval says `a` is better than `b`, 'reversed' when it says worse, else 'not shown'."""
        if len(self.seeds) < 2:
            return "not shown (fewer than 2 paired seeds)"
        lo, hi = self.interval
        better_side = hi < 0 if self.lower_is_better else lo > 0
        worse_side = lo > 0 if self.lower_is_better else hi < 0
        return "holds" if better_side else "reversed" if worse_side else "not shown (interval spans 0)"

    def line(self) -> str:
        lo, hi = self.interval
        return (f"{self.metric}: {self.a} - {self.b} = {self.mean:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                f"({self.level:.0%}, {len(self.seeds)} paired seeds): {self.verdict()}")

    def to_json(self) -> dict:
        return {**asdict(self), "interval": list(self.interval), "verdict": self.verdict()}


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], *, metric: str, names: tuple[str, str],
                      lower_is_better: bool = True, level: float = 0.95, resamples: int = 10_000,
                      seed: int = 0) -> PairedDifference:
    """The per-seed difference a - b of one metric over the seeds both arms have (a: {seed: value})."""
    if not 0 < level < 1:
        raise UserError(f"level: a confidence level in (0, 1), got {level}")
    if resamples < 1:
        raise UserError(f"resamples: must be positive, got {resamples}")
    seeds = sorted(set(a) & set(b))
    bad = [(name, k) for name, arm in zip(names, (a, b)) for k in seeds if not math.isfinite(float(arm[k]))]
    if bad:
        raise UserError(f"{metric}: not a finite number for {', '.join(f'{n} seed {k}' for n, k in bad)}; "
                        f"an arm's evaluation failed or was not run: rerun the study to finish it")
    d = np.array([float(a[k]) - float(b[k]) for k in seeds])
    nan = (float("nan"), float("nan"))
    if len(d) == 0:
        return PairedDifference(metric, *names, [], [], float("nan"), nan, nan, level, lower_is_better)
    if len(d) < 2:
        return PairedDifference(metric, *names, seeds, d.tolist(), float(d.mean()), nan, nan, level,
                                lower_is_better)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    tail = (1 - level) / 2
    boot = (float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)))
    t_interval = _t_interval(d, level)
    return PairedDifference(metric, *names, seeds, d.tolist(), float(d.mean()), boot, t_interval, level,
                            lower_is_better)


def _t_interval(d: np.ndarray, level: float) -> tuple[float, float]:
    from scipy.stats import t
    half = float(t.ppf(0.5 + level / 2, len(d) - 1)) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return float(d.mean()) - half, float(d.mean()) + half


def arm_values(rows: list[dict], arm: str, metric: str, *, by: str = "arm") -> dict[int, float]:
    """{seed: value} of one metric for the rows of one arm (rows carry their tags: arm, seed)."""
    out: dict[int, float] = {}
    for r in rows:
        if r.get(by) == arm and r.get(metric) is not None:
            seed = int(r["seed"])
            if seed in out:
                raise UserError(f"{by}={arm}: two evaluations for seed {seed}; give each eval step its own seed tag")
            out[seed] = float(r[metric])
    return out


def compare_arms(rows: list[dict], a: str, b: str, metric: str, *, by: str = "arm",
                 lower_is_better: Optional[bool] = None, **kw) -> PairedDifference:
    """paired_difference of two arms' rows; lower is better unless the metric is an accuracy."""
    if lower_is_better is None:
        lower_is_better = "acc" not in metric
    return paired_difference(arm_values(rows, a, metric, by=by), arm_values(rows, b, metric, by=by), metric=metric,
                             names=(a, b), lower_is_better=lower_is_better, **kw)
