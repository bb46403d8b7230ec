"""A request and its sequences: tokens computed, tokens wanted, and where their state lives.

A request with n > 1 fans out into n sequences that share the prompt (and, with prefix caching, its
cached blocks); each sequence is scheduled on its own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from glimpse.inputs import MediaSpan
from glimpse.outputs import Logprob
from glimpse.sampling_params import SamplingParams

# Stands in a sequence's output for a token sampled on the device but not yet read back (the engine's
# asynchronous decode: the next step is launched before the host knows this one's tokens).
PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request: Request
    index: int  # child index within the request (n > 1)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int | None = None
    block_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict] | None = None
    token_texts: list[str] | None = None  # with logprobs: what each output token added to `text`
    cumulative_logprob: float = 0.0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    sampling_state: Any = None
    detokenizer: Any = None
    text: str = ""
    num_preemptions: int = 0
    grammar: Any = None  # a GrammarMatcher when the output is constrained (JSON schema, regex)
    grammar_waits: bool = False  # the constraint starts after the model closes its reasoning (</think>)
    num_registered_blocks: int = 0  # leading blocks already entered in the prefix cache
    snapshot_points: set[int] = field(default_factory=set)  # computed-token counts worth a state snapshot

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    def token_at(self, pos: int) -> int:
        p = self.num_prompt_tokens
        return self.prompt_token_ids[pos] if pos < p else self.output_token_ids[pos - p]

    def token_ids(self, start: int, end: int) -> list[int]:
        p = self.num_prompt_tokens
        if end <= p:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]

    @property
    def prompt_logprobs_from(self) -> int | None:
        """The first prompt position whose logits this sequence must still compute for the request's prompt
        logprobs (the logits at position i score prompt token i + 1), or None when it owes none. The first
        child computes them for the whole request."""
        done = self.request.prompt_logprobs
        if done is None or self.index != 0 or len(done) >= self.num_prompt_tokens:
            return None
        return len(done) - 1

    @property
    def max_cached_tokens(self) -> int:
        """How many leading tokens a prefix-cache hit may cover: not the last one (its logits choose the
        next token), and none whose logits are still owed to the prompt logprobs."""
        owed = self.prompt_logprobs_from
        return self.num_tokens - 1 if owed is None else owed

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # arrival order (first come, first served)
    media_spans: list[MediaSpan] = field(default_factory=list)
    media_info: list[dict[str, Any]] = field(default_factory=list)  # RequestOutput.media
    video_tokens: dict[str, int] | None = None
    grammar: Any = None  # a compiled structured-output constraint factory, if any
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of the prompt's full blocks
    # With params.prompt_logprobs: [None], then one dict per prompt token as the prefill computes it.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    sequences: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.sequences)
