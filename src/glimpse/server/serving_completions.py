"""POST /v1/completions, and the machinery both OpenAI endpoints share (`ServingBase`).

A request goes: read the body within --max-request-bytes -> `parse_request` (400 on any bad field) ->
check the model name (404) -> check the batch against the caps and each text against the context by its
length (400, before any work) -> tokenise -> check the context and max_tokens (400) -> the engine.
Parsing and tokenising run in worker threads, so one large request never stalls the event loop (and
with it every other client and /health). Streams are SSE (`data: {...}\\n\\n`, then `data: [DONE]`); a
client that goes away, streaming or not, has its engine requests aborted so their memory comes back at
once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from glimpse.engine.async_llm import AsyncLLM
from glimpse.errors import GlimpseError, InvalidRequestError, LimitExceededError, NotFoundError
from glimpse.inputs import ProcessedInput
from glimpse.outputs import CompletionOutput, RequestOutput
from glimpse.processing.media import MediaLimits, MediaPolicy
from glimpse.sampling_params import SamplingParams
from glimpse.server.config import ServerConfig, check_logprobs
from glimpse.server.logprobs import TokenBytes, completion_logprobs, text_pieces
from glimpse.server.metrics import ServerMetrics
from glimpse.server.protocol import (
    GLANCE_FROM_BYTES,
    ChatCompletionRequest,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    RequestSize,
    Usage,
    parse_request,
    random_id,
)
from glimpse.server.request_params import to_sampling_params

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R", ChatCompletionRequest, CompletionRequest)

# The field a test sends to force the model's output (only with GLIMPSE_TEST_HOOKS=1; API.md, Tests).
FORCED_OUTPUT_FIELD = "glimpse_forced_output"
# How often a non-streaming request checks that its client is still there.
DISCONNECT_POLL_SECONDS = 0.25
# What a log line shows of a client's error message or unknown field names.
_LOGGED_CHARS = 2000
_LOGGED_NAMES = 20


class InternalServerError(GlimpseError):
    """500: a bug, never bad input. The message stays generic; the details go to the log."""

    status = 500
    error_type = "internal_server_error"


class ClientDisconnected(Exception):
    """The client went away before its answer was ready (or before it sent its whole body); any engine
    requests have been aborted."""


def printable(text: str) -> str:
    """`text` with control and other unprintable characters escaped (`\\x1b`, `\\n`), for a log line a
    client's input can't forge or garble."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def log_refusal(request: Request, status: int, message: str) -> None:
    """One log line for a request answered with an error: what it asked and the reason it was given."""
    if len(message) > _LOGGED_CHARS:
        message = message[:_LOGGED_CHARS] + "..."
    log.info("%s %s -> %d: %s", request.method, request.url.path, status, printable(message))


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters any one token of the vocabulary stands for. A byte-level BPE vocabulary
    spells each byte as one character (special tokens as their text), so no token covers more
    characters of a text than its entry has: a text of C characters is at least C / this many tokens."""
    return max(map(len, tokenizer.get_vocab()), default=1)


@dataclass
class ServingContext:
    """What every handler needs: the engine, the served name, the limits and the media settings."""

    llm: AsyncLLM
    served_model_name: str  # the name answers carry
    metrics: ServerMetrics
    aliases: tuple[str, ...] = ()  # more names requests may use (`--served-model-name a b`: b)
    media_limits: MediaLimits = field(default_factory=MediaLimits)
    media_policy: MediaPolicy = field(default_factory=MediaPolicy.for_server)
    max_request_bytes: int = 268_435_456
    max_logprobs: int = 20
    max_prompts_per_request: int = ServerConfig.max_prompts_per_request
    max_sequences_per_request: int = ServerConfig.max_sequences_per_request
    test_hooks: bool = False  # accept `glimpse_forced_output`
    sampling_defaults: dict[str, Any] = field(default_factory=dict)  # from generation_config.json
    max_chars_per_token: int = field(init=False)  # from the tokenizer's vocabulary

    def __post_init__(self) -> None:
        self.max_chars_per_token = longest_token_chars(self.tokenizer)

    @property
    def served_model_names(self) -> list[str]:
        return [self.served_model_name, *self.aliases]

    @property
    def max_model_len(self) -> int:
        return self.llm.engine.max_model_len

    @property
    def tokenizer(self):
        return self.llm.engine.tokenizer

    @cached_property
    def token_bytes(self) -> TokenBytes:
        """Each token's own bytes (chat logprobs report them)."""
        return TokenBytes(self.tokenizer)


# Characters JSON leaves raw that many line readers (Python's str.splitlines, httpx's aiter_lines) treat as
# line ends: a generated U+2028 would cut the event in two for such a client. Escaped, the JSON is the same.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def sse(data: Any) -> str:
    """One server-sent event; `data` is a response model, a dict, or the final "[DONE]"."""
    if isinstance(data, str):
        return f"data: {data}\n\n"
    if hasattr(data, "model_dump"):
        data = data.model_dump()
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)
    return f"data: {text}\n\n"


def error_event(exc: GlimpseError) -> str:
    """An error after a stream has started (its status line was already sent): as vLLM, an SSE event."""
    return sse(ErrorResponse.from_error(exc))


async def merge_streams(gens: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they come, tagged with the iterator's index.

    An exception from any of them is raised here; leaving early (or an error) closes all of them, which
    aborts their engine requests.
    """
    if len(gens) == 1:
        gen = gens[0]
        try:
            async for item in gen:
                yield 0, item
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        return
    done = object()
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: AsyncIterator[T]) -> None:
        try:
            async for item in gen:
                queue.put_nowait((i, item))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class RequestTracker:
    """Times one engine request (TTFT, end to end) and reports it to the metrics when it ends."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.first_token: float | None = None
        self.last: RequestOutput | None = None
        self.recorded = False

    def see(self, out: RequestOutput) -> None:
        self.last = out
        if self.first_token is None and any(o.token_ids for o in out.outputs):
            self.first_token = time.monotonic()
            self.metrics.record_first_token(self.first_token - self.arrival)
        if out.finished:
            self.record()

    def record(self) -> None:
        """Report once: at the finish, or when the request was abandoned (aborted, failed)."""
        if self.recorded or self.last is None:
            return
        self.recorded = True
        out = self.last
        self.metrics.record_request(
            prompt_tokens=len(out.prompt_token_ids),
            generation_tokens=sum(len(o.token_ids) for o in out.outputs),
            finish_reasons=[o.finish_reason if out.finished else "abort" for o in out.outputs],
            e2e_seconds=time.monotonic() - self.arrival,
            cached_tokens=out.num_cached_tokens,
            video_tokens=out.video_tokens,
            media=out.media or (),
        )


def usage_of(outs: Sequence[RequestOutput]) -> Usage:
    """Usage summed over the engine requests of one API request (several prompts, n choices each)."""
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outs)
    videos = [o.video_tokens for o in outs if o.video_tokens]
    video = (
        {"total": sum(v["total"] for v in videos), "kept": sum(v["kept"] for v in videos)} if videos else None
    )
    return Usage.make(prompt, completion, cached_tokens=cached, video_tokens=video)


def logprob_steps(c: CompletionOutput) -> list:
    """The per-token logprob dicts of an output, cut to its tokens (the engine's list keeps growing)."""
    return list(c.logprobs[: len(c.token_ids)]) if c.logprobs is not None else []


def json_response(model: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(model.model_dump() if hasattr(model, "model_dump") else model, status_code=status)


class ServingBase:
    """Request plumbing both endpoints share."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    # Input --------------------------------------------------------------------------------------------
    async def parse(self, request: Request, model: type[R]) -> R:
        """The request's body validated into `model` and checked against the caps and the context by its
        size (400), with the model's name checked (404) and unknown top-level fields logged.

        Parsing runs in a worker thread. It holds the GIL for as long as the body takes to parse (about
        30 ms a megabyte of numbers), which would stall the event loop anyway: so a body over
        GLANCE_FROM_BYTES is first judged by its start, and one far over the caps or the context (a batch
        of thousands of prompts, a prompt of millions of characters) is refused without being parsed
        whole."""
        body = await self.read_body(request)
        req = await asyncio.to_thread(self._parse, model, body)
        del body
        self.check_model(req.model)
        self.warn_unknown(request, req.unknown_fields)
        self.check_size(RequestSize.of(req))
        self.check_logprobs(req)
        return req

    def _parse(self, model: type[R], body: bytearray) -> R:
        if len(body) > GLANCE_FROM_BYTES:
            size = RequestSize.glance(body, chat=model is ChatCompletionRequest)
            if size is not None:
                self.check_size(size)
        return parse_request(model, body)

    def warn_unknown(self, request: Request, fields: dict[str, Any]) -> None:
        names = [k for k in fields if not (self.ctx.test_hooks and k == FORCED_OUTPUT_FIELD)]
        if not names:
            return
        shown = ", ".join(repr(name[:64]) for name in names[:_LOGGED_NAMES])
        more = f" and {len(names) - _LOGGED_NAMES} more" if len(names) > _LOGGED_NAMES else ""
        log.warning("%s %s: ignored unknown fields %s%s", request.method, request.url.path, shown, more)

    async def read_body(self, request: Request) -> bytearray:
        """The raw body, refused with 413 past --max-request-bytes: by Content-Length before reading a
        byte, and by counting while reading (chunked bodies have no length). A client that hangs up
        before sending all of it is ClientDisconnected (nobody is left to answer).

        The chunks are appended as they come: joining a body of tens of megabytes at the end would be
        one copy long enough to stall the event loop."""
        limit = self.ctx.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise InvalidRequestError("the Content-Length header is not a number") from None
            if size > limit:
                raise LimitExceededError(
                    f"the request body is {size} bytes; this server accepts at most {limit} "
                    "(--max-request-bytes)"
                )
        body = bytearray()
        try:
            async for chunk in request.stream():
                if len(body) + len(chunk) > limit:
                    raise LimitExceededError(
                        f"the request body is over {limit} bytes, the most this server accepts "
                        "(--max-request-bytes)"
                    )
                body += chunk
        except ClientDisconnect:
            log.info("%s %s: the client hung up while sending its body", request.method, request.url.path)
            raise ClientDisconnected() from None
        return body

    def check_logprobs(self, req: ChatCompletionRequest | CompletionRequest) -> None:
        """400, before any work, for more log-probabilities per token than --max-logprobs (as vLLM)."""
        if isinstance(req, ChatCompletionRequest):
            check_logprobs(req.top_logprobs if req.logprobs else None, self.ctx.max_logprobs, "top_logprobs")
        else:
            check_logprobs(req.logprobs, self.ctx.max_logprobs, "logprobs")

    def check_model(self, name: str | None) -> None:
        """404 unless the request names a served model (or names none)."""
        if name is not None and name not in self.ctx.served_model_names:
            served = ", ".join(map(repr, self.ctx.served_model_names))
            raise NotFoundError(
                f"the model {name!r} does not exist; this server serves {served}", param="model"
            )

    async def forced_output(self, fields: dict[str, Any]) -> list[int] | None:
        """Token ids to force (`glimpse_forced_output` + EOS, from the request's unknown `fields`), only
        on a server started with test hooks."""
        text = fields.get(FORCED_OUTPUT_FIELD) if self.ctx.test_hooks else None
        if text is None:
            return None
        if not isinstance(text, str):
            raise InvalidRequestError(f"{FORCED_OUTPUT_FIELD} must be a string", param=FORCED_OUTPUT_FIELD)
        engine = self.ctx.llm.engine
        tok = engine.tokenizer
        eos = tok.eos_token_id if tok.eos_token_id in engine.eos_token_ids else engine.eos_token_ids[0]
        ids = await asyncio.to_thread(tok.encode, text, add_special_tokens=False)
        return ids + [eos]

    def check_size(self, size: RequestSize) -> None:
        """400, before any work, for a request over the caps on prompts and on sequences (prompts x n),
        or whose longest prompt can't fit in the context whatever it says.

        Text is judged by its length alone, before it is tokenised: no token covers more than
        `max_chars_per_token` characters, so text longer than that many characters per token of the
        context (less one to generate) is over it."""
        some = "at least " if size.partial else ""
        cap = self.ctx.max_prompts_per_request
        if size.prompts > cap:
            raise InvalidRequestError(
                f"this request has {some}{size.prompts} prompts; at most {cap} are allowed per request "
                "(--max-prompts-per-request)",
                param=size.param,
            )
        cap = self.ctx.max_sequences_per_request
        if size.prompts * size.n > cap:
            raise InvalidRequestError(
                f"this request asks for {some}{size.prompts * size.n} sequences (n={size.n} for each of "
                f"{size.prompts} prompts); at most {cap} are allowed per request (--max-sequences-per-request)",
                param="n",
            )
        per_token, context = self.ctx.max_chars_per_token, self.ctx.max_model_len
        limit = per_token * (context - 1)
        if size.text_chars > limit:
            raise InvalidRequestError(
                f"the prompt has {some}{size.text_chars} characters; this model's context of {context} tokens "
                f"holds at most {limit} (no token is longer than {per_token} characters)",
                param=size.param,
            )
        self.check_context(size.token_ids, size.param, some)

    def check_context(self, n_prompt: int, param: str, some: str = "") -> None:
        """400 when the prompt leaves no room for even one generated token."""
        limit = self.ctx.max_model_len
        if n_prompt + 1 > limit:
            raise InvalidRequestError(
                f"the prompt has {some}{n_prompt} tokens; this model's context is {limit} tokens, which must "
                "hold the prompt and at least one generated token",
                param=param,
            )

    def sampling_params(
        self, req: Any, inp: ProcessedInput, forced: list[int] | None, param: str
    ) -> SamplingParams:
        n_prompt = len(inp.prompt_token_ids)
        self.check_context(n_prompt, param)
        limit = self.ctx.max_model_len
        params = to_sampling_params(
            req, default_max_tokens=limit - n_prompt, defaults=self.ctx.sampling_defaults, max_model_len=limit
        )
        if forced is not None:
            params.forced_token_ids = forced
        return params

    # Running ------------------------------------------------------------------------------------------
    async def until_disconnected(self, request: Request, work: Awaitable[T]) -> T:
        """Await `work`, cancelling it (and so aborting its engine requests) if the client goes away."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise ClientDisconnected()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def generators(
        self, inputs: Sequence[ProcessedInput], params: Sequence[SamplingParams], prefix: str
    ) -> list[AsyncIterator[RequestOutput]]:
        llm = self.ctx.llm
        return [llm.generate(inp, p, f"{prefix}-{i}") for i, (inp, p) in enumerate(zip(inputs, params))]

    async def collect(
        self, gens: Sequence[AsyncIterator[RequestOutput]], trackers: Sequence[RequestTracker]
    ) -> list[RequestOutput]:
        """Run every engine request to its end; the final output of each, in order."""
        finals: list[RequestOutput | None] = [None] * len(gens)
        try:
            async for i, out in merge_streams(gens):
                trackers[i].see(out)
                finals[i] = out
        finally:
            for t in trackers:
                t.record()
        return finals  # type: ignore[return-value]

    def streaming_response(
        self, request: Request, events: AsyncIterator[str], trackers: Sequence[RequestTracker]
    ) -> StreamingResponse:
        """SSE from `events`, stopped (and its engine requests aborted) when the client disconnects."""

        async def body() -> AsyncIterator[str]:
            try:
                async for event in events:
                    if await request.is_disconnected():
                        log.debug("client disconnected; aborting its stream")
                        return
                    yield event
            except GlimpseError as e:
                log_refusal(request, e.status, e.message)
                yield error_event(e)
                yield sse("[DONE]")
            except Exception:
                log.exception("a stream failed")
                yield error_event(InternalServerError("internal server error"))
                yield sse("[DONE]")
            finally:
                await events.aclose()  # type: ignore[attr-defined]
                for t in trackers:
                    t.record()

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


async def first_and_rest(
    stream: AsyncIterator[T], request: Request, base: ServingBase
) -> tuple[T | None, AsyncIterator[T]]:
    """Wait for a stream's first item before answering, so that errors the engine raises at admission
    (a prompt over the context, bad token ids) still get their HTTP status instead of a 200 stream."""
    try:
        first = await base.until_disconnected(request, stream.__anext__())
    except StopAsyncIteration:
        return None, stream
    except BaseException:
        await stream.aclose()  # type: ignore[attr-defined]
        raise

    async def chained() -> AsyncIterator[T]:
        try:
            yield first
            async for item in stream:
                yield item
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    return first, chained()


@dataclass
class Echo:
    """What an echoing request puts before each choice of one prompt: the prompt's text and, with
    logprobs, each prompt token's piece of it."""

    text: str = ""
    pieces: list[str] | None = None


class CompletionsHandler(ServingBase):
    """POST /v1/completions: one prompt or a batch (strings or token ids), n choices each."""

    async def create(self, request: Request) -> Response:
        arrival = time.monotonic()
        req = await self.parse(request, CompletionRequest)
        prompts = req.prompts()
        n = req.n or 1
        forced = await self.forced_output(req.unknown_fields)
        inputs, params = await asyncio.to_thread(self._prepare, req, prompts, forced)
        if req.echo and req.logprobs is not None:  # as vLLM: echoed prompts come with their logprobs
            params = [replace(p, prompt_logprobs=req.logprobs) for p in params]
        echo = await asyncio.to_thread(self._echoes, req, inputs)
        request_id = random_id("cmpl")
        gens = self.generators(inputs, params, request_id)
        trackers = [RequestTracker(self.ctx.metrics, arrival) for _ in gens]
        if req.stream:
            _, events = await first_and_rest(merge_streams(gens), request, self)
            stream = self._stream(req, request_id, events, trackers, n, echo)
            return self.streaming_response(request, stream, trackers)
        try:
            finals = await self.until_disconnected(request, self.collect(gens, trackers))
        finally:
            for g in gens:
                await g.aclose()  # type: ignore[attr-defined]
        choices = []
        for i, out in enumerate(finals):
            for c in out.outputs:
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self._logprobs(
                        req, out, c, 0, len(echo[i].text), echo[i] if req.echo else None
                    )
                choices.append(
                    CompletionChoice(
                        index=i * n + c.index,
                        text=echo[i].text + ("" if req.echo_only else c.text),
                        logprobs=logprobs,
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                )
        resp = CompletionResponse(
            id=request_id, model=self.ctx.served_model_name, choices=choices, usage=self._usage(req, finals)
        )
        return json_response(resp)

    @staticmethod
    def _usage(req: CompletionRequest, outs: Sequence[RequestOutput]) -> Usage:
        usage = usage_of(outs)
        if req.echo_only:  # the engine drew a token per choice to finish the prompt; none is returned
            usage = usage.model_copy(update={"completion_tokens": 0, "total_tokens": usage.prompt_tokens})
        return usage

    def _echoes(self, req: CompletionRequest, inputs: Sequence[ProcessedInput]) -> list[Echo]:
        """Each prompt's echo (blocking work for long prompts: off the event loop). A prompt given as
        text is echoed as given (as vLLM), one given as token ids as their decode."""
        if not req.echo:
            return [Echo() for _ in inputs]
        echoes = []
        for inp in inputs:
            pieces = None
            if req.logprobs is not None:
                pieces = text_pieces(self.ctx.tokenizer, inp.prompt_token_ids)
            text = inp.prompt
            if text is None:
                text = (
                    "".join(pieces) if pieces is not None else self.ctx.tokenizer.decode(inp.prompt_token_ids)
                )
            echoes.append(Echo(text, pieces))
        return echoes

    @staticmethod
    def _logprobs(
        req: CompletionRequest,
        out: RequestOutput,
        c: CompletionOutput,
        tok_start: int,
        text_offset: int,
        echo: Echo | None,
    ) -> CompletionLogprobs:
        """Completions logprobs of the choice's tokens from `tok_start` on, at `text_offset` in its text;
        with `echo`, the prompt's tokens and their logprobs come first, from offset 0."""
        end = tok_start if req.echo_only else len(c.token_ids)
        ids = c.token_ids[tok_start:end]
        steps = logprob_steps(c)[tok_start:end]
        texts = c.token_texts[tok_start:end] if c.token_texts is not None else None
        if echo is None:
            return completion_logprobs(ids, steps, req.logprobs, text_offset, texts)
        prompt_steps = list(out.prompt_logprobs or [])  # complete unless the request ended mid-prompt
        prompt_steps += [None] * (len(out.prompt_token_ids) - len(prompt_steps))
        if texts is not None and echo.pieces is not None:
            texts = [*echo.pieces, *texts]
        return completion_logprobs(
            [*out.prompt_token_ids, *ids], [*prompt_steps, *steps], req.logprobs, 0, texts
        )

    def _prepare(
        self, req: CompletionRequest, prompts: list[str | list[int]], forced: list[int] | None
    ) -> tuple[list[ProcessedInput], list[SamplingParams]]:
        """Tokenise each prompt and check it against the context (blocking work: in a worker thread); the
        first prompt that fails stops the rest."""
        inputs: list[ProcessedInput] = []
        params: list[SamplingParams] = []
        for p in prompts:
            inp = self.ctx.llm.process(p if isinstance(p, str) else {"prompt_token_ids": p})
            if not inp.prompt_token_ids:
                raise InvalidRequestError("the prompt is empty", param="prompt")
            inputs.append(inp)
            params.append(self.sampling_params(req, inp, forced, "prompt"))
        return inputs, params

    async def _stream(
        self,
        req: CompletionRequest,
        request_id: str,
        events: AsyncIterator[tuple[int, RequestOutput]],
        trackers: Sequence[RequestTracker],
        n: int,
        echo: list[Echo],
    ) -> AsyncIterator[str]:
        model = self.ctx.served_model_name
        created = int(time.time())
        sent_text: dict[int, int] = {}  # choice index -> characters sent
        sent_tokens: dict[int, int] = {}  # choice index -> tokens sent
        done: set[int] = set()
        finals: dict[int, RequestOutput] = {}
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        async for i, out in events:
            trackers[i].see(out)
            finals[i] = out
            for c in out.outputs:
                index = i * n + c.index
                if index in done:
                    continue
                first = index not in sent_text
                prefix = echo[i].text if first else ""
                start, tok_start = sent_text.get(index, 0), sent_tokens.get(index, 0)
                text, new_ids = ("", []) if req.echo_only else (c.text[start:], c.token_ids[tok_start:])
                logprobs = None
                if req.logprobs is not None and (new_ids or prefix):
                    offset = len(echo[i].text) + start
                    logprobs = self._logprobs(req, out, c, tok_start, offset, echo[i] if prefix else None)
                sent_text[index], sent_tokens[index] = len(c.text), len(c.token_ids)
                if c.finish_reason is not None:
                    done.add(index)
                if not (prefix or text or logprobs or c.finish_reason):
                    continue
                choice = CompletionChoice(
                    index=index,
                    text=prefix + text,
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
                usage = self._usage(req, [finals[k] for k in sorted(finals)]) if continuous else None
                yield sse(
                    CompletionChunk(
                        id=request_id, created=created, model=model, choices=[choice], usage=usage
                    )
                )
        if req.include_usage:
            usage = self._usage(req, [finals[i] for i in sorted(finals)])
            yield sse(CompletionChunk(id=request_id, created=created, model=model, usage=usage))
        yield sse("[DONE]")


__all__ = [
    "ServingContext",
    "log_refusal",
    "printable",
    "ServingBase",
    "CompletionsHandler",
    "InternalServerError",
    "ClientDisconnected",
    "merge_streams",
    "sse",
]
