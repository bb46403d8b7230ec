"""The model runner: turns a scheduled step into one forward pass and samples where a sequence is due."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glimpse.engine.parallel import ForwardStep, GraphStep, TPLeader
from glimpse.engine.request import PENDING_TOKEN, Sequence
from glimpse.engine.sampler import SamplerOutput, prompt_logprobs, sample, sample_on_device
from glimpse.engine.scheduler import SchedulerOutput
from glimpse.engine.structured import batch_allowed_mask
from glimpse.engine.vision_encoder import CachedVisionEncoder
from glimpse.model.batch import CacheTensors, ForwardBatch
from glimpse.outputs import Logprob


@dataclass
class PromptScores:
    """Prompt logprobs one step computed for a sequence's request: the next entries, in prompt order."""

    seq: Sequence
    entries: list[dict[int, Logprob]]


@dataclass
class PendingStep:
    """A decode step launched without waiting for it: its sampled tokens are still on their way to the host.

    `tokens` stays on the device, so the next step can read its inputs from it before the host has seen
    them; `host_tokens`/`host_logprobs` are pinned copies, complete once `done` has fired."""

    seqs: list[Sequence]
    out_index: list[int]  # where each sequence's placeholder sits in its output_token_ids
    tokens: torch.Tensor
    host_tokens: torch.Tensor
    host_logprobs: torch.Tensor
    done: torch.cuda.Event | None

    def row_of(self) -> dict[int, int]:
        return {s.seq_id: i for i, s in enumerate(self.seqs)}

    def wait(self) -> tuple[list[int], list[float]]:
        if self.done is not None:
            self.done.synchronize()
        return self.host_tokens.tolist(), self.host_logprobs.tolist()


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        cache: CacheTensors,
        device: torch.device,
        eos_token_ids: list[int],
        generator: torch.Generator | None = None,
        vision: CachedVisionEncoder | None = None,
        leader: TPLeader | None = None,
    ):
        self.model = model
        self.leader = leader  # with tensor parallelism: tells the follower ranks each step first
        self.vision = vision  # encodes media spans as the prompt chunks reach them (VL models)
        self.generator = generator  # the draws of unseeded sequences
        self.cache = cache
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.num_forward_tokens = 0  # tokens computed so far (the prefix cache saves some of them)
        self.graphs = None  # DecodeGraphs on CUDA (set by the engine), None for eager execution

    def _reset_states(self, seqs: list[Sequence]) -> None:
        """A sequence starting from token 0 must start from zero Mamba state, whoever had its slot before."""
        slots = [s.slot for s in seqs]
        if slots and self.leader is not None:
            self.leader.reset_states(slots)
        if slots:
            idx = torch.tensor(slots, device=self.device)
            self.cache.conv_state[:, idx] = 0
            self.cache.ssm_state[:, idx] = 0

    @staticmethod
    def _media_pieces(sched: SchedulerOutput) -> list:
        """Where this step's chunks touch media: (row in the step, span, its request's spans, first
        embedding row, count) each."""
        pieces = []
        offset = 0
        for chunk in sched.chunks:
            start, end = chunk.start, chunk.start + chunk.num_tokens
            spans = chunk.seq.request.media_spans
            for span in spans:
                lo, hi = max(start, span.start), min(end, span.end)
                if lo < hi:
                    pieces.append((offset + lo - start, span, spans, lo - span.start, hi - lo))
            offset += chunk.num_tokens
        return pieces

    def _embed(self, ids: torch.Tensor, pieces: list) -> torch.Tensor | None:
        """Token embeddings with vision embeddings written over the placeholder positions, or None
        when no chunk of this step touches media."""
        if not pieces:
            return None
        embeds = self.model.embed(ids)
        for at, span, spans, src, n in pieces:
            if span.embeddings is None:
                self.vision.fill(span, spans)
            embeds[at : at + n] = span.embeddings[src : src + n].to(embeds.device, embeds.dtype)
        if self.leader is not None:  # the followers run no ViT: they take these
            self.leader.share_embeds(embeds)
        return embeds

    def _announce(self, chunks, ids: torch.Tensor, logits_rows: list[int] | None, with_embeds: bool) -> None:
        """Tell the follower ranks about the step rank 0 is about to run, and send them its token ids."""
        step = ForwardStep(
            [c.num_tokens for c in chunks], [c.start for c in chunks], [c.seq.slot for c in chunks],
            [list(c.seq.block_ids) for c in chunks], logits_rows, with_embeds,
        )  # fmt: skip
        self.leader.forward(step, ids)

    @torch.inference_mode()
    def execute(
        self, sched: SchedulerOutput
    ) -> tuple[list[Sequence], SamplerOutput | None, list[PromptScores]]:
        """Run one step; returns the sequences that sampled a token, what they sampled, and the prompt
        logprobs the step's chunks computed."""
        chunks = sched.chunks
        if self.can_replay(chunks):
            seqs = [c.seq for c in chunks]
            host_ids = [c.seq.token_at(c.start) for c in chunks]
            if self.leader is not None:
                self._announce_replay(chunks, host_ids, None)
            logits = self.graphs.run(
                host_ids, [c.seq.slot for c in chunks], [c.seq.block_ids for c in chunks], [c.start for c in chunks],
            )  # fmt: skip
            self.num_forward_tokens += len(chunks)
            return seqs, self._sample(seqs, logits), []
        self._reset_states([c.seq for c in chunks if c.start == 0])
        token_ids: list[int] = []
        for c in chunks:
            token_ids.extend(c.seq.token_ids(c.start, c.start + c.num_tokens))
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        batch = self._batch(chunks)
        due = [i for i, c in enumerate(chunks) if c.completes]
        scored, scored_rows = self._prompt_positions(chunks, batch.cu_query_lens_list)
        last = batch.cu_query_lens[1:] - 1
        logits_indices = last[torch.tensor(due, dtype=torch.long, device=last.device)]
        if scored_rows:
            rows = torch.tensor(scored_rows, dtype=torch.long, device=last.device)
            logits_indices = torch.cat([rows, logits_indices])
        pieces = self._media_pieces(sched)
        if self.leader is not None:
            cu = batch.cu_query_lens_list
            self._announce(chunks, ids, scored_rows + [cu[i + 1] - 1 for i in due], bool(pieces))
        embeds = self._embed(ids, pieces)
        logits = self.model(
            batch, self.cache, input_ids=ids if embeds is None else None, inputs_embeds=embeds,
            logits_indices=logits_indices,
        )  # fmt: skip
        self.num_forward_tokens += batch.num_tokens
        prompt_scores = []
        at = 0
        for seq, first, end in scored:
            targets = seq.prompt_token_ids[first + 1 : end + 1]
            k = seq.params.prompt_logprobs or 0
            prompt_scores.append(
                PromptScores(seq, prompt_logprobs(logits[at : at + end - first], targets, k))
            )
            at += end - first
        if not due:
            return [], None, prompt_scores
        seqs = [chunks[i].seq for i in due]
        return seqs, self._sample(seqs, logits[at:]), prompt_scores

    @staticmethod
    def _prompt_positions(
        chunks, cu_query_lens: list[int]
    ) -> tuple[list[tuple[Sequence, int, int]], list[int]]:
        """The prompt positions whose logits this step owes to prompt logprobs: (sequence, first, end) per
        chunk that owes some (positions first..end-1, scoring tokens first+1..end), and their rows in the
        step's packed tokens. The last prompt position is left out: its logits sample the first output."""
        scored, rows = [], []
        for c, offset in zip(chunks, cu_query_lens):
            first = c.seq.prompt_logprobs_from
            if first is None:
                continue
            end = min(c.start + c.num_tokens, c.seq.num_prompt_tokens - 1)
            if first >= end:
                continue
            # positions before `first` are already scored; a prefix-cache hit never skips an owed one
            assert first >= c.start, f"prompt position {first} is owed logits but was not computed"
            scored.append((c.seq, first, end))
            rows.extend(range(offset + first - c.start, offset + end - c.start))
        return scored, rows

    @torch.inference_mode()
    def launch_decode(self, sched: SchedulerOutput, prev: PendingStep | None) -> PendingStep:
        """Run a pure decode step and sample without reading anything back. Inputs still pending from
        `prev` (PENDING_TOKEN on the host) are taken from prev's device tensor."""
        chunks = sched.chunks
        seqs = [c.seq for c in chunks]
        host_ids, dst, src = [], [], []
        prev_rows = prev.row_of() if prev is not None else {}
        for i, c in enumerate(chunks):
            token = c.seq.token_at(c.start)
            if token == PENDING_TOKEN:
                dst.append(i)
                src.append(prev_rows[c.seq.seq_id])
                token = 0
            host_ids.append(token)
        device_ids = None
        if dst:
            assert prev is not None
            idx = torch.tensor([dst, src], dtype=torch.long)
            idx = idx.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else idx
            device_ids = (idx[0], prev.tokens.index_select(0, idx[1]))
        if self.can_replay(chunks):
            if self.leader is not None:
                self._announce_replay(chunks, host_ids, device_ids)
            logits = self.graphs.run(
                host_ids, [c.seq.slot for c in chunks], [c.seq.block_ids for c in chunks],
                [c.start for c in chunks], device_ids=device_ids,
            )  # fmt: skip
        else:  # eager (CPU, or enforce_eager): the same step without a graph
            ids = torch.tensor(host_ids, dtype=torch.long, device=self.device)
            if device_ids is not None:
                ids.index_copy_(0, *device_ids)
            if self.leader is not None:
                self._announce(chunks, ids, None, False)
            batch = self._batch(chunks)
            logits = self.model(batch, self.cache, input_ids=ids, logits_indices=batch.last_token_indices())
        self.num_forward_tokens += len(chunks)
        tokens, _, sampled_lp = sample_on_device(
            logits, [s.sampling_state for s in seqs], self.eos_token_ids, generator=self.generator
        )
        cuda = self.device.type == "cuda"
        host_tokens = torch.empty(len(seqs), dtype=torch.long, pin_memory=cuda)
        host_lp = torch.empty(len(seqs), dtype=torch.float32, pin_memory=cuda)
        host_tokens.copy_(tokens, non_blocking=cuda)
        host_lp.copy_(sampled_lp, non_blocking=cuda)
        done = None
        if cuda:
            done = torch.cuda.Event()
            done.record()
        out_index = [len(s.output_token_ids) for s in seqs]
        return PendingStep(seqs, out_index, tokens, host_tokens, host_lp, done)

    def _announce_replay(self, chunks, host_ids: list[int], device_ids) -> None:
        """Tell the follower ranks to replay their graph for this decode step; the ids (some perhaps still
        on the device from the step before) go as one broadcast."""
        ids = torch.tensor(host_ids, dtype=torch.long).to(self.device)
        if device_ids is not None:
            ids.index_copy_(0, *device_ids)
        step = GraphStep(
            [c.seq.slot for c in chunks], [list(c.seq.block_ids) for c in chunks], [c.start for c in chunks]
        )
        self.leader.replay(step, ids)

    def _batch(self, chunks) -> ForwardBatch:
        width = max(len(c.seq.block_ids) for c in chunks)
        tables = torch.zeros(len(chunks), max(width, 1), dtype=torch.long)
        for i, c in enumerate(chunks):
            tables[i, : len(c.seq.block_ids)] = torch.tensor(c.seq.block_ids, dtype=torch.long)
        slots = [c.seq.slot for c in chunks]
        return ForwardBatch(
            query_lens=[c.num_tokens for c in chunks],
            context_lens=[c.start for c in chunks],
            state_slots=torch.tensor(slots, dtype=torch.long, device=self.device),
            block_tables=tables.to(self.device),
            state_slots_list=slots,
            block_tables_cpu=tables,
        )

    def can_replay(self, chunks) -> bool:
        """A pure decode step (one new token each, every state already started, every sequence due to
        sample) that a graph can run."""
        if self.graphs is None or not all(c.num_tokens == 1 and c.start > 0 and c.completes for c in chunks):
            return False
        if any(span.start <= c.start < span.end for c in chunks for span in c.seq.request.media_spans):
            return False
        return self.graphs.can_run(len(chunks), max(len(c.seq.block_ids) for c in chunks))

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> SamplerOutput:
        mask = None
        if any(s.grammar is not None and not s.grammar_waits for s in seqs):
            matchers = [s.grammar if not s.grammar_waits else None for s in seqs]
            mask = batch_allowed_mask(matchers, logits.shape[-1], logits.device)
        return sample(
            logits, [s.sampling_state for s in seqs], self.eos_token_ids, mask, generator=self.generator
        )
