"""Running a pipeline: its steps in order (or those `only` names), skipping what is complete (state.py), each kind
by its runner (steps.py), with one line per step and a closing table."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..log import say
from ..data import storage
from .spec import Pipeline, PipelineError, Step
from .state import step_complete, work_dir_for
from .steps import RUNNERS, StepContext


@dataclass
class StepReport:
    name: str
    kind: str
    status: str  # "done" | "skipped"
    seconds: float
    output: str
    detail: str = ""


def _check_only(pipe: Pipeline, only: list[str]) -> None:
    """A selected step may read an unselected one only if that one is already complete."""
    unknown = [name for name in only if not any(s.name == name for s in pipe.steps)]
    if unknown:
        raise PipelineError(f"--only {' '.join(unknown)}: no such step; steps: "
                            f"{', '.join(s.name for s in pipe.steps)}")
    for step in pipe.steps:
        if step.name not in only:
            continue
        for field, name in step.inputs().items():
            needed = pipe.step(name)
            if needed.name not in only and not step_complete(
                    pipe, needed, pipe.train_config(needed) if needed.kind == "train" else None, clean=False):
                raise PipelineError(f"--only: step {step.name} reads step {needed.name} ({field}), which is not "
                                    f"complete and not selected; add {needed.name} to --only")


def plan(pipe: Pipeline, address: Optional[str] = None, unreadable_store: Optional[list] = None) -> list[str]:
    """`pipeline --check`: one line per step saying whether it is complete, where it would run and with what
    (resources.describe: "ray workers: 4 tasks x 1 CPU, 0 GPU", "ray train: 64 workers x 1 GPU", "driver (local)")."""
    from ..errors import UserError
    from .resources import describe
    lines, unreadable = [], None
    for i, step in enumerate(pipe.steps, 1):
        cfg = pipe.train_config(step) if step.kind == "train" else None
        done = "unknown"
        if unreadable is None:  # a store this machine cannot read (no credentials, no network): the plan still prints
            try:
                done = "complete" if step_complete(pipe, step, cfg, clean=False) else "to run"
            except UserError as exc:
                unreadable = str(exc)
        where = f" ({pipe.launcher_of(step, cfg, address)} launcher)" if cfg is not None else ""
        lines.append(f"{i}. {step.name:<12} {step.kind:<14} {done:<9} -> {pipe.url(step.name)}{where}; "
                     f"{describe(pipe, step, address)}")
    if unreadable is not None:
        lines.append(f"(step states unknown: the store is not readable from here: {unreadable.splitlines()[0]})")
        if unreadable_store is not None:  # the caller ends with this error after the plan (`pipeline --check`)
            unreadable_store.append(unreadable)
    return lines


def run_pipeline(pipe: Pipeline, *, address: Optional[str] = None, work_dir: Optional[str] = None,
                 only: Optional[list[str]] = None) -> list[StepReport]:
    """Run the steps in order (or those named in `only`), skipping complete ones; returns one report per step."""
    ctx = StepContext(pipe, Path(work_dir) if work_dir else work_dir_for(pipe.store), address)
    ctx.work.mkdir(parents=True, exist_ok=True)
    if storage.is_remote(pipe.store):
        storage.check_reachable(pipe.store)
    if only:
        _check_only(pipe, only)
    import torch
    total = len(pipe.steps)
    say("pipeline", f"{total} steps -> {pipe.store}; torch CPU threads: {torch.get_num_threads()}")
    reports: list[StepReport] = []
    began = time.perf_counter()
    for i, step in enumerate(pipe.steps, 1):
        if only and step.name not in only:
            continue
        reports.append(_run_step(ctx, step, f"[pipeline {i}/{total}]"))
    say("", format_reports(reports, time.perf_counter() - began))
    return reports


def _run_step(ctx: StepContext, step: Step, prefix: str) -> StepReport:
    pipe = ctx.pipe
    cfg = pipe.train_config(step) if step.kind == "train" else None
    t0 = time.perf_counter()
    if step_complete(pipe, step, cfg):
        say(prefix, f"{step.name} ({step.kind}): complete, skipped -> {pipe.url(step.name)}")
        return StepReport(step.name, step.kind, "skipped", 0.0, pipe.url(step.name))
    say(prefix, f"{step.name} ({step.kind}) -> {pipe.url(step.name)}")
    detail = RUNNERS[step.kind](ctx, step)
    say(prefix, f"{step.name}: {detail}")
    return StepReport(step.name, step.kind, "done", time.perf_counter() - t0, pipe.url(step.name), detail)


def format_reports(reports: list[StepReport], seconds: float) -> str:
    lines = [f"{'step':<14} {'kind':<14} {'status':<8} {'seconds':>8}  output"]
    for r in reports:
        lines.append(f"{r.name:<14} {r.kind:<14} {r.status:<8} {r.seconds:>8.1f}  {r.output}")
    done = sum(r.status == "done" for r in reports)
    lines.append(f"pipeline: {done} steps run, {len(reports) - done} complete and skipped, in {seconds:.0f} s")
    return "\n".join(lines)
