"""CUDA graphs for decode steps: one graph per batch size on a ladder, replayed instead of launching
hundreds of small kernels per step (62 blocks, each a few launches, at a few microseconds each).

A graph reads its inputs from static device buffers: token ids, state slots, block tables, sequence
lengths and KV write positions. A batch smaller than the graph is padded with rows that point at a
scratch state slot and a scratch KV block, which no sequence owns, so padding can't disturb real rows.
"""

from __future__ import annotations

import logging

import torch

from glimpse.model.batch import CacheTensors, ForwardBatch

log = logging.getLogger(__name__)


def batch_ladder(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 1025, 32))
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        cache: CacheTensors,
        device: torch.device,
        max_batch: int,
        max_blocks_per_seq: int,
        scratch_slot: int,
        scratch_block: int,
    ) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.block_size = cache.block_size
        self.scratch_slot = scratch_slot
        self.scratch_block = scratch_block
        self.sizes = batch_ladder(max_batch)
        self.max_batch = self.sizes[-1]
        m, w = self.max_batch, max_blocks_per_seq
        self.ids = torch.zeros(m, dtype=torch.long, device=device)
        self.slots = torch.full((m,), scratch_slot, dtype=torch.long, device=device)
        self.tables = torch.full((m, w), scratch_block, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(m, dtype=torch.int32, device=device)
        self.slot_map = torch.full((m,), scratch_block * self.block_size, dtype=torch.long, device=device)
        self.rows = torch.arange(m, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        # built now, outside any capture: making a batch copies its host-side lists to the device
        self.batches = {b: self._batch(b) for b in self.sizes}

    def _batch(self, b: int) -> ForwardBatch:
        return ForwardBatch(
            [1] * b, [0] * b, self.slots[:b], self.tables[:b], seq_lens_t=self.seq_lens[:b],
            slot_mapping_t=self.slot_map[:b],
        )  # fmt: skip

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self.batches[b], self.cache, input_ids=self.ids[:b], logits_indices=self.rows[:b])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first (later graphs reuse its memory pool)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton compilation, cuBLAS handles, allocator
                self._forward(self.max_batch)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for b in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward(b)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[b] = (graph, out)
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def can_run(self, num_seqs: int, widest: int) -> bool:
        return num_seqs <= self.max_batch and widest <= self.tables.shape[1]

    @torch.inference_mode()
    def run(
        self,
        token_ids: list[int],
        slots: list[int],
        block_tables: list[list[int]],
        context_lens: list[int],
        device_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """Logits [len(token_ids), vocab] of one decode step, by replaying the smallest graph that fits.

        `device_ids` = (rows, values): token ids still on the device (sampled by the step before, not yet
        read back), written over `token_ids[rows]` before the replay."""
        b = len(token_ids)
        size = next(s for s in self.sizes if s >= b)
        bs = self.block_size
        width = max(len(t) for t in block_tables)
        pad = size - b
        sb = self.scratch_block
        rows = [t + [sb] * (width - len(t)) for t in block_tables] + [[sb] * width] * pad
        tables = torch.tensor(rows, dtype=torch.long)
        slot_map = [t[c // bs] * bs + c % bs for t, c in zip(block_tables, context_lens)]
        host = torch.tensor(
            [token_ids + [0] * pad, slots + [self.scratch_slot] * pad,
             [c + 1 for c in context_lens] + [1] * pad, slot_map + [self.scratch_block * bs] * pad],
            dtype=torch.long,
        )  # fmt: skip
        # From pinned memory, so the copies queue behind the step in flight instead of waiting for it.
        dev = host.pin_memory().to(self.device, non_blocking=True)
        self.ids[:size].copy_(dev[0])
        self.slots[:size].copy_(dev[1])
        self.seq_lens[:size].copy_(dev[2])
        self.slot_map[:size].copy_(dev[3])
        self.tables[:size, :width].copy_(tables.pin_memory().to(self.device, non_blocking=True))
        if device_ids is not None:
            self.ids.index_copy_(0, *device_ids)
        graph, out = self.graphs[size]
        graph.replay()
        return out[:b]
