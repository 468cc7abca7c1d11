"""One way to say things: log lines and progress, on rank 0 only, with one prefix convention.

    say("sweep", "3 points done")           ->  [sweep] 3 points done
    with progress(total=n, desc="shards", unit="img") as bar: ... bar.update(k)

A line is `[room] message`, where the room is the part of the system speaking (demo, pipeline, train, data, eval,
sample, sweep, teacher). Only rank 0 of a distributed run speaks (RANK, or torch.distributed when initialised), unless
`all_ranks=True`. Progress is a tqdm bar (with its ETA) on a terminal; where the output is not a terminal (a Ray job's
log, a Ray Train worker, CI) it is a plain line every DMVAE_PROGRESS_EVERY_S seconds (default 30) with the count, the
rate and the ETA, and one at the end: no carriage returns in logs. Progress goes to stderr, as tqdm's does, so a
command's own output on stdout stays clean.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Iterable, Iterator, Optional


def rank() -> int:
    """This process's rank: torch.distributed's when initialised, else $RANK, else 0."""
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def say(room: str, message: str, *, err: bool = False, all_ranks: bool = False) -> None:
    """Print `[room] message` (flushed) on rank 0, or on every rank with all_ranks (then prefixed with the rank)."""
    if not all_ranks and rank() != 0:
        return
    head = f"[{room}]" if not all_ranks else f"[{room} rank {rank()}]"
    print(f"{head} {message}" if room else message, file=sys.stderr if err else sys.stdout, flush=True)


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("DMVAE_PROGRESS_EVERY_S", "30")))
    except ValueError:
        return 30.0


def duration_text(seconds: float) -> str:
    """Seconds as `42 s`, `3 min 05 s` or `1 h 07 min`: the ETAs and elapsed times of progress lines."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class LineProgress:
    """Progress as plain lines (for logs): `[desc] 300/1,000 img (30%), 41.2 img/s, ETA 17 s`."""

    def __init__(self, total: Optional[int], desc: str, unit: str, initial: int, leave: bool):
        self.total, self.desc, self.unit, self.leave = total, desc, unit, leave
        self.n = self._start = int(initial)
        self._began = self._last = time.perf_counter()
        self._postfix = ""
        self._closed = False

    def line(self) -> str:
        elapsed = time.perf_counter() - self._began
        done = self.n - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{self.n:,}/{self.total:,} {self.unit}" if self.total else f"{self.n:,} {self.unit}"
        parts = [count + (f" ({self.n / self.total:.0%})" if self.total else "")]
        if done > 0:
            parts.append(f"{rate:.3g} {self.unit}/s")
            if self.total and self.n < self.total:
                parts.append(f"ETA {duration_text((self.total - self.n) / rate)}")
            else:
                parts.append(f"in {duration_text(elapsed)}")
        return f"[{self.desc}] " + ", ".join(parts) + (f"; {self._postfix}" if self._postfix else "")

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = time.perf_counter()
        if now - self._last >= _interval() and not (self.total and self.n >= self.total):
            self._last = now
            print(self.line(), file=sys.stderr, flush=True)

    def set_postfix(self, values=None, refresh: bool = False, **kwargs) -> None:
        values = {**(values or {}), **kwargs}
        self._postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        if not self._closed and self.leave and self.n > self._start:
            print(self.line(), file=sys.stderr, flush=True)
        self._closed = True


class _Silent:
    """Progress that says nothing (not rank 0, or progress turned off); counts all the same."""

    def __init__(self, initial: int = 0):
        self.n = int(initial)

    def update(self, n: int = 1) -> None:
        self.n += int(n)

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


class Progress:
    """A progress display (see progress()); a context manager, and iterable when made over an iterable."""

    def __init__(self, iterable: Optional[Iterable], total: Optional[int], desc: str, unit: str, initial: int,
                 enabled: bool, leave: bool, terminal: Optional[bool]):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        if not enabled or rank() != 0:
            self._impl = _Silent(initial)
        elif terminal if terminal is not None else sys.stderr.isatty():
            from tqdm import tqdm
            self._impl = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
        else:
            self._impl = LineProgress(total, desc, unit, initial, leave)

    @property
    def n(self) -> int:
        return int(self._impl.n)

    def update(self, n: int = 1) -> None:
        self._impl.update(n)

    def set_postfix(self, values=None, refresh: bool = False, **kwargs) -> None:
        self._impl.set_postfix(values, refresh=refresh, **kwargs) if values is not None \
            else self._impl.set_postfix(refresh=refresh, **kwargs)

    def close(self) -> None:
        self._impl.close()

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this progress display was made without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str, unit: str = "img",
             initial: int = 0, enabled: bool = True, leave: bool = True, terminal: Optional[bool] = None) -> Progress:
    """Progress over `total` units (or over an iterable, one unit per item), shown on rank 0 only.

    terminal: None decides by whether stderr is a terminal (tqdm bar) or not (lines for logs)."""
    return Progress(iterable, total, desc, unit, initial, enabled, leave, terminal)


def _stamp() -> str:
    """Wall-clock time with milliseconds, UTC: 2026-12-07T03:46:31.123Z (a step log's start and end lines)."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class _ThreadStream:
    """sys.stdout / sys.stderr while StepLogs is active: a line written by a step's thread goes, whole, to the real
    stream (prefixed `[STEP] ` when steps run at once) and to the step's log file; other threads pass through."""

    def __init__(self, logs: "StepLogs", real):
        self._logs, self._real = logs, real

    def write(self, text: str) -> int:
        current = getattr(self._logs.local, "step", None)
        if current is None:
            with self._logs.lock:
                self._real.write(text)
            return len(text)
        name, buf, file = current
        if not self._logs.prefix:  # steps one at a time: the console sees exactly what the step wrote (bars too)
            with self._logs.lock:
                self._real.write(text)
                file.write(text)
            return len(text)
        buf.append(text)
        joined = "".join(buf)
        if "\n" in joined:
            whole, _, rest = joined.rpartition("\n")
            buf[:] = [rest] if rest else []
            self._logs.emit(self._real, name, file, whole.split("\n"))
        return len(text)

    def flush(self) -> None:
        with self._logs.lock:
            self._real.flush()

    def isatty(self) -> bool:  # steps at once: a step's progress is lines, never a redrawn bar shared with others
        return False if self._logs.prefix else self._real.isatty()

    def __getattr__(self, attr):
        return getattr(self._real, attr)


class StepLogs:
    """While active, what each step's thread prints is its own: whole lines only (concurrent steps never interleave
    mid-line), each also written to DIR/STEP.log, and prefixed `[STEP] ` on the console when `prefix` (steps run at
    once); with prefix False the console shows exactly what the step printed.

        with StepLogs(work / "logs", prefix=True) as logs:
            with logs.step("shards"): ...   # in the step's thread
    """

    def __init__(self, directory, prefix: bool):
        from pathlib import Path
        self.directory, self.prefix = Path(directory), prefix
        self.lock = threading.Lock()
        self.local = threading.local()

    def emit(self, real, name: str, file, lines: list[str]) -> None:
        with self.lock:
            for line in lines:
                real.write((f"[{name}] {line}" if self.prefix else line) + "\n")
                file.write(line + "\n")
            real.flush()
            file.flush()

    def __enter__(self) -> "StepLogs":
        self.directory.mkdir(parents=True, exist_ok=True)
        self._saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _ThreadStream(self, sys.stdout), _ThreadStream(self, sys.stderr)
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout, sys.stderr = self._saved

    @contextlib.contextmanager
    def step(self, name: str):
        """In a step's thread: its lines carry its name and go to DIR/NAME.log (appended: a rerun adds to it)."""
        with open(self.directory / f"{name}.log", "a", encoding="utf-8") as file:
            file.write(f"--- {name} started at {_stamp()}\n")
            self.local.step = (name, [], file)
            try:
                yield self
            finally:
                _, buf, _ = self.local.step
                if buf:
                    self.emit(self._saved[0], name, file, ["".join(buf)])
                self.local.step = None
                file.write(f"--- {name} ended at {_stamp()}\n")
