"""Shared-memory all-reduce / all-gather between 2 real ranks, checked against gloo's own collectives.

`python tests/test_shm_collectives.py --worker OUT.json` is the rank program; the tests read what
rank 0 wrote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.ranks import run_worker_ranks, worker_main

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")


def worker(out_path: str) -> None:
    import torch
    import torch.distributed as dist

    from ragdist import distributed as rdist
    from ragdist.train.shm_collectives import ShmCollectives

    torch.set_num_threads(1)
    rank, world = rdist.init_process_group()
    before = {f for f in os.listdir("/dev/shm") if f.startswith("ragdist-shm-")}
    res: dict = {"cases": []}
    # 300 KB slots: the 4 MB tensors below go through in chunks
    for label, slot in (("one_slot", 32 << 20), ("chunked", 300_000)):
        shm = ShmCollectives.create(max_slot_bytes=slot)
        assert shm is not None
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for n in (40_000, 100_003, 1_000_001):
                g = torch.Generator().manual_seed(1000 * rank + n)
                x = torch.randn(n, generator=g).to(dtype)
                want, got = x.clone(), x.clone()
                dist.all_reduce(want)
                took_r = shm.all_reduce_(got)
                part = torch.randn(n, generator=g).to(dtype)
                want_g, got_g = torch.empty(world * n, dtype=dtype), torch.full((world * n,), 7.0, dtype=dtype)
                dist.all_gather_into_tensor(want_g, part)
                took_g = shm.all_gather_into_tensor(got_g, part)
                res["cases"].append({
                    "slot": label, "dtype": str(dtype), "n": n, "reduce_taken": took_r,
                    "reduce_equal": bool(torch.equal(want, got)), "gather_taken": took_g,
                    "gather_equal": bool(torch.equal(want_g, got_g)),
                })  # fmt: skip
        # 2-D tensors keep their shape; the result is identical on every rank
        m = torch.full((300, 200), float(rank + 1))
        assert shm.all_reduce_(m)
        peers = [torch.empty_like(m) for _ in range(world)]
        dist.all_gather(peers, m)
        res[f"{label}_2d"] = bool(all(torch.equal(p, peers[0]) for p in peers)) and float(m[0, 0]) == 3.0
        res[f"{label}_calls"] = dict(shm.calls)
        shm.close()
    # calls it does not take: nothing done, the caller keeps its tensor
    shm = ShmCollectives.create()
    small = torch.ones(100)
    ints = torch.ones(100_000, dtype=torch.int64)
    strided = torch.ones(400, 400).t()
    res["refused"] = {
        "small": shm.all_reduce_(small) or float(small[0]) != 1.0,
        "int64": shm.all_reduce_(ints) or int(ints[0]) != 1,
        "strided": shm.all_reduce_(strided) or float(strided[0, 0]) != 1.0,
        "gather_shape": shm.all_gather_into_tensor(torch.empty(10), torch.ones(100_000)),
    }
    res["calls_after_refusals"] = dict(shm.calls)
    dist.barrier()
    res["left_in_dev_shm"] = sorted({f for f in os.listdir("/dev/shm") if f.startswith("ragdist-shm-")} - before)
    if rank == 0:
        Path(out_path).write_text(json.dumps(res))
    rdist.shutdown()


@pytest.fixture(scope="module")
def shm_run(tmp_path_factory):
    return run_worker_ranks(__file__, tmp_path_factory.mktemp("shm") / "results.json")


def test_all_reduce_and_all_gather_match_gloo_bitwise(shm_run):
    cases = shm_run["cases"]
    assert len(cases) == 2 * 3 * 3
    for c in cases:
        assert c["reduce_taken"] and c["gather_taken"], c
        assert c["reduce_equal"] and c["gather_equal"], c
    assert shm_run["one_slot_2d"] and shm_run["chunked_2d"]
    assert shm_run["one_slot_calls"] == {"all_reduce": 10, "all_gather": 9}
    assert shm_run["chunked_calls"] == {"all_reduce": 10, "all_gather": 9}


def test_untaken_calls_change_nothing(shm_run):
    assert shm_run["refused"] == {"small": False, "int64": False, "strided": False, "gather_shape": False}
    assert shm_run["calls_after_refusals"] == {"all_reduce": 0, "all_gather": 0}


def test_no_region_file_outlives_its_setup(shm_run):
    assert shm_run["left_in_dev_shm"] == []


if __name__ == "__main__":
    worker_main(worker)
