"""POST /tokenize and POST /detokenize, with vLLM's shapes.

/tokenize takes `{"model", "prompt"}` and counts the prompt as /v1/completions does, or `{"model",
"messages", ...}` and counts the conversation as /v1/chat/completions does (the same rendering, media
expanded, the generation prompt included unless `add_generation_prompt` is false). `add_special_tokens`
defaults as in vLLM: true for a prompt, false for messages (the chat template writes its own). The answer
is `{"count", "max_model_len", "tokens", "token_strs"}` (`token_strs` only with `return_token_strs`).
/detokenize takes `{"model", "tokens"}` and answers `{"prompt"}`. Both name the served model (404 else).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request, params
from fastapi.responses import JSONResponse, Response

from glimpse.errors import InvalidRequestError
from glimpse.inputs import ProcessedInput
from glimpse.server.protocol import (
    Bool,
    ChatCompletionRequest,
    OpenAIModel,
    ResponseModel,
    TokenIds,
    parse_request,
)
from glimpse.server.serving_chat import ChatHandler
from glimpse.server.serving_completions import ServingBase, ServingContext


class TokenizePromptRequest(OpenAIModel):
    model: str | None = None
    prompt: str
    add_special_tokens: Bool = True
    return_token_strs: Bool = False


class TokenizeChatRequest(ChatCompletionRequest):
    """The chat request's fields (messages, tools, chat_template, chat_template_kwargs, media options),
    plus the tokenizer's."""

    add_special_tokens: Bool = False
    return_token_strs: Bool = False


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: TokenIds


class _Form(OpenAIModel):
    """Which /tokenize form a body is: with `messages`, a conversation."""

    messages: object = None


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(ResponseModel):
    prompt: str


Guard = Callable[[Callable[[Request], Awaitable[Response]]], Callable[[Request], Awaitable[Response]]]


class TokensHandler(ServingBase):
    def __init__(self, ctx: ServingContext) -> None:
        super().__init__(ctx)
        self.chat = ChatHandler(ctx)  # renders messages exactly as a chat request

    def router(self, guard: Guard, auth: params.Depends) -> APIRouter:
        """The two routes, each wrapped by `guard` (errors) and behind `auth` (the API key)."""
        router = APIRouter(dependencies=[auth])
        router.add_api_route("/tokenize", guard(self.tokenize), methods=["POST"],
                             responses={200: {"model": TokenizeResponse}})  # fmt: skip
        router.add_api_route("/detokenize", guard(self.detokenize), methods=["POST"],
                             responses={200: {"model": DetokenizeResponse}})  # fmt: skip
        return router

    async def tokenize(self, request: Request) -> Response:
        body = await self.read_body(request)
        chat = (await asyncio.to_thread(parse_request, _Form, body)).messages is not None
        model = TokenizeChatRequest if chat else TokenizePromptRequest
        req = await asyncio.to_thread(parse_request, model, body)
        self.check_model(req.model)
        if isinstance(req, TokenizeChatRequest):
            counts = self.chat.check_media_counts(req)
            inp = await self.chat.process(req, has_media=any(counts.values()))
            tokens = await asyncio.to_thread(self._with_special_tokens, inp, req.add_special_tokens)
        else:
            tokens = await asyncio.to_thread(self.ctx.tokenizer.encode, req.prompt,
                                             add_special_tokens=req.add_special_tokens)  # fmt: skip
        strs = self.ctx.tokenizer.convert_ids_to_tokens(tokens) if req.return_token_strs else None
        resp = TokenizeResponse(
            count=len(tokens), max_model_len=self.ctx.max_model_len, tokens=tokens, token_strs=strs
        )
        return JSONResponse(resp.model_dump())

    def _with_special_tokens(self, inp: ProcessedInput, add: bool) -> list[int]:
        """The conversation's tokens as chat sends them (no special tokens added), or the rendered text
        encoded with the tokenizer's special tokens (text only: media tokens are not text)."""
        if not add:
            return list(inp.prompt_token_ids)
        if inp.media_spans:
            raise InvalidRequestError(
                "add_special_tokens is not supported for messages with media", param="add_special_tokens"
            )
        return self.ctx.tokenizer.encode(inp.prompt, add_special_tokens=True)

    async def detokenize(self, request: Request) -> Response:
        body = await self.read_body(request)
        req = await asyncio.to_thread(parse_request, DetokenizeRequest, body)
        self.check_model(req.model)
        tokenizer = self.ctx.tokenizer
        vocab = len(tokenizer)
        bad = [t for t in req.tokens if t >= vocab]
        if bad:
            raise InvalidRequestError(f"token ids out of range [0, {vocab}): {bad[:5]}", param="tokens")
        text = await asyncio.to_thread(tokenizer.decode, req.tokens)
        return JSONResponse(DetokenizeResponse(prompt=text).model_dump())


__all__ = ["TokensHandler", "TokenizeResponse", "DetokenizeResponse"]
