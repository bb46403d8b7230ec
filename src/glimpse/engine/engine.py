"""LLMEngine: one engine for every caller (LLM, AsyncLLM, the server, the agents).

It owns the model, the memory pools, the scheduler and the runner; `add_request` queues work, each
`step()` runs one scheduled forward pass and returns the outputs of the requests it advanced.
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from glimpse.config import NemotronHConfig
from glimpse.distributed.group import SINGLE
from glimpse.distributed.workers import WorkerLostError
from glimpse.engine.cache import (
    BlockPool,
    CacheManager,
    SlotPool,
    kv_bytes_per_token,
    state_bytes_per_sequence,
)
from glimpse.engine.config import DTYPES, EngineConfig
from glimpse.engine.cuda_graphs import DecodeGraphs
from glimpse.engine.detokenizer import IncrementalDetokenizer
from glimpse.engine.memory import prefix_cache_bytes
from glimpse.engine.output_processor import OutputProcessor
from glimpse.engine.parallel import CaptureGraphs, TPLeader, graphs_with_tp, plan_caches, rank_device
from glimpse.engine.prefix_cache import PrefixCache, prompt_block_hashes, snapshot_points
from glimpse.engine.request import PENDING_TOKEN, Request, Sequence
from glimpse.engine.runner import ModelRunner, PendingStep
from glimpse.engine.sampler import SequenceSamplingState, make_generator, needs_penalties
from glimpse.engine.scheduler import Scheduler
from glimpse.engine.structured import StructuredOutputCompiler
from glimpse.engine.vision_encoder import CachedVisionEncoder
from glimpse.engine.warmup import warm_up
from glimpse.errors import InvalidRequestError
from glimpse.inputs import MediaSpan
from glimpse.model.loading import check_tensor_parallel_size, load_model, resolve_model_path
from glimpse.outputs import RequestOutput
from glimpse.processing.reasoning import prompt_ends_in_reasoning, think_token_ids
from glimpse.processing.tokenizer import end_of_sequence_ids, load_tokenizer
from glimpse.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, cfg: EngineConfig, *, model: torch.nn.Module | None = None, tokenizer=None) -> None:
        """Load `cfg.model` (a checkpoint), or serve a prebuilt `model` with `tokenizer` (the benchmark's
        full-size random-weight model)."""
        self.cfg = cfg
        started = time.perf_counter()
        self.startup_seconds: dict[str, float] = {}  # phase -> seconds, logged once ready
        self.device = cfg.resolve_device()
        self.dtype = cfg.resolve_dtype(self.device)
        self.ssm_dtype = DTYPES[cfg.cache.mamba_ssm_cache_dtype]
        torch.manual_seed(cfg.seed)
        self.tp_leader: TPLeader | None = None  # the follower ranks, with tensor parallelism
        self.fatal_error: str | None = None  # why the engine cannot go on (a tensor-parallel rank died)
        self.fatal_callbacks: list[Callable[[str], None]] = []
        try:
            self._start(cfg, model, tokenizer, started)
        except BaseException:
            if self.tp_leader is not None:
                self.tp_leader.close()
            raise

    def _start(self, cfg: EngineConfig, model: torch.nn.Module | None, tokenizer, started: float) -> None:
        tp = SINGLE
        if model is None:
            self.model_dir: Path | None = resolve_model_path(
                cfg.model, revision=cfg.revision, download_dir=cfg.download_dir
            )
            # The tokenizer first: a bad --tokenizer or --chat-template fails before the model loads.
            tokenizer_dir = self.model_dir
            if cfg.tokenizer:
                tokenizer_dir = resolve_model_path(cfg.tokenizer, download_dir=cfg.download_dir)
            self.tokenizer = load_tokenizer(tokenizer_dir, cfg.chat_template)
            if cfg.tensor_parallel_size > 1:
                tp = self._start_tensor_parallel(cfg)
            self.model = load_model(self.model_dir, self.device, self.dtype, cfg.quantization, tp=tp)
            config_eos = self.model.llm_config.eos_token_ids
            self.eos_token_ids = end_of_sequence_ids(self.model_dir, self.tokenizer, config_eos)
        else:
            if cfg.tensor_parallel_size > 1:
                raise ValueError("a prebuilt model cannot be split: tensor_parallel_size must be 1")
            self.model_dir, self.model, self.tokenizer = None, model, tokenizer
            self.eos_token_ids = list(model.llm_config.eos_token_ids)
        self.config: NemotronHConfig = self.model.llm_config  # this rank's share with tensor parallelism
        self.startup_seconds["load"] = time.perf_counter() - started

        use_graphs = self.device.type == "cuda" and not cfg.scheduler.enforce_eager
        if tp.is_parallel:  # each rank captures and replays its own graphs (opt-in: engine/parallel.py)
            use_graphs = graphs_with_tp(cfg, self.device)
        # With CUDA graphs, one extra slot and block (no sequence owns them) absorb the padding rows.
        extra = 1 if use_graphs else 0
        mark = time.perf_counter()
        self.cache_tensors, slots, blocks, self.max_model_len = plan_caches(
            self.model, cfg, tp, self.device, self.dtype, self.ssm_dtype, extra
        )
        self.startup_seconds["profile"] = time.perf_counter() - mark
        self.prefix_cache = PrefixCache() if cfg.cache.enable_prefix_caching else None
        self.cache = CacheManager(
            BlockPool(blocks, cfg.cache.block_size), SlotPool(slots), self.prefix_cache, self._copy_state
        )
        self.scheduler = Scheduler(
            self.cache, cfg.scheduler.max_num_batched_tokens, min(cfg.scheduler.max_num_seqs, slots)
        )
        self.vision_encoder: CachedVisionEncoder | None = None
        if self.model.is_multimodal:
            encoder_bytes = cfg.cache.encoder_cache_bytes or (
                2 << 30 if self.device.type == "cuda" else 512 << 20
            )
            self.vision_encoder = CachedVisionEncoder(self.model, self.device, encoder_bytes)
        self._default_generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.runner = ModelRunner(
            self.model, self.cache_tensors, self.device, self.eos_token_ids, self._default_generator,
            self.vision_encoder, self.tp_leader,
        )  # fmt: skip
        mark = time.perf_counter()
        if use_graphs:
            self.runner.graphs = DecodeGraphs(
                self.model, self.cache_tensors, self.device, self.scheduler.max_num_seqs,
                -(-self.max_model_len // cfg.cache.block_size), scratch_slot=slots, scratch_block=blocks,
            )  # fmt: skip
            if self.tp_leader is not None:
                graphs = self.runner.graphs
                self.tp_leader.capture_graphs(
                    CaptureGraphs(graphs.max_batch, graphs.tables.shape[1], slots, blocks)
                )
            self.runner.graphs.capture()
        self.startup_seconds["graphs"] = time.perf_counter() - mark
        self.think_ids = think_token_ids(self.tokenizer)
        self.outputs = OutputProcessor(
            self.tokenizer, self.eos_token_ids, self.max_model_len, self.scheduler,
            self.think_ids[1] if self.think_ids else None,
        )  # fmt: skip
        self.async_scheduling = (
            use_graphs if cfg.scheduler.async_scheduling is None else cfg.scheduler.async_scheduling
        )
        self._pending: PendingStep | None = None  # a decode step launched but not yet read back
        self.num_async_steps = 0
        self._structured = None  # the grammar compiler, made on the first constrained request
        self._structured_lock = threading.Lock()
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        if cfg.scheduler.warmup:
            self.startup_seconds["warmup"] = warm_up(self)
        self.startup_seconds["total"] = time.perf_counter() - started
        log.info("engine startup: %s", ", ".join(f"{k} {v:.1f} s" for k, v in self.startup_seconds.items()))
        log.info(
            "engine ready: %s on %s (%s), %d state slots, %d KV blocks of %d, max_model_len %d",
            self.model_dir, self.device, self.dtype, slots, blocks, cfg.cache.block_size, self.max_model_len,
        )  # fmt: skip
        if tp.is_parallel:
            log.info(
                "tensor parallel %d: each rank holds 1/%d of the Mamba heads and attention heads, so %.1f MiB "
                "of state per sequence and %d KV bytes per token per rank", tp.size, tp.size,
                state_bytes_per_sequence(self.config, self.dtype, self.ssm_dtype) / 2**20,
                kv_bytes_per_token(self.config, self.dtype),
            )  # fmt: skip

    def _start_tensor_parallel(self, cfg: EngineConfig):
        """Check the split, start the follower ranks and join their group (as rank 0)."""
        size = cfg.tensor_parallel_size
        check_tensor_parallel_size(self.model_dir, size)
        if self.device.type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(
                f"tensor_parallel_size={size} needs {size} GPUs, this host has {torch.cuda.device_count()}"
            )
        if self.device.type == "cuda" and self.device.index not in (None, 0):
            raise ValueError(
                "with tensor parallelism rank r runs on cuda:r; give device 'cuda', not a GPU number"
            )
        self.device = rank_device(self.device, 0)
        self.tp_leader = TPLeader(cfg, self.model_dir, self.device)
        self.tp_leader.followers.on_death.append(self._on_rank_lost)
        return self.tp_leader.tp

    def _on_rank_lost(self, why: str) -> None:
        """The watchdog's call (its own thread) when a follower rank dies."""
        self.fatal_error = why
        for callback in list(self.fatal_callbacks):
            callback(why)

    def forget_warmup(self) -> None:
        """Zero the counters /metrics reads after the warm-up's synthetic requests (engine/warmup.py)."""
        self.runner.num_forward_tokens = 0
        self.scheduler.num_preemptions = 0
        if self.prefix_cache is not None:
            self.prefix_cache.queries = self.prefix_cache.query_tokens = self.prefix_cache.hit_tokens = 0

    def _copy_state(self, src: int, dst: int) -> None:
        """Copy one state slot into another across every Mamba layer (prefix snapshots in and out)."""
        if self.tp_leader is not None:
            self.tp_leader.copy_state(src, dst)
        self.cache_tensors.conv_state[:, dst] = self.cache_tensors.conv_state[:, src]
        self.cache_tensors.ssm_state[:, dst] = self.cache_tensors.ssm_state[:, src]

    @property
    def structured(self):
        """The structured-output compiler (llguidance); built once, on first use, from any thread."""
        with self._structured_lock:
            if self._structured is None:
                self._structured = StructuredOutputCompiler(
                    self.tokenizer, self.config.vocab_size, self.eos_token_ids
                )
            return self._structured

    # Requests ----------------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        prompt: str | None = None,
        media_spans: list[MediaSpan] | None = None,
        media_info: list[dict[str, Any]] | None = None,
        video_tokens: dict[str, int] | None = None,
    ) -> Request:
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty")
        n = len(prompt_token_ids)
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens; this model's context is {self.max_model_len} tokens "
                f"(prompt plus at least one generated token)",
                param="messages",
            )
        bad = [t for t in prompt_token_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"prompt token ids out of range [0, {self.config.vocab_size}): {bad[:5]}"
            )
        req = Request(
            request_id, prompt, list(prompt_token_ids), params, next(self._arrivals),
            media_spans=media_spans or [], media_info=media_info or [], video_tokens=video_tokens,
        )  # fmt: skip
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]  # nothing scores the first token
        grammar = (
            self.structured.compile(params) if (params.json_schema is not None or params.regex) else None
        )
        # a prompt that ends inside <think>: the constraint starts after the model's </think>
        waits = (
            grammar is not None
            and self.think_ids is not None
            and prompt_ends_in_reasoning(req.prompt_token_ids, *self.think_ids)
        )
        points: set[int] = set()
        if self.prefix_cache is not None:
            req.block_hashes = prompt_block_hashes(
                req.prompt_token_ids, req.media_spans, self.cfg.cache.block_size
            )
            points = snapshot_points(n, req.media_spans, self.cfg.cache.block_size)
        for i in range(params.n):
            seq = Sequence(next(self._seq_ids), req, i, snapshot_points=points)
            seq.sampling_state = SequenceSamplingState(
                params=params,
                prompt_token_ids=req.prompt_token_ids,
                output_token_ids=seq.output_token_ids,
                generator=make_generator(params.seed, i, self.device),  # None: the engine's shared stream
                child_index=i,
            )
            if params.detokenize:
                seq.detokenizer = IncrementalDetokenizer(
                    self.tokenizer, req.prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop,
                )  # fmt: skip
            if params.logprobs is not None:
                seq.logprobs = []
                seq.token_texts = [] if params.detokenize else None
            if grammar is not None:
                seq.grammar, seq.grammar_waits = grammar.matcher(), waits
            req.sequences.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.sequences:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return self.outputs.output(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests) or self._pending is not None

    # Stepping ----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass; outputs for every request that got new tokens or finished.

        With async scheduling a pure decode step is launched before the previous one's tokens are read
        back: its outputs arrive with the next call, while the GPU already runs the following step.
        With tensor parallelism a dead follower rank makes this raise WorkerLostError, saying which."""
        if self.tp_leader is None:
            return self._step()
        try:
            self.tp_leader.check()
            return self._step()
        except Exception as e:
            explained = self.tp_leader.explain(e)
            if isinstance(explained, WorkerLostError) and self.fatal_error is None:
                self.fatal_error = str(
                    explained
                )  # this thread may find the death before the watchdog says so
            if explained is e:
                raise
            raise explained from e

    def _step(self) -> list[RequestOutput]:
        if self._pending is not None and not self._can_continue_async():
            return self._collect(self._take_pending())  # settle the pipeline; the next call schedules
        sched = self.scheduler.schedule()
        if not sched.chunks:
            if self._pending is not None:
                return self._collect(self._take_pending())
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("the scheduler cannot admit any waiting sequence (cache too small)")
            return []
        if self.async_scheduling and self._async_step(sched):
            return self._launch_async(sched)
        if self._pending is not None:  # not expected (checked above); settle first, drop what finished
            outputs = self._collect(self._take_pending())
            sched.chunks = [c for c in sched.chunks if not c.seq.is_finished]
            if not sched.chunks:
                return outputs
        else:
            outputs = []
        seqs, sampled, prompt_scores = self.runner.execute(sched)
        for scores in prompt_scores:
            self.outputs.add_prompt_logprobs(scores.seq.request, scores.entries)
        for chunk in sched.chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            self.cache.on_computed(chunk.seq)
        touched: dict[str, Request] = {}
        for i, seq in enumerate(seqs):
            self.outputs.append_token(
                seq, sampled.token_ids[i], sampled.logprobs[i], sampled.sampled_logprobs[i]
            )
            touched[seq.request.request_id] = seq.request
        return outputs + self._outputs_for(touched)

    def _outputs_for(self, touched: dict[str, Request]) -> list[RequestOutput]:
        outputs = []
        for req in touched.values():
            outputs.append(self.outputs.output(req))
            if req.finished:
                self.requests.pop(req.request_id, None)
        return outputs

    # Asynchronous decode -------------------------------------------------------------------------------
    @staticmethod
    def _async_safe(seq: Sequence) -> bool:
        """Sampling that needs nothing from the host about the previous token: no penalties (they count
        tokens), no grammar (it advances on the host), no logprob dicts, no forced test tokens."""
        p = seq.params
        return (
            seq.grammar is None
            and p.logprobs is None
            and p.forced_token_ids is None
            and not needs_penalties(p)
        )

    def _async_step(self, sched) -> bool:
        chunks = sched.chunks
        if sched.preempted or not all(c.num_tokens == 1 and c.start > 0 and c.completes for c in chunks):
            return False
        if self.runner.graphs is not None and not self.runner.can_replay(chunks):
            return False
        if any(span.start <= c.start < span.end for c in chunks for span in c.seq.request.media_spans):
            return False
        return all(self._async_safe(c.seq) for c in chunks)

    def _can_continue_async(self) -> bool:
        """With a step in flight, may the next one be scheduled before its tokens are known? Only when the
        schedule is bound to be a plain decode of the same sequences that cannot preempt anyone (a
        preempted sequence would recompute from placeholder tokens)."""
        sch = self.scheduler
        if sch.waiting or not sch.running or len(sch.running) > len(self._pending.seqs):
            return False
        bs = self.cfg.cache.block_size
        new_blocks = 0
        for seq in sch.running:
            if seq.num_tokens - seq.num_computed_tokens != 1 or not self._async_safe(seq):
                return False
            new_blocks += seq.num_computed_tokens + 1 > len(seq.block_ids) * bs
        return new_blocks <= self.cache.blocks.num_free

    def _launch_async(self, sched) -> list[RequestOutput]:
        pending = self.runner.launch_decode(sched, self._pending)
        self.num_async_steps += 1
        for chunk in sched.chunks:
            chunk.seq.num_computed_tokens += 1
            chunk.seq.output_token_ids.append(PENDING_TOKEN)
        previous, self._pending = self._pending, pending
        return self._collect(previous) if previous is not None else []

    def drop_pending(self) -> None:
        """Forget a step in flight (after a failure: its requests have been aborted)."""
        self._pending = None

    def _take_pending(self) -> PendingStep:
        pending, self._pending = self._pending, None
        return pending

    def _collect(self, pending: PendingStep) -> list[RequestOutput]:
        """Read a launched step's tokens back and process them as a synchronous step would have."""
        tokens, logprobs = pending.wait()
        touched: dict[str, Request] = {}
        for i, seq in enumerate(pending.seqs):
            if seq.is_finished:  # aborted, or stopped by the step before: its extra token is dropped
                continue
            at = pending.out_index[i]
            later = seq.output_token_ids[at + 1 :]  # placeholders of steps launched since
            del seq.output_token_ids[at:]
            self.outputs.append_token(seq, tokens[i], None, logprobs[i])
            if not seq.is_finished:
                seq.output_token_ids.extend(later)
                self.cache.on_computed(seq)  # its blocks hold no placeholder up to the last real token
            touched[seq.request.request_id] = seq.request
        return self._outputs_for(touched)

    def stats(self) -> dict[str, float]:
        """Counters and gauges for /metrics and logs (read from any thread: plain ints, no locking)."""
        blocks, slots, vision = self.cache.blocks, self.cache.slots, self.vision_encoder
        snapshots = len(self.prefix_cache.snapshots) if self.prefix_cache else 0
        return {
            "num_requests_running": len(self.scheduler.running),
            "num_requests_waiting": len(self.scheduler.waiting),
            "kv_blocks_total": blocks.num_blocks,
            "kv_blocks_used": blocks.num_blocks - blocks.num_free,  # held or kept by the prefix cache
            "kv_blocks_active": sum(1 for c in blocks.ref_count if c > 0),  # held by sequences
            "state_slots_total": slots.num_slots,
            "state_slots_used": slots.num_slots - slots.num_free,
            "state_slots_active": slots.num_slots - slots.num_free - snapshots,  # held by sequences
            "num_preemptions": self.scheduler.num_preemptions,
            "forward_tokens": self.runner.num_forward_tokens,
            "prefix_cache_queries": self.prefix_cache.queries if self.prefix_cache else 0,
            "prefix_cache_hit_tokens": self.prefix_cache.hit_tokens if self.prefix_cache else 0,
            "prefix_cache_query_tokens": self.prefix_cache.query_tokens if self.prefix_cache else 0,
            "prefix_cache_blocks": len(self.prefix_cache.block_by_hash) if self.prefix_cache else 0,
            "prefix_cache_snapshots": snapshots,
            "prefix_cache_bytes": prefix_cache_bytes(
                self.prefix_cache, self.config, self.cfg.cache.block_size, self.dtype, self.ssm_dtype
            ),
            "encoder_cache_hits": vision.cache.hits if vision else 0,
            "encoder_cache_misses": vision.cache.misses if vision else 0,
            "encoder_cache_bytes": vision.cache.bytes if vision else 0,
        }

    def close(self) -> None:
        """Give the caches and CUDA graphs back to the device (the model stays: the caller may reuse it)."""
        self.requests.clear()
        self._pending = None
        if self.tp_leader is not None:
            self.tp_leader.close()
        self.runner.graphs = None
        self.runner.cache = None
        self.cache_tensors = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def all_memory_free(self) -> bool:
        return self.cache.all_free()
