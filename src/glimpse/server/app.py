"""`glimpse serve MODEL`: the OpenAI-compatible HTTP server (API.md, HTTP).

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /v1/models/{id}
    GET /health   GET /metrics   GET /version   GET|POST /ping   GET /openapi.json

/docs is off: its page would load Swagger UI from a CDN, which an offline or locked-down server can't
reach and should not point browsers at; /openapi.json is the same description, for any viewer.

Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}` with the status API.md gives,
and leaves a log line with the reason the client was given; bad input is never a 5xx, and a bug in one
request is a logged 500 (with its traceback) that leaves the server serving. A client that hangs up,
even halfway through sending its body, is no error: it gets a quiet 499 nobody reads.
`build_app` makes the FastAPI app around a running `AsyncLLM` (tests use it); `build_server` makes the
app, engine included, from an `EngineConfig` and a `ServerConfig` (embedders and the online benchmark use
it), with CORS as the config allows; `run_server` checks what it can before loading the model (the
port, the TLS files: glimpse.server.startup), then serves with uvicorn (`glimpse serve`,
`python -m glimpse.server`).
"""

from __future__ import annotations

import gc
import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from glimpse.engine.async_llm import AsyncLLM
from glimpse.engine.config import EngineConfig
from glimpse.engine.engine import LLMEngine
from glimpse.errors import AuthenticationError, GlimpseError, InvalidRequestError
from glimpse.processing.media import MediaPolicy, prepare_fetching
from glimpse.server.config import ServerConfig
from glimpse.server.metrics import CONTENT_TYPE, ServerMetrics
from glimpse.server.playground import add_playground
from glimpse.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from glimpse.server.serving_chat import ChatHandler
from glimpse.server.serving_completions import (
    ClientDisconnected,
    CompletionsHandler,
    InternalServerError,
    ServingContext,
    log_refusal,
)
from glimpse.server.serving_tokens import TokensHandler
from glimpse.server.startup import prepare_to_serve
from glimpse.version import __version__

log = logging.getLogger("glimpse.server")

TEST_HOOKS_ENV = "GLIMPSE_TEST_HOOKS"
# Routes counted by path in /metrics; anything else is counted as "other" (no label explosion).
_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/ping",
           "/version")  # fmt: skip
# Sampling fields a checkpoint's generation_config.json may set as defaults (as vLLM applies them).
_GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def error_response(exc: GlimpseError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(ErrorResponse.from_error(exc).model_dump(), status_code=exc.status, headers=headers)


class _HTTPMetrics:
    """Pure ASGI middleware counting answered requests by method, route and status (streams untouched)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.metrics.record_http(scope.get("method", ""), path if path in _ROUTES else "other", status)


def _guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Errors a user caused pass to the GlimpseError handler; anything else is a bug: logged, 500."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except (GlimpseError, ClientDisconnected, ClientDisconnect):
            raise
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.url.path)
            raise InternalServerError("internal server error; the details are in the server log") from None

    return run


def build_app(ctx: ServingContext, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `ctx.llm` (the engine is already running)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        ctx.llm.shutdown()

    app = FastAPI(
        title="Glimpse", summary="OpenAI-compatible server for Nemotron Nano 2 VL", version=__version__,
        lifespan=lifespan, docs_url=None, redoc_url=None,
    )  # fmt: skip
    app.state.ctx = ctx
    chat = ChatHandler(ctx)
    completions = CompletionsHandler(ctx)

    # Errors -------------------------------------------------------------------------------------------
    @app.exception_handler(GlimpseError)
    async def _glimpse_error(request: Request, exc: GlimpseError) -> JSONResponse:
        if exc.status < 500:  # a 500 was logged with its traceback where it happened
            log_refusal(request, exc.status, exc.message)
        return error_response(exc)

    @app.exception_handler(ClientDisconnected)
    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {401: "authentication_error", 404: "not_found_error"}
        kind = kinds.get(
            exc.status_code, "invalid_request_error" if exc.status_code < 500 else "internal_server_error"
        )
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": exc.status_code}}
        log_refusal(request, exc.status_code, str(exc.detail))
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = InvalidRequestError(f"invalid request: {exc.errors()}")
        log_refusal(request, error.status, error.message)
        return error_response(error)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error answering %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(InternalServerError("internal server error; the details are in the server log"))

    # Authentication -------------------------------------------------------------------------------------
    expected = api_key.encode() if api_key else None

    async def require_api_key(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise AuthenticationError("incorrect API key")

    # Routes -------------------------------------------------------------------------------------------
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @v1.post(
        "/chat/completions",
        responses={
            200: {
                "model": ChatCompletionResponse,
                "description": "a completion, or an SSE stream of "
                "chat.completion.chunk objects with stream=true",
            }
        },  # fmt: skip
        openapi_extra={
            "x-glimpse-request": "ChatCompletionRequest",
            "x-glimpse-chunk": "ChatCompletionChunk",
        },
    )
    async def create_chat_completion(request: Request) -> Response:
        return await _guarded(chat.create)(request)

    @v1.post(
        "/completions",
        responses={200: {"model": CompletionResponse}},
        openapi_extra={"x-glimpse-request": "CompletionRequest"},
    )
    async def create_completion(request: Request) -> Response:
        return await _guarded(completions.create)(request)

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, root=ctx.llm.engine.cfg.model, max_model_len=ctx.max_model_len)

    @v1.get("/models", response_model=ModelList)
    async def list_models() -> JSONResponse:
        """Every served name (`--served-model-name a b`), in order."""
        return JSONResponse(ModelList(data=[card(name) for name in ctx.served_model_names]).model_dump())

    @v1.get("/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str) -> JSONResponse:
        """One served name's card (hub ids have a slash, hence the path parameter); another is a 404."""
        chat.check_model(model_id)
        return JSONResponse(card(model_id).model_dump())

    app.include_router(v1)
    app.include_router(TokensHandler(ctx).router(_guarded, Depends(require_api_key)))
    add_playground(app, ctx, api_key, require_api_key)  # the page at / and its agent jobs (playground.py)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Open (no API key). `idle`: nothing in flight and every KV block and state slot free."""
        return JSONResponse({"status": "ok", "model": ctx.served_model_name, "idle": ctx.llm.is_idle()})

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format; open (no API key)."""
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> JSONResponse:
        """Glimpse's version (vLLM's route); open."""
        return JSONResponse({"version": __version__})

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        """200 while the server runs (vLLM's and SageMaker's liveness route); open."""
        return Response(status_code=200)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(_HTTPMetrics, metrics=ctx.metrics)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the request bodies (read raw, so FastAPI can't see them) and the chunk."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version="1", summary=app.summary, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    models = {"ChatCompletionRequest": ChatCompletionRequest, "CompletionRequest": CompletionRequest,
              "ChatCompletionChunk": ChatCompletionChunk}  # fmt: skip
    for name, model in models.items():
        ref_template = "#/components/schemas/{model}"
        mode = "serialization" if name.endswith("Chunk") else "validation"
        body = model.model_json_schema(ref_template=ref_template, mode=mode)
        components.update(body.pop("$defs", {}))
        components[name] = body
    for path in schema.get("paths", {}).values():
        op = path.get("post")
        if op and (name := op.pop("x-glimpse-request", None)):
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
            }
        if op and (chunk := op.pop("x-glimpse-chunk", None)):
            op["responses"]["200"].setdefault("content", {})["text/event-stream"] = {
                "schema": {"$ref": f"#/components/schemas/{chunk}"}
            }
    app.openapi_schema = schema
    return schema


# ------------------------------------------------------------------------------- from a configuration


def generation_defaults(model_dir: Any) -> dict[str, Any]:
    """Sampling defaults from the checkpoint's generation_config.json (for fields a request leaves out)."""
    path = os.path.join(str(model_dir), "generation_config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return {k: config[k] for k in _GENERATION_DEFAULTS if config.get(k) is not None}


def make_context(
    engine_config: EngineConfig, server_config: ServerConfig, llm: AsyncLLM | None = None
) -> ServingContext:
    """Build the engine (or take `llm`, built from `engine_config`) and what the handlers need."""
    if llm is None:
        llm = AsyncLLM(LLMEngine(engine_config))
    name, *aliases = server_config.model_names(engine_config.model)
    defaults = generation_defaults(llm.engine.model_dir)
    if defaults:
        log.info("sampling defaults from generation_config.json: %s", defaults)
    test_hooks = os.environ.get(TEST_HOOKS_ENV) == "1"
    if test_hooks:
        log.warning("%s=1: requests may force the model's output (tests only)", TEST_HOOKS_ENV)
    media = engine_config.media
    media_policy = MediaPolicy.for_server(media.allowed_local_media_path, media.allow_private_media_urls)
    prepare_fetching(media_policy)  # not on the first request, while others wait for the GIL
    return ServingContext(
        llm=llm,
        served_model_name=name,
        aliases=tuple(aliases),
        metrics=ServerMetrics(name, llm.engine.stats, llm.is_idle),
        media_limits=server_config.media_limits,
        media_policy=media_policy,
        max_request_bytes=server_config.max_request_bytes,
        max_logprobs=server_config.max_logprobs,
        max_prompts_per_request=server_config.max_prompts_per_request,
        max_sequences_per_request=server_config.max_sequences_per_request,
        test_hooks=test_hooks,
        sampling_defaults=defaults,
    )


def build_server(
    engine_config: EngineConfig, server_config: ServerConfig, llm: AsyncLLM | None = None
) -> tuple[FastAPI, ServingContext]:
    """The app and its context for a configuration: the engine is loaded (or `llm` taken) and running."""
    ctx = make_context(engine_config, server_config, llm)
    app = build_app(ctx, api_key=server_config.api_key)
    if server_config.allowed_origins:
        # Outermost, so every answer (errors included) carries the headers, and preflights need no API key.
        app.add_middleware(
            CORSMiddleware, allow_origins=server_config.allowed_origins,
            allow_methods=server_config.allowed_methods, allow_headers=server_config.allowed_headers,
            allow_credentials=server_config.allow_credentials,
        )  # fmt: skip
    return app, ctx


def freeze_startup_objects() -> None:
    """Keep the objects start-up made (the model's modules, torch, transformers: millions) out of every
    later garbage collection. A full collection walks them all holding the GIL: 380-460 ms on the test
    machine, during which no thread, the event loop included, runs (/health took 690 ms). They live as
    long as the server, so the collector has nothing to find there."""
    gc.collect()
    gc.freeze()


def run_server(engine_config: EngineConfig, server_config: ServerConfig, llm: AsyncLLM | None = None) -> None:
    """Check the address and TLS files (a StartupError), then build the server and answer HTTP(S) on
    `server_config.host:port` until interrupted."""
    import uvicorn

    sock = prepare_to_serve(server_config)
    try:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("glimpse").setLevel(logging.INFO)
        app, ctx = build_server(engine_config, server_config, llm)
        freeze_startup_objects()
        scheme = "https" if server_config.ssl_certfile else "http"
        log.info(
            "serving %s (max_model_len %d) on %s://%s:%d", ", ".join(map(repr, ctx.served_model_names)),
            ctx.max_model_len, scheme, server_config.host, server_config.port,
        )  # fmt: skip
        config = uvicorn.Config(
            app, host=server_config.host, port=server_config.port,  # for its log; it serves on `sock`
            log_level=server_config.uvicorn_log_level, timeout_graceful_shutdown=5,
            ssl_keyfile=server_config.ssl_keyfile, ssl_certfile=server_config.ssl_certfile,
        )  # fmt: skip
        server = uvicorn.Server(config)
        # A tensor-parallel rank that dies leaves the model incomplete: stop serving (uvicorn's graceful
        # shutdown), then exit with the watchdog's reason.
        engine = ctx.llm.engine
        engine.fatal_callbacks.append(lambda why: setattr(server, "should_exit", True))
        server.run(sockets=[sock])
        if engine.fatal_error is not None:
            raise SystemExit(f"glimpse serve stopped: {engine.fatal_error}")
    finally:
        sock.close()


__all__ = ["build_app", "build_server", "run_server", "make_context", "error_response"]
