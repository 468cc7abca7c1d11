"""The streaming reader across ranks: disjoint samples covering the epoch, and a mid-epoch stop + resume that reads
exactly the remaining samples with the same augmentation, with the same or a smaller number of ranks.

Ranks are separate processes with their RANK / WORLD_SIZE / LOCAL_* variables set before the dataset is built, as
torchrun or Ray Train set them (forked from a forkserver that has Streaming imported already, to save start-up).
"""
import hashlib
import multiprocessing
import os

import pytest

from dmvae_scale.data.shards import write_shards
from dmvae_scale.localhost import free_port

pytestmark = pytest.mark.integration

N, BATCH = 96, 4


def _rank_main(rank, world, port, url, stop_after, state, num_workers, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        from dmvae_scale.data.stream import ImageStreamDataset, make_loader
        ds = ImageStreamDataset(url, batch_size=BATCH, image_size=24, crop="random", hflip=True, seed=7,
                                num_canonical_nodes=1, with_keys=True)
        loader = make_loader(ds, num_workers=num_workers)
        if state is not None:
            loader.load_state_dict(state)
        samples = []
        for i, batch in enumerate(loader):
            for key, image in zip(batch["key"], batch["image"]):
                samples.append((key, hashlib.sha1(image.numpy().tobytes()).hexdigest()))
            if stop_after is not None and i + 1 == stop_after:
                break
        queue.put((rank, samples, loader.state_dict() if rank == 0 else None, None))
    except Exception as exc:  # report instead of hanging the parent
        queue.put((rank, [], None, repr(exc)))


def run_ranks(url, world, stop_after=None, state=None, num_workers=0):
    """Returns ([samples of rank 0, rank 1, ...], state of rank 0); a sample is (key, sha1 of its image tensor)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["streaming", "dmvae_scale.data.stream"])
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, url, stop_after, state, num_workers, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, samples, st, err = queue.get(timeout=180)
            assert err is None, f"rank {rank} failed: {err}"
            results[rank] = (samples, st)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r][0] for r in range(world)], results[0][1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    dest = tmp_path_factory.mktemp("resume") / "fm"
    write_shards("fashion-mnist", str(dest), limit=N, part_size=48, shard_bytes=1 << 13, progress=False)
    return str(dest)


def keys(samples):
    return [k for k, _ in samples]


def test_ranks_disjoint_and_resume_reads_exactly_the_rest(dataset):
    full, _ = run_ranks(dataset, world=2)
    all_keys = {f"fashion-mnist/train/{i:06d}" for i in range(N)}
    assert set(keys(full[0])).isdisjoint(keys(full[1]))
    assert sorted(keys(full[0]) + keys(full[1])) == sorted(all_keys)
    digest = {k: d for r in full for k, d in r}

    # stop after 3 batches per rank (24 samples seen), resume with 2 ranks
    first, state = run_ranks(dataset, world=2, stop_after=3)
    assert state["sample_in_epoch"] == 2 * 3 * BATCH
    for r in range(2):
        assert first[r] == full[r][:3 * BATCH]  # the stopped run read what the full run read first
    rest, _ = run_ranks(dataset, world=2, state=state)
    for r in range(2):
        assert rest[r] == full[r][3 * BATCH:]  # same samples, same order, same augmentation per rank

    # resume the 2-rank state with 1 rank (and 2 DataLoader workers): exactly the unread samples, none twice
    single, _ = run_ranks(dataset, world=1, state=state, num_workers=2)
    seen = keys(first[0]) + keys(first[1])
    resumed = keys(single[0])
    assert len(resumed) == len(set(resumed)) == N - len(seen)
    assert set(resumed) | set(seen) == all_keys and set(resumed).isdisjoint(seen)
    assert all(digest[k] == d for k, d in single[0])  # augmentation depends on (seed, epoch, sample) only
