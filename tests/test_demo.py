"""The main job, end to end, as a user runs it: `dmvae-scale demo` (shrunk with --scale so CI can afford it)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmvae_scale.artifacts import read_artifact_info

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_every_stage_and_evaluates(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "dmvae_scale.cli", "demo", "--out", str(out), "--images", "256",
                        "--scale", "0.05", "--per-class", "1", "--eval-images", "40", "--workers", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = [row["stage"] for row in summary["stages"]]
    assert stages == ["tokenizer", "reference", "dmd", "decoder", "generator"]
    # Each stage's artifact names the one it was trained from: the chain is explicit, not implied by paths.
    infos = {s: read_artifact_info(out / s / "artifact") for s in stages}
    assert infos["reference"].upstream["tokenizer"] == infos["tokenizer"].id
    assert infos["dmd"].upstream["reference"] == infos["reference"].id
    assert infos["generator"].upstream["tokenizer"] == infos["decoder"].id
    assert infos["generator"].latent is not None and infos["generator"].latent.scale > 0
    for row in summary["stages"]:
        assert row["images"] > 0 and row["steps"] > 0
    samples = np.load(out / "samples" / "samples.npz")["arr_0"]
    assert samples.shape == (10, 32, 32, 3) and samples.dtype == np.uint8
    fid = summary["metrics"]["fid"]
    assert np.isfinite(fid) and fid > 0
    assert (out / "eval" / "report.md").read_text().startswith("#")
    assert "demo done in" in r.stdout
