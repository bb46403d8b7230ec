"""What a finished (or streaming) request returns: RequestOutput and CompletionOutput, as in vLLM."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    # With logprobs: the text each token added to `text` (they join to it). A token that leaves a character
    # unfinished, or is a skipped special token, adds "" (Logprob.decoded_token is the token decoded alone).
    token_texts: list[str] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    video_tokens: dict[str, int] | None = None  # {"total", "kept"} over the prompt's videos
    media: list[dict[str, Any]] = field(default_factory=list)
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing scores
    # it), else the token's Logprob and the top k at its position.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
