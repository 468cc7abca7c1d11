"""Running a pipeline: its steps as a graph (or those `only` names), a step starting once the steps it reads are
complete, up to max_concurrent at once; skipping what is complete (state.py), each kind by its runner (steps.py), each
step's output in its own log, with one line per step and a closing table."""
from __future__ import annotations

import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..log import StepLogs, say
from ..data import storage
from .spec import Pipeline, PipelineError, Step
from .state import step_complete, work_dir_for
from .steps import RUNNERS, StepContext


@dataclass
class StepReport:
    name: str
    kind: str
    status: str  # "done" | "skipped" | "failed" | "blocked" | "stopped"
    seconds: float
    output: str
    detail: str = ""  # done: the runner's line; failed: the one-line reason; blocked: "blocked by X"
    blocked_by: str = ""
    user_error: bool = False
    stop: bool = False  # the step was stopped on request (a stop ends the pipeline: no new steps start)

    @property
    def unfinished(self) -> bool:
        """Failed, blocked by a failure upstream, or not started after a stop: what a rerun still has to do."""
        return self.status in ("failed", "blocked", "stopped")


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
    if pipe.max_concurrent > 1:
        lines.append(f"steps at once: up to {pipe.max_concurrent} (max_concurrent; --max-concurrent N overrides), each "
                     f"once the steps it reads are complete; Ray queues each for its resources")
    if unreadable is not None:
        lines.append(f"(step states unknown: the store is not readable from here: {unreadable.splitlines()[0]})")
        if unreadable_store is not None:  # the caller ends with this error after the plan (`pipeline --check`)
            unreadable_store.append(unreadable)
    return lines


def run_pipeline(pipe: Pipeline, *, address: Optional[str] = None, work_dir: Optional[str] = None,
                 only: Optional[list[str]] = None, max_concurrent: Optional[int] = None) -> list[StepReport]:
    """Run the steps (or those named in `only`) as a graph: a step starts once the steps it reads are complete, at
    most `max_concurrent` at once (default: pipeline.yaml's, else 1 = one after another in pipeline.yaml's order).
    Complete steps are skipped. A failed step blocks only the steps downstream of it; the others go on. Returns one
    report per selected step (done / skipped); when any failed, was blocked or was not started after a stop, raises
    PipelineFailed (its reports, the closing table printed first) once every other step has ended."""
    ctx = StepContext(pipe, Path(work_dir) if work_dir else work_dir_for(pipe.store), address)
    ctx.work.mkdir(parents=True, exist_ok=True)
    if storage.is_remote(pipe.store):
        storage.check_reachable(pipe.store)
    if only:
        _check_only(pipe, only)
    limit = int(max_concurrent if max_concurrent is not None else pipe.max_concurrent)
    if limit < 1:
        raise PipelineError(f"--max-concurrent {limit}: give a positive number of steps")
    import torch
    total = len(pipe.steps)
    say("pipeline", f"{total} steps -> {pipe.store}; torch CPU threads: {torch.get_num_threads()}"
        + (f"; up to {limit} steps at once" if limit > 1 else ""))
    began = time.perf_counter()
    selected = [s for s in pipe.steps if not only or s.name in only]
    logs = ctx.work / "logs"
    with StepLogs(logs, prefix=limit > 1) as tee:
        reports = _schedule(ctx, selected, limit, tee)
    for step in selected:  # each step's own log beside the store's outputs: <store>/logs/STEP.log
        path = logs / f"{step.name}.log"
        if path.is_file() and any(r.name == step.name and r.status != "blocked" for r in reports):
            try:
                storage.write_bytes(storage.join(pipe.store, "logs", f"{step.name}.log"), path.read_bytes())
            except Exception as exc:  # the log is a convenience: its copy must not hide the steps' outcome
                say("pipeline", f"{step.name}: its log stays at {path} ({type(exc).__name__}: {exc})")
    say("", format_reports(reports, time.perf_counter() - began))
    if any(r.unfinished for r in reports):
        raise PipelineFailed(reports)
    return reports


class PipelineFailed(UserError):
    """Some selected steps failed, were blocked by a failure, or were not started after a stop; the others finished.
    `reports`: every step's report; `exit_code`: 2 when each failure is a user error (bad input, a stop), else 1.
    Rerunning the same command finishes what is missing (complete steps are skipped)."""

    def __init__(self, reports: list[StepReport]):
        self.reports = reports
        self.exit_code = exit_code(reports)
        bad = [r for r in reports if r.unfinished]
        parts = [f"{r.name} {r.status} ({r.detail})" for r in bad]
        super().__init__(f"pipeline: {len(bad)} of {len(reports)} steps did not finish: {'; '.join(parts)}; "
                         f"run the same command again to finish what is missing")


def _schedule(ctx: StepContext, steps: list[Step], limit: int, tee: "StepLogs") -> list[StepReport]:
    """Start every step whose inputs are done, up to `limit` at once (one at a time: in pipeline.yaml's order; more:
    the ready step with the longest chain of steps after it first, see _steps_to_the_end). With limit 1 each
    step runs on this thread, as before concurrency (a stop signal reaches a run directly); with more, each runs on
    its own thread and this thread's SIGTERM / SIGINT handler starts no new step and asks the running runs to
    checkpoint and stop (train/collectives.stop_runs_off_the_main_thread); a second Ctrl-C leaves at once."""
    total = len(ctx.pipe.steps)
    index = {s.name: i for i, s in enumerate(ctx.pipe.steps, 1)}
    names = {s.name for s in steps}
    reports: dict[str, StepReport] = {}
    pending = list(steps)
    running: dict[str, threading.Thread] = {}
    finished: "queue.Queue[StepReport]" = queue.Queue()
    state = {"stopping": False}

    def run_one(step: Step) -> StepReport:
        with tee.step(step.name):
            return _run_step(ctx, step, f"pipeline {index[step.name]}/{total}")

    def work(step: Step) -> None:
        try:
            report = run_one(step)
        except BaseException as exc:  # noqa: BLE001 - the scheduler must hear of every thread's end
            report = StepReport(step.name, step.kind, "failed", 0.0, ctx.pipe.url(step.name),
                                f"{type(exc).__name__}: {exc}")
        finished.put(report)

    def blocker(step: Step) -> Optional[str]:
        """None: its inputs are done; "": not yet; else the failed step upstream that blocks it. A report reads
        everything before it: it waits until each of those has ended, however it ended."""
        if step.kind == "report":
            earlier = [s.name for s in ctx.pipe.steps[:index[step.name] - 1] if s.name in names]
            return None if all(name in reports for name in earlier) else ""
        for name in step.inputs().values():
            if name in names and (name not in reports or reports[name].status not in ("done", "skipped")):
                if name in reports:
                    return reports[name].blocked_by or name
                return ""
        return None

    def record(report: StepReport) -> None:
        reports[report.name] = report
        if report.stop and not state["stopping"]:
            state["stopping"] = True
            _say_stopping(running)

    def on_signal(signum, frame) -> None:
        if state["stopping"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        state["stopping"] = True
        _say_stopping(running)
        from ..train.collectives import stop_runs_off_the_main_thread
        stop_runs_off_the_main_thread()

    previous = {}
    if limit > 1 and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    depth = _steps_to_the_end(ctx.pipe)
    try:
        while pending and not state["stopping"] or running:
            # one at a time: pipeline.yaml's order; several: the ready step with the longest chain after it first
            order = pending if limit == 1 else sorted(pending, key=lambda s: (-depth[s.name], index[s.name]))
            for step in order:
                if state["stopping"] or len(running) >= limit:
                    break
                why = blocker(step)
                if why is None:
                    pending.remove(step)
                    if limit == 1:
                        record(run_one(step))
                        break  # look again from the first pending step
                    thread = threading.Thread(target=work, args=(step,), name=f"step-{step.name}", daemon=True)
                    running[step.name] = thread
                    thread.start()
                elif why:
                    pending.remove(step)
                    reports[step.name] = StepReport(step.name, step.kind, "blocked", 0.0, ctx.pipe.url(step.name),
                                                    f"blocked by {why}", blocked_by=why)
            if not running:
                if pending and all(blocker(s) == "" for s in pending) and not state["stopping"]:
                    raise PipelineError(f"steps {', '.join(s.name for s in pending)} wait on steps not selected")
                continue
            report = finished.get()
            running.pop(report.name).join()
            record(report)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for step in pending:
        reports[step.name] = StepReport(step.name, step.kind, "stopped", 0.0, ctx.pipe.url(step.name),
                                        "not started: the pipeline was stopped")
    return [reports[s.name] for s in steps if s.name in reports]


def _steps_to_the_end(pipe: Pipeline) -> dict[str, int]:
    """For each step, the number of steps on the longest chain from it to a step nothing reads (itself included).
    With several steps at once the scheduler starts the ready step with the longest chain first, so the chain that
    decides the pipeline's end is never queued behind a step that ends a short branch (the demo: the DMVAE chain's
    tokenizer before the teacher's probe). A report, which waits for everything before it, is not counted as a
    reader."""
    readers: dict[str, list[str]] = {s.name: [] for s in pipe.steps}
    for s in pipe.steps:
        for name in s.inputs().values():
            if name in readers:
                readers[name].append(s.name)
    depth: dict[str, int] = {}
    for s in reversed(pipe.steps):  # a step reads only steps before it in the file
        depth[s.name] = 1 + max((depth.get(r, 0) for r in readers[s.name]), default=0)
    return depth


def _say_stopping(running: dict) -> None:
    say("pipeline", "stopping: no new steps start" + (f"; waiting for {', '.join(running)}" if running else ""))


def _run_step(ctx: StepContext, step: Step, prefix: str) -> StepReport:
    """One step: skipped when complete, else run by its runner; an exception becomes a failed report (one line)."""
    pipe = ctx.pipe
    t0 = time.perf_counter()
    try:
        cfg = pipe.train_config(step) if step.kind == "train" else None
        if step_complete(pipe, step, cfg):
            say(prefix, f"{step.name} ({step.kind}): complete, skipped -> {pipe.url(step.name)}")
            return StepReport(step.name, step.kind, "skipped", 0.0, pipe.url(step.name))
        say(prefix, f"{step.name} ({step.kind}) -> {pipe.url(step.name)}")
        detail = RUNNERS[step.kind](ctx, step)
    except Exception as exc:  # noqa: BLE001 - one branch's failure is reported, the other branches go on
        from ..train.launch import TrainingStoppedError
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, UserError):
            reason = f"{type(exc).__name__}: {reason}"
            traceback.print_exc()  # into the step's log, each line with its name
        say(prefix, f"{step.name} failed: {reason}")
        stopped = isinstance(exc, TrainingStoppedError) and getattr(exc.result, "status", "") == "stopped"
        return StepReport(step.name, step.kind, "failed", time.perf_counter() - t0, pipe.url(step.name), reason,
                          user_error=isinstance(exc, UserError), stop=stopped)
    say(prefix, f"{step.name}: {detail}")
    return StepReport(step.name, step.kind, "done", time.perf_counter() - t0, pipe.url(step.name), detail)


def exit_code(reports: list[StepReport]) -> int:
    """0 when nothing failed; 2 when every failure is a UserError (bad input, a stop), else 1."""
    if not any(r.unfinished for r in reports):
        return 0
    return 2 if all(r.user_error for r in reports if r.status == "failed") else 1


def format_reports(reports: list[StepReport], seconds: float) -> str:
    lines = [f"{'step':<14} {'kind':<14} {'status':<8} {'seconds':>8}  output"]
    for r in reports:
        why = f"  ({r.detail})" if r.unfinished else ""
        lines.append(f"{r.name:<14} {r.kind:<14} {r.status:<8} {r.seconds:>8.1f}  {r.output}{why}")
    count = {s: sum(r.status == s for r in reports) for s in ("done", "skipped", "failed", "blocked", "stopped")}
    line = f"pipeline: {count['done']} steps run, {count['skipped']} complete and skipped, "
    if any(r.unfinished for r in reports):
        line += (f"{count['failed']} failed, {count['blocked']} blocked, {count['stopped']} not started, "
                 f"in {seconds:.0f} s; run the same command again to finish what is missing")
    else:
        line += f"in {seconds:.0f} s"
    lines.append(line)
    return "\n".join(lines)
