"""`estimate`'s communication model: its byte counts against what DeepSpeed's collectives really move for a small
LightningDiT on gloo (our engine, 2 and 3 workers), the ring and bandwidth arithmetic, the scaling table and its
flags."""
from __future__ import annotations

import inspect
import json
import multiprocessing
import os
import threading

import pytest

from dmvae_scale.cli import main as cli_main
from dmvae_scale.config import DiTConfig
from dmvae_scale.scaling.comms import (INSTANCES, Collective, payload_by_op, resolve_network, step_collectives,
                                       step_seconds)
from dmvae_scale.scaling.estimate import NetworkChoice, estimate, param_numels, scaling_rows

# A 2.6M-parameter LightningDiT: linear layers above ZeRO-3's persistence threshold (1e5 elements) and small tensors
# below it; 3 latent channels make the parameter count odd, so every stage's padding to the world size shows.
SMALL = DiTConfig(depth=2, hidden_size=256, num_heads=4, input_size=4, in_channels=3, num_classes=10,
                  attention="sdpa")
MICRO = 2
SCALARS = 64  # bytes of scalar collectives per step the model leaves out (DeepSpeed's gradient-norm all-reduce)

# (name, ZeRO stage, grad_accum, DeepSpeed config keys added to our engine's, gradient dtype, model overrides)
CASES = [
    ("zero0", 0, 1, {}, "fp32", {}),
    ("zero1 accum2", 1, 2, {}, "fp32", {}),
    ("zero2 accum2", 2, 2, {}, "fp32", {}),
    ("zero2 bf16", 2, 1, {"communication_data_type": "bf16"}, "bf16", {}),
    ("zero3", 3, 1, {}, "fp32", {}),
    ("zero3 accum2 bf16", 3, 2, {"communication_data_type": "bf16"}, "bf16", {}),
    ("zero3 re-gather", 3, 1, {"zero_optimization": {"stage3_max_reuse_distance": 0,
                                                     "stage3_prefetch_bucket_size": 0}}, "fp32",
     {"max_reuse_distance": 0, "prefetch_bucket": 0}),
]
OPS = {"all_reduce": "tensor", "broadcast": "tensor", "reduce": "tensor",
       "all_gather_into_tensor": "output_tensor", "all_gather": "tensor_list",
       "reduce_scatter_tensor": "input", "reduce_scatter": "input_list"}
KIND = {"all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter"}


def _count_collectives(totals: dict) -> None:
    """Wrap torch.distributed's collectives (both namespaces DeepSpeed and torch call through) so each outermost
    call adds its payload: the tensor reduced or broadcast, the gathered output, the reduce-scatter input."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    inside = threading.local()
    for op, arg in OPS.items():
        fn = getattr(c10d, op)
        signature = inspect.signature(fn)

        def counted(*args, _fn=fn, _op=op, _arg=arg, _sig=signature, **kwargs):
            if getattr(inside, "depth", 0) == 0:
                value = _sig.bind(*args, **kwargs).arguments[_arg]
                tensors = value if isinstance(value, (list, tuple)) else [value]
                kind = KIND.get(_op, _op)
                totals[kind] = totals.get(kind, 0) + sum(t.numel() * t.element_size() for t in tensors)
            inside.depth = getattr(inside, "depth", 0) + 1
            try:
                return _fn(*args, **kwargs)
            finally:
                inside.depth -= 1
        setattr(dist, op, counted)
        setattr(c10d, op, counted)


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        totals: dict = {}
        _count_collectives(totals)  # before DeepSpeed's comm backend takes its references
        import torch

        import dmvae_scale.train.deepspeed_engine as engine_module
        from dmvae_scale.config import DistributedConfig, OptimConfig
        from dmvae_scale.models.dit import LightningDiT
        from dmvae_scale.train.api import ModelSpec
        engine_module.init_distributed(use_gpu=False)
        ours = engine_module.deepspeed_config
        measured = {}
        for name, stage, accum, extra, _, _ in CASES:
            def with_extra(*args, _extra=extra, **kwargs):
                cfg = ours(*args, **kwargs)
                for key, value in _extra.items():
                    cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
                return cfg
            engine_module.deepspeed_config = with_extra
            torch.manual_seed(0)
            engines = engine_module.build_engines(
                {"dit": ModelSpec(LightningDiT(SMALL), True, OptimConfig())},
                DistributedConfig(num_workers=world, zero_stage=stage, grad_accum=accum), micro_batch=MICRO,
                rank=rank, world_size=world, device=torch.device("cpu"))
            engine = engines.engines["dit"]

            def optimiser_step():
                for _ in range(accum):
                    x = torch.randn(MICRO, SMALL.in_channels, SMALL.input_size, SMALL.input_size)
                    loss = engine(x, torch.rand(MICRO), torch.randint(0, 10, (MICRO,))).square().mean()
                    engine.backward(loss)
                    engine.step()
            optimiser_step()
            optimiser_step()  # warm-up: ZeRO-3 records its trace in the first step
            totals.clear()
            optimiser_step()
            measured[name] = dict(totals)
        queue.put((rank, "ok", measured))
    except Exception as exc:  # report instead of leaving the parent waiting
        queue.put((rank, "error", repr(exc)))


def _measure(world: int) -> dict:
    from dmvae_scale.localhost import free_port
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, world, port, queue)) for rank in range(world)]
    for proc in procs:
        proc.start()
    try:
        results = sorted(queue.get(timeout=240) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    for rank, status, measured in results:
        assert status == "ok", f"rank {rank}: {measured}"
    assert all(m == results[0][2] for _, _, m in results)  # every rank moves the same payloads
    return results[0][2]


@pytest.mark.integration
@pytest.mark.parametrize("world", [2, 3])
def test_byte_counts_equal_what_deepspeed_moves_on_gloo(world):
    """Payloads per optimiser step, per collective kind, as measured around torch.distributed in each worker, equal
    the model's to the byte, up to the gradient-norm scalar the model leaves out (wire bytes on a ring are these
    payloads times 2 (N-1)/N or (N-1)/N; gloo's own algorithms differ, so only payloads are compared)."""
    measured = _measure(world)
    numels = param_numels(SMALL)
    for name, stage, accum, _, grad_dtype, model_kwargs in CASES:
        predicted = payload_by_op(step_collectives(numels, stage, world, grad_accum=accum, grad_dtype=grad_dtype,
                                                   **model_kwargs))
        got = measured[name]
        print(f"world {world} {name:<18} measured {got} predicted {predicted}")
        assert set(got) == set(predicted) | ({"all_reduce"} if "all_reduce" in got else set()), name
        for op in got:
            assert 0 <= got[op] - predicted.get(op, 0) <= SCALARS, (name, op, got[op], predicted.get(op, 0))


# ----------------------------------------------------------------------------------------------------------------------
# The arithmetic
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_per_stage_payloads_and_ring_wire_bytes():
    numels, n = [1_000_000, 300_000, 10, 3], 8
    p = sum(numels)
    z0, = step_collectives(numels, 0, n)
    assert (z0.op, z0.payload) == ("all_reduce", 4 * p) and z0.wire(n) == pytest.approx(2 * 7 / 8 * 4 * p)
    reduce2, gather2 = step_collectives(numels, 2, n, grad_accum=4, grad_dtype="bf16")
    assert reduce2.payload == 4 * 2 * p and gather2.payload == 4 * 1_300_016  # padded to a multiple of 2 x 8
    assert gather2.wire(n) == pytest.approx(7 / 8 * gather2.payload)
    assert step_collectives(numels, 1, n, grad_accum=4)[0].payload == 4 * p  # stage 1 reduces once per step
    z3 = {c.what: c.payload for c in step_collectives(numels, 3, n)}
    assert z3["forward weight gathers"] == 4 * 1_300_000 and "backward re-gathers" not in z3  # reuse within 1e9
    assert z3["gradients"] == 4 * (1_300_000 + 16 + 8) and z3["persistent weights after the step"] == 4 * 24
    full = {c.what: c.payload for c in step_collectives(numels, 3, n, max_reuse_distance=0, prefetch_bucket=0)}
    assert full["backward re-gathers"] == 4 * 1_300_000  # nothing kept between forward and backward
    half = {c.what: c.payload for c in step_collectives(numels, 3, n, max_reuse_distance=1_000_000,
                                                        prefetch_bucket=0)}
    assert half.get("backward re-gathers", 0) == 0  # 2 x 300_024 elements later: within the reuse distance
    assert {c.what: c.payload for c in step_collectives(numels, 3, n, max_reuse_distance=600_000,
                                                        prefetch_bucket=0)}["backward re-gathers"] == 4 * 1_000_000
    assert step_collectives(numels, 3, 1) == []


@pytest.mark.unit
def test_slowest_link_bounds_a_ring_across_nodes_and_overlap_takes_the_larger():
    p4d = resolve_network("A100", "p4d.24xlarge", efficiency=1.0)
    assert p4d.bus_bandwidth(1) == 300e9 and p4d.bus_bandwidth(2) == 50e9
    net = resolve_network("H200", inter_gbs=25.0)
    assert net.name == "p5en.48xlarge (EFA) with overrides" and net.bus_bandwidth(4) == pytest.approx(0.8 * 25e9)
    assert step_seconds(3.0, 2.0, overlap=True) == 3.0 and step_seconds(3.0, 2.0, overlap=False) == 5.0
    assert Collective("all_reduce", "gradients", 100).wire(1) == 0.0
    assert set(INSTANCES) >= {"p4d.24xlarge", "p5.48xlarge", "p5en.48xlarge", "dgx-h100"}


@pytest.mark.unit
def test_xl_gradients_are_27_gb_a_step_and_the_table_scales_at_fixed_batch():
    cfg = DiTConfig(size="XL", patch_size=1)
    e = estimate(cfg, zero_stage=2, micro_batch=16, num_gpus=64, gpu="H200", mfu=0.4)
    reduce, gather = e.comm.collectives
    assert reduce.payload == pytest.approx(2.70e9, rel=0.01) and gather.payload == pytest.approx(reduce.payload)
    assert e.comm.nodes == 8 and e.comm.bus_bandwidth == pytest.approx(0.8 * 400e9)
    assert e.comm_s == pytest.approx((2 * 63 / 64 + 63 / 64) * reduce.payload / 320e9, rel=1e-3)
    assert e.step_s == pytest.approx(e.compute_s + e.comm_s) and e.images_per_s == pytest.approx(1024 / e.step_s)
    bf16 = estimate(cfg, zero_stage=2, micro_batch=16, num_gpus=64, gpu="H200", mfu=0.4,
                    network=NetworkChoice(grad_dtype="bf16", overlap="on"))
    assert bf16.comm.collectives[0].payload == pytest.approx(reduce.payload / 2)
    assert bf16.step_s == pytest.approx(max(bf16.compute_s, bf16.comm_s))
    rows = scaling_rows(e, 32)
    assert [r.nodes for r in rows] == [1, 2, 4, 8, 16, 32] and [r.micro_batch for r in rows] == [128, 64, 32, 16, 8, 4]
    assert rows[0].efficiency == 1.0 and all(a.efficiency > b.efficiency for a, b in zip(rows, rows[1:]))
    assert rows[3].step_s == pytest.approx(e.step_s)  # 8 nodes = the estimate's own 64 GPUs
    assert rows[5].compute_s == pytest.approx(rows[0].compute_s / 32)


@pytest.mark.unit
def test_estimate_prints_compute_communication_step_and_the_scaling_table(capsys):
    assert cli_main(["estimate", "--size", "XL", "--zero", "2", "--batch", "1024", "--gpus", "64", "--gpu", "H200",
                     "--max-nodes", "32"]) == 0
    out = capsys.readouterr().out
    assert "all_reduce gradients" in out and "all_gather updated weights" in out
    assert "not overlapped: the sum" in out and "ms per step" in out
    table = out[out.index("scaling at global batch 1024"):].splitlines()
    assert table[1].split() == ["nodes", "GPUs", "micro", "compute", "ms", "comm", "ms", "step", "ms", "images/s",
                                "efficiency"]
    assert [int(line.split()[1]) for line in table[2:]] == [8, 16, 32, 64, 128, 256]
    assert table[2].split()[-1] == "100%"
    assert cli_main(["estimate", "--size", "B", "--zero", "3", "--gpus", "16", "--gpu", "H100", "--json",
                     "--grad-dtype", "bf16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["overlap"] is True and out["nodes"] == 2 and out["network"]["name"] == "p5.48xlarge (EFA)"
    assert {c["op"] for c in out["collectives"]} == {"all_gather", "reduce_scatter"}
    assert out["step_s"] == pytest.approx(max(out["compute_s"], out["comm_s"]))
    assert [r["nodes"] for r in out["scaling"]] == [1, 2, 4, 8]


@pytest.mark.unit
@pytest.mark.parametrize("flags,message", [
    (["--grad-dtype", "fp16"], "--grad-dtype must be one of fp32, bf16, got 'fp16'"),
    (["--overlap", "maybe"], "--overlap must be auto, on or off, got 'maybe'"),
    (["--max-nodes", "0"], "--max-nodes must be a positive number of nodes, got 0"),
    (["--instance", "p9.big"], "instance 'p9.big' is not in the network table"),
    (["--gpu", "L40S", "--gpus", "8"], "no network defaults for gpu 'L40S'; give --instance"),
    (["--instance", "p4d.24xlarge"], "instance p4d.24xlarge has A100 GPUs, not H200; give --gpu A100"),
    (["--gpus", "12", "--batch", "96"], "12 GPUs do not fill whole nodes of 8"),
    (["--inter-gbs", "-1"], "--inter-gbs must be positive, got -1.0"),
    (["--comm-efficiency", "1.5"], "--comm-efficiency is a fraction of the link peak in (0, 1], got 1.5"),
])
def test_bad_flags_are_one_line_errors(capsys, flags, message):
    assert cli_main(["estimate", "--size", "S", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
