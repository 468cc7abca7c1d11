"""Scaling-law fits on synthetic points with known exponents, the frontier, and the report files."""
import numpy as np
import pytest

from dmvae_scale.scaling.fit import (FitError, bootstrap_exponent, compute_frontier, fit_power_law,
                                     optimal_size_exponent)
from dmvae_scale.scaling.report import write_report

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("a,b,c", [(3.0e4, 0.3, 0.5), (50.0, 0.12, 2.0), (1e7, 0.55, 0.0)])
def test_fit_recovers_known_law(a, b, c):
    compute = np.geomspace(1e12, 1e17, 12)
    loss = a * compute ** -b + c
    law = fit_power_law(compute, loss)
    assert law.b == pytest.approx(b, rel=1e-3)
    assert law.c == pytest.approx(c, abs=1e-3 * max(loss))
    assert law(compute) == pytest.approx(loss, abs=1e-4 * max(loss))


def test_bootstrap_interval_covers_the_true_exponent_under_noise():
    rng = np.random.default_rng(1)
    compute = np.geomspace(1e13, 1e17, 15)
    loss = 2e3 * compute ** -0.25 + 0.3
    noisy = loss * (1 + 0.01 * rng.standard_normal(len(loss)))
    law = bootstrap_exponent(noisy * 0 + compute, noisy, samples=300, confidence=0.9)
    assert law.b_low < 0.25 < law.b_high
    assert law.b_high - law.b_low < 0.15  # 1% noise over 4 decades pins the exponent
    assert law.b_low <= law.b <= law.b_high


def test_fit_refuses_too_few_points():
    with pytest.raises(FitError, match="needs points at >= 3 distinct compute values"):
        fit_power_law([1e12, 1e12, 1e13], [1.0, 0.9, 0.8])


def test_frontier_is_the_lower_envelope():
    # Small model better at low compute, large model better at high compute.
    pts = [(1, 5.0, "S", 10), (2, 4.0, "S", 10), (4, 3.6, "S", 10),
           (2, 4.5, "B", 40), (4, 3.2, "B", 40), (8, 2.5, "B", 40), (8, 2.9, "S", 10)]
    front = compute_frontier(pts)
    assert [(f.compute, f.label) for f in front] == [(1, "S"), (2, "S"), (4, "B"), (8, "B")]
    assert optimal_size_exponent(front) == pytest.approx(np.polyfit(np.log([1, 2, 4, 8]), np.log([10, 10, 40, 40]),
                                                                    1)[0])


def test_report_writes_plots_and_markdown(tmp_path):
    rows = []
    for size, params, shift in [("S", 1e6, 0.0), ("B", 4e6, -0.05), ("L", 1.6e7, -0.08)]:
        for images in (1e3, 1e4, 1e5):
            flops = 6 * params * images
            rows.append({"point": f"{size}-{int(images)}", "latent": "dmvae", "size": size, "params": params,
                         "images_seen": images, "train_flops": flops, "status": "done",
                         "final_loss": 40 * flops ** -0.2 + 0.3 + shift * 0, "gfid": 5e3 * flops ** -0.3 + 2})
    rows.append({"point": "failed", "latent": "dmvae", "size": "L", "status": "failed"})
    result = write_report(rows, tmp_path, bootstrap=50)
    report = (tmp_path / "report.md").read_text()
    assert sorted(p.split("/")[-1] for p in result["plots"]) == ["final_loss_vs_compute.png", "gfid_vs_compute.png"]
    for p in result["plots"]:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert result["fits"]["gfid"]["dmvae"]["law"].b == pytest.approx(0.3, rel=0.01)
    assert "9 finished points of 10" in report and "b = 0.300" in report and "| failed |" in report
