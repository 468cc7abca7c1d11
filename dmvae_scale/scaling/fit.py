"""Scaling-law fits: a saturating power law L(C) = a * C^(-b) + c, a bootstrap interval for b, the frontier.

The fit runs in normalised compute x = C / C0 (C0 the geometric mean of the points) so the optimiser sees numbers near
1 whatever the FLOP scale; `a` is reported back in the units of C. scipy's `curve_fit` does the optimisation (bounded
trust-region: a > 0, 0 < b < 5, 0 <= c < min L, since loss and gFID are non-negative and the floor lies below every
point).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from ..errors import UserError

MIN_POINTS = 3  # three parameters


class FitError(UserError):
    """Too few or unusable points for a fit."""


@dataclass(frozen=True)
class PowerLaw:
    a: float
    b: float  # the exponent
    c: float  # the floor (irreducible loss)
    rmse: float
    points: int
    b_low: Optional[float] = None  # bootstrap interval for b
    b_high: Optional[float] = None
    confidence: Optional[float] = None

    def __call__(self, compute):
        return self.a * np.asarray(compute, dtype=float) ** (-self.b) + self.c

    def describe(self) -> str:
        ci = "" if self.b_low is None else f" [{self.b_low:.3f}, {self.b_high:.3f}] ({self.confidence:.0%} bootstrap)"
        return f"L(C) = {self.a:.4g} * C^-{self.b:.3f} + {self.c:.4g}; b = {self.b:.3f}{ci}; rmse {self.rmse:.3g}"


def _check(compute: Sequence[float], loss: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(compute, dtype=float), np.asarray(loss, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[keep], y[keep]
    if len(np.unique(x)) < MIN_POINTS:
        raise FitError(f"a saturating power law has 3 parameters and needs points at >= {MIN_POINTS} distinct "
                       f"compute values with finite metrics; got {len(np.unique(x))}")
    return x, y


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> PowerLaw:
    """Least-squares fit of loss = a * compute^-b + c."""
    from scipy.optimize import curve_fit
    x, y = _check(compute, loss)
    c0 = float(np.exp(np.mean(np.log(x))))
    xn = x / c0
    floor_max = float(y.min()) * (1 - 1e-9)
    # Start from a log-log line through the points above a floor at half the smallest value.
    c_init = 0.5 * floor_max
    slope = np.polyfit(np.log(xn), np.log(np.maximum(y - c_init, 1e-12)), 1)[0]
    b_init = float(np.clip(-slope, 1e-3, 4.9))
    a_init = float(max(np.exp(np.mean(np.log(np.maximum(y - c_init, 1e-12)) + b_init * np.log(xn))), 1e-12))

    def law(xv, a, b, c):
        return a * xv ** (-b) + c

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OptimizeWarning on a flat covariance; we do not use the covariance
        try:
            (a, b, c), _ = curve_fit(law, xn, y, p0=[a_init, b_init, c_init],
                                     bounds=([0.0, 0.0, 0.0], [np.inf, 5.0, max(floor_max, 1e-12)]), maxfev=20000)
        except (RuntimeError, ValueError) as exc:
            raise FitError(f"the power-law fit did not converge on {len(x)} points: {exc}") from None
    rmse = float(np.sqrt(np.mean((law(xn, a, b, c) - y) ** 2)))
    return PowerLaw(float(a * c0 ** b), float(b), float(c), rmse, len(x))


def bootstrap_exponent(compute: Sequence[float], loss: Sequence[float], samples: int = 1000, confidence: float = 0.9,
                       seed: int = 0) -> PowerLaw:
    """The fit of all points, with a percentile bootstrap interval for b from refits on points drawn with
    replacement (resamples with fewer than 3 distinct compute values, or that fail to fit, are redrawn)."""
    x, y = _check(compute, loss)
    best = fit_power_law(x, y)
    rng = np.random.default_rng(seed)
    exponents: list[float] = []
    tries = 0
    while len(exponents) < samples and tries < 5 * samples:
        tries += 1
        pick = rng.integers(0, len(x), len(x))
        if len(np.unique(x[pick])) < MIN_POINTS:
            continue
        try:
            exponents.append(fit_power_law(x[pick], y[pick]).b)
        except FitError:
            continue
    if len(exponents) < samples // 2:
        return best
    tail = (1 - confidence) / 2
    low, high = np.quantile(exponents, [tail, 1 - tail])
    return PowerLaw(best.a, best.b, best.c, best.rmse, best.points, float(low), float(high), confidence)


@dataclass(frozen=True)
class FrontierPoint:
    compute: float
    loss: float
    label: str  # which run (size) is best at this compute
    params: Optional[float] = None


def compute_frontier(points: Iterable[tuple[float, float, str, Optional[float]]]) -> list[FrontierPoint]:
    """The compute-optimal frontier: the points (compute, loss, label, params) that no point of equal or smaller
    compute beats, in increasing compute (the lower envelope of all sizes' curves at the measured budgets)."""
    ordered = sorted(((float(c), float(v), s, p) for c, v, s, p in points if math.isfinite(v)),
                     key=lambda t: (t[0], t[1]))
    frontier: list[FrontierPoint] = []
    best = math.inf
    for c, v, label, params in ordered:
        if v < best:
            frontier.append(FrontierPoint(c, v, label, params))
            best = v
    return frontier


def optimal_size_exponent(frontier: Sequence[FrontierPoint]) -> Optional[float]:
    """Slope of log(params) against log(compute) along the frontier (N_opt ~ C^slope), None with < 2 sizes."""
    pts = [(f.compute, f.params) for f in frontier if f.params]
    if len({p for _, p in pts}) < 2:
        return None
    c, p = np.log([q[0] for q in pts]), np.log([q[1] for q in pts])
    return float(np.polyfit(c, p, 1)[0])
