"""Tensor parallelism in the engine: rank 0 (this process) schedules and samples; ranks 1..t-1 follow.

Every rank holds a share of the language model (model/parallel.py) and of every cache pool, with the
same number of state slots and KV blocks, so a slot or block id means the same on each. Rank 0 runs
the engine as usual; whenever it touches the model or the caches it first tells the followers, through
their pipes, what to do, and they do the same in the same order:
- `("reset", slots)`: zero the Mamba state of sequences starting over;
- `("copy", src, dst)`: copy a state slot (prefix-cache snapshots in and out);
- a `ForwardStep`: the step's batch description; the token ids follow as a broadcast on the device
  group (so a step launched from tokens still on the GPU needs no host round trip), and for a step
  touching media, rank 0's input embeddings follow as a broadcast too (the ViT runs on rank 0 only);
- `None`: stop.
Collectives inside the forward pass keep the ranks in step; only rank 0 samples.
Setup runs the same code on every rank in the same order: load the share, measure the cache budget,
agree on the smallest one (all-reduce min), plan the pools, allocate them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from glimpse.distributed.group import TPGroup, abort_group, destroy_group, init_group
from glimpse.distributed.workers import Followers, WorkerLostError, free_tcp_address
from glimpse.engine.cache import allocate_cache_tensors
from glimpse.engine.config import DTYPES, EngineConfig
from glimpse.engine.cuda_graphs import DecodeGraphs
from glimpse.engine.memory import cache_budget, plan_memory
from glimpse.model.batch import CacheTensors, ForwardBatch
from glimpse.model.loading import load_model

log = logging.getLogger(__name__)

SETUP_TIMEOUT_S = 600.0  # loading a shard of a large checkpoint can take minutes


@dataclass(frozen=True)
class ForwardStep:
    """What a follower needs to run the step rank 0 runs (the token ids arrive as a broadcast)."""

    query_lens: list[int]
    context_lens: list[int]
    slots: list[int]
    block_tables: list[list[int]]
    logits_indices: list[int] | None  # None: each sequence's last token
    with_embeds: bool  # rank 0 broadcasts the input embeddings (media written in) after the ids


@dataclass(frozen=True)
class GraphStep:
    """A decode step rank 0 replays from a CUDA graph: the followers replay theirs (ids as a broadcast)."""

    slots: list[int]
    block_tables: list[list[int]]
    context_lens: list[int]


@dataclass(frozen=True)
class CaptureGraphs:
    """Capture the decode graphs, as rank 0 is about to (same sizes, same order: collectives inside)."""

    max_batch: int
    max_blocks_per_seq: int
    scratch_slot: int
    scratch_block: int


def graphs_with_tp(cfg: EngineConfig, device: torch.device) -> bool:
    """Decode CUDA graphs under tensor parallelism: opt in with GLIMPSE_TP_CUDA_GRAPHS=1 until they are
    proven on GPUs (each rank captures NCCL collectives into its graphs)."""
    wanted = os.environ.get("GLIMPSE_TP_CUDA_GRAPHS", "0") == "1"
    return wanted and device.type == "cuda" and not cfg.scheduler.enforce_eager


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th GPU (one process per GPU), or the CPU."""
    return torch.device("cuda", rank) if device.type == "cuda" else device


def build_batch(step: ForwardStep, device: torch.device) -> ForwardBatch:
    """The ForwardBatch of a step description, built as the runner builds its own."""
    width = max(1, max(len(b) for b in step.block_tables))
    tables = torch.zeros(len(step.block_tables), width, dtype=torch.long)
    for i, blocks in enumerate(step.block_tables):
        tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
    return ForwardBatch(
        query_lens=step.query_lens, context_lens=step.context_lens,
        state_slots=torch.tensor(step.slots, dtype=torch.long, device=device), block_tables=tables.to(device),
        state_slots_list=list(step.slots), block_tables_cpu=tables,
    )  # fmt: skip


def plan_caches(
    model: torch.nn.Module, cfg: EngineConfig, tp: TPGroup, device: torch.device, dtype: torch.dtype,
    ssm_dtype: torch.dtype, extra: int,
) -> tuple[CacheTensors, int, int, int]:  # fmt: skip
    """Every rank's pools, the same counts on each: (cache tensors, slots, blocks, max_model_len). Each rank
    measures its budget (on GPUs, a profiled step all ranks run together); the smallest one wins."""
    budget = tp.all_reduce_min(cache_budget(model, cfg, device, dtype, ssm_dtype), device)
    config = model.llm_config  # this rank's share: its heads and groups size the pools
    slots, blocks, max_len = plan_memory(config, cfg, budget, dtype, ssm_dtype)
    tensors = allocate_cache_tensors(
        config, slots + extra, blocks + extra, cfg.cache.block_size, dtype, ssm_dtype, device
    )
    return tensors, slots, blocks, max_len


class TPLeader:
    """Rank 0's side: starts the followers, joins the group, and announces what the followers must do."""

    def __init__(self, cfg: EngineConfig, model_dir: Path, device: torch.device) -> None:
        size = cfg.tensor_parallel_size
        init_method = free_tcp_address()
        self.followers = Followers(size, follower_main, (cfg, str(model_dir), device.type), init_method)
        try:
            # each follower says it is about to join: one that failed to start is found here, at once,
            # instead of after the rendezvous times out
            self.followers.receive_all(SETUP_TIMEOUT_S)
            self.tp = init_group(0, size, init_method, rank_device(device, 0))
        except Exception as e:
            self.followers.close(timeout_s=1)
            explained = self.followers.explain(e)
            if explained is e:
                raise
            raise explained from e
        self.followers.on_death.append(lambda why: abort_group(self.tp))
        log.info("tensor parallel: rank 0 of %d here, ranks 1..%d in processes %s", size, size - 1,
                 [p.pid for p in self.followers.procs])  # fmt: skip

    def check(self) -> None:
        self.followers.check()

    def explain(self, error: BaseException) -> BaseException:
        return self.followers.explain(error)

    def reset_states(self, slots: list[int]) -> None:
        self.followers.send(("reset", slots))

    def copy_state(self, src: int, dst: int) -> None:
        self.followers.send(("copy", src, dst))

    def forward(self, step: ForwardStep, ids: torch.Tensor) -> None:
        """Announce a step and send its token ids (before rank 0 runs the same forward)."""
        self.followers.send(step)
        self.tp.broadcast(ids)

    def share_embeds(self, embeds: torch.Tensor) -> None:
        self.tp.broadcast(embeds)

    def capture_graphs(self, capture: CaptureGraphs) -> None:
        self.followers.send(capture)

    def replay(self, step: GraphStep, ids: torch.Tensor) -> None:
        """Announce a graph replay and send its token ids (before rank 0 replays its own graph)."""
        self.followers.send(step)
        self.tp.broadcast(ids)

    def close(self) -> None:
        self.followers.close()
        destroy_group(self.tp)


def follower_main(rank: int, size: int, init_method: str, pipe: Connection, payload) -> None:
    """A follower's life: join, load its share, size the pools with the others, then follow rank 0's
    messages until told to stop (None) or rank 0 is gone (the pipe closes)."""
    cfg, model_dir, device_type = payload
    logging.basicConfig(level=logging.WARNING, format=f"rank {rank} %(levelname)s %(name)s: %(message)s")
    device = rank_device(torch.device(device_type), rank)
    if device.type == "cpu":  # the ranks share this host's cores
        torch.set_num_threads(max(1, torch.get_num_threads() // size))
    dtype = cfg.resolve_dtype(device)
    ssm_dtype = DTYPES[cfg.cache.mamba_ssm_cache_dtype]
    pipe.send("joining")
    tp = init_group(rank, size, init_method, device)
    try:
        model = load_model(Path(model_dir), device, dtype, cfg.quantization, tp=tp)
        extra = 1 if graphs_with_tp(cfg, device) else 0  # as rank 0: the graphs' scratch slot and block
        cache, *_ = plan_caches(model, cfg, tp, device, dtype, ssm_dtype, extra)
        _follow(model, cache, tp, pipe, device)
    except (EOFError, OSError, WorkerLostError):
        pass  # rank 0 has gone: nothing to report to
    finally:
        destroy_group(tp)


@torch.inference_mode()
def _follow(model, cache: CacheTensors, tp: TPGroup, pipe: Connection, device: torch.device) -> None:
    graphs: DecodeGraphs | None = None
    while True:
        message = pipe.recv()
        if message is None:
            return
        if isinstance(message, GraphStep):
            n = len(message.slots)
            ids = tp.broadcast(torch.empty(n, dtype=torch.long, device=device))
            rows = torch.arange(n, device=device)
            graphs.run(
                [0] * n, message.slots, message.block_tables, message.context_lens, device_ids=(rows, ids)
            )
        elif isinstance(message, CaptureGraphs):
            graphs = DecodeGraphs(
                model, cache, device, message.max_batch, message.max_blocks_per_seq, message.scratch_slot,
                message.scratch_block,
            )  # fmt: skip
            graphs.capture()
        elif isinstance(message, ForwardStep):
            batch = build_batch(message, device)
            ids = tp.broadcast(torch.empty(batch.num_tokens, dtype=torch.long, device=device))
            embeds = None
            if message.with_embeds:
                embeds = tp.broadcast(model.embed(ids))
            indices = None
            if message.logits_indices is not None:
                indices = torch.tensor(message.logits_indices, dtype=torch.long, device=device)
            model(batch, cache, input_ids=None if embeds is not None else ids, inputs_embeds=embeds,
                  logits_indices=indices)  # fmt: skip
        elif message[0] == "reset":
            idx = torch.tensor(message[1], device=device)
            cache.conv_state[:, idx] = 0
            cache.ssm_state[:, idx] = 0
        elif message[0] == "copy":
            _, src, dst = message
            cache.conv_state[:, dst] = cache.conv_state[:, src]
            cache.ssm_state[:, dst] = cache.ssm_state[:, src]
