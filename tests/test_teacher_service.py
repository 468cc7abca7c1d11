"""TeacherService on a real loopback Ray cluster: two workers share one service, features equal in-process features bit
for bit, a killed service costs a retry and never a batch without features."""
from __future__ import annotations

import sys
import time

import pytest
import ray
import torch

from dmvae_scale.distributed.teacher_service import (
    FEATURES_KEY, ServiceOptions, TeacherClient, TeacherUnavailableError, connect_teacher_service,
    start_teacher_service, stop_teacher_service)
from dmvae_scale.distributed.teachers import TeacherSpec, build_teacher

# Workers cannot import this test module; ship its functions and classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# chunk 32 > the 6-image requests: every forward pads, so the service is the slow side and requests queue up.
SPEC = TeacherSpec(name="random_vit", image_size=32, grid=8, arch="vit_tiny", patch_size=4, seed=11, chunk=32)
BATCH, STEPS = 6, 8


def batches_of(rank: int, steps: int = STEPS) -> list[dict]:
    """Each worker's data: a pure function of (rank, step), so the test can recompute it."""
    out = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * rank + step)
        out.append({"image": torch.rand(BATCH, 3, 32, 32, generator=g) * 2 - 1, "step": step})
    return out


@ray.remote(num_cpus=1)
class TrainWorker:
    """A training worker: a bottleneck layer trained on teacher features, one SGD step per batch."""

    def run(self, pool, rank: int, steps: int, max_retries: int = 8) -> dict:
        torch.manual_seed(rank)
        client = TeacherClient(pool, rank=rank, max_retries=max_retries, retry_wait_s=0.2)
        bottleneck = torch.nn.Linear(96, 4)
        opt = torch.optim.SGD(bottleneck.parameters(), lr=0.1)
        trained, features = [], []
        try:
            for batch in client.attach(batches_of(rank, steps)):
                feats = batch[FEATURES_KEY]  # a batch without features never reaches this line
                loss = bottleneck(feats).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                trained.append(batch["step"])
                features.append(feats.clone())
            error = None
        except TeacherUnavailableError as exc:
            error = str(exc)
        return {"trained": trained, "features": features, "error": error, **client.stats()}


@pytest.fixture(scope="module")
def reference_teacher():
    torch.set_num_threads(1)
    return build_teacher(SPEC)


@pytest.fixture(scope="module")
def workers(ray_driver):
    """Two training workers (one CPU each: the whole 2-CPU cluster; the service asks for num_cpus=0)."""
    return [TrainWorker.remote() for _ in range(2)]


@pytest.fixture(scope="module")
def service(ray_driver):
    pool = start_teacher_service(SPEC, ServiceOptions(name="teacher-test", num_cpus=0, max_restarts=2,
                                                      max_wait_ms=20, threads=1))
    yield pool
    stop_teacher_service(pool)


def wait_for_requests(pool, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pool.info()[0]["requests"] < count:
        assert time.monotonic() < deadline, f"the service did not serve {count} requests in {timeout_s} s"
        time.sleep(0.02)


@pytest.mark.integration
def test_service_batches_requests_of_both_workers(service, workers, reference_teacher):
    before = service.info()[0]
    results = ray.get([w.run.remote(service, rank, 6) for rank, w in enumerate(workers)], timeout=120)
    after = service.info()[0]
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == 12 and after["images"] - before["images"] == 12 * BATCH
    assert batches < requests, "no batch held requests of more than one worker"
    for rank, result in enumerate(results):
        assert result["retries"] == 0 and result["trained"] == list(range(6))
        for batch, feats in zip(batches_of(rank, 6), result["features"]):
            assert torch.equal(feats, reference_teacher.encode(batch["image"]))
    # Another client finds the service by name and gets the same features.
    again = TeacherClient(connect_teacher_service(SPEC, service.options, wait_s=10))
    x = batches_of(0, 1)[0]["image"]
    assert torch.equal(again.features(x), reference_teacher.encode(x))


@pytest.mark.integration
def test_two_workers_share_one_service_and_survive_a_kill(service, workers, reference_teacher):
    before = service.info()[0]
    runs = [w.run.remote(service, rank, STEPS) for rank, w in enumerate(workers)]
    # Kill the service while both workers have requests in flight (it is the slow side), after a few were served.
    wait_for_requests(service, before["requests"] + 4)
    ray.kill(service.handles[0], no_restart=False)
    results = ray.get(runs, timeout=180)

    info = service.info()[0]
    assert info["restarted"] and info["pid"] != before["pid"]
    assert sum(r["retries"] for r in results) >= 1, "the kill cost no retry: no request was in flight"
    for rank, result in enumerate(results):
        assert result["error"] is None
        assert result["trained"] == list(range(STEPS))  # every batch trained, in order, none skipped
        for batch, feats in zip(batches_of(rank), result["features"]):
            assert torch.equal(feats, reference_teacher.encode(batch["image"])), f"rank {rank} {batch['step']}"


@pytest.mark.integration
def test_a_service_of_another_teacher_is_refused(service):
    other = TeacherSpec(**{**SPEC.__dict__, "seed": 12})
    with pytest.raises(RuntimeError, match="already runs another teacher"):
        connect_teacher_service(other, service.options, wait_s=10)


@pytest.mark.integration
def test_a_service_gone_for_good_stops_the_run_instead_of_training_without_features(workers):
    pool = start_teacher_service(SPEC, ServiceOptions(name="teacher-mortal", num_cpus=0, max_restarts=0, threads=1))
    run = workers[0].run.remote(pool, 0, 40, 2)
    wait_for_requests(pool, 3)
    ray.kill(pool.handles[0], no_restart=True)
    result = ray.get(run, timeout=60)
    assert result["error"] is not None and "stopping instead of training without features" in result["error"]
    assert 2 <= len(result["trained"]) < 40
    assert len(result["features"]) == len(result["trained"])  # each trained batch had its features


@pytest.mark.integration
def test_training_on_remote_features_equals_training_in_process(service, reference_teacher):
    """teacher.remote true or false: the same trained weights, bit for bit (same device, dtype and threads)."""
    from dmvae_scale.distributed.teacher_service import LocalFeatures

    def train(source) -> torch.Tensor:
        torch.manual_seed(0)
        layer = torch.nn.Linear(96, 4)
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
        for batch in source.attach(batches_of(0, 5)):
            loss = layer(batch[FEATURES_KEY]).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in layer.parameters()])

    remote = train(TeacherClient(service))
    local = train(LocalFeatures(reference_teacher))
    assert torch.equal(remote, local)


@pytest.mark.integration
def test_config_picks_the_feature_source_and_both_agree(ray_driver):
    """`teacher.remote` switches between the service and the in-process teacher; the features are the same."""
    from dmvae_scale.config import load_config
    from dmvae_scale.distributed.teacher_service import LocalFeatures, open_feature_source

    overrides = ["teacher.name=random_vit", "batch_size=8", "teacher.num_cpus=0"]
    local = open_feature_source(load_config("configs/demo/tokenizer.yaml", overrides))
    remote = open_feature_source(load_config("configs/demo/tokenizer.yaml", overrides + ["teacher.remote=true"]),
                                 start=True)
    try:
        assert isinstance(local, LocalFeatures) and isinstance(remote, TeacherClient)
        x = batches_of(1, 1)[0]["image"]
        assert torch.equal(remote.features(x), local.features(x))
    finally:
        stop_teacher_service(remote.pool)
