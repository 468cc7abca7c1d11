"""The one way the package speaks (dmvae_scale/log.py): `[room] message` on rank 0 only, and progress that writes
plain lines with an ETA (no carriage return) to stderr where the output is not a terminal, as in a Ray job's log."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dmvae_scale import log
from dmvae_scale.log import progress, say


@pytest.mark.unit
def test_say_prefixes_the_room_and_only_rank_zero_speaks(capsys, monkeypatch):
    monkeypatch.setattr(log, "rank", lambda: 0)
    say("sweep", "3 of 4 points done")
    say("config", "a note", err=True)
    captured = capsys.readouterr()
    assert captured.out == "[sweep] 3 of 4 points done\n" and captured.err == "[config] a note\n"
    monkeypatch.setattr(log, "rank", lambda: 1)
    say("train", "not shown")
    say("train", "every rank", all_ranks=True)
    assert capsys.readouterr().out == "[train rank 1] every rank\n"


@pytest.mark.unit
def test_the_rank_comes_from_the_environment_before_a_process_group_exists():
    code = "from dmvae_scale.log import rank, say; print(rank()); say('x', 'spoken')"
    env = {**os.environ, "RANK": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out == "3\n"  # rank 3 says nothing


@pytest.mark.unit
def test_progress_in_a_log_is_lines_with_an_eta_and_a_closing_total(capsys, monkeypatch):
    monkeypatch.setattr(log, "rank", lambda: 0)
    monkeypatch.setenv("DMVAE_PROGRESS_EVERY_S", "0")  # a line at every update
    with progress(total=4, desc="shards s3://b/x", unit="img", terminal=False) as bar:
        bar.update(1)
        bar.set_postfix({"loss": "0.5"})
        bar.update(1)
        bar.update(2)
    captured = capsys.readouterr()
    assert captured.out == "" and "\r" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 3  # two intermediate lines, the final one only once
    assert lines[0].startswith("[shards s3://b/x] 1/4 img (25%), ") and "ETA " in lines[0]
    assert lines[1].endswith("; loss 0.5")
    assert lines[2].startswith("[shards s3://b/x] 4/4 img (100%), ") and " in " in lines[2]


@pytest.mark.unit
def test_progress_over_an_iterable_counts_items_and_is_silent_off_rank_zero(capsys, monkeypatch):
    monkeypatch.setattr(log, "rank", lambda: 0)
    monkeypatch.setenv("DMVAE_PROGRESS_EVERY_S", "3600")
    assert list(progress(range(3), desc="decode", terminal=False)) == [0, 1, 2]
    assert capsys.readouterr().err.splitlines()[-1].startswith("[decode] 3/3 img (100%)")
    monkeypatch.setattr(log, "rank", lambda: 1)
    bar = progress(total=10, desc="train", terminal=False)
    bar.update(10)
    bar.close()
    assert bar.n == 10 and capsys.readouterr() == ("", "")
    assert list(progress(range(2), desc="off", enabled=False, terminal=False)) == [0, 1]
