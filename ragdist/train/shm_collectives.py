"""Sum all-reduce and all-gather through shared memory, for CPU ranks that share one node.

gloo moves CPU tensors between ranks over TCP sockets even when every rank is on the same machine.
On the 2-core benchmark host, 2 ranks all-reducing 4.4M fp32 (a tiny model's gradients) took
13.2 ms over gloo; gathering 2.2M fp32 from each took 8.2 ms. Through a shared-memory region the
same collectives cost a few copies at memory speed (`bench/train_step.py` measures what that does
to a training step).

Protocol (one region per process group, double-buffered so a collective never waits for the
previous one's readers):

- all-reduce: each rank copies its tensor into its slot; barrier; rank r sums segment r of every
  slot, in rank order, into the result area; barrier; each rank copies the whole result out. Every
  element is summed once, by one rank, in a fixed order, so all ranks hold the same bits (with 2
  ranks exactly gloo's bits: a + b).
- all-gather: each rank copies its input to its place in the slot area; barrier; each rank copies
  the whole area out. Bytes are only copied.

The barriers run on a gloo group of their own: they also order the memory traffic (every barrier
is a socket round trip), and a peer that dies fails the barrier instead of hanging its peers. Tensors
larger than a slot go through in slot-sized chunks. The region lives in /dev/shm only while ranks
map it: the file is unlinked as soon as every rank has it open, so nothing outlives the processes.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
#: Below this many bytes gloo's own collective is cheaper than the two barriers.
MIN_BYTES = 64 * 1024
#: Largest slot: bigger tensors are chunked. The region holds 2 × (world + 1) slots.
MAX_SLOT_BYTES = 32 * 1024 * 1024
_SUMMABLE = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _node_id() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class ShmCollectives:
    """All-reduce (sum) and all-gather among every rank of the default process group, over shared memory.

    Build it with `ShmCollectives.create()` (collective: every rank calls it); it returns None where it
    cannot serve (not gloo, one rank, ranks on several nodes, no /dev/shm). The `all_reduce_` and
    `all_gather_into_tensor` methods return False, having done nothing, for calls they do not take
    (too small, not CPU, not contiguous, a dtype they do not sum); the caller then uses the process
    group. Every rank must make the same calls in the same order, as with any collective.
    """

    def __init__(self, group: Any, world: int, rank: int, max_slot_bytes: int = MAX_SLOT_BYTES):
        self.group, self.world, self.rank = group, world, rank
        self.max_slot_bytes = max_slot_bytes
        self.slot_bytes = 0
        self._mm: mmap.mmap | None = None
        self._buf: torch.Tensor | None = None
        self._gen = 0  # which half of the double buffer the next collective uses
        self.disabled = False
        self.calls = {"all_reduce": 0, "all_gather": 0}
        self.bytes = 0

    @classmethod
    def create(cls, max_slot_bytes: int = MAX_SLOT_BYTES) -> ShmCollectives | None:
        if not dist.is_initialized() or dist.get_backend() != "gloo" or dist.get_world_size() < 2:
            return None
        world, rank = dist.get_world_size(), dist.get_rank()
        nodes: list[Any] = [None] * world
        dist.all_gather_object(nodes, (_node_id(), SHM_DIR.is_dir()))
        if len({n for n, _ in nodes}) != 1 or not all(ok for _, ok in nodes):
            return None
        # a group of its own, so the barriers never interleave with other collectives' messages
        return cls(dist.new_group(backend="gloo"), world, rank, max_slot_bytes)

    # -- the region ---------------------------------------------------------------------------------

    def _region_bytes(self, slot: int) -> int:
        return 2 * (self.world + 1) * slot

    def _ensure(self, nbytes: int) -> bool:
        """A region whose slots hold `nbytes` (up to the largest slot); collective when it changes."""
        if self.disabled:
            return False
        want = min(self.max_slot_bytes, nbytes)
        if want <= self.slot_bytes:
            return True
        # every rank sees the same sizes in the same order, so all of them grow here together
        slot = min(self.max_slot_bytes, max(want, 2 * self.slot_bytes, 1 << 20))
        slot = (slot + 4095) // 4096 * 4096
        size = self._region_bytes(slot)
        name: list[Any] = [None]
        if self.rank == 0:
            path = SHM_DIR / f"ragdist-shm-{uuid.uuid4().hex}"
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                try:
                    os.posix_fallocate(fd, 0, size)  # reserve now: a full tmpfs fails here, not with SIGBUS later
                finally:
                    os.close(fd)
                name[0] = str(path)
            except OSError as e:
                log.warning("shared-memory collectives off: cannot reserve %d bytes in %s (%s)", size, SHM_DIR, e)
                path.unlink(missing_ok=True)
        dist.broadcast_object_list(name, src=0, group=self.group)
        ok = torch.tensor([1 if name[0] else 0])
        mm = None
        if name[0]:
            try:
                with open(name[0], "r+b") as f:
                    mm = mmap.mmap(f.fileno(), size)
            except OSError as e:
                log.warning("shared-memory collectives off: cannot map %s (%s)", name[0], e)
                ok.zero_()
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)
        if self.rank == 0 and name[0]:
            os.unlink(name[0])  # every rank has it mapped (or gave up): the name is no longer needed
        if not ok.item():
            if mm is not None:
                mm.close()
            self.disabled = True
            return False
        self._release()
        self._mm, self._buf, self.slot_bytes = mm, torch.frombuffer(mm, dtype=torch.uint8), slot
        return True

    def _release(self) -> None:
        self._buf = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a tensor view still refers to it; the mapping goes with the last one
                pass
            self._mm = None

    def _half(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot area, result area) of the next half of the double buffer, viewed as `dtype`."""
        assert self._buf is not None
        half = (self.world + 1) * self.slot_bytes
        base = self._gen * half
        self._gen ^= 1
        area = self._buf[base : base + self.world * self.slot_bytes].view(dtype)
        result = self._buf[base + self.world * self.slot_bytes : base + half].view(dtype)
        return area, result

    def _barrier(self) -> None:
        dist.barrier(group=self.group)

    # -- collectives --------------------------------------------------------------------------------

    def _takes(self, *tensors: torch.Tensor) -> bool:
        t = tensors[0]
        return (
            not self.disabled
            and all(x.device.type == "cpu" and x.is_contiguous() and x.dtype == t.dtype for x in tensors)
            and t.dtype in _SUMMABLE
            and t.numel() * t.element_size() >= MIN_BYTES
        )

    def all_reduce_(self, tensor: torch.Tensor) -> bool:
        """Sum `tensor` over all ranks, in place. False (nothing done) when this call is not taken."""
        if not self._takes(tensor) or not self._ensure(tensor.numel() * tensor.element_size()):
            return False
        flat = tensor.view(-1)
        per = self.slot_bytes // tensor.element_size()
        for start in range(0, flat.numel(), per):
            self._all_reduce_chunk(flat[start : start + per])
        self.calls["all_reduce"] += 1
        self.bytes += tensor.numel() * tensor.element_size()
        return True

    def _all_reduce_chunk(self, x: torch.Tensor) -> None:
        n, w, r = x.numel(), self.world, self.rank
        area, result = self._half(x.dtype)
        slots = [area[i * n : (i + 1) * n] for i in range(w)]
        slots[r].copy_(x)
        self._barrier()
        seg = -(-n // w)
        lo, hi = min(n, r * seg), min(n, (r + 1) * seg)
        if hi > lo:
            out = result[lo:hi]
            torch.add(slots[0][lo:hi], slots[1][lo:hi], out=out)
            for i in range(2, w):
                out.add_(slots[i][lo:hi])
        self._barrier()
        x.copy_(result[:n])

    def all_gather_into_tensor(self, output: torch.Tensor, inp: torch.Tensor) -> bool:
        """`output` ← every rank's `inp` in rank order. False (nothing done) when this call is not taken."""
        if output.numel() != self.world * inp.numel() or not self._takes(output, inp):
            return False
        if not self._ensure(inp.numel() * inp.element_size()):
            return False
        src, dst = inp.view(-1), output.view(-1)
        n = src.numel()
        per = self.slot_bytes // inp.element_size()
        for start in range(0, n, per):
            m = min(per, n - start)
            area, _ = self._half(inp.dtype)
            area[self.rank * m : (self.rank + 1) * m].copy_(src[start : start + m])
            self._barrier()
            if m == n:  # one chunk: the area is the output, rank after rank
                dst.copy_(area[: self.world * n])
            else:
                for j in range(self.world):
                    dst[j * n + start : j * n + start + m].copy_(area[j * m : (j + 1) * m])
        self.calls["all_gather"] += 1
        self.bytes += output.numel() * output.element_size()
        return True

    def close(self) -> None:
        self._release()
        self.disabled = True
