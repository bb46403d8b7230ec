"""Run a function on every rank of a real gloo group (spawned processes) and return rank 0's result."""

from __future__ import annotations

import multiprocessing as mp
import pickle
from collections.abc import Callable
from typing import Any

import torch

from glimpse.distributed.group import TPGroup, destroy_group, init_group
from glimpse.distributed.workers import free_tcp_address


def _rank_main(rank: int, size: int, address: str, fn: Callable[..., Any], args: tuple, results) -> None:
    torch.set_num_threads(1)
    tp = init_group(rank, size, address, torch.device("cpu"), timeout_s=60)
    try:
        out = fn(tp, *args)
        if rank == 0:  # pickled here: a queued tensor would be shared through this process, about to exit
            results.put(pickle.dumps(out))
    finally:
        destroy_group(tp)


def run_ranks(size: int, fn: Callable[[TPGroup], Any], *args: Any, timeout_s: float = 120) -> Any:
    """fn(tp, *args) on ranks 0..size-1 (fn importable: the ranks are spawned); rank 0's return value."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    address = free_tcp_address()
    procs = [
        ctx.Process(target=_rank_main, args=(r, size, address, fn, args, results), daemon=True)
        for r in range(size)
    ]
    for p in procs:
        p.start()
    try:
        out = pickle.loads(results.get(timeout=timeout_s))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return out
