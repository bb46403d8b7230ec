"""OpenAI API request and response models (API.md, HTTP): what a client may send, and what it gets back.

Requests ignore unknown fields (clients send extras; a request keeps their names in `unknown_fields` so
the server can warn about them) but type-check the ones they know strictly: `true` is not a number,
`"0.5"` is not a float, and every number must be finite (`NaN`, `Infinity` and `1e400`, which parses to
infinity, are refused wherever they appear). Checks that span several fields raise
`InvalidRequestError` with `param` straight out of validation, so `parse_request` is the one door a
request body goes through. Response models serialise to OpenAI's exact shapes with `model_dump()`.
What a request means for the engine is request_params.py's job; logprobs.py builds the logprobs shapes.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import pydantic_core
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Strict,
    Tag,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from glimpse.errors import GlimpseError, InvalidRequestError

# Strict scalars: JSON `true` must not pass as 1 nor `"2"` as 2. Ints still pass as floats.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def random_id(prefix: str) -> str:
    """`chatcmpl-…`, `cmpl-…`: a prefix and 32 hex digits, as OpenAI-style ids look."""
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    """Request side: unknown fields are ignored, as OpenAI clients send extras; floats must be finite."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, allow_inf_nan=False)


def _finite_json(value: Any) -> Any:
    """Refuse NaN and infinities anywhere inside a free-form JSON value (schemas, template and processor
    arguments): the float fields refuse them by type, these would carry them on to whoever reads them."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise PydanticCustomError("finite_number", "numbers must be finite (not NaN or Infinity)")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


# A JSON object whose numbers are all finite.
JSONObject = Annotated[dict[str, Any], AfterValidator(_finite_json)]


# ---------------------------------------------------------------- messages and content parts


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


def _url_object(value: Any) -> Any:
    # Some clients send `"image_url": "https://…"` rather than `{"url": …}`.
    return {"url": value} if isinstance(value, str) else value


class ImageURL(OpenAIModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImageURLPart(OpenAIModel):
    type: Literal["image_url"]
    image_url: ImageURL

    _wrap = field_validator("image_url", mode="before")(_url_object)


class VideoURL(OpenAIModel):
    url: str


class VideoURLPart(OpenAIModel):
    type: Literal["video_url"]
    video_url: VideoURL

    _wrap = field_validator("video_url", mode="before")(_url_object)


def _check_file_source(file_data: str | None, file_url: str | None, file_id: str | None) -> None:
    # PydanticCustomError (not InvalidRequestError) so the error keeps its location in the request.
    if file_id is not None:
        raise PydanticCustomError(
            "unsupported_file_id",
            "file_id is not supported (this server has no files API); send file_data or file_url",
        )
    if (file_data is None) == (file_url is None):
        raise PydanticCustomError("invalid_file", "a file needs exactly one of file_data or file_url")


class FileRef(OpenAIModel):
    """`{"type": "file", "file": {...}}`: a PDF as a data URL, or a URL to fetch."""

    file_data: str | None = None
    file_url: str | None = None
    file_id: str | None = None
    filename: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> FileRef:
        _check_file_source(self.file_data, self.file_url, self.file_id)
        return self


class FilePart(OpenAIModel):
    type: Literal["file"]
    file: FileRef


class InputFilePart(OpenAIModel):
    """The flat Responses-API spelling: `{"type": "input_file", "file_data" | "file_url", "filename"}`."""

    type: Literal["input_file"]
    file_data: str | None = None
    file_url: str | None = None
    file_id: str | None = None
    filename: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> InputFilePart:
        _check_file_source(self.file_data, self.file_url, self.file_id)
        return self


_PART_TYPES = ("text", "image_url", "video_url", "file", "input_file")


def _part_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"type={kind}" if kind in _PART_TYPES else None


_PART_ERROR = {
    "custom_error_type": "invalid_content_part",
    "custom_error_message": f"a content part's type must be one of {', '.join(_PART_TYPES)}",
}
# Tags spelt `type=…` so that error locations can drop them (see `_param_from_loc`).
ContentPart = Annotated[
    Annotated[TextPart, Tag("type=text")]
    | Annotated[ImageURLPart, Tag("type=image_url")]
    | Annotated[VideoURLPart, Tag("type=video_url")]
    | Annotated[FilePart, Tag("type=file")]
    | Annotated[InputFilePart, Tag("type=input_file")],
    Discriminator(_part_tag, **_PART_ERROR),
]
TextOnlyPart = Annotated[
    Annotated[TextPart, Tag("type=text")],
    Discriminator(
        lambda v: "type=text" if _part_tag(v) == "type=text" else None,
        custom_error_type="invalid_content_part",
        custom_error_message="only text parts are allowed in this message's content",
    ),
]


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # a JSON string, as OpenAI sends it

    @field_validator("arguments", mode="before")
    @classmethod
    def _dump_object(cls, value: Any) -> Any:
        # Some clients put the arguments object itself; the chat template wants one spelling.
        return json.dumps(_finite_json(value), ensure_ascii=False) if isinstance(value, dict) else value


class ToolCall(OpenAIModel):
    """A call in an assistant message, sent back in history and returned in responses."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(OpenAIModel):
    role: Literal["system", "developer"]  # newer clients send "developer" for system instructions
    content: str | list[TextOnlyPart]
    name: str | None = None


class UserMessage(OpenAIModel):
    role: Literal["user"]
    content: str | list[ContentPart]
    name: str | None = None


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"]
    content: str | list[TextOnlyPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    name: str | None = None


class ToolMessage(OpenAIModel):
    role: Literal["tool"]
    content: str | list[TextOnlyPart]
    tool_call_id: str


_ROLES = ("system", "developer", "user", "assistant", "tool")


def _role_tag(value: Any) -> str | None:
    role = value.get("role") if isinstance(value, dict) else getattr(value, "role", None)
    if role not in _ROLES:
        return None
    return "role=system" if role == "developer" else f"role={role}"


ChatMessage = Annotated[
    Annotated[SystemMessage, Tag("role=system")]
    | Annotated[UserMessage, Tag("role=user")]
    | Annotated[AssistantMessage, Tag("role=assistant")]
    | Annotated[ToolMessage, Tag("role=tool")],
    Discriminator(
        _role_tag,
        custom_error_type="invalid_role",
        custom_error_message=f"a message's role must be one of {', '.join(_ROLES)}",
    ),
]


# ---------------------------------------------------------------- tools, formats, options


class FunctionDefinition(OpenAIModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: JSONObject | None = None
    strict: Bool | None = None


class Tool(OpenAIModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class JSONSchemaFormat(OpenAIModel):
    name: str
    description: str | None = None
    # `schema` would shadow a BaseModel attribute; the JSON key stays "schema".
    schema_: JSONObject | None = Field(default=None, alias="schema")
    strict: Bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        # As vLLM: a json_schema format without its schema is an error, not "any JSON object".
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise PydanticCustomError(
                "missing_json_schema",
                'response_format of type "json_schema" needs a "json_schema" object with a "schema"',
            )
        return self


class StreamOptions(OpenAIModel):
    include_usage: Bool | None = None
    continuous_usage_stats: Bool | None = None


class StructuredOutputs(OpenAIModel):
    """vLLM's constrained-decoding extra: exactly one of json, regex, choice (grammar is not supported)."""

    json_: JSONObject | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: Bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        if self.grammar is not None:
            raise PydanticCustomError(
                "unsupported_grammar", "grammar is not supported; use json, regex or choice"
            )
        given = [
            k for k in ("json_", "regex", "choice", "json_object") if getattr(self, k) not in (None, False)
        ]
        if len(given) != 1:
            raise PydanticCustomError(
                "invalid_structured_outputs", "give exactly one of json, regex or choice"
            )
        if self.choice is not None and not self.choice:
            raise PydanticCustomError("empty_choice", "choice needs at least one string")
        return self


# ---------------------------------------------------------------- requests


class _SamplingRequest(OpenAIModel):
    """Fields both endpoints share, with vLLM's extras. None means "not given": defaults apply later.

    Unknown top-level fields are collected (not kept as attributes) into `unknown_fields`."""

    # "allow" only to see the unknown fields: `_set_aside_unknown` moves them out of the model.
    model_config = ConfigDict(extra="allow")
    _unknown: dict[str, Any] = PrivateAttr(default_factory=dict)

    model: str | None = None
    frequency_penalty: Float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: Float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    n: Int | None = Field(default=None, ge=1, le=128)
    seed: Int | None = Field(default=None, ge=_INT64_MIN, le=_INT64_MAX)
    stop: str | list[str] | None = None
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Float | None = Field(default=None, ge=0)
    top_p: Float | None = Field(default=None, gt=0, le=1)
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM extras
    top_k: Int | None = Field(default=None, ge=-1)
    min_p: Float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: Float | None = Field(default=None, gt=0)
    ignore_eos: Bool | None = None
    min_tokens: Int | None = Field(default=None, ge=0)
    stop_token_ids: list[Annotated[Int, Field(ge=0)]] | None = None
    skip_special_tokens: Bool | None = None
    structured_outputs: StructuredOutputs | None = None
    # Older vLLM spellings of structured_outputs, still sent by some clients.
    guided_json: JSONObject | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else value or []
        if any(not s for s in items):
            raise ValueError("stop strings must be non-empty")
        return value

    @model_validator(mode="after")
    def _set_aside_unknown(self) -> _SamplingRequest:
        extra = self.__pydantic_extra__
        if extra:
            self._unknown = dict(extra)
            extra.clear()
        return self

    @property
    def unknown_fields(self) -> dict[str, Any]:
        """The top-level fields this server does not know, with their values (ignored, but a test hook
        like `glimpse_forced_output` is read from here)."""
        return self._unknown

    @model_validator(mode="after")
    def _common_checks(self) -> _SamplingRequest:
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "stream_options is only allowed with stream=true", param="stream_options"
            )
        legacy = {
            k: v
            for k, v in (
                ("json", self.guided_json),
                ("regex", self.guided_regex),
                ("choice", self.guided_choice),
            )
            if v is not None
        }
        if legacy:
            if self.structured_outputs is not None:
                raise InvalidRequestError(
                    "give structured_outputs or the older guided_* fields, not both",
                    param="structured_outputs",
                )
            try:
                self.structured_outputs = StructuredOutputs.model_validate(legacy)
            except ValidationError as exc:
                name = "guided_" + next(iter(legacy))
                raise InvalidRequestError(f"{name}: {exc.errors()[0]['msg']}", param=name) from None
        self._check_constraint()
        max_tokens = self.requested_max_tokens
        if self.min_tokens is not None and max_tokens is not None and self.min_tokens > max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({max_tokens})",
                param="min_tokens",
            )
        return self

    def _check_constraint(self) -> None:
        """response_format and structured_outputs are exclusive, and a schema sent as a JSON string must
        parse to an object: a 400 before the request goes anywhere."""
        if self.response_format is not None and self.response_format.type != "text":
            if self.structured_outputs is not None:
                raise InvalidRequestError(
                    "give response_format or structured_outputs, not both", param="structured_outputs"
                )
            return
        structured = self.structured_outputs
        if structured is None or not isinstance(structured.json_, str):
            return
        try:
            schema = json.loads(structured.json_)
        except ValueError:
            raise InvalidRequestError(
                "structured_outputs.json is not valid JSON", param="structured_outputs.json"
            ) from None
        if not isinstance(schema, dict):
            raise InvalidRequestError(
                "structured_outputs.json must be a JSON schema object", param="structured_outputs.json"
            )

    @property
    def requested_max_tokens(self) -> int | None:
        raise NotImplementedError

    @property
    def asked_max_tokens(self) -> tuple[str, int] | None:
        """(field name, value) of a length the client set itself (a default is not asked for)."""
        raise NotImplementedError

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (stream_options.include_usage)."""
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(default=None, ge=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: Bool | None = None
    top_logprobs: Int | None = Field(default=None, ge=0)  # at most --max-logprobs (checked by the server)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: Bool | None = None
    # vLLM extras for the chat template and media
    chat_template: str | None = None  # a Jinja template used instead of the model's, for this request
    chat_template_kwargs: JSONObject | None = None
    add_generation_prompt: Bool = True
    mm_processor_kwargs: JSONObject | None = None
    media_io_kwargs: dict[str, JSONObject] | None = None
    video_pruning_rate: Float | None = Field(default=None, ge=0, lt=1)

    @model_validator(mode="after")
    def _chat_checks(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
        choice = self.tool_choice
        names = {t.function.name for t in self.tools or []}
        if choice == "required" and not names:
            raise InvalidRequestError('tool_choice "required" needs tools', param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise InvalidRequestError(
                f"tool_choice names function {choice.function.name!r}, which is not in tools",
                param="tool_choice",
            )
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens, else its older alias max_tokens (OpenAI prefers the newer name)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def asked_max_tokens(self) -> tuple[str, int] | None:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return None if self.max_tokens is None else ("max_tokens", self.max_tokens)

    @property
    def tools_enabled(self) -> bool:
        """Whether the output should be parsed for tool calls (tools given and tool_choice not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    def text_chars(self) -> int:
        """Characters of text in the messages' content: what the chat template renders into the prompt
        (tools and the template's own text only add to it)."""
        total = 0
        for message in self.messages:
            content = message.content
            if isinstance(content, str):
                total += len(content)
            elif content is not None:
                total += sum(len(part.text) for part in content if isinstance(part, TextPart))
        return total


# Every list in the prompt's union fails at its first bad item: a batch of 20,000 id lists tried as
# `list[str]` would otherwise collect 20,000 errors (and copy the batch into each) before the right
# member is tried.
_FAIL_FAST = Field(fail_fast=True)
TokenIds = Annotated[list[Annotated[Int, Field(ge=0)]], _FAIL_FAST]


class CompletionRequest(_SamplingRequest):
    prompt: str | Annotated[list[str], _FAIL_FAST] | TokenIds | Annotated[list[TokenIds], _FAIL_FAST]
    max_tokens: Int | None = Field(default=16, ge=0)  # OpenAI's default; 0 only with echo (the prompt alone)
    logprobs: Int | None = Field(default=None, ge=0)  # at most --max-logprobs (checked by the server)
    echo: Bool | None = False
    suffix: str | None = None
    best_of: Int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _completion_checks(self) -> CompletionRequest:
        if self.suffix:
            raise InvalidRequestError(
                "suffix is not supported (the model has no fill-in-the-middle mode)", param="suffix"
            )
        if isinstance(self.prompt, list) and (not self.prompt or any(p == [] for p in self.prompt)):
            raise InvalidRequestError("prompt must not be an empty list", param="prompt")
        if self.best_of is not None and self.best_of > (self.n or 1):
            raise InvalidRequestError("best_of larger than n is not supported", param="best_of")
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequestError("max_tokens must be at least 1 (0 only with echo)", param="max_tokens")
        return self

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the answer is the prompt (and its logprobs), nothing generated."""
        return bool(self.echo) and self.max_tokens == 0

    @property
    def requested_max_tokens(self) -> int | None:
        return 1 if self.echo_only else self.max_tokens  # the engine draws a token that is not returned

    @property
    def asked_max_tokens(self) -> tuple[str, int] | None:
        given = "max_tokens" in self.model_fields_set and self.max_tokens is not None
        return ("max_tokens", self.max_tokens) if given else None  # type: ignore[return-value]

    def prompts(self) -> list[str | list[int]]:
        """The prompts in order: one text or one list of token ids each (a batch gives several)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# ---------------------------------------------------------------- a request's size, before any work


@dataclass(frozen=True)
class RequestSize:
    """What the server's caps and the context judge of a request before doing any work with it: how many
    prompts, how many choices each, and its longest prompt, as text (characters; for chat all the
    messages' text) or as token ids; `param` is the field that holds the prompts.

    `of` reads it from a validated request. `glance` reads it from the start of a large body before the
    body is parsed whole: every number is then a lower bound (`partial`), enough to refuse a batch of
    millions of prompts or a prompt of millions of characters at the cost of parsing one megabyte."""

    param: str
    prompts: int
    n: int
    text_chars: int
    token_ids: int
    partial: bool = False

    @classmethod
    def of(cls, req: ChatCompletionRequest | CompletionRequest) -> RequestSize:
        n = req.n or 1
        if isinstance(req, ChatCompletionRequest):
            return cls("messages", 1, n, req.text_chars(), 0)
        prompts = req.prompts()
        return cls(
            param="prompt",
            prompts=len(prompts),
            n=n,
            text_chars=max((len(p) for p in prompts if isinstance(p, str)), default=0),
            token_ids=max((len(p) for p in prompts if isinstance(p, list)), default=0),
        )

    @classmethod
    def glance(cls, body: bytes | bytearray, chat: bool) -> RequestSize | None:
        """The size as far as the first GLANCE_BYTES of `body` tell (a value cut off at the end counts
        with what it has), or None when they don't start a JSON object. Only bounds are read here; the
        whole body is validated afterwards."""
        try:
            data = pydantic_core.from_json(body[:GLANCE_BYTES], allow_partial="trailing-strings")
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        n = data.get("n")
        n = n if type(n) is int and n >= 1 else 1  # a bool is no count
        if chat:
            messages = data.get("messages")
            chars = sum(map(_glanced_text, messages)) if isinstance(messages, list) else 0
            return cls("messages", 1, n, chars, 0, partial=True)
        prompt = data.get("prompt")
        if isinstance(prompt, str):
            return cls("prompt", 1, n, len(prompt), 0, partial=True)
        if not isinstance(prompt, list) or not prompt:
            return None
        if isinstance(prompt[0], int):  # one prompt of token ids
            return cls("prompt", 1, n, 0, len(prompt), partial=True)
        chars = max((len(p) for p in prompt if isinstance(p, str)), default=0)
        ids = max((len(p) for p in prompt if isinstance(p, list)), default=0)
        return cls("prompt", len(prompt), n, chars, ids, partial=True)


# How much of a body `RequestSize.glance` parses, and from what size a body is worth a glance before it is
# parsed whole (over 4,096 prompts of a few ids each). The parse holds the GIL throughout, stalling every
# other thread and the event loop: 256 KB is ~8 ms of it (1 MB was ~30 ms, and up to 99 ms on a loaded
# machine), and still holds ~7,000 prompts of ten ids or 262,144 characters of text.
GLANCE_BYTES = 1 << 18
GLANCE_FROM_BYTES = 1 << 18


def _glanced_text(message: Any) -> int:
    """Characters of text in one message of a glanced body (junk counts as none)."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list):
        return 0
    texts = (part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text")
    return sum(len(text) for text in texts if isinstance(text, str))


def _param_from_loc(loc: Sequence[int | str]) -> str | None:
    """A dotted path like `messages.0.content` from a pydantic location, minus union-member labels."""
    keep: list[str] = []
    for part in loc:
        if isinstance(part, int):
            keep.append(str(part))
        elif part.isidentifier() and part.islower() and part not in _TYPE_LABELS:
            keep.append(part)
    return ".".join(keep) or None


_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "literal"})


M = TypeVar("M", bound=OpenAIModel)


def parse_request(model: type[M], body: bytes | bytearray | str | Mapping[str, Any]) -> M:
    """Validate a request body into `model`, turning every problem into a 400 InvalidRequestError.

    The message names each bad field and why; `param` is the most specific bad field.
    """
    try:
        if isinstance(body, bytes | bytearray | str):
            return model.model_validate_json(body)
        return model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise InvalidRequestError(f"the request body is not valid JSON: {errors[0]['msg']}") from None
        if any(e["type"] == "model_type" and not e["loc"] for e in errors):
            raise InvalidRequestError("the request body must be a JSON object") from None
        # The deepest location is usually the branch of a union the client meant; the shallower
        # errors of the other branches ("content: Input should be a valid string") are noise.
        errors.sort(key=lambda e: -len(e["loc"]))
        found: list[tuple[str | None, str]] = []
        for e in errors:
            where = _param_from_loc(e["loc"])
            if where and any(w and w.startswith(where + ".") for w, _ in found):
                continue
            found.append((where, f"{where}: {e['msg']}" if where else e["msg"]))
        shown = "; ".join(text for _, text in found[:3])
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise InvalidRequestError(f"invalid request: {shown}{more}", param=found[0][0]) from None


# ---------------------------------------------------------------- responses


class ResponseModel(BaseModel):
    """Response side: keys named in `_omit_if_none` are left out when None, the rest always sent."""

    model_config = ConfigDict(populate_by_name=True)
    _omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for key in self._omit_if_none:
            if data.get(key, 0) is None:
                del data[key]
        return data


class PromptTokensDetails(ResponseModel):
    cached_tokens: int = 0


class VideoTokens(ResponseModel):
    total: int
    kept: int


class Usage(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    video_tokens: VideoTokens | None = None
    _omit_if_none = frozenset({"prompt_tokens_details", "video_tokens"})

    @classmethod
    def make(
        cls,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int | None = None,
        video_tokens: Mapping[str, int] | None = None,
    ) -> Usage:
        """Usage with the total filled in; `video_tokens` as RequestOutput.video_tokens gives it."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=None
            if cached_tokens is None
            else PromptTokensDetails(cached_tokens=cached_tokens),
            video_tokens=None if video_tokens is None else VideoTokens(**video_tokens),
        )


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(ResponseModel):
    content: list[TokenLogprob] | None = None


class CompletionLogprobs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class ResponseFunctionCall(ResponseModel):
    name: str
    arguments: str


class ResponseToolCall(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ChatCompletionMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None
    _omit_if_none = frozenset({"tool_calls"})


class ChatCompletionChoice(ResponseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None  # "stop", "length", "tool_calls", "abort"
    stop_reason: int | str | None = None  # vLLM's extra: the stop string or token id


class ChatCompletionResponse(ResponseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage | None = None
    # Glimpse's extra, present when the prompt has media: per item, as RequestOutput.media gives it (a
    # video's frame_indices, true `seconds`, tokens and tokens_kept; an image's tiles, tokens, PDF page).
    media: list[dict[str, Any]] | None = None
    _omit_if_none = frozenset({"media"})


class DeltaFunctionCall(ResponseModel):
    name: str | None = None
    arguments: str | None = None
    _omit_if_none = frozenset({"name", "arguments"})


class DeltaToolCall(ResponseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None
    _omit_if_none = frozenset({"id", "type", "function"})


class DeltaMessage(ResponseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    _omit_if_none = frozenset({"role", "content", "reasoning_content", "tool_calls"})


class ChatCompletionChunkChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    _omit_if_none = frozenset({"stop_reason"})


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChunkChoice] = Field(default_factory=list)
    usage: Usage | None = None
    media: list[dict[str, Any]] | None = None  # on the first chunk, as ChatCompletionResponse.media
    _omit_if_none = frozenset({"usage", "media"})


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(ResponseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class CompletionChunk(ResponseModel):
    """One streamed piece; OpenAI names stream chunks "text_completion" too."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: Usage | None = None
    _omit_if_none = frozenset({"usage"})


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "glimpse"
    root: str | None = None
    max_model_len: int | None = None
    _omit_if_none = frozenset({"root", "max_model_len"})


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(ResponseModel):
    error: ErrorInfo

    @classmethod
    def from_error(cls, exc: GlimpseError) -> ErrorResponse:
        """The body for a GlimpseError; answer it with status `exc.status` (== `code`)."""
        return cls(
            error=ErrorInfo(message=exc.message, type=exc.error_type, param=exc.param, code=exc.status)
        )
