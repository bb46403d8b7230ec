"""LLMEngine: one engine for every caller (LLM, AsyncLLM, the server, the agents).

It owns the model, the memory pools, the scheduler and the runner; `add_request` queues work, each
`step()` runs one scheduled forward pass and returns the outputs of the requests it advanced.
"""

from __future__ import annotations

import itertools
import logging
import threading
from pathlib import Path
from typing import Any

import torch

from glimpse.config import NemotronHConfig
from glimpse.engine.cache import (
    BlockPool,
    CacheManager,
    SlotPool,
    allocate_cache_tensors,
    kv_bytes_per_token,
    state_bytes_per_sequence,
)
from glimpse.engine.config import DTYPES, EngineConfig
from glimpse.engine.detokenizer import IncrementalDetokenizer
from glimpse.engine.encoder_cache import EncoderCache
from glimpse.engine.prefix_cache import PrefixCache, prompt_block_hashes, snapshot_points
from glimpse.engine.request import PENDING_TOKEN, MediaSpan, Request, Sequence, SequenceStatus
from glimpse.engine.runner import ModelRunner, PendingStep
from glimpse.engine.sampler import SequenceSamplingState, make_generator, needs_penalties
from glimpse.engine.scheduler import Scheduler
from glimpse.errors import InvalidRequestError
from glimpse.outputs import CompletionOutput, Logprob, RequestOutput
from glimpse.sampling_params import SamplingParams

log = logging.getLogger(__name__)

def _plan_memory(
    config: NemotronHConfig, cfg: EngineConfig, budget: int, dtype: torch.dtype, ssm_dtype: torch.dtype
) -> tuple[int, int, int]:
    """Split a byte budget into state slots and KV blocks: KV for at least one full-length sequence first,
    then a slot per allowed sequence while memory lasts, the rest to KV. Returns (slots, blocks, max_len)."""
    per_seq = state_bytes_per_sequence(config, dtype, ssm_dtype)
    per_block = max(1, kv_bytes_per_token(config, dtype) * cfg.cache.block_size)
    max_len = cfg.max_model_len or config.max_position_embeddings
    kv_floor = -(-max_len // cfg.cache.block_size) * per_block
    if kv_floor + per_seq > budget:  # cap the context at what memory holds
        fit = max(cfg.cache.block_size, (budget - per_seq) // per_block * cfg.cache.block_size)
        if cfg.max_model_len:
            raise ValueError(
                f"max_model_len={cfg.max_model_len} needs {kv_floor + per_seq} bytes of cache, only {budget} "
                f"are available; lower max_model_len or give more memory"
            )
        log.warning("max_model_len capped from %d to %d by cache memory", max_len, fit)
        max_len = fit
        kv_floor = -(-max_len // cfg.cache.block_size) * per_block
    # With prefix caching a few extra slots hold Mamba snapshots (running sequences take them back first).
    extra = max(2, cfg.scheduler.max_num_seqs // 8) if cfg.cache.enable_prefix_caching else 0
    slots = int(max(1, min(cfg.scheduler.max_num_seqs + extra, (budget - kv_floor) // per_seq)))
    blocks = int((budget - slots * per_seq) // per_block)
    return slots, blocks, max_len


class LLMEngine:
    def __init__(self, cfg: EngineConfig, *, model: torch.nn.Module | None = None, tokenizer=None) -> None:
        """Load `cfg.model` (a checkpoint), or serve a prebuilt `model` with `tokenizer` (the benchmark's
        full-size random-weight model)."""
        from glimpse.model.loading import load_model, resolve_model_path
        from glimpse.processing.inputs import InputProcessor
        from glimpse.processing.tokenizer import end_of_sequence_ids, load_tokenizer

        self.cfg = cfg
        self.device = cfg.resolve_device()
        self.dtype = cfg.resolve_dtype(self.device)
        self.ssm_dtype = DTYPES[cfg.cache.mamba_ssm_cache_dtype]
        torch.manual_seed(cfg.seed)
        if model is None:
            self.model_dir: Path | None = resolve_model_path(cfg.model)
            self.model = load_model(self.model_dir, self.device, self.dtype)
            self.tokenizer = load_tokenizer(self.model_dir)
            config_eos = self.model.llm_config.eos_token_ids
            self.eos_token_ids = end_of_sequence_ids(self.model_dir, self.tokenizer, config_eos)
        else:
            self.model_dir, self.model, self.tokenizer = None, model, tokenizer
            self.eos_token_ids = list(model.llm_config.eos_token_ids)
        self.config: NemotronHConfig = self.model.llm_config

        budget = self._cache_budget()
        slots, blocks, self.max_model_len = _plan_memory(self.config, cfg, budget, self.dtype, self.ssm_dtype)
        use_graphs = self.device.type == "cuda" and not cfg.scheduler.enforce_eager
        # With CUDA graphs, one extra slot and block (no sequence owns them) absorb the padding rows.
        extra = 1 if use_graphs else 0
        self.cache_tensors = allocate_cache_tensors(
            self.config,
            slots + extra,
            blocks + extra,
            cfg.cache.block_size,
            self.dtype,
            self.ssm_dtype,
            self.device,
        )
        self.prefix_cache = PrefixCache() if cfg.cache.enable_prefix_caching else None
        self.cache = CacheManager(
            BlockPool(blocks, cfg.cache.block_size), SlotPool(slots), self.prefix_cache, self._copy_state
        )
        self.scheduler = Scheduler(
            self.cache, cfg.scheduler.max_num_batched_tokens, min(cfg.scheduler.max_num_seqs, slots)
        )
        self._default_generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.runner = ModelRunner(
            self.model, self.cache_tensors, self.device, self.eos_token_ids, self._default_generator
        )
        self.encoder_cache = EncoderCache(
            cfg.cache.encoder_cache_bytes or (2 << 30 if self.device.type == "cuda" else 512 << 20)
        )
        self.processor = InputProcessor(self)
        if use_graphs:
            from glimpse.engine.cuda_graphs import DecodeGraphs

            self.runner.graphs = DecodeGraphs(
                self.model, self.cache_tensors, self.device, self.scheduler.max_num_seqs,
                -(-self.max_model_len // cfg.cache.block_size), scratch_slot=slots, scratch_block=blocks,
            )  # fmt: skip
            self.runner.graphs.capture()
        self.async_scheduling = (
            use_graphs if cfg.scheduler.async_scheduling is None else cfg.scheduler.async_scheduling
        )
        self._pending: PendingStep | None = None  # a decode step launched but not yet read back
        self.num_async_steps = 0
        self._think_ids: tuple | None = None
        self._structured = None  # the grammar compiler, made on the first constrained request
        self._structured_lock = threading.Lock()
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        log.info(
            "engine ready: %s on %s (%s), %d state slots, %d KV blocks of %d, max_model_len %d",
            self.model_dir, self.device, self.dtype, slots, blocks, cfg.cache.block_size, self.max_model_len,
        )  # fmt: skip

    def _copy_state(self, src: int, dst: int) -> None:
        """Copy one state slot into another across every Mamba layer (prefix snapshots in and out)."""
        self.cache_tensors.conv_state[:, dst] = self.cache_tensors.conv_state[:, src]
        self.cache_tensors.ssm_state[:, dst] = self.cache_tensors.ssm_state[:, src]

    def _cache_budget(self) -> int:
        if self.device.type == "cuda":
            peak = self._profile_activation_bytes()
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free  # weights, the CUDA context, and anyone else on the card
            budget = int(total * self.cfg.cache.gpu_memory_utilization - used - peak)
            log.info("GPU memory: %.1f GiB in use, %.1f GiB peak activations, %.1f GiB for caches",
                     used / 2**30, peak / 2**30, budget / 2**30)  # fmt: skip
            if budget <= 0:
                raise ValueError(
                    f"no GPU memory is left for the caches (total {total / 2**30:.1f} GiB, in use "
                    f"{used / 2**30:.1f} GiB, activations {peak / 2**30:.1f} GiB); raise gpu_memory_utilization "
                    f"or lower max_num_batched_tokens"
                )
            return budget
        if self.cfg.cache.cache_memory_bytes:
            return int(self.cfg.cache.cache_memory_bytes)
        # CPU default: a slot per allowed sequence and KV for a few full-length sequences, at most 2 GiB.
        c = self.config
        max_len = self.cfg.max_model_len or c.max_position_embeddings
        seqs = self.cfg.scheduler.max_num_seqs
        want = (seqs + 2 + seqs // 8) * state_bytes_per_sequence(c, self.dtype, self.ssm_dtype)
        want += 4 * max_len * kv_bytes_per_token(c, self.dtype)
        return int(min(want, 2 << 30))

    @torch.inference_mode()
    def _profile_activation_bytes(self) -> int:
        """Peak memory a full step needs beside the weights: run one forward pass of a full token budget
        (and, for a VL model, one micro-batch of tiles through the vision encoder) and measure it."""
        from glimpse.model.batch import ForwardBatch

        n = self.cfg.scheduler.max_num_batched_tokens
        bs = self.cfg.cache.block_size
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        scratch = allocate_cache_tensors(
            self.config, 1, -(-n // bs), bs, self.dtype, self.ssm_dtype, self.device
        )
        scratch.conv_state.zero_()
        scratch.ssm_state.zero_()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = torch.randint(0, self.config.vocab_size, (n,), device=self.device)
        table = torch.arange(-(-n // bs), device=self.device).view(1, -1)
        batch = ForwardBatch([n], [0], torch.tensor([0], device=self.device), table)
        rows = torch.arange(n - min(n, self.cfg.scheduler.max_num_seqs), n, device=self.device)
        self.model(batch, scratch, input_ids=ids, logits_indices=rows)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        if getattr(self.model, "is_multimodal", False):
            tiles = self.model.vision_model.max_batch
            size = self.model.config.force_image_size
            torch.cuda.reset_peak_memory_stats(self.device)
            self.model.encode_images(torch.randn(tiles, 3, size, size, device=self.device))
            peak = max(peak, torch.cuda.max_memory_allocated(self.device) - base)
        del scratch, ids, batch
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        return int(peak * 1.1) + (256 << 20)  # headroom for the sampler and fragmentation

    @property
    def structured(self):
        """The structured-output compiler (llguidance); built once, on first use, from any thread."""
        with self._structured_lock:
            if self._structured is None:
                from glimpse.engine.structured import StructuredOutputCompiler

                self._structured = StructuredOutputCompiler(
                    self.tokenizer, self.config.vocab_size, self.eos_token_ids
                )
            return self._structured

    def _reasoning_open(self, prompt_token_ids: list[int]) -> bool:
        """The prompt ends inside a <think> block, so the answer (and any constraint) starts after </think>."""
        ids = self._think_ids
        if ids is None:
            ids = self._think_ids = tuple(
                self.tokenizer.convert_tokens_to_ids(t) if self.tokenizer is not None else None
                for t in ("<think>", "</think>")
            )
        start, end = ids
        if start is None or end is None or start == self.tokenizer.unk_token_id:
            return False
        tail = prompt_token_ids[-64:]
        return start in tail and (end not in tail or max(i for i, t in enumerate(tail) if t == start)
                                  > max(i for i, t in enumerate(tail) if t == end))  # fmt: skip

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
        grammar = (
            self.structured.compile(params) if (params.json_schema is not None or params.regex) else None
        )
        waits = grammar is not None and self._reasoning_open(req.prompt_token_ids)
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
        return self._output(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests) or self._pending is not None

    # Stepping ----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward pass; outputs for every request that got new tokens or finished.

        With async scheduling a pure decode step is launched before the previous one's tokens are read
        back: its outputs arrive with the next call, while the GPU already runs the following step."""
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
        seqs, sampled = self.runner.execute(sched)
        for chunk in sched.chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            self.cache.on_computed(chunk.seq)
        touched: dict[str, Request] = {}
        for i, seq in enumerate(seqs):
            self._append_token(seq, sampled.token_ids[i], sampled.logprobs[i], sampled.sampled_logprobs[i])
            touched[seq.request.request_id] = seq.request
        return outputs + self._outputs_for(touched)

    def _outputs_for(self, touched: dict[str, Request]) -> list[RequestOutput]:
        outputs = []
        for req in touched.values():
            outputs.append(self._output(req))
            if req.finished:
                self.requests.pop(req.request_id, None)
        return outputs

    # Asynchronous decode -------------------------------------------------------------------------------
    @staticmethod
    def _async_safe(seq: Sequence) -> bool:
        """Sampling that needs nothing from the host about the previous token: no penalties (they count
        tokens), no grammar (it advances on the host), no logprob dicts, no forced test tokens."""
        p = seq.params
        return seq.grammar is None and p.logprobs is None and p.forced_token_ids is None and not needs_penalties(p)

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
            self._append_token(seq, tokens[i], None, logprobs[i])
            if not seq.is_finished:
                seq.output_token_ids.extend(later)
                self.cache.on_computed(seq)  # its blocks hold no placeholder up to the last real token
            touched[seq.request.request_id] = seq.request
        return self._outputs_for(touched)

    def _append_token(self, seq: Sequence, token: int, logprobs: dict | None, sampled_logprob: float) -> None:
        params = seq.params
        seq.output_token_ids.append(token)
        seq.cumulative_logprob += sampled_logprob
        if seq.logprobs is not None and logprobs is not None:
            for tid, lp in logprobs.items():
                if lp.decoded_token is None and self.tokenizer is not None:
                    lp.decoded_token = self.tokenizer.decode([tid])
            seq.logprobs.append(logprobs)
        n_out = len(seq.output_token_ids)
        if seq.grammar is not None and self._advance_grammar(seq, token):
            return
        stop_token = token in params.stop_token_ids
        eos = token in self.eos_token_ids and not params.ignore_eos
        if (stop_token or eos) and n_out >= params.min_tokens:
            seq.finish_reason, seq.stop_reason = "stop", (token if stop_token else None)
        else:
            detok = seq.detokenizer
            if detok is not None:
                seq.text += detok.add_tokens([token])
            if detok is not None and detok.stopped_by is not None and n_out >= params.min_tokens:
                seq.finish_reason, seq.stop_reason = "stop", seq.detokenizer.stopped_by
                seq.text = seq.detokenizer.text
            elif params.max_tokens is not None and n_out >= params.max_tokens:
                seq.finish_reason = "length"
            elif seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            # a stop string already cut the text; otherwise release what the detokenizer held back
            if seq.detokenizer is not None and not isinstance(seq.stop_reason, str):
                seq.text += seq.detokenizer.flush()
            self.scheduler.finish(seq)

    def _advance_grammar(self, seq: Sequence, token: int) -> bool:
        """Feed the token to the sequence's constraint; True when that finished the sequence."""
        if seq.grammar_waits:
            if token == self._think_ids[1]:
                seq.grammar_waits = False
            return False
        if token in self.eos_token_ids:
            return False
        if not seq.grammar.accept(token):  # only forced tokens can break the grammar
            seq.finish_reason = "abort"
        elif seq.grammar.is_terminated():  # the value is complete: stop now (even with ignore_eos)
            seq.finish_reason, seq.stop_reason = "stop", None
            if seq.detokenizer is not None:
                seq.text += seq.detokenizer.add_tokens([token])
        else:
            return False
        if seq.detokenizer is not None:
            seq.text += seq.detokenizer.flush()
        self.scheduler.finish(seq)
        return True

    def _output(self, req: Request) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=s.index,
                text=s.text,
                token_ids=_known_tokens(s.output_token_ids),
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                logprobs=s.logprobs,
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
            )
            for s in req.sequences
        ]
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outs,
            finished=req.finished,
            num_cached_tokens=min(s.num_cached_tokens for s in req.sequences),
            video_tokens=req.video_tokens,
            media=req.media_info,
        )

    def stats(self) -> dict[str, float]:
        """Counters and gauges for /metrics and logs (read from any thread: plain ints, no locking)."""
        blocks, slots, enc = self.cache.blocks, self.cache.slots, self.encoder_cache
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
            "prefix_cache_bytes": self._prefix_cache_bytes(),
            "encoder_cache_hits": enc.hits,
            "encoder_cache_misses": enc.misses,
            "encoder_cache_bytes": enc.bytes,
        }

    def _prefix_cache_bytes(self) -> int:
        """Bytes the prefix cache keeps: cached KV blocks plus Mamba state snapshots."""
        if self.prefix_cache is None:
            return 0
        block = kv_bytes_per_token(self.config, self.dtype) * self.cfg.cache.block_size
        state = state_bytes_per_sequence(self.config, self.dtype, self.ssm_dtype)
        return len(self.prefix_cache.block_by_hash) * block + len(self.prefix_cache.snapshots) * state

    def close(self) -> None:
        """Give the caches and CUDA graphs back to the device (the model stays: the caller may reuse it)."""
        import gc

        self.requests.clear()
        self._pending = None
        self.runner.graphs = None
        self.runner.cache = None
        self.cache_tensors = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def all_memory_free(self) -> bool:
        return self.cache.all_free()


__all__ = ["LLMEngine", "Logprob", "SequenceStatus"]


def _known_tokens(ids: list[int]) -> list[int]:
    """The output tokens the host has read back: without the trailing placeholders of steps in flight."""
    n = len(ids)
    while n and ids[n - 1] == PENDING_TOKEN:
        n -= 1
    return ids[:n]
