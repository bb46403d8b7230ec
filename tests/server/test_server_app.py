"""The server's plumbing in-process, against a fake engine (no model, milliseconds per test).

What a real model can't show cheaply: forced output ignored without test hooks, a bug becoming a 500
the server survives, media counted before anything is loaded, errors in the middle of a stream,
and the command line's defaults being API.md's.
"""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

import httpx
import pytest

from glimpse.errors import MediaError
from glimpse.inputs import ProcessedInput
from glimpse.outputs import CompletionOutput, RequestOutput
from glimpse.processing.media import MediaLimits
from glimpse.server.app import build_app
from glimpse.server.metrics import ServerMetrics, parse_text
from glimpse.server.serving_completions import ServingContext, merge_streams


class FakeTokenizer:
    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1 + ord(c) % 250 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)

    def get_vocab(self) -> dict[str, int]:
        return {chr(i - 1): i for i in range(1, 251)}  # one character a token


class FakeProcessor:
    def __init__(self) -> None:
        self.calls = 0
        self.fail: BaseException | None = None

    def from_messages(self, messages, **kwargs) -> ProcessedInput:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        text = "prompt<think>\n"
        return ProcessedInput(text, FakeTokenizer().encode(text))

    def from_prompt(self, prompt) -> ProcessedInput:
        if isinstance(prompt, str):
            return ProcessedInput(prompt, FakeTokenizer().encode(prompt))
        return ProcessedInput(None, list(prompt["prompt_token_ids"]))


class FakeLLM:
    """Generates "abc" (one character a step), or fails after `fail_after` outputs."""

    def __init__(self) -> None:
        self.engine = SimpleNamespace(
            max_model_len=64, tokenizer=FakeTokenizer(), eos_token_ids=[0],
            cfg=SimpleNamespace(model="fake-model"), model_dir="/nonexistent", stats=lambda: {},
        )  # fmt: skip
        self.processor = FakeProcessor()
        self.params = []
        self.fail_after: int | None = None
        self.active = 0

    def is_idle(self) -> bool:
        return self.active == 0

    def process(self, prompt) -> ProcessedInput:
        return self.processor.from_prompt(prompt)

    async def process_chat(self, messages, **kwargs) -> ProcessedInput:
        return self.processor.from_messages(messages, **kwargs)

    def shutdown(self) -> None:
        pass

    async def generate(self, inp, params, request_id):
        self.params.append(params)
        self.active += 1
        try:
            text = "abc"
            for step in range(1, len(text) + 1):
                if self.fail_after is not None and step > self.fail_after:
                    raise RuntimeError("the engine broke")
                done = step == len(text)
                outs = [
                    CompletionOutput(i, text[:step], list(range(1, step + 1)), "length" if done else None)
                    for i in range(params.n)
                ]
                yield RequestOutput(request_id, inp.prompt, inp.prompt_token_ids, outs, done)
                await asyncio.sleep(0)
        finally:
            self.active -= 1


def make_app(test_hooks: bool = False, context: dict | None = None, **limits):
    """The app around a FakeLLM; `context`: more ServingContext fields (caps), `limits`: media limits."""
    llm = FakeLLM()
    ctx = ServingContext(
        llm=llm,  # type: ignore[arg-type]
        served_model_name="fake",
        media_limits=MediaLimits(**limits),
        metrics=ServerMetrics("fake", llm.engine.stats, llm.is_idle),
        test_hooks=test_hooks,
        **(context or {}),
    )
    return build_app(ctx), llm


def make_client(
    test_hooks: bool = False, context: dict | None = None, **limits
) -> tuple[httpx.AsyncClient, FakeLLM]:
    app, llm = make_app(test_hooks, context, **limits)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test"), llm


def run(coro):
    return asyncio.run(coro)


CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


@pytest.mark.parametrize("hooks", [False, True])
def test_forced_output_only_with_test_hooks(hooks):
    async def go():
        client, llm = make_client(test_hooks=hooks)
        async with client:
            r = await client.post("/v1/chat/completions", json={**CHAT, "glimpse_forced_output": "xy"})
        assert r.status_code == 200
        return llm.params[0].forced_token_ids

    forced = run(go())
    assert forced == ([1 + ord("x"), 1 + ord("y"), 0] if hooks else None)


def test_unexpected_error_is_a_500_and_the_server_goes_on():
    async def go():
        client, llm = make_client()
        async with client:
            llm.processor.fail = KeyError("a bug")
            bad = await client.post("/v1/chat/completions", json=CHAT)
            llm.processor.fail = None
            good = await client.post("/v1/chat/completions", json=CHAT)
            metrics = (await client.get("/metrics")).text
        return bad, good, metrics

    bad, good, metrics = run(go())
    assert bad.status_code == 500
    err = bad.json()["error"]
    assert err["type"] == "internal_server_error" and "a bug" not in err["message"]
    assert good.status_code == 200
    assert 'status="500"' in metrics


def test_media_decoding_failure_is_a_400():
    async def go():
        client, llm = make_client()
        llm.processor.fail = OSError("cannot identify image file")
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        body = {**CHAT, "messages": [{"role": "user", "content": [image, {"type": "text", "text": "?"}]}]}
        async with client:
            r = await client.post("/v1/chat/completions", json=body)
            llm.processor.fail = MediaError("image too odd", param="messages")
            r2 = await client.post("/v1/chat/completions", json=body)
        return r, r2

    r, r2 = run(go())
    assert r.status_code == 400 and "cannot identify" in r.json()["error"]["message"]
    assert r2.status_code == 400 and r2.json()["error"]["param"] == "messages"


def test_media_counted_before_loading():
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    video = {"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}
    pdf = {"type": "file", "file": {"file_url": "https://example.com/a.pdf"}}
    flat_pdf = {"type": "input_file", "file_url": "https://example.com/b.pdf"}

    async def go(parts, **limits):
        client, llm = make_client(**limits)
        body = {**CHAT, "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}]}
        async with client:
            r = await client.post("/v1/chat/completions", json=body)
        return r, llm.processor.calls

    r, calls = run(go([image] * 17))
    assert r.status_code == 400 and calls == 0 and "17 images" in r.json()["error"]["message"]
    assert run(go([image] * 16))[0].status_code == 200
    assert run(go([video] * 3))[0].status_code == 400
    assert run(go([pdf, flat_pdf] * 2))[0].status_code == 200
    assert run(go([pdf, flat_pdf] * 2 + [pdf]))[0].status_code == 400
    assert (
        run(go([image, image], limit_mm_per_prompt={"image": 1, "video": 0, "file": 0}))[0].status_code == 400
    )


def test_error_in_the_middle_of_a_stream():
    async def go():
        client, llm = make_client()
        llm.fail_after = 1
        async with client:
            r = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        return r

    r = run(go())
    assert r.status_code == 200  # the first output came: the status line was already sent
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 500 and error["type"] == "internal_server_error"


def test_continuous_usage_stats():
    async def go():
        client, _ = make_client()
        options = {"include_usage": True, "continuous_usage_stats": True}
        async with client:
            r = await client.post(
                "/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": options}
            )
            c = await client.post(
                "/v1/completions", json={"prompt": "x", "stream": True, "stream_options": options}
            )
        return r, c

    for r in run(go()):
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        with_choices = [e for e in events if e["choices"]]
        assert with_choices and all("usage" in e for e in with_choices[1:])
        assert with_choices[-1]["usage"]["completion_tokens"] == 3
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3


def test_error_before_the_first_output_keeps_its_status():
    async def go():
        client, llm = make_client()
        llm.fail_after = 0
        async with client:
            return await client.post("/v1/completions", json={"prompt": "x", "stream": True})

    assert run(go()).status_code == 500


def test_completions_batch_indices_and_usage():
    async def go():
        client, _ = make_client()
        async with client:
            return (await client.post("/v1/completions", json={"prompt": [[5, 6], [7]], "n": 2})).json()

    r = run(go())
    assert sorted(c["index"] for c in r["choices"]) == [0, 1, 2, 3]
    assert r["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15,
                          "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip


def test_batches_over_the_caps_are_refused_before_any_prompt_is_processed():
    caps = {"max_prompts_per_request": 3, "max_sequences_per_request": 4}

    async def go(path, body):
        client, llm = make_client(context=caps)
        async with client:
            r = await client.post(path, json=body)
        return r, llm

    r, llm = run(go("/v1/completions", {"prompt": [[5]] * 4}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and not llm.params
    assert "at most 3" in r.json()["error"]["message"]
    r, llm = run(go("/v1/completions", {"prompt": ["a", "b"], "n": 3}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "n" and not llm.params
    assert "6 sequences" in r.json()["error"]["message"] and "at most 4" in r.json()["error"]["message"]
    r, llm = run(go("/v1/chat/completions", {**CHAT, "n": 5}))
    assert r.status_code == 400 and llm.processor.calls == 0
    r, llm = run(go("/v1/completions", {"prompt": [[5], [6]], "n": 2}))
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


def test_text_over_the_context_is_refused_by_its_length_before_tokenising():
    """The fake context is 64 tokens of at most one character: 63 characters is the most a prompt can be."""
    tokenised = []

    async def go(path, body):
        client, llm = make_client()
        llm.processor.from_prompt = lambda prompt: tokenised.append(prompt)
        async with client:
            r = await client.post(path, json=body)
        return r, llm

    r, _ = run(go("/v1/completions", {"prompt": ["ok", "x" * 64]}))
    assert r.status_code == 400 and "64 characters" in r.json()["error"]["message"] and not tokenised
    r, _ = run(go("/v1/completions", {"prompt": "x" * 64}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and not tokenised
    long = [{"type": "text", "text": "x" * 40}, {"type": "text", "text": "y" * 24}]
    r, llm = run(go("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": long}]}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and llm.processor.calls == 0


def test_max_tokens_over_the_room_left_is_refused():
    async def go(body):
        client, _ = make_client()
        async with client:
            return await client.post("/v1/completions", json=body)

    r = run(go({"prompt": "abc", "max_tokens": 62}))  # 3 + 62 > 64
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "max_tokens" and "64" in err["message"]
    assert run(go({"prompt": "abc", "max_tokens": 61})).status_code == 200
    assert run(go({"prompt": "x" * 60})).status_code == 200  # the default 16 is capped to the 4 left


def test_client_gone_while_sending_its_body_is_no_error(caplog):
    """A client that hangs up halfway through its body gets a quiet 499: no 500, no traceback."""
    app, _ = make_app()
    incoming = [
        {"type": "http.request", "body": b'{"model": "fake", "messa', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}  # fmt: skip
    with caplog.at_level(logging.INFO, logger="glimpse"):
        run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_refusals_and_unknown_fields_are_logged(caplog):
    async def go():
        client, _ = make_client()
        async with client:
            await client.post("/v1/chat/completions", json={**CHAT, "model": "other\x1b[31m"})
            await client.post("/v1/completions", json={"prompt": "x", "zorp": 1, "frob\nnicate": 2})

    with caplog.at_level(logging.INFO, logger="glimpse"):
        run(go())
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "POST /v1/chat/completions -> 404: the model 'other\\x1b[31m' does not exist" in text
    assert "\x1b" not in text  # a client's control characters are escaped
    assert "ignored unknown fields 'zorp', 'frob\\nnicate'" in text


def test_merge_streams_closes_everything_on_early_exit():
    closed = []

    async def gen(i):
        try:
            for k in range(100):
                yield k
                await asyncio.sleep(0)
        finally:
            closed.append(i)

    async def go():
        merged = merge_streams([gen(0), gen(1), gen(2)])
        seen = 0
        async for _ in merged:
            seen += 1
            if seen == 5:
                break
        await merged.aclose()

    run(go())
    assert sorted(closed) == [0, 1, 2]


def test_cli_defaults_are_the_contract(monkeypatch):
    from glimpse.cli import build_parser
    from glimpse.server.config import serve_configs

    monkeypatch.delenv("GLIMPSE_API_KEY", raising=False)
    args = build_parser().parse_args(["serve", "tiny"])
    assert (args.host, args.port, args.served_model_name, args.api_key) == ("127.0.0.1", 8000, None, None)
    assert args.limit_mm_per_prompt == {"image": 16, "video": 2, "file": 4}
    assert args.max_request_bytes == 268435456 and args.max_image_pixels == 64000000
    assert args.max_video_bytes == 2147483648 and args.max_video_seconds == 21600
    assert args.max_video_frames == 1024 and args.max_pdf_pages == 32 and args.media_fetch_timeout == 30
    assert args.allowed_local_media_path is None and args.allow_private_media_urls is False
    assert args.video_pruning_rate == 0 and args.gpu_memory_utilization == 0.9
    engine, server = serve_configs(args)
    assert server.max_request_bytes == 268435456 and engine.media.allow_private_media_urls is False
    assert server.media_limits == MediaLimits() and server.media_limits.max_video_frames == 1024
    args = build_parser().parse_args(["serve", "tiny", "--limit-mm-per-prompt", '{"image": 2}'])
    assert args.limit_mm_per_prompt == {"image": 2, "video": 2, "file": 4}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "tiny", "--limit-mm-per-prompt", '{"audio": 1}'])


def test_metrics_exposition():
    m = ServerMetrics("m", lambda: {"kv_blocks_used": 3, "kv_blocks_total": 12}, lambda: False)
    m.record_http("POST", "/v1/completions", 200)
    m.record_first_token(0.03)
    m.record_request(prompt_tokens=10, generation_tokens=4, finish_reasons=["stop", None], e2e_seconds=0.5,
                     video_tokens={"total": 512, "kept": 300}, media=[{"type": "video"}])  # fmt: skip
    text = m.render()
    values = parse_text(text)
    assert values['glimpse:kv_cache_usage_perc{model_name="m"}'] == 0.25
    assert values['glimpse:engine_idle{model_name="m"}'] == 0
    assert values['glimpse:request_success_total{model_name="m",finished_reason="abort"}'] == 1
    assert values['glimpse:video_tokens_kept_total{model_name="m"}'] == 300
    assert values['glimpse:time_to_first_token_seconds_bucket{model_name="m",le="0.04"}'] == 1
    assert values['glimpse:time_to_first_token_seconds_bucket{model_name="m",le="0.02"}'] == 0
    assert values['glimpse:e2e_request_latency_seconds_count{model_name="m"}'] == 1
    for line in text.splitlines():  # every sample belongs to a declared family
        if not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            base = name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
            assert f"# TYPE {base} " in text or f"# TYPE {name} " in text, line


def test_forced_tool_choice_parsing():
    from glimpse.server.protocol import ChatCompletionRequest, parse_request
    from glimpse.server.serving_chat import ChoiceStream, forced_tool_calls, forced_tool_schema

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    base = {"messages": [{"role": "user", "content": "x"}], "tools": [tool]}
    named = parse_request(
        ChatCompletionRequest, {**base, "tool_choice": {"type": "function", "function": {"name": "f"}}}
    )
    required = parse_request(
        ChatCompletionRequest, {**base, "tool_choice": "required", "parallel_tool_calls": False}
    )
    auto = parse_request(ChatCompletionRequest, base)
    assert forced_tool_schema(named) == {"type": "object"}
    assert forced_tool_schema(required)["maxItems"] == 1 and forced_tool_schema(auto) is None
    (call,) = forced_tool_calls(named, '{"a": 1}')
    assert (call.name, json.loads(call.arguments)) == ("f", {"a": 1})
    (call,) = forced_tool_calls(required, '[{"name": "f", "parameters": {"b": 2}}]')
    assert (call.name, json.loads(call.arguments)) == ("f", {"b": 2})
    assert forced_tool_calls(required, '[{"name": "f", "para') is None  # cut short: stays content
    stream = ChoiceStream("<think></think>", required)
    deltas = stream.feed('[{"name": "f", ') + stream.feed('"parameters": {}}]')
    assert deltas == []  # held back until whole
    (last,) = stream.finish()
    assert last.tool_calls[0].function.name == "f" and stream.tools_called
