"""POST /v1/chat/completions: messages (text, images, videos, PDFs) -> answer, reasoning and tool calls.

Per choice the output goes through the reasoning parser first (text before `</think>` is
`reasoning_content`; the rendered prompt's end says whether the output starts inside reasoning), then,
when tools are enabled, through the tool-call parser (`<TOOLCALL>[...]</TOOLCALL>` -> `tool_calls`,
finish_reason "tool_calls"). A forced tool_choice (a named function, or "required") constrains the
answer to JSON, as vLLM does: the named function's arguments, or a list of `{"name", "parameters"}`;
the engine starts the constraint after any reasoning. Streaming uses the parsers' incremental halves,
which join to exactly what the whole-text halves give, so a streamed answer concatenates to the
non-streamed one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from glimpse.errors import GlimpseError, InvalidRequestError, MediaError
from glimpse.inputs import ProcessedInput
from glimpse.outputs import CompletionOutput, RequestOutput
from glimpse.server.logprobs import chat_logprobs
from glimpse.server.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    DeltaToolCall,
    FilePart,
    ImageURLPart,
    InputFilePart,
    NamedToolChoice,
    Tool,
    UserMessage,
    VideoURLPart,
    random_id,
)
from glimpse.server.reasoning import ReasoningParser
from glimpse.server.serving_completions import (
    RequestTracker,
    ServingBase,
    first_and_rest,
    json_response,
    logprob_steps,
    merge_streams,
    sse,
    usage_of,
)
from glimpse.server.tool_parser import ToolCall, ToolCallStreamParser, parse_tool_calls

log = logging.getLogger(__name__)

_PART_KIND = {ImageURLPart: "image", VideoURLPart: "video", FilePart: "file", InputFilePart: "file"}
_KIND_NAMES = {"image": "images", "video": "videos", "file": "files"}
# Exceptions from media decoding libraries (PIL, PyAV, pypdfium2) that mean "bad media", not a bug.
_MEDIA_FAILURES = (ValueError, OSError, EOFError, UnicodeError)


def count_media(req: ChatCompletionRequest) -> dict[str, int]:
    """Media items per kind, counted from the content parts (nothing loaded; a PDF counts as one file)."""
    counts = {"image": 0, "video": 0, "file": 0}
    for message in req.messages:
        if isinstance(message, UserMessage) and isinstance(message.content, list):
            for part in message.content:
                kind = _PART_KIND.get(type(part))
                if kind is not None:
                    counts[kind] += 1
    return counts


def tool_mode(req: ChatCompletionRequest) -> str | None:
    """None (no tools, or tool_choice "none"), "auto", "named" (one function forced) or "required"."""
    if not req.tools_enabled:
        return None
    if isinstance(req.tool_choice, NamedToolChoice):
        return "named"
    return "required" if req.tool_choice == "required" else "auto"


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object"}


def forced_tool_schema(req: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema the answer must follow when tool_choice forces a call (as vLLM does it): the named
    function's parameters, or for "required" a non-empty list of `{"name", "parameters"}` objects (one
    at most with parallel_tool_calls false)."""
    mode = tool_mode(req)
    tools = req.tools or []
    if mode == "named":
        name = req.tool_choice.function.name  # type: ignore[union-attr]
        return _parameters(next(t for t in tools if t.function.name == name))
    if mode == "required":
        options = [
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "parameters": _parameters(t)},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for t in tools
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
        if req.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return schema
    return None


def forced_tool_calls(req: ChatCompletionRequest, text: str | None) -> list[ToolCall] | None:
    """The calls in an answer constrained by `forced_tool_schema`; None when it is not complete JSON
    (cut by max_tokens): then the text stays the content."""
    try:
        data = json.loads(text or "")
    except ValueError:
        return None
    if isinstance(req.tool_choice, NamedToolChoice):
        return [ToolCall(req.tool_choice.function.name, json.dumps(data, ensure_ascii=False))]
    if not isinstance(data, list) or not all(isinstance(x, dict) and "name" in x for x in data):
        return None
    return [ToolCall(x["name"], json.dumps(x.get("parameters", {}), ensure_ascii=False)) for x in data]


def finish_reason_of(c: CompletionOutput, tools_called: bool, mode: str | None) -> str | None:
    """As OpenAI: "tool_calls" when the model chose to call tools; a named tool_choice ends with "stop"."""
    if c.finish_reason is None:
        return None
    if tools_called and mode != "named" and c.finish_reason != "abort":
        return "tool_calls"
    return c.finish_reason


def merge_deltas(deltas: list[DeltaMessage]) -> DeltaMessage:
    """One delta from several: each field is concatenated on the client's side anyway."""
    reasoning = "".join(d.reasoning_content for d in deltas if d.reasoning_content) or None
    content = "".join(d.content for d in deltas if d.content) or None
    calls: list[DeltaToolCall] = [t for d in deltas for t in d.tool_calls or []]
    return DeltaMessage(reasoning_content=reasoning, content=content, tool_calls=calls or None)


class ChoiceStream:
    """The parsers of one streamed choice and how much of its output was sent.

    With a forced tool_choice the answer is JSON that only makes sense whole: it is held back and sent
    at the end as tool calls (or as content when it was cut short)."""

    def __init__(self, prompt: str, req: ChatCompletionRequest) -> None:
        self.req = req
        self.mode = tool_mode(req)
        self.reasoning = ReasoningParser.for_prompt(prompt)
        self.tools = ToolCallStreamParser() if self.mode == "auto" else None
        self.held: list[str] | None = [] if self.mode in ("named", "required") else None
        self.forced_calls: list[ToolCall] = []
        self.sent_text = 0
        self.sent_tokens = 0
        self.done = False

    def _route(self, reasoning: str | None, content: str | None) -> list[DeltaMessage]:
        out = [DeltaMessage(reasoning_content=reasoning)] if reasoning else []
        if content:
            if self.held is not None:
                self.held.append(content)
            elif self.tools is not None:
                out += self.tools.feed(content)
            else:
                out.append(DeltaMessage(content=content))
        return out

    def feed(self, text: str) -> list[DeltaMessage]:
        return self._route(*self.reasoning.feed(text)) if text else []

    def finish(self) -> list[DeltaMessage]:
        out = self._route(*self.reasoning.finish())
        if self.tools is not None:
            out += self.tools.finish()
        if self.held is not None:
            text = "".join(self.held)
            calls = forced_tool_calls(self.req, text)
            if calls is None:
                out += [DeltaMessage(content=text)] if text else []
            else:
                self.forced_calls = calls
                out += [DeltaMessage(tool_calls=[call.to_delta(i) for i, call in enumerate(calls)])]
        return out

    @property
    def tools_called(self) -> bool:
        return bool((self.tools and self.tools.calls) or self.forced_calls)


class ChatHandler(ServingBase):
    """POST /v1/chat/completions."""

    async def create(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = await self.parse(request, ChatCompletionRequest)
        counts = self.check_media_counts(req)
        forced = await self.forced_output(req.unknown_fields)
        # a client that gives up while its media is fetched or decoded cancels that work
        inp = await self.until_disconnected(request, self.process(req, has_media=any(counts.values())))
        params = self.sampling_params(req, inp, forced, "messages")
        if (schema := forced_tool_schema(req)) is not None:
            if params.json_schema is not None or params.regex is not None:
                raise InvalidRequestError(
                    "a forced tool_choice can't be combined with response_format or structured_outputs",
                    param="tool_choice",
                )
            params.json_schema = schema
        request_id = random_id("chatcmpl")
        gen = self.ctx.llm.generate(inp, params, request_id)
        tracker = RequestTracker(self.ctx.metrics, arrival)
        prompt = inp.prompt or ""
        if req.stream:
            _, events = await first_and_rest(merge_streams([gen]), request, self)
            stream = self._stream(req, request_id, events, tracker, prompt, params.n, inp.media_info)
            return self.streaming_response(request, stream, [tracker])
        try:
            (final,) = await self.until_disconnected(request, self.collect([gen], [tracker]))
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        choices = [self._choice(req, c, prompt) for c in final.outputs]
        resp = ChatCompletionResponse(
            id=request_id,
            model=self.ctx.served_model_name,
            choices=choices,
            usage=usage_of([final]),
            media=final.media or None,
        )
        return json_response(resp)

    # Input --------------------------------------------------------------------------------------------
    def check_media_counts(self, req: ChatCompletionRequest) -> dict[str, int]:
        counts = count_media(req)
        limits = self.ctx.media_limits.limit_mm_per_prompt
        for kind, n in counts.items():
            allowed = limits.get(kind, 0)
            if n > allowed:
                raise InvalidRequestError(
                    f"this request has {n} {_KIND_NAMES[kind]}; at most {allowed} are allowed per request "
                    "(--limit-mm-per-prompt)",
                    param="messages",
                )
        return counts

    async def process(self, req: ChatCompletionRequest, has_media: bool) -> ProcessedInput:
        """Render the chat template and load the media, off the event loop (the media in the media pool)."""
        messages = [m.model_dump(exclude_none=True, by_alias=True) for m in req.messages]
        tools = [t.model_dump(exclude_none=True, by_alias=True) for t in req.tools or []]
        kwargs: dict[str, Any] = dict(
            tools=tools if req.tools_enabled else None,
            add_generation_prompt=req.add_generation_prompt,
            chat_template=req.chat_template,
            chat_template_kwargs=req.chat_template_kwargs,
            mm_processor_kwargs=req.mm_processor_kwargs,
            media_io_kwargs=req.media_io_kwargs,
            video_pruning_rate=req.video_pruning_rate,
            media_limits=self.ctx.media_limits,
            media_policy=self.ctx.media_policy,
        )
        try:
            return await self.ctx.llm.process_chat(messages, **kwargs)
        except GlimpseError:
            raise
        except _MEDIA_FAILURES as e:
            if not has_media:
                raise
            log.warning("media could not be processed", exc_info=True)
            raise MediaError(f"a media item could not be processed: {e}", param="messages") from None

    # Output -------------------------------------------------------------------------------------------
    def _choice(self, req: ChatCompletionRequest, c: CompletionOutput, prompt: str) -> ChatCompletionChoice:
        reasoning, content = ReasoningParser.for_prompt(prompt).parse(c.text)
        mode = tool_mode(req)
        calls: list[ToolCall] = []
        if mode == "auto":
            content, calls = parse_tool_calls(content or "")
        elif mode is not None and (found := forced_tool_calls(req, content)) is not None:
            content, calls = None, found
        logprobs = None
        if req.logprobs:
            logprobs = chat_logprobs(
                c.token_ids, logprob_steps(c), req.top_logprobs or 0, self.ctx.token_bytes
            )
        return ChatCompletionChoice(
            index=c.index,
            message=ChatCompletionMessage(
                content=content,
                reasoning_content=reasoning,
                tool_calls=[call.to_openai() for call in calls] or None,
            ),
            logprobs=logprobs,
            finish_reason=finish_reason_of(c, bool(calls), mode),
            stop_reason=c.stop_reason,
        )

    async def _stream(
        self,
        req: ChatCompletionRequest,
        request_id: str,
        events: AsyncIterator[tuple[int, RequestOutput]],
        tracker: RequestTracker,
        prompt: str,
        n: int,
        media: list[dict[str, Any]],
    ) -> AsyncIterator[str]:
        model = self.ctx.served_model_name
        created = int(time.time())
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        final: RequestOutput | None = None

        def chunk(choice: ChatCompletionChunkChoice, media: list[dict[str, Any]] | None = None) -> str:
            usage = usage_of([final]) if continuous and final is not None else None
            return sse(
                ChatCompletionChunk(
                    id=request_id, created=created, model=model, choices=[choice], usage=usage, media=media
                )
            )

        states = [ChoiceStream(prompt, req) for _ in range(n)]
        for i in range(n):  # as OpenAI: each choice opens with the role; the first carries the media report
            opening = ChatCompletionChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
            yield chunk(opening, media=(media or None) if i == 0 else None)
        async for _, out in events:
            tracker.see(out)
            final = out
            for c in out.outputs:
                st = states[c.index]
                if st.done:
                    continue
                deltas = st.feed(c.text[st.sent_text :])
                new_ids = c.token_ids[st.sent_tokens :]
                logprobs = None
                if req.logprobs and new_ids:
                    steps = logprob_steps(c)[st.sent_tokens :]
                    logprobs = chat_logprobs(new_ids, steps, req.top_logprobs or 0, self.ctx.token_bytes)
                st.sent_text, st.sent_tokens = len(c.text), len(c.token_ids)
                if c.finish_reason is not None:
                    deltas += st.finish()
                    st.done = True
                delta = merge_deltas(deltas)
                empty = delta.reasoning_content is None and delta.content is None and not delta.tool_calls
                if empty and logprobs is None and c.finish_reason is None:
                    continue
                yield chunk(
                    ChatCompletionChunkChoice(
                        index=c.index,
                        delta=delta,
                        logprobs=logprobs,
                        finish_reason=finish_reason_of(c, st.tools_called, st.mode),
                        stop_reason=c.stop_reason if c.finish_reason is not None else None,
                    )
                )
        if req.include_usage and final is not None:
            usage = usage_of([final])
            yield sse(ChatCompletionChunk(id=request_id, created=created, model=model, usage=usage))
        yield sse("[DONE]")


__all__ = ["ChatHandler", "count_media", "ChoiceStream"]
