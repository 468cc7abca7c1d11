"""tools/gpu_throughput.py: runs on a machine with torch alone (no yaml, ray, deepspeed imported), says "no CUDA
device" and exits 0 without a GPU, and writes its JSON table with one."""
import json
import subprocess
import sys

import pytest
from repo import REPO

TOOL = REPO / "tools" / "gpu_throughput.py"

# Runs the tool with imports of the packages a bare GPU machine lacks made to fail.
BLOCKED = """
import builtins, runpy, sys
real = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split('.')[0] in ('yaml', 'ray', 'deepspeed', 'streaming', 's3fs', 'scipy', 'matplotlib', 'pyarrow'):
        raise ImportError('not on a bare GPU machine: ' + name)
    return real(name, *args, **kwargs)
builtins.__import__ = guarded
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-c", BLOCKED, str(TOOL), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.unit
def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = _run("--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no CUDA device"


@pytest.mark.unit
def test_models_and_estimate_import_with_torch_alone(tmp_path):
    code = BLOCKED.replace("sys.argv = [sys.argv[1]] + sys.argv[2:]\nrunpy.run_path(sys.argv[0], run_name='__main__')",
                           "import dmvae_scale.models.dit, dmvae_scale.models.flops, dmvae_scale.scaling.estimate\n"
                           "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.gpu
def test_table_on_a_gpu(tmp_path):
    done = _run("--out", str(tmp_path), "--models", "XL/2", "--steps", "2", "--warmup", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    table = json.loads((tmp_path / "gpu_throughput.json").read_text())
    rows = {r["attention"]: r for r in table["rows"]}
    assert set(rows) == {"flash", "math"} and all(r["status"] == "ok" for r in rows.values())
    for r in rows.values():
        assert r["images_per_s"] > 0 and r["peak_memory_gib"] > 0
        assert r["counted_gflops_per_image"] == pytest.approx(r["train_gflops_per_image"], rel=0.02)
