"""The pipeline as a graph (#20 item 2): steps whose inputs are complete run at once, up to max_concurrent; each step's
output goes to its own log (<work>/logs/STEP.log, copied to <store>/logs/); a failed step blocks only the steps
downstream of it while the other branches finish; the rerun finishes what is missing and skips what is complete."""
from __future__ import annotations

import io
import json
import re
import shutil
import sys
import threading
from datetime import datetime

import pytest

from repo import DEMO
from dmvae_scale.cli import main
from dmvae_scale.data import storage
from dmvae_scale.pipeline import PipelineError, load_pipeline
from node_cluster import node_cluster  # noqa: F401 (a fixture)
from s3_server import s3_bucket, s3_server  # noqa: F401 (fixtures)

TINY = ["total_images=64", "batch_size=32", "log_every_images=32", "ckpt_every_images=32"]
STAMP = re.compile(r"^--- (\S+) (started|ended) at (\S+)Z$", re.M)


def _graph(tmp_path, bad_source: str, launcher: str = "local", max_concurrent: int = 2):
    """Two independent shards steps (a, b), a third whose source is `bad_source` and a tokenizer that reads it."""
    config = tmp_path / "pipe"
    config.mkdir(exist_ok=True)
    shutil.copy(DEMO / "kl_tokenizer.yaml", config / "kl_tokenizer.yaml")
    (config / "pipeline.yaml").write_text(f"""launcher: {launcher}
max_concurrent: {max_concurrent}
steps:
  - {{name: a, kind: shards, source: fashion-mnist, split: train, limit: 600}}
  - {{name: b, kind: shards, source: fashion-mnist, split: test, limit: 600}}
  - {{name: c, kind: shards, source: {bad_source}, split: train, limit: 96}}
  - {{name: tok, kind: train, config: kl_tokenizer.yaml, data: c, launcher: local}}
""")
    return config


def _interval(log: str, name: str) -> tuple[datetime, datetime]:
    """The last run's (start, end) of step `name` from its log's stamp lines."""
    stamps = {}
    for step, edge, when in STAMP.findall(log):
        assert step == name, log  # a step's log holds only its own lines
        stamps[edge] = datetime.fromisoformat(when)
    return stamps["started"], stamps["ended"]


def _overlap(work, first: str, second: str) -> float:
    (s1, e1), (s2, e2) = (_interval((work / "logs" / f"{n}.log").read_text(), n) for n in (first, second))
    return (min(e1, e2) - max(s1, s2)).total_seconds()


# ----------------------------------------------------------------------------------------------------------------------
# Checked before anything runs
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("value", ["0", "two", "true", "-1"])
def test_max_concurrent_that_is_not_a_positive_whole_number_is_refused_naming_the_file(tmp_path, value):
    config = _graph(tmp_path, "fashion-mnist")
    text = (config / "pipeline.yaml").read_text().replace("max_concurrent: 2", f"max_concurrent: {value}")
    (config / "pipeline.yaml").write_text(text)
    with pytest.raises(PipelineError,
                       match=r"pipeline.yaml: max_concurrent \S+ must be a positive whole number of steps"):
        load_pipeline(config, str(tmp_path / "store"))


@pytest.mark.unit
def test_max_concurrent_flag_must_be_positive(tmp_path, capsys):
    config = _graph(tmp_path, "fashion-mnist")
    with pytest.raises(SystemExit) as exit_:
        main(["pipeline", str(config), "--store", str(tmp_path / "store"), "--max-concurrent", "0"])
    assert exit_.value.code == 2
    assert "--max-concurrent: 0: give a positive number of steps" in capsys.readouterr().err


@pytest.mark.unit
def test_check_says_how_many_steps_run_at_once(tmp_path, capsys):
    config = _graph(tmp_path, "fashion-mnist", max_concurrent=3)
    assert main(["pipeline", str(config), "--store", str(tmp_path / "store"), "--check"]) == 0
    assert "steps at once: up to 3 (max_concurrent" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------------
# Logs of steps at once stay apart
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_lines_of_steps_printing_at_once_go_whole_to_their_own_logs(tmp_path, monkeypatch):
    from dmvae_scale.log import StepLogs
    console = io.StringIO()
    monkeypatch.setattr(sys, "stdout", console)
    go = threading.Barrier(2)

    def chatter(logs, name):
        with logs.step(name):
            go.wait()
            for i in range(300):
                print(f"{name} line {i} " + "x" * 40)  # print writes the text and the newline separately
                sys.stdout.write(f"{name} part ")
                sys.stdout.write(f"two {i}\n")

    with StepLogs(tmp_path / "logs", prefix=True) as logs:
        threads = [threading.Thread(target=chatter, args=(logs, n)) for n in ("left", "right")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for name in ("left", "right"):
        body = [ln for ln in (tmp_path / "logs" / f"{name}.log").read_text().splitlines() if not ln.startswith("---")]
        expected = [x for i in range(300) for x in (f"{name} line {i} " + "x" * 40, f"{name} part two {i}")]
        assert body == expected
    shown = console.getvalue().splitlines()
    assert len(shown) == 1200
    for name in ("left", "right"):
        assert [ln[len(name) + 3:] for ln in shown if ln.startswith(f"[{name}] ")] == \
            [x for i in range(300) for x in (f"{name} line {i} " + "x" * 40, f"{name} part two {i}")]
    assert sys.stdout is console  # restored


@pytest.mark.unit
def test_a_run_started_off_the_main_thread_is_reached_by_the_pipelines_stop():
    from dmvae_scale.train.collectives import stop_runs_off_the_main_thread
    from dmvae_scale.train.launch import _forwarded_stop_signals
    asked, inside, leave = [], threading.Event(), threading.Event()

    def step():
        with _forwarded_stop_signals() as on_stop:
            on_stop.append(lambda: asked.append("checkpoint and stop"))
            inside.set()
            leave.wait(30)

    t = threading.Thread(target=step)
    t.start()
    assert inside.wait(30)
    assert stop_runs_off_the_main_thread() == 1
    assert asked == ["checkpoint and stop"]
    leave.set()
    t.join()
    assert stop_runs_off_the_main_thread() == 0  # gone with its run


# ----------------------------------------------------------------------------------------------------------------------
# Branches at once, a failure in one, the rerun
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_independent_steps_overlap_a_failed_branch_blocks_only_its_own_and_the_rerun_finishes(tmp_path, capsys):
    config = _graph(tmp_path, str(tmp_path / "not-there"))
    store, work = tmp_path / "store", tmp_path / "work"
    base = ["pipeline", str(config), "--store", str(store), "--work-dir", str(work)] + [f"tok:{o}" for o in TINY]
    assert main(base) == 2  # the failure is bad input (a missing source): exit 2, as a bad config
    out, err = capsys.readouterr()
    table = {ln.split()[0]: ln.split()[2] for ln in out.splitlines() if ln.split()[:1] in (["a"], ["b"], ["c"],
                                                                                           ["tok"])}
    assert table == {"a": "done", "b": "done", "c": "failed", "tok": "blocked"}, out
    assert "tok            train          blocked       0.0" in out and "(blocked by c)" in out
    line = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert line == [f"error: pipeline: 2 of 4 steps did not finish: c failed (data source '{tmp_path}/not-there' is "
                    f"neither a built-in set (fashion-mnist) nor a directory); tok blocked (blocked by c); run the "
                    f"same command again to finish what is missing"], err
    assert _overlap(work, "a", "b") > 0  # a and b ran at once
    assert "[a] [pipeline 1/4] a (shards)" in out and "[b] [pipeline 2/4] b (shards)" in out  # console: named lines
    c_log = (work / "logs" / "c.log").read_text()
    assert "c failed: data source" in c_log and " a (shards)" not in c_log
    assert sorted(p.name for p in (store / "logs").iterdir()) == ["a.log", "b.log", "c.log"]  # tok never started
    assert storage.read_bytes(str(store / "logs" / "a.log")) == (work / "logs" / "a.log").read_bytes()
    done_a = json.loads((store / "data" / "a" / "dataset.json").read_text())
    assert done_a["images"] == 600

    # the rerun with the source fixed: a and b are complete and skipped, c and the blocked tok run
    assert main(base + ["c:source=fashion-mnist"]) == 0
    out = capsys.readouterr().out
    table = {ln.split()[0]: ln.split()[2] for ln in out.splitlines() if ln.split()[:1] in (["a"], ["b"], ["c"],
                                                                                           ["tok"])}
    assert table == {"a": "skipped", "b": "skipped", "c": "done", "tok": "done"}, out
    assert json.loads((store / "data" / "a" / "dataset.json").read_text()) == done_a  # not rewritten
    assert (store / "runs" / "tok" / "artifact").is_dir()
    assert "pipeline: 2 steps run, 2 complete and skipped" in out


@pytest.mark.integration
def test_one_at_a_time_the_same_steps_do_not_overlap(tmp_path, capsys):
    """The contrast that makes the overlap above mean something: --max-concurrent 1 runs them one after another."""
    config = _graph(tmp_path, "fashion-mnist")
    work = tmp_path / "work"
    assert main(["pipeline", str(config), "--store", str(tmp_path / "store"), "--work-dir", str(work),
                 "--only", "a", "b", "--max-concurrent", "1"]) == 0
    out = capsys.readouterr().out
    assert _overlap(work, "a", "b") <= 0  # b starts after a ends (the stamps are to the millisecond: may be equal)
    assert "[pipeline 1/4] a (shards)" in out and "[a] " not in out  # one at a time: lines exactly as printed


@pytest.mark.unit
def test_the_demos_longest_chain_counts_most_steps_to_the_end(tmp_path):
    from dmvae_scale.pipeline.run import _steps_to_the_end
    depth = _steps_to_the_end(load_pipeline(DEMO, str(tmp_path / "store")))
    # shards, teacher, tokenizer, reference, dmd, decoder, latents, generator, samples, fid
    assert depth["shards"] == 10 and depth["teacher"] == 9 and depth["tokenizer"] == 8
    assert depth["kl_tokenizer"] == 6 and depth["teacher_probe"] == 1 and depth["test_stats"] == 2
    assert depth["report"] == 1 and max(depth.values()) == depth["shards"]


@pytest.mark.integration
def test_several_at_once_the_ready_step_with_the_longest_chain_after_it_starts_first(tmp_path, capsys):
    """a, b and c are ready at once and two may run; tok reads c, so c goes before b though the file lists b first
    (one at a time, the order stays the file's: the test above)."""
    config = _graph(tmp_path, "fashion-mnist")
    work = tmp_path / "work"
    assert main(["pipeline", str(config), "--store", str(tmp_path / "store"), "--work-dir", str(work),
                 "--only", "a", "b", "c"]) == 0
    capsys.readouterr()
    start = {n: _interval((work / "logs" / f"{n}.log").read_text(), n)[0] for n in ("a", "b", "c")}
    assert start["c"] < start["b"] and start["a"] < start["b"], start
    assert _overlap(work, "a", "c") > 0


@pytest.mark.integration
def test_on_a_cluster_independent_steps_run_at_once_on_different_workers(node_cluster, s3_bucket,  # noqa: F811
                                                                         tmp_path):
    """Ray: a and b (one one-CPU task each) run at once on the two one-CPU worker nodes; c's failure leaves them
    done."""
    from dmvae_scale.pipeline.run import PipelineFailed, run_pipeline
    config = _graph(tmp_path, "/no/such/imagenet", launcher="ray")
    store = f"{s3_bucket}/g"
    pipe = load_pipeline(config, store, [f"tok:{o}" for o in TINY])
    work = tmp_path / "work"
    with pytest.raises(PipelineFailed) as failed:
        run_pipeline(pipe, work_dir=str(work))
    status = {r.name: r.status for r in failed.value.reports}
    assert status == {"a": "done", "b": "done", "c": "failed", "tok": "blocked"}
    assert failed.value.exit_code == 2
    assert _overlap(work, "a", "b") > 0
    nodes = [json.loads(storage.read_bytes(f"{store}/data/{n}/placement.json"))["nodes"] for n in ("a", "b")]
    assert len(nodes[0]) == len(nodes[1]) == 1 and nodes[0] != nodes[1]  # each on its own worker node, at once
    assert storage.exists(f"{store}/logs/a.log") and storage.exists(f"{store}/logs/c.log")


@pytest.mark.unit
def test_a_run_that_ends_leaves_the_other_runs_stop_registered():
    """Two runs on step threads whose stop lists are equal by value (both still empty), the other one registered
    first: the run that ends must take away its own list, not the other's (the stop would then miss the run still
    going)."""
    from dmvae_scale.train.collectives import stop_runs_off_the_main_thread
    from dmvae_scale.train.launch import _forwarded_stop_signals
    asked = []
    other_in, this_done, appended, leave = (threading.Event() for _ in range(4))

    def other():
        with _forwarded_stop_signals() as on_stop:
            other_in.set()
            this_done.wait(30)
            on_stop.append(lambda: asked.append("other"))
            appended.set()
            leave.wait(30)

    def this():
        other_in.wait(30)
        with _forwarded_stop_signals():
            pass
        this_done.set()

    threads = [threading.Thread(target=other), threading.Thread(target=this)]
    for t in threads:
        t.start()
    assert this_done.wait(30) and appended.wait(30)  # the other run appends its call after this one has gone
    try:
        assert stop_runs_off_the_main_thread() == 1
        assert asked == ["other"]
    finally:
        leave.set()
        for t in threads:
            t.join()


@pytest.mark.integration
def test_a_stop_reaches_in_process_runs_on_step_threads_they_checkpoint_and_the_rerun_resumes(tmp_path):
    """SIGTERM (a `ray job stop`, Ctrl-C) to a pipeline running two in-process train steps at once (the demo's launcher
    auto): both runs checkpoint and stop, the pipeline ends with exit 2 instead of training on, and the same command
    again resumes both from their checkpoints."""
    import os
    import signal
    import subprocess
    import time
    from repo import REPO
    config = tmp_path / "pipe"
    config.mkdir()
    shutil.copy(DEMO / "kl_tokenizer.yaml", config / "kl_tokenizer.yaml")
    (config / "pipeline.yaml").write_text("""launcher: local
max_concurrent: 2
steps:
  - {name: a, kind: shards, source: fashion-mnist, split: train, limit: 256}
  - {name: t1, kind: train, config: kl_tokenizer.yaml, data: a}
  - {name: t2, kind: train, config: kl_tokenizer.yaml, data: a, overrides: [seed=1]}
""")
    store, work = tmp_path / "store", tmp_path / "work"
    cmd = [sys.executable, "-m", "dmvae_scale.cli", "pipeline", str(config), "--store", str(store), "--work-dir",
           str(work), "total_images=640", "batch_size=16", "log_every_images=16", "ckpt_every_images=320"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = {"t1": False, "t2": False}
    lines: list[str] = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:  # both runs training: each has logged an interval
        lines.append(line)
        for name in seen:
            seen[name] |= line.startswith(f"[{name}] [train] tokenizer 16/640 images")
        if all(seen.values()) or time.monotonic() > deadline:
            break
    assert all(seen.values()), "".join(lines[-40:])
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=240)
    out = "".join(lines) + rest
    assert proc.returncode == 2, out[-3000:]
    assert time.monotonic() - sent < 120, out[-3000:]
    assert out.count("stop requested: checkpointing and stopping at the next stop check") == 2, out[-3000:]
    for name in ("t1", "t2"):
        log = (work / "logs" / f"{name}.log").read_text()
        assert f"{name} failed: stopped on request at " in log, log[-2000:]
        ckpts = sorted(p.name for p in (store / "runs" / name / "checkpoints").glob("img-*"))
        assert ckpts and int(ckpts[-1][4:]) < 640, (name, ckpts)  # a checkpoint at the stop, before the end
        assert not (store / "runs" / name / "artifact").exists()
    # The same command again resumes both runs from those checkpoints and finishes them.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    for name in ("t1", "t2"):
        log = (work / "logs" / f"{name}.log").read_text().rsplit(f"--- {name} started at", 1)[1]
        assert "resumed from" in log and f"{name}: train done: 640 images" in log, log[-2000:]
