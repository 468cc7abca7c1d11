"""`dmvae-scale scaling`: the sweep file's checks, the grid of run configs, retry-then-report bookkeeping, and (the
integration test) a real 2 x 2 sweep killed mid-way and rerun, which finishes only the missing points."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repo import REPO, tokenizer_artifact
from dmvae_scale.cli import main as cli_main
from dmvae_scale.scaling.sweep import SweepRunner, load_sweep, plan_points, read_table



def write_sweep(path: Path, out: Path, **extra) -> Path:
    data = {"name": "t", "out": str(out), "base": str(REPO / "configs/demo/generator.yaml"),
            "overrides": ["distributed.num_workers=1", "batch_size=32"],  # pinned: the demo config may change
            "sizes": {"a": {"depth": 1, "hidden_size": 32, "num_heads": 2},
                      "b": {"depth": 2, "hidden_size": 64, "num_heads": 4}},
            "budgets": [64, 128]}
    data.update(extra)
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


@pytest.mark.unit
def test_grid_of_run_configs(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", tmp_path / "out",
                                   latents={"x": "tok1", "y": {"tokenizer": "tok2", "latents": "s3://b/lat"}}))
    points = plan_points(sweep)
    assert [p.id for p in points][:4] == ["x_a_64", "x_a_128", "x_b_64", "x_b_128"] and len(points) == 8
    assert points[4].cfg.data.latents == "s3://b/lat" and points[4].cfg.inputs.tokenizer == str(Path("tok2").resolve())
    assert points[0].cfg.data.latents is None
    p = points[3]
    assert (p.cfg.score.depth, p.cfg.score.hidden_size, p.cfg.total_images) == (2, 64, 128)
    assert p.cfg.run_dir == str((tmp_path / "out/points/x_b_128/run").resolve())
    assert p.cfg.inputs.tokenizer == str(Path("tok1").resolve())
    assert p.cfg.ckpt_every_images == 64 and p.cfg.log_every_images == 32  # a checkpoint mid-way, logs per step


@pytest.mark.unit
def test_shipped_example_sweeps_plan_their_grid():
    for path in sorted((REPO / "configs" / "scaling").glob("*.yaml")):
        points = plan_points(load_sweep(path))
        assert len(points) == 9 and all(p.cfg.stage == "generator" for p in points), path


@pytest.mark.unit
@pytest.mark.parametrize("extra,message", [
    ({"sizes": {"a": {"depth": 1, "hidden_size": 30, "num_heads": 4}}}, "sweep point default_a_64"),
    ({"sizes": {"a": {"dept": 1}}}, "unknown config key 'score.dept'"),
    ({"budgets": []}, "'budgets' must list positive image counts"),
    ({"sizes": ["S"]}, "'sizes' must map size names"),
    ({"max_concurent": 2}, "did you mean max_concurrent"),
    ({"latents": {"x": {"tokeniser": "t"}}}, "{tokenizer: ARTIFACT, latents: LATENT_CACHE}"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, capsys, extra, message):
    path = write_sweep(tmp_path / "s.yaml", tmp_path / "out", **extra)
    assert cli_main(["scaling", str(path)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.unit
def test_failed_point_is_retried_once_then_reported_and_the_sweep_goes_on(tmp_path):
    """Bookkeeping only: the training function is replaced by one that fails for point a_64 every time and on the
    first attempt of b_64, and otherwise writes what a finished run leaves (metrics, artifact manifest)."""
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", tmp_path / "out", budgets=[64], eval={"enabled": False}))
    calls = []

    def train_fn(cfg, address=None):
        calls.append(cfg.name)
        if cfg.name.endswith("a_64") or calls.count(cfg.name) == 1:
            raise RuntimeError(f"worker died in {cfg.name}")
        run = Path(cfg.run_dir)
        (run / "artifact").mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps({"images": 64, "fm_loss": 0.5, "images_per_second": 10.0}))
        (run / "artifact" / "artifact.json").write_text("{}")
        from dmvae_scale.train.launch import TrainResult
        return TrainResult("done", "", 64, 2, 0, "", str(run / "artifact"), 1.0)

    rows = {r["point"]: r for r in SweepRunner(sweep, train_fn=train_fn).run()}
    assert calls == ["t-default_a_64", "t-default_a_64", "t-default_b_64", "t-default_b_64"]
    assert rows["default_a_64"]["status"] == "failed" and rows["default_a_64"]["attempts"] == 2
    assert "worker died in t-default_a_64" in rows["default_a_64"]["error"]
    assert rows["default_b_64"]["status"] == "done" and rows["default_b_64"]["final_loss"] == 0.5
    table = {r["point"]: r for r in read_table(tmp_path / "out/results.csv")}
    assert table["default_a_64"]["status"] == "failed" and table["default_b_64"]["train_flops"] == \
        rows["default_b_64"]["flops_per_image"] * 64


# ----------------------------------------------------------------------------------------------------------------------
# A real sweep, killed and rerun
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep_inputs(tmp_path_factory):
    """A demo tokenizer artifact (decoder stage, random weights, latent statistics) and 128 Fashion-MNIST images."""
    from dmvae_scale.data.shards import write_shards
    root = tmp_path_factory.mktemp("sweep_inputs")
    tokenizer_artifact(root / "tokenizer", "decoder", latent=(0.1, 2.0), ema=True)
    write_shards("fashion-mnist", str(root / "shards"), limit=128, progress=False)
    return root


def _sweep_cmd(path: Path) -> list[str]:
    return [sys.executable, "-m", "dmvae_scale.cli", "scaling", str(path)]


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_killed_sweep_reruns_only_the_missing_points(sweep_inputs, tmp_path):
    out = tmp_path / "out"
    path = write_sweep(tmp_path / "s.yaml", out, latents={"rnd": str(sweep_inputs / "tokenizer")},
                       overrides=["distributed.num_workers=1", "batch_size=32",
                                  f"data.source={sweep_inputs / 'shards'}", "data.limit=null"],
                       eval={"num_samples": 20, "batch_size": 20, "sampler": {"method": "ode_euler", "steps": 2},
                             "real_images": {"limit": 100}})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first_state = out / "points/rnd_a_64/state.json"
    with open(tmp_path / "run1.log", "w") as log:
        proc = subprocess.Popen(_sweep_cmd(path), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.time() + 600
            while time.time() < deadline and proc.poll() is None:
                state = json.loads(first_state.read_text()) if first_state.is_file() else {}
                if state.get("status") == "done":
                    break
                time.sleep(1)
            assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the sweep and the embedded Ray it started (its session)
            proc.wait()
    killed_state = first_state.read_text()
    done_before = [p for p in ("rnd_a_64", "rnd_a_128", "rnd_b_64", "rnd_b_128")
                   if json.loads((out / "points" / p / "state.json").read_text() if (out / "points" / p /
                                 "state.json").is_file() else "{}").get("status") == "done"]
    assert done_before == ["rnd_a_64"]

    rerun = subprocess.run(_sweep_cmd(path), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=800)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-3000:]
    assert "1 finished earlier" in log and "[sweep] rnd_a_64: finished earlier, skipped" in log
    assert "training a for 64 images" not in log  # the finished point did not train again
    for point in ("rnd_a_128", "rnd_b_64", "rnd_b_128"):
        assert f"[sweep] {point}: done" in log
    assert first_state.read_text() == killed_state  # its result untouched

    rows = {r["point"]: r for r in read_table(out / "results.csv")}
    assert sorted(rows) == ["rnd_a_128", "rnd_a_64", "rnd_b_128", "rnd_b_64"]
    for r in rows.values():
        assert r["status"] == "done" and r["images_seen"] == r["budget_images"]
        assert r["train_flops"] == r["flops_per_image"] * r["images_seen"] and r["gfid"] > 0 and r["final_loss"] > 0
    assert (out / "report.md").is_file() and (out / "final_loss_vs_compute.png").is_file()


@pytest.mark.unit
def test_report_only_refits_from_the_table(tmp_path, capsys):
    from dmvae_scale.scaling.sweep import write_table
    path = write_sweep(tmp_path / "s.yaml", tmp_path / "out")
    rows = [{"point": f"p{i}", "latent": "default", "size": "a", "params": 1000, "images_seen": 2 ** i,
             "train_flops": 1e9 * 2 ** i, "final_loss": 3.0 * (1e9 * 2 ** i) ** -0.25 + 0.1, "status": "done"}
            for i in range(5)]
    write_table(rows, tmp_path / "out")
    assert cli_main(["scaling", str(path), "--report-only"]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "b = 0.250" in report and (tmp_path / "out" / "final_loss_vs_compute.png").is_file()
    assert cli_main(["scaling", str(write_sweep(tmp_path / "t.yaml", tmp_path / "none")), "--report-only"]) == 2
    assert "does not exist; run the sweep first" in capsys.readouterr().err
