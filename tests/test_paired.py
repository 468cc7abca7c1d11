"""Paired differences between study arms (eval/paired.py): pairing by chain seed, the bootstrap over seed pairs against
its exact distribution, Student's t at known values, the verdict read from the wider interval, and refusals."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dmvae_scale.errors import UserError
from dmvae_scale.eval.paired import compare_arms, paired_difference

pytestmark = pytest.mark.unit


def test_t_interval_matches_the_textbook_value_and_spanning_zero_is_not_shown():
    # d = [-2, -3, -1]: mean -2, sd 1, t(0.975, 2) = 4.3027 -> half width 4.3027 / sqrt(3) = 2.4841
    r = paired_difference({0: 10.0, 1: 11.0, 2: 12.0}, {0: 12.0, 1: 14.0, 2: 13.0}, metric="gfid",
                          names=("dmvae", "lambda0"))
    assert r.seeds == [0, 1, 2] and r.differences == [-2.0, -3.0, -1.0] and r.mean == -2.0
    assert r.t_interval == pytest.approx((-2 - 2.48414, -2 + 2.48414), abs=1e-4)
    assert r.interval[0] <= r.bootstrap[0] and r.interval[1] >= r.bootstrap[1]
    assert r.verdict() == "not shown (interval spans 0)"
    assert r.line() == ("gfid: dmvae - lambda0 = -2.000 [-4.484, +0.484] (95%, 3 paired seeds): "
                        "not shown (interval spans 0)")


def test_bootstrap_over_seed_pairs_matches_its_exact_distribution():
    # d = [0, 0, 3]: a resample's mean is 3k/3 with k ~ Binomial(3, 1/3): P(mean = 3) = 1/27 > 2.5%, P(0) = 8/27
    r = paired_difference({0: 0.0, 1: 0.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0}, metric="gfid", names=("a", "b"))
    assert r.bootstrap == (0.0, 3.0)
    # the same inputs and resampling seed give the same result
    assert paired_difference({0: 0.0, 1: 0.0, 2: 3.0}, {0: 0, 1: 0, 2: 0}, metric="gfid", names=("a", "b")) == r


def test_pairs_only_shared_seeds_and_order_of_entry_does_not_matter():
    a = {2: 5.0, 0: 4.0, 1: 4.5, 7: 100.0}   # seed 7 has no partner: left out
    b = {1: 6.0, 2: 6.5, 0: 5.0, 9: -100.0}
    r = paired_difference(a, b, metric="gfid", names=("dmvae", "kl"))
    assert r.seeds == [0, 1, 2] and r.differences == [-1.0, -1.5, -1.5]
    lo, hi = r.interval
    assert hi < 0 and r.verdict() == "holds"


def test_a_consistent_loss_is_reported_reversed_and_accuracy_counts_higher_as_better():
    worse = paired_difference({0: 9.0, 1: 9.2, 2: 9.1}, {0: 8.0, 1: 8.1, 2: 8.05}, metric="gfid", names=("a", "b"))
    assert worse.verdict() == "reversed"
    rows = [{"arm": "dmvae", "seed": s, "accuracy": v} for s, v in enumerate([0.71, 0.72, 0.70])] + \
           [{"arm": "random", "seed": s, "accuracy": v} for s, v in enumerate([0.60, 0.62, 0.61])]
    acc = compare_arms(rows, "dmvae", "random", "accuracy")
    assert not acc.lower_is_better and acc.mean == pytest.approx(0.1) and acc.verdict() == "holds"


def test_fewer_than_two_seeds_give_no_interval_and_no_verdict():
    r = paired_difference({0: 1.0}, {0: 2.0, 1: 3.0}, metric="gfid", names=("a", "b"))
    assert r.mean == -1.0 and all(math.isnan(v) for v in r.bootstrap + r.t_interval)
    assert r.verdict() == "not shown (fewer than 2 paired seeds)"
    assert paired_difference({}, {0: 1.0}, metric="gfid", names=("a", "b")).seeds == []


def test_refusals_name_the_input():
    with pytest.raises(UserError, match=r"^gfid: not a finite number for b seed 1; an arm's evaluation failed"):
        paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: float("nan")}, metric="gfid", names=("a", "b"))
    with pytest.raises(UserError, match=r"^level: a confidence level in \(0, 1\), got 95"):
        paired_difference({0: 1.0}, {0: 1.0}, metric="gfid", names=("a", "b"), level=95)
    rows = [{"arm": "a", "seed": 0, "gfid": 1.0}, {"arm": "a", "seed": 0, "gfid": 2.0}]
    with pytest.raises(UserError, match="arm=a: two evaluations for seed 0"):
        compare_arms(rows, "a", "b", "gfid")


def test_to_json_carries_the_interval_and_verdict():
    r = paired_difference({0: 1.0, 1: 1.1, 2: 0.9}, {0: 2.0, 1: 2.1, 2: 2.0}, metric="fd_classifier",
                          names=("a", "b"))
    doc = r.to_json()
    assert doc["verdict"] == "holds" and doc["interval"] == list(r.interval) and np.isfinite(doc["mean"])
