"""A validated OpenAI request -> the engine's SamplingParams: the request's own fields, the server's
defaults (the model's generation_config) for those it leaves out, a max_tokens the client set checked
against the room left in the context (a default one capped to it), and response_format /
structured_outputs as one JSON schema or regex."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from glimpse.errors import InvalidRequestError
from glimpse.sampling_params import SamplingParams
from glimpse.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseFormat,
    StructuredOutputs,
)

# Fields a server's defaults (the model's generation_config) may fill when a request leaves them out.
DEFAULTABLE = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


def _regex_escape(text: str) -> str:
    """Escape only the metacharacters every regex dialect shares, so any constrained decoder reads it."""
    return "".join("\\" + c if c in "\\.^$|?*+()[]{}" else c for c in text)


def output_constraint(
    response_format: ResponseFormat | None, structured: StructuredOutputs | None
) -> tuple[dict[str, Any] | None, str | None]:
    """(json_schema, regex) from response_format or structured_outputs (validation has checked that at
    most one is given, that a json_schema format has its schema, and that a schema sent as a string
    parses to an object)."""
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            return {"type": "object"}, None
        return response_format.json_schema.schema_, None  # type: ignore[union-attr]
    if structured is None:
        return None, None
    if structured.regex is not None:
        return None, structured.regex
    if structured.choice is not None:
        return None, "(" + "|".join(_regex_escape(c) for c in structured.choice) + ")"
    if structured.json_object:
        return {"type": "object"}, None
    schema = structured.json_
    return (json.loads(schema) if isinstance(schema, str) else schema), None


def check_max_tokens(
    req: ChatCompletionRequest | CompletionRequest, room: int, max_model_len: int | None = None
) -> None:
    """As vLLM: a max_tokens (or max_completion_tokens) the client set above the `room` left in the
    context (max_model_len - prompt tokens) is a 400, not silently capped."""
    asked = req.asked_max_tokens
    if asked is None or asked[1] <= room:
        return
    name, value = asked
    if max_model_len is None:
        detail = f"only {room} tokens are left in the model's context"
    else:
        prompt = max_model_len - room
        detail = (
            f"this model's context is {max_model_len} tokens and the prompt takes {prompt} of them "
            f"({value} > {max_model_len} - {prompt})"
        )
    raise InvalidRequestError(f"{name} is too large: {value}; {detail}", param=name)


def to_sampling_params(
    req: ChatCompletionRequest | CompletionRequest,
    default_max_tokens: int | None = None,
    defaults: Mapping[str, Any] | None = None,
    max_model_len: int | None = None,
) -> SamplingParams:
    """SamplingParams for a request.

    `default_max_tokens` is the room left in the context (max_model_len - prompt tokens): a max_tokens
    the client set must fit in it (`max_model_len`, when given, makes the refusal say the whole
    context), a default one is capped to it. `defaults` are the server's sampling defaults (from the
    model's generation_config) for fields not given.
    """
    if isinstance(req, ChatCompletionRequest):
        logprobs, prompt_param = (req.top_logprobs or 0) if req.logprobs else None, "messages"
    else:
        logprobs, prompt_param = req.logprobs, "prompt"
    defaults = defaults or {}
    kwargs: dict[str, Any] = {k: defaults[k] for k in DEFAULTABLE if defaults.get(k) is not None}
    kwargs.update({k: getattr(req, k) for k in DEFAULTABLE if getattr(req, k) is not None})
    if default_max_tokens is not None and default_max_tokens < 1:
        raise InvalidRequestError(
            "the prompt leaves no room to generate within the model's context length", param=prompt_param
        )
    if default_max_tokens is not None:
        check_max_tokens(req, default_max_tokens, max_model_len)
    # The smallest of what was asked (or defaulted), the server's cap and the room left in the context.
    limits = [req.requested_max_tokens, defaults.get("max_tokens"), default_max_tokens]
    limits = [v for v in limits if v is not None]
    json_schema, regex = output_constraint(req.response_format, req.structured_outputs)
    kwargs.update(
        n=req.n or 1,
        seed=req.seed,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=bool(req.ignore_eos),
        max_tokens=min(limits) if limits else None,
        min_tokens=req.min_tokens or 0,
        logprobs=logprobs,
        skip_special_tokens=True if req.skip_special_tokens is None else req.skip_special_tokens,
        json_schema=json_schema,
        regex=regex,
    )
    if kwargs["max_tokens"] is not None and kwargs["min_tokens"] > kwargs["max_tokens"]:
        raise InvalidRequestError(
            f"min_tokens ({kwargs['min_tokens']}) must not exceed max_tokens ({kwargs['max_tokens']}, "
            "after capping to the room left in the context)",
            param="min_tokens",
        )
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:  # a server default out of range; the request's own fields were checked
        name = str(exc).split(" ", 1)[0]
        raise InvalidRequestError(str(exc), param=name if name in kwargs else None) from None
