"""The two timers of every benchmark, and the rule that keeps a kernel's inputs out of L2.

- `time_eager`: the calls launched one by one from Python, as a serving step runs them without graphs
  (launch overhead included). CUDA events on a GPU, the host clock (after a device barrier) on a CPU.
- `time_graph`: the calls captured once in a CUDA graph and the graph replayed (launch gaps excluded, as
  in the engine's decode graphs).

A kernel that finds its inputs in L2 runs faster than it will in the model, where every layer brings its
own. So a kernel benchmark builds several independent input sets, together `L2_CYCLE_BYTES` or more
(`sets_over_l2`), and times one call per set in turn (`at_least` repeats the list to a useful length).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Call = Callable[[], object]

L2_CYCLE_BYTES = 320 << 20  # inputs cycled through per timing (L2 is 50 MB on an H100)


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call, one figure per timed repetition."""

    samples_ms: list[float]

    @property
    def ms(self) -> float:
        """The median over the repetitions."""
        return statistics.median(self.samples_ms)

    @property
    def seconds(self) -> float:
        return self.ms / 1e3

    @property
    def samples_seconds(self) -> list[float]:
        return [t / 1e3 for t in self.samples_ms]


def sync(device: torch.device | str) -> None:
    """Wait for the device: its work is asynchronous, so host clocks need this around timed regions."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _as_list(calls: Call | Sequence[Call]) -> list[Call]:
    return [calls] if callable(calls) else list(calls)


def time_eager(
    calls: Call | Sequence[Call],
    reps: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cuda",
    setup: Call | None = None,
) -> Timing:
    """ms per call of `calls` (one callable, or a list run in order as one repetition) launched from Python.

    `warmup` untimed repetitions first; `setup` (untimed, e.g. restoring a state the calls update in place)
    runs before every repetition. Each repetition starts on an idle device."""
    calls = _as_list(calls)

    def run() -> None:
        for c in calls:
            c()

    for _ in range(warmup):
        if setup is not None:
            setup()
        run()
    samples = []
    for _ in range(reps):
        if setup is not None:
            setup()
        sync(device)
        if torch.device(device).type == "cuda":
            stream = torch.cuda.current_stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            run()
            end.record(stream)
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            run()
            ms = (time.perf_counter() - t0) * 1e3
        samples.append(ms / len(calls))
    return Timing(samples)


def time_graph(calls: Call | Sequence[Call], reps: int = 20, warmup: int = 3) -> Timing:
    """ms per call: `calls` captured once in a CUDA graph (after one eager run, which compiles and warms
    them), the graph replayed `warmup` times untimed, then `reps` times timed."""
    calls = _as_list(calls)
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    for _ in range(warmup):
        graph.replay()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / len(calls))
    del graph
    return Timing(samples)


def sets_over_l2(per_set_bytes: int, lo: int = 2, hi: int = 64) -> int:
    """How many independent input sets of `per_set_bytes` to cycle through: enough for L2_CYCLE_BYTES,
    within [lo, hi]."""
    return max(lo, min(hi, math.ceil(L2_CYCLE_BYTES / max(1, per_set_bytes))))


def at_least(calls: list[Call], n: int = 16) -> list[Call]:
    """`calls` (one per input set) repeated in turn until there are at least `n`."""
    return calls * max(1, math.ceil(n / len(calls)))
