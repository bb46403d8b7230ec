"""The scheduler: each step fills a token budget and a sequence budget, no prefill or decode phase.

Running sequences go first (a decode costs one token, an unfinished prompt its next chunk), then
waiting ones in arrival order, each taking as much of its prompt as the budget leaves (chunked
prefill). When memory runs out, the newest running sequence is preempted: its memory is freed and it
is recomputed later from its tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from glimpse.engine.cache import CacheManager
from glimpse.engine.request import Sequence, SequenceStatus

# A prompt whose logprobs are wanted has logits computed at every position of its chunk (tokens x vocab,
# 256 MiB at 1024 tokens of a 131k vocabulary in bf16): its chunks stay this small so that tensor remains
# well inside the activation memory a full step was profiled with.
PROMPT_LOGPROBS_CHUNK_TOKENS = 1024


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # new tokens computed for this sequence in this step

    @property
    def start(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def completes(self) -> bool:
        """After this chunk every known token is computed, so the step samples the next one."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_batched_tokens: int, max_num_seqs: int) -> None:
        self.cache = cache
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            while not self.cache.grow(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]  # newest first
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break  # it preempted itself: nothing newer is left to run
            out.chunks.append(ScheduledChunk(seq, n))
            scheduled.add(seq.seq_id)
            budget -= n
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            if not self.cache.admit(seq):  # a prefix hit sets num_computed_tokens here
                break
            n = self._chunk(seq, budget)
            if not self.cache.grow(seq, seq.num_computed_tokens + n):
                self.cache.free(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, n))
            budget -= n
        return out

    @staticmethod
    def _chunk(seq: Sequence, budget: int) -> int:
        """Tokens to compute for `seq` this step: what it lacks, within the budget, and stopping at the
        next boundary where its Mamba state is to be snapshotted (the state exists only at chunk ends)."""
        n = min(seq.num_tokens - seq.num_computed_tokens, budget)
        if seq.prompt_logprobs_from is not None:
            n = min(n, PROMPT_LOGPROBS_CHUNK_TOKENS)
        for point in seq.snapshot_points:
            if seq.num_computed_tokens < point < seq.num_computed_tokens + n:
                n = point - seq.num_computed_tokens
        return n

    def _preempt(self, seq: Sequence) -> None:
        """Free everything the sequence holds; it will recompute its tokens when readmitted."""
        self.running.remove(seq)
        self.cache.free(seq)
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Called when a sequence ends (stopped, length, aborted): its memory is free at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.free(seq)
        seq.status = SequenceStatus.FINISHED
