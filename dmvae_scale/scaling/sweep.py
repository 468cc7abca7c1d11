"""`dmvae-scale scaling SWEEP.yaml`: a grid of generator runs (sizes x budgets x latent spaces) that runs itself.

Each point is an ordinary generator run (`train.launch.train`, DeepSpeed workers under Ray Train) in its own run
directory OUT/points/<point>/run, at most `max_concurrent` at once on one Ray cluster (embedded on loopback unless
--address names one), then evaluated at the sweep's fixed sampler settings (gFID on a small sample count against
real-image statistics computed once per sweep). Rerunning the sweep:
  - skips a point whose OUT/points/<point>/result.json says done (written last, after its artifact manifest and
    evaluation exist);
  - resumes a point that has checkpoints but no artifact (train() resumes from the latest complete checkpoint);
  - evaluates a point whose artifact exists but whose evaluation does not.
A point that raises is retried (`retries`, default once; the retry resumes from its checkpoints); if it fails again
it is reported (status failed, the error in the table) and the sweep goes on. Results: OUT/results.csv (and
results.parquet when pyarrow imports), rewritten as each point finishes, then report.md and PNGs (scaling/report.py).
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..log import say
from ..config import ConfigError, RunConfig, SamplerConfig, from_dict, load_config, read_yaml, worker_range
from ..errors import UserError
from ..eval.score import RealImages
from ..models.dit import param_count, resolve_shape
from ..models.flops import dit_flops

RESULT_COLUMNS = ("point", "latent", "size", "params", "budget_images", "images_seen", "flops_per_image",
                  "train_flops", "final_loss", "gfid", "classifier_accuracy", "images_per_s", "achieved_tflops", "mfu", "train_s", "eval_s",
                  "wall_s", "attempts", "status", "error")


class SweepError(UserError):
    """A sweep file that does not describe a grid of generator runs."""


class SweepStopped(UserError):
    """A point's run was asked to stop (SIGTERM / SIGINT): the sweep stops too; rerun it to resume."""


@dataclass
class SweepEval:
    enabled: bool = True
    num_samples: int = 100  # small on purpose: a relative gFID to compare points, not a publishable number
    batch_size: int = 50
    device: str = "cpu"
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(method="ode_heun", steps=10))
    # The real images gFID is measured against (their statistics computed once per sweep, under OUT/eval/real).
    real_images: RealImages = field(default_factory=lambda: RealImages(image_size=32, limit=500))
    # An evaluator classifier's directory (classifier.json + classifier.safetensors, trained on real images only,
    # e.g. a pipeline's eval/classifier): the share of each point's class-conditional samples it labels as their
    # class goes beside gFID. None: no accuracy column values.
    classifier: Optional[str] = None


@dataclass
class SweepConfig:
    name: str = "sweep"
    out: str = "runs/scaling"
    base: str = ""  # the generator config every point starts from
    overrides: list[str] = field(default_factory=list)  # dotted overrides for every point
    sizes: Any = None  # {name: {DiTConfig field: value}} e.g. {tiny: {depth: 1, hidden_size: 32, num_heads: 2}}
    budgets: list[int] = field(default_factory=list)  # images seen per point (total_images)
    latents: Any = None  # optional {name: tokenizer artifact, or {tokenizer: artifact, latents: its latent cache}}
    max_concurrent: int = 1
    retries: int = 1
    eval: SweepEval = field(default_factory=SweepEval)


@dataclass(frozen=True)
class Point:
    id: str
    latent: str
    size: str
    budget: int
    cfg: RunConfig

    @property
    def dir(self) -> Path:
        return Path(self.cfg.run_dir).parent


def load_sweep(path: str | Path) -> SweepConfig:
    data = read_yaml(path)
    sweep = from_dict(SweepConfig, data)
    if not sweep.base:
        raise SweepError(f"{path}: 'base' must name the generator config every point starts from "
                         "(e.g. configs/demo/generator.yaml)")
    if not isinstance(sweep.sizes, dict) or not sweep.sizes or \
            not all(isinstance(v, dict) for v in sweep.sizes.values()):
        raise SweepError(f"{path}: 'sizes' must map size names to score settings, e.g. "
                         "{tiny: {depth: 1, hidden_size: 32, num_heads: 2}, S: {size: S}}")
    if not sweep.budgets or any(b <= 0 for b in sweep.budgets):
        raise SweepError(f"{path}: 'budgets' must list positive image counts, got {sweep.budgets}")
    if sweep.latents is not None:
        def valid(v):
            return isinstance(v, str) or (isinstance(v, dict) and set(v) <= {"tokenizer", "latents"} and
                                          isinstance(v.get("tokenizer"), str))
        if not isinstance(sweep.latents, dict) or not all(valid(v) for v in sweep.latents.values()):
            raise SweepError(f"{path}: 'latents' must map latent-space names to a tokenizer artifact path, or to "
                             "{tokenizer: ARTIFACT, latents: LATENT_CACHE} (a `data cache-latents` output)")
    if sweep.max_concurrent < 1 or sweep.retries < 0:
        raise SweepError(f"{path}: max_concurrent >= 1 and retries >= 0 are required")
    return sweep


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-")


def _resolve(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def _round_to(value: int, multiple: int) -> int:
    return max(multiple, value // multiple * multiple)


def plan_points(sweep: SweepConfig) -> list[Point]:
    """Every (latent, size, budget) of the grid as a RunConfig, validated now (a bad size fails before any run)."""
    out = Path(sweep.out).resolve()
    latents = sweep.latents or {"default": None}
    points = []
    for latent, tokenizer in latents.items():
        for size, score in sweep.sizes.items():
            for budget in sweep.budgets:
                pid = f"{_slug(latent)}_{_slug(size)}_{budget}"
                run_dir = out / "points" / pid / "run"
                ov = list(sweep.overrides) + [f"score.{k}={json.dumps(v)}" for k, v in score.items()]
                ov += [f"run_dir={run_dir}", f"total_images={budget}", f"name={_slug(sweep.name)}-{pid}"]
                if tokenizer is not None:
                    spec = tokenizer if isinstance(tokenizer, dict) else {"tokenizer": tokenizer}
                    ov.append(f"inputs.tokenizer={_resolve(spec['tokenizer'])}")
                    if spec.get("latents"):
                        ov.append(f"data.latents={_resolve(spec['latents'])}")
                try:
                    cfg = load_config(sweep.base, ov)
                    resolve_shape(cfg.score)
                except ConfigError as exc:
                    raise SweepError(f"sweep point {pid} (size {size!r}: {score}): {exc}") from None
                if cfg.stage != "generator":
                    raise SweepError(f"base {sweep.base}: stage {cfg.stage!r}; a sweep point is a generator run")
                # Budgets smaller than the base's intervals still log a few rows and leave a checkpoint mid-way.
                cfg.log_every_images = min(cfg.log_every_images, _round_to(budget // 4, cfg.batch_size))
                cfg.ckpt_every_images = min(cfg.ckpt_every_images, _round_to(budget // 2, cfg.batch_size))
                points.append(Point(pid, latent, size, budget, cfg))
    return points


# ----------------------------------------------------------------------------------------------------------------------
# One point
# ----------------------------------------------------------------------------------------------------------------------

def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)  # atomic: a killed sweep never leaves half a result


def _history(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return rows


def _loss_key(row: dict) -> Optional[str]:
    keys = sorted(k for k in row if k.endswith("loss"))
    return keys[0] if keys else None


def _finite_or_none(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def point_row(point: Point, state: dict) -> dict:
    """The table row of a point from its run directory's metrics and its state (attempts, timings, gFID)."""
    cfg = point.cfg
    history = _history(Path(cfg.run_dir))
    last = history[-1] if history else {}
    loss_key = _loss_key(last)
    rates = [r["images_per_second"] for r in history[1:] if "images_per_second" in r] or \
        [r["images_per_second"] for r in history if "images_per_second" in r]
    flops = dit_flops(cfg.score).train
    images_seen = int(last.get("images", 0)) if last else 0
    if (Path(cfg.run_dir) / "artifact" / "artifact.json").is_file():
        images_seen = cfg.total_images  # a finished run saw all of them; the last log row may come before the end
    rate = statistics.median(rates) if rates else None
    train_s, eval_s = state.get("train_s", 0.0), state.get("eval_s", 0.0)
    return {"point": point.id, "latent": point.latent, "size": point.size, "params": param_count(cfg.score),
            "budget_images": point.budget, "images_seen": images_seen, "flops_per_image": flops,
            "train_flops": flops * images_seen, "final_loss": _finite_or_none(last.get(loss_key)) if loss_key else None,
            "gfid": state.get("gfid"), "classifier_accuracy": state.get("classifier_accuracy"), "images_per_s": rate,
            "achieved_tflops": None if rate is None else flops * rate / 1e12, "mfu": last.get("mfu"),
            "train_s": round(train_s, 1), "eval_s": round(eval_s, 1), "wall_s": round(train_s + eval_s, 1),
            "attempts": state.get("attempts", 0), "status": state.get("status", "pending"),
            "error": state.get("error", "")}


class SweepRunner:
    """Runs the points of a sweep. `train_fn(cfg, address=...)` replaces train.launch.train where a caller brings its
    own (tests of the retry bookkeeping); it must behave like it (write the run directory, return a TrainResult)."""

    def __init__(self, sweep: SweepConfig, address: Optional[str] = None, progress: bool = True,
                 train_fn: Optional[Callable] = None):
        self.sweep = sweep
        self.train_fn = train_fn
        self.address = address
        self.progress = progress
        self.out = Path(sweep.out).resolve()
        self.points = plan_points(sweep)
        self.rows: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    # -- bookkeeping -------------------------------------------------------------------------------------------------
    def _state(self, point: Point) -> dict:
        return _read_json(point.dir / "state.json") or {}

    def _save_state(self, point: Point, state: dict) -> None:
        point.dir.mkdir(parents=True, exist_ok=True)
        _write_json(point.dir / "state.json", state)

    def _record(self, point: Point, row: dict) -> None:
        with self.lock:
            self.rows[point.id] = row
            write_table([self.rows.get(p.id) or point_row(p, self._state(p)) for p in self.points], self.out)

    # -- evaluation --------------------------------------------------------------------------------------------------
    def real_stats(self) -> Path:
        from ..eval.evaluate import EvalOptions
        from ..eval.score import real_statistics
        return real_statistics(self.sweep.eval.real_images, self.out / "eval" / "real", device=self.sweep.eval.device,
                               opts=EvalOptions(allow_few_samples=True, progress=False))

    def evaluate(self, point: Point, real_stats: Path) -> dict:
        from ..eval.evaluate import EvalOptions
        from ..eval.sample_run import run_sample
        from ..eval.score import score_samples
        ev = self.sweep.eval
        s = ev.sampler
        overrides = [f"sampler.method={s.method}", f"sampler.steps={s.steps}", f"sampler.cfg_scale={s.cfg_scale}",
                     f"sampler.seed={s.seed}"]
        if s.guidance_interval:
            overrides.append(f"sampler.guidance_interval=[{s.guidance_interval[0]},{s.guidance_interval[1]}]")
        run_sample(str(Path(point.cfg.run_dir) / "artifact"), str(point.dir / "samples"), num_samples=ev.num_samples,
                   batch_size=ev.batch_size, overrides=overrides, use_ray=False, device=ev.device, progress=False)
        metrics = score_samples(point.dir / "samples", real_stats, point.dir / "eval", classifier=ev.classifier,
                                device=ev.device, opts=EvalOptions(allow_few_samples=True, progress=False))
        out = {"gfid": float(metrics["fid"])}
        if "classifier_accuracy" in metrics:
            out["classifier_accuracy"] = metrics["classifier_accuracy"]
        return out

    # -- one point ---------------------------------------------------------------------------------------------------
    def run_point(self, point: Point, real_stats: Optional[Path]) -> dict:
        from ..train.launch import TrainingStoppedError, train
        train = self.train_fn or train
        state = self._state(point)
        if state.get("status") == "done" and (Path(point.cfg.run_dir) / "artifact" / "artifact.json").is_file():
            say("sweep", f"{point.id}: finished earlier, skipped")
            row = point_row(point, state)
            self._record(point, row)
            return row
        state.update(status="running", error="")
        artifact = Path(point.cfg.run_dir) / "artifact" / "artifact.json"
        tries = 0
        while not artifact.is_file():
            if self.stopped.is_set():
                raise SweepStopped("stopped")
            resumed = (Path(point.cfg.run_dir) / "checkpoints").is_dir()
            say("sweep", f"{point.id}: {'resuming' if resumed else 'training'} {point.size} for {point.budget} "
                         f"images (attempt {tries + 1} of {1 + self.sweep.retries})")
            state["attempts"] = state.get("attempts", 0) + 1
            self._save_state(point, state)
            began = time.perf_counter()
            try:
                result = train(point.cfg, address=self.address)
            except TrainingStoppedError as exc:  # a stop request checkpointed the run: not a failure to retry
                if exc.result is None or exc.result.status != "stopped":
                    raise
                result = exc.result
            except Exception as exc:  # noqa: BLE001 - any failure of one point is recorded, the sweep goes on
                state["train_s"] = state.get("train_s", 0.0) + time.perf_counter() - began
                tries += 1
                state["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                say("sweep", f"{point.id}: failed ({state['error']})")
                if tries > self.sweep.retries:
                    state["status"] = "failed"
                    self._save_state(point, state)
                    row = point_row(point, state)
                    self._record(point, row)
                    return row
                continue
            state["train_s"] = state.get("train_s", 0.0) + time.perf_counter() - began
            if result.status == "stopped":
                state["status"] = "stopped"
                self._save_state(point, state)
                self.stopped.set()
                raise SweepStopped(f"point {point.id} was stopped at {result.images_seen} images; rerun the sweep "
                                   "to resume it from its checkpoint")
        self._save_state(point, state)
        if real_stats is not None and state.get("gfid") is None:
            began = time.perf_counter()
            try:
                state.update(self.evaluate(point, real_stats))
            except Exception as exc:  # noqa: BLE001 - a failed evaluation is reported; the run itself is kept
                state["error"] = f"evaluation: {type(exc).__name__}: {exc}"[:300]
            state["eval_s"] = state.get("eval_s", 0.0) + time.perf_counter() - began
        state["status"] = "done"
        state["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._save_state(point, state)
        row = point_row(point, state)
        self._record(point, row)
        acc = row.get("classifier_accuracy")
        say("sweep", f"{point.id}: done, loss {row['final_loss']}, gFID {row['gfid']}"
                     f"{f', classifier accuracy {acc:.1%}' if acc is not None else ''}")
        return row

    # -- the grid ----------------------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        from ..distributed.ray_session import ray_session
        self.out.mkdir(parents=True, exist_ok=True)
        todo = [p for p in self.points if self._state(p).get("status") != "done"]
        say("sweep", f"{self.sweep.name}: {len(self.points)} points, {len(self.points) - len(todo)} finished "
                     f"earlier; up to {self.sweep.max_concurrent} at once -> {self.out}")
        real_stats = self.real_stats() if self.sweep.eval.enabled else None
        workers = max(worker_range(p.cfg)[1] for p in self.points)
        needs_ray = self.train_fn is None and any(
            not (Path(p.cfg.run_dir) / "artifact" / "artifact.json").is_file() for p in todo)
        session = ray_session(self.address, num_cpus=max(os.cpu_count() or 1, workers * self.sweep.max_concurrent)) \
            if needs_ray else contextlib.nullcontext()
        with session:
            if self.sweep.max_concurrent == 1:
                for point in self.points:  # main thread: train() forwards SIGTERM to the workers
                    self.run_point(point, real_stats)
            else:
                with ThreadPoolExecutor(self.sweep.max_concurrent) as pool:
                    for future in [pool.submit(self.run_point, p, real_stats) for p in self.points]:
                        future.result()
        rows = [self.rows.get(p.id) or point_row(p, self._state(p)) for p in self.points]
        write_table(rows, self.out)
        return rows


def write_table(rows: list[dict], out: Path) -> Path:
    """results.csv (and results.parquet when pyarrow imports) in `out`, written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.csv"
    tmp = out / "results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in RESULT_COLUMNS})
    os.replace(tmp, path)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return path
    table = pa.Table.from_pylist([{k: row.get(k) for k in RESULT_COLUMNS} for row in rows])
    pq.write_table(table, out / "results.parquet")
    return path


def read_table(path: str | Path) -> list[dict]:
    """results.csv back as dicts with numbers parsed (empty cells None)."""
    def parse(value: str):
        if value == "":
            return None
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def run_sweep(path: str | Path, address: Optional[str] = None, report: bool = True) -> dict:
    """Run (or finish) the sweep of `path`; then the report next to the table. Returns paths and rows."""
    sweep = load_sweep(path)
    runner = SweepRunner(sweep, address=address)
    rows = runner.run()
    out = {"table": str(runner.out / "results.csv"), "rows": rows}
    failed = [r["point"] for r in rows if r["status"] != "done"]
    if report:
        from .report import write_report
        out.update(write_report(rows, runner.out))
    say("sweep", f"{sum(r['status'] == 'done' for r in rows)} of {len(rows)} points done"
                 f"{'; failed: ' + ', '.join(failed) if failed else ''}; table {out['table']}"
                 f"{'; report ' + out['report'] if report else ''}")
    return out

