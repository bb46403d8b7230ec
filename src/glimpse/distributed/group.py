"""A tensor-parallel group: this process's rank, the world size, and the collectives the model needs.

At size 1 (`SINGLE`) every collective returns its input untouched: no copies, no process group.
Collectives run on the device group (NCCL on GPUs, gloo on CPUs). A bounded `timeout` makes a
collective whose peer died fail instead of waiting forever.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = float(os.environ.get("GLIMPSE_TP_TIMEOUT_S", "120"))
"""How long a collective may wait for a peer before it fails (the watchdog usually notices a death first)."""


class CollectiveError(RuntimeError):
    """A collective failed: a peer died or stopped answering (gloo and NCCL raise plain RuntimeErrors)."""


@dataclass(frozen=True)
class TPGroup:
    """Rank `rank` of `size`; `group` is None only at size 1."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    @property
    def is_parallel(self) -> bool:
        return self.size > 1

    def split(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share of `n` items (n divisible by size): (start, count)."""
        count = n // self.size
        return self.rank * count, count

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (row-parallel outputs, the vocabulary-parallel embedding)."""
        if self.size > 1:
            try:
                dist.all_reduce(x, group=self.group)
            except RuntimeError as e:
                raise CollectiveError(f"all_reduce failed: {e}") from e
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along the last dimension, in rank order (vocabulary-parallel logits)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        try:
            dist.all_gather(parts, x.contiguous(), group=self.group)
        except RuntimeError as e:
            raise CollectiveError(f"all_gather failed: {e}") from e
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `x` on every rank, in place."""
        if self.size > 1:
            try:
                dist.broadcast(x, src=src, group=self.group)
            except RuntimeError as e:
                raise CollectiveError(f"broadcast failed: {e}") from e
        return x

    def all_reduce_min(self, value: int, device: torch.device) -> int:
        """The smallest `value` of all ranks (the memory every rank can afford)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        except RuntimeError as e:
            raise CollectiveError(f"all_reduce(min) failed: {e}") from e
        return int(t.item())


SINGLE = TPGroup()
"""No tensor parallelism."""


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_group(
    rank: int, size: int, init_method: str, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S
) -> TPGroup:
    """Join the process group (every rank calls this with the same `init_method` and `size`). It is the
    process's default group (the path NCCL is best trodden on), so one process holds one group at a time."""
    if size == 1:
        return SINGLE
    if dist.is_initialized():
        raise RuntimeError(
            "a tensor-parallel engine is already running in this process; close it (engine.close()) first"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend_for(device), init_method=init_method, rank=rank, world_size=size,
        timeout=timedelta(seconds=timeout_s),
        **({"device_id": device} if device.type == "cuda" else {}),
    )  # fmt: skip
    return TPGroup(rank, size, dist.group.WORLD)


def destroy_group(tp: TPGroup) -> None:
    if tp.size > 1 and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to tear down cleanly
            pass


def abort_group(tp: TPGroup) -> None:
    """Unblock this rank's collectives after a peer died: NCCL would wait out its timeout (gloo notices a
    closed socket at once). Best effort, from any thread."""
    if tp.group is None or not torch.cuda.is_available():
        return
    try:
        tp.group._get_backend(torch.device("cuda")).abort()
    except Exception:  # not NCCL, or already torn down
        pass
