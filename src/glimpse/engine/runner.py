"""The model runner: turns a scheduled step into one forward pass and samples where a sequence is due."""

from __future__ import annotations

import torch

from glimpse.engine.request import Sequence
from glimpse.engine.sampler import SamplerOutput, sample
from glimpse.engine.scheduler import SchedulerOutput
from glimpse.model.batch import CacheTensors, ForwardBatch


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        cache: CacheTensors,
        device: torch.device,
        eos_token_ids: list[int],
        generator: torch.Generator | None = None,
    ):
        self.model = model
        self.generator = generator  # the draws of unseeded sequences
        self.cache = cache
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.num_forward_tokens = 0
        self.graphs = None  # DecodeGraphs on CUDA (set by the engine), None for eager execution  # tokens computed so far (the prefix cache saves some of them)

    def _reset_states(self, seqs: list[Sequence]) -> None:
        """A sequence starting from token 0 must start from zero Mamba state, whoever had its slot before."""
        slots = [s.slot for s in seqs]
        if slots:
            idx = torch.tensor(slots, device=self.device)
            self.cache.conv_state[:, idx] = 0
            self.cache.ssm_state[:, idx] = 0

    def _embed(self, ids: torch.Tensor, sched: SchedulerOutput) -> torch.Tensor | None:
        """Token embeddings with vision embeddings written over the placeholder positions, or None
        when no chunk of this step touches media."""
        pieces = []
        offset = 0
        for chunk in sched.chunks:
            start, end = chunk.start, chunk.start + chunk.num_tokens
            for span in chunk.seq.request.media_spans:
                lo, hi = max(start, span.start), min(end, span.end)
                if lo < hi:
                    pieces.append((offset + lo - start, span, lo - span.start, hi - lo))
            offset += chunk.num_tokens
        if not pieces:
            return None
        embeds = self.model.embed(ids)
        for at, span, src, n in pieces:
            if span.embeddings is None:
                span.embeddings = span.encode()
            embeds[at : at + n] = span.embeddings[src : src + n].to(embeds.device, embeds.dtype)
        return embeds

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> tuple[list[Sequence], SamplerOutput | None]:
        """Run one step; returns the sequences that sampled a token and what they sampled."""
        chunks = sched.chunks
        if self._graph_step(chunks):
            seqs = [c.seq for c in chunks]
            logits = self.graphs.run(
                [c.seq.token_ids(c.start, c.start + 1)[0] for c in chunks], [c.seq.slot for c in chunks],
                [c.seq.block_ids for c in chunks], [c.start for c in chunks],
            )  # fmt: skip
            self.num_forward_tokens += len(chunks)
            return seqs, self._sample(seqs, logits)
        self._reset_states([c.seq for c in chunks if c.start == 0])
        token_ids: list[int] = []
        for c in chunks:
            token_ids.extend(c.seq.token_ids(c.start, c.start + c.num_tokens))
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        width = max(len(c.seq.block_ids) for c in chunks)
        tables = torch.zeros(len(chunks), max(width, 1), dtype=torch.long)
        for i, c in enumerate(chunks):
            tables[i, : len(c.seq.block_ids)] = torch.tensor(c.seq.block_ids, dtype=torch.long)
        batch = ForwardBatch(
            query_lens=[c.num_tokens for c in chunks],
            context_lens=[c.start for c in chunks],
            state_slots=torch.tensor([c.seq.slot for c in chunks], dtype=torch.long, device=self.device),
            block_tables=tables.to(self.device),
        )
        due = [i for i, c in enumerate(chunks) if c.completes]
        last = batch.cu_query_lens[1:] - 1
        logits_indices = last[torch.tensor(due, dtype=torch.long, device=last.device)]
        embeds = self._embed(ids, sched)
        logits = self.model(
            batch, self.cache, input_ids=ids if embeds is None else None, inputs_embeds=embeds,
            logits_indices=logits_indices,
        )  # fmt: skip
        self.num_forward_tokens += batch.num_tokens
        if not due:
            return [], None
        seqs = [chunks[i].seq for i in due]
        return seqs, self._sample(seqs, logits)

    def _graph_step(self, chunks) -> bool:
        """A pure decode step (one new token each, every state already started) that a graph can run."""
        if self.graphs is None or not all(c.num_tokens == 1 and c.start > 0 for c in chunks):
            return False
        if any(span.start <= c.start < span.end for c in chunks for span in c.seq.request.media_spans):
            return False
        return self.graphs.can_run(len(chunks), max(len(c.seq.block_ids) for c in chunks))

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> SamplerOutput:
        mask = None
        if any(s.grammar is not None and not s.grammar_waits for s in seqs):
            from glimpse.engine.structured import batch_allowed_mask

            matchers = [s.grammar if not s.grammar_waits else None for s in seqs]
            mask = batch_allowed_mask(matchers, logits.shape[-1], logits.device)
        return sample(
            logits, [s.sampling_state for s in seqs], self.eos_token_ids, mask, generator=self.generator
        )
