"""End to end: `glimpse serve tiny` in a subprocess, talked to with the `openai` client and httpx.

One server for the whole module (the tiny text model, an API key, a small body limit, test hooks on so
requests can force the model's output). The tiny model has random weights: tests assert structure,
counts and parity between streamed and whole answers, never meaning.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time

import httpx
import openai
import pytest

from tests.server.server_process import Server, metrics, start_server, wait_idle

API_KEY = "sk-glimpse-test"
NAME = "glimpse-tiny"
BODY_LIMIT = 200_000

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CALL_TEXT = '<TOOLCALL>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</TOOLCALL>'


@pytest.fixture(scope="module")
def server():
    s = start_server(
        "tiny", "--served-model-name", NAME, "--max-request-bytes", str(BODY_LIMIT), api_key=API_KEY
    )
    yield s
    s.stop()
    assert "Traceback" not in s.log(), s.log()
    s.remove_log()  # no request may have hit an unexpected error


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from glimpse.model.loading import resolve_model_path

    return AutoTokenizer.from_pretrained(str(resolve_model_path("tiny")))


def chat_prompt_ids(tok, messages, tools=None, **template_kwargs) -> list[int]:
    text = tok.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False, **template_kwargs
    )
    return tok.encode(text, add_special_tokens=False)


def post(server: Server, path: str, body, **kw) -> httpx.Response:
    headers = {**server.headers, **kw.pop("headers", {})}
    kw.setdefault("timeout", 60)
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{server.url}{path}", content=body, headers=headers, **kw)
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, **kw)


def sse_events(server: Server, path: str, body: dict) -> list:
    """Every `data:` event of a stream, JSON-decoded, ending with the string "[DONE]"."""
    events = []
    with httpx.stream("POST", f"{server.url}{path}", json=body, headers=server.headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    assert events and events[-1] == "[DONE]"
    assert all(e != "[DONE]" for e in events[:-1])
    return events


def joined_stream(events: list, index: int = 0) -> dict:
    """A streamed chat choice put back together: reasoning, content, tool calls, finish reason."""
    reasoning, content, calls, finish = [], [], [], None
    for e in events[:-1]:
        for c in e["choices"]:
            if c["index"] != index:
                continue
            d = c["delta"]
            reasoning.append(d.get("reasoning_content") or "")
            content.append(d.get("content") or "")
            calls += d.get("tool_calls") or []
            if c["finish_reason"] is not None:
                assert finish is None, "two finish reasons for one choice"
                finish = c["finish_reason"]
    return {
        "reasoning_content": "".join(reasoning) or None,
        "content": "".join(content) or None,
        "tool_calls": calls,
        "finish_reason": finish,
    }


def check_error(r: httpx.Response, status: int, kind: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["type"] == kind and err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# ---------------------------------------------------------------------------------------------- basics


def test_models_health_and_openapi(server: Server, client: openai.OpenAI):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    health = httpx.get(f"{server.url}/health", timeout=10)  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    schema = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(
        schema["paths"]
    )
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert "messages" in schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]


def test_api_key(server: Server):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    check_error(
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=10), 401, "authentication_error"
    )
    wrong = {"Authorization": "Bearer sk-wrong"}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=wrong, timeout=10)
    check_error(r, 401, "authentication_error")
    check_error(httpx.get(f"{server.url}/v1/models", timeout=10), 401, "authentication_error")
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200


def test_chat_text(server: Server, client: openai.OpenAI, tokenizer):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    expected = chat_prompt_ids(tokenizer, messages)
    assert r.usage.prompt_tokens == len(expected)
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    assert r.usage.prompt_tokens_details.cached_tokens >= 0

    stream = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(expected)
    assert chunks[-1].usage.completion_tokens == 5
    finishes = [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_logprobs(server: Server):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "logprobs": True, "top_logprobs": 2, "ignore_eos": True}  # fmt: skip
    r = post(server, "/v1/chat/completions", body).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] == 4
    for entry in content:
        assert entry["logprob"] <= 0 and math.isfinite(entry["logprob"])
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    events = sse_events(server, "/v1/chat/completions", {**body, "stream": True})
    streamed = [
        x for e in events[:-1] for c in e["choices"] if c.get("logprobs") for x in c["logprobs"]["content"]
    ]
    assert len(streamed) == 4


def test_completions(server: Server, client: openai.OpenAI, tokenizer):
    r = client.completions.create(
        model=NAME, prompt="Once upon a time", max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.usage.prompt_tokens == len(tokenizer.encode("Once upon a time"))
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"

    ids = [10, 20, 30, 40, 50]
    r = client.completions.create(
        model=NAME, prompt=ids, max_tokens=3, logprobs=3, extra_body={"ignore_eos": True}
    )
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 3
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text

    stream = client.completions.create(
        model=NAME, prompt=ids, max_tokens=3, logprobs=1, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].choices == []
    tokens = [t for c in chunks[:-1] for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    assert len(tokens) == 3
    assert "".join(c.choices[0].text for c in chunks[:-1]) == "".join(tokens)


def test_completions_batch_and_echo(server: Server):
    body = {
        "model": NAME,
        "prompt": ["first prompt", "second one"],
        "max_tokens": 2,
        "n": 2,
        "ignore_eos": True,
    }
    r = post(server, "/v1/completions", body).json()
    assert sorted(c["index"] for c in r["choices"]) == [0, 1, 2, 3]
    assert r["usage"]["completion_tokens"] == 8
    events = sse_events(server, "/v1/completions", {**body, "stream": True})
    finished = {c["index"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]}
    assert finished == {0, 1, 2, 3}
    r = post(
        server, "/v1/completions", {"model": NAME, "prompt": "echo me", "max_tokens": 2, "echo": True}
    ).json()
    assert r["choices"][0]["text"].startswith("echo me")


def test_chat_n2(server: Server):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2,
            "ignore_eos": True, "temperature": 1.0}  # fmt: skip
    r = post(server, "/v1/chat/completions", body).json()
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert r["usage"]["completion_tokens"] == 6
    events = sse_events(
        server, "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert events[-2]["usage"]["completion_tokens"] == 6
    for i in (0, 1):
        assert joined_stream(events, i)["finish_reason"] == "length"


# ---------------------------------------------------------------------- forced output: parsers end to end


def forced_chat(server: Server, messages, forced: str, stream: bool, **extra) -> dict:
    body = {"model": NAME, "messages": messages, "max_tokens": 200, "glimpse_forced_output": forced, **extra}
    if stream:
        return {"events": sse_events(server, "/v1/chat/completions", {**body, "stream": True,
                                                                      "stream_options": {"include_usage": True}})}  # fmt: skip
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    return r.json()


def test_forced_output_roundtrips(tokenizer):
    for text in [
        "Plan.\n</think>\n\nThe answer is 4.",
        "Need weather.</think>" + CALL_TEXT,
        "one two STOP three",
    ]:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_reasoning_split(server: Server, tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    forced = "Plan.\n</think>\n\nThe answer is 4."
    whole = forced_chat(server, messages, forced, stream=False)
    msg = whole["choices"][0]["message"]
    assert msg["reasoning_content"] == "Plan.\n"
    assert msg["content"] == "\n\nThe answer is 4."
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] == len(tokenizer.encode(forced, add_special_tokens=False)) + 1
    events = forced_chat(server, messages, forced, stream=True)["events"]
    streamed = joined_stream(events)
    assert streamed["reasoning_content"] == msg["reasoning_content"]
    assert streamed["content"] == msg["content"]
    assert streamed["finish_reason"] == "stop"
    assert events[-2]["usage"] == whole["usage"] | {
        "prompt_tokens_details": events[-2]["usage"]["prompt_tokens_details"]
    }

    # Reasoning off: the prompt ends in an empty <think></think> and everything is the answer.
    off = [{"role": "system", "content": "/no_think"}, *messages]
    r = forced_chat(server, off, "Just 4.", stream=False)["choices"][0]["message"]
    assert r["reasoning_content"] is None and r["content"] == "Just 4."
    r = forced_chat(
        server, messages, "Just 4.", stream=False, chat_template_kwargs={"enable_thinking": False}
    )
    assert r["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Just 4.",
        "reasoning_content": None,
    }
    assert joined_stream(forced_chat(server, off, "Just 4.", stream=True)["events"])["content"] == "Just 4."


def test_tool_calls(server: Server, tokenizer):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    forced = "Need weather.</think>" + CALL_TEXT
    whole = forced_chat(server, messages, forced, stream=False, tools=TOOLS)
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["reasoning_content"] == "Need weather."
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert whole["usage"]["prompt_tokens"] == len(chat_prompt_ids(tokenizer, messages, tools=TOOLS))

    streamed = joined_stream(forced_chat(server, messages, forced, stream=True, tools=TOOLS)["events"])
    assert streamed["finish_reason"] == "tool_calls"
    assert streamed["reasoning_content"] == "Need weather." and streamed["content"] is None
    (delta,) = streamed["tool_calls"]
    assert delta["index"] == 0 and delta["function"]["name"] == "get_weather"
    assert json.loads(delta["function"]["arguments"]) == {"city": "Paris"}

    # The result goes back as a `tool` message; the model answers.
    history = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "18C and sunny"},
    ]
    again = forced_chat(server, history, "</think>It is 18C.", stream=False, tools=TOOLS)
    assert again["choices"][0]["message"]["content"] == "It is 18C."
    assert again["choices"][0]["finish_reason"] == "stop"
    rendered = [*messages, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "18C and sunny"}]  # fmt: skip
    assert again["usage"]["prompt_tokens"] == len(chat_prompt_ids(tokenizer, rendered, tools=TOOLS))

    # tool_choice "none": the tools are not announced and the output is not parsed.
    none = forced_chat(server, messages, forced, stream=False, tools=TOOLS, tool_choice="none")
    assert none["choices"][0]["finish_reason"] == "stop"
    assert "tool_calls" not in none["choices"][0]["message"]
    assert none["choices"][0]["message"]["content"] == CALL_TEXT
    assert none["usage"]["prompt_tokens"] == len(chat_prompt_ids(tokenizer, messages))


def test_openai_client_reads_tool_calls(client: openai.OpenAI):
    r = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, max_tokens=200,
        extra_body={"glimpse_forced_output": "</think>" + CALL_TEXT},
    )  # fmt: skip
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
    stream = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS, max_tokens=200, stream=True,
        extra_body={"glimpse_forced_output": "</think>" + CALL_TEXT},
    )  # fmt: skip
    calls = [t for c in stream for t in (c.choices[0].delta.tool_calls or [])]
    assert [t.function.name for t in calls] == ["get_weather"]


def test_stop_strings(server: Server):
    body = {
        "model": NAME,
        "prompt": "x",
        "max_tokens": 50,
        "stop": ["STOP"],
        "glimpse_forced_output": "one two STOP three",
    }
    r = post(server, "/v1/completions", body).json()
    assert r["choices"][0]["text"] == "one two "
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["stop_reason"] == "STOP"
    events = sse_events(server, "/v1/completions", {**body, "stream": True})
    assert "".join(c["text"] for e in events[:-1] for c in e["choices"]) == "one two "
    messages = [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "count"}]
    whole = forced_chat(server, messages, "one two STOP three", stream=False, stop="STOP")
    assert whole["choices"][0]["message"]["content"] == "one two "
    streamed = joined_stream(
        forced_chat(server, messages, "one two STOP three", stream=True, stop="STOP")["events"]
    )
    assert streamed["content"] == "one two " and streamed["finish_reason"] == "stop"


def _structured_outputs_wired() -> bool:
    """The constraint module exists AND the engine uses it (it landed before its wiring did)."""
    from pathlib import Path

    import glimpse.engine

    folder = Path(glimpse.engine.__file__).parent
    return any("structured import" in f.read_text() for f in folder.glob("*.py") if f.name != "structured.py")


def test_structured_json_output(server: Server):
    pytest.importorskip("glimpse.engine.structured")
    if not _structured_outputs_wired():
        pytest.skip("glimpse.engine.structured is not wired into the engine yet")
    import jsonschema

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}  # fmt: skip
    messages = [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "Answer in JSON."}]
    body = {"model": NAME, "messages": messages, "max_tokens": 64,
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}}  # fmt: skip
    r = post(server, "/v1/chat/completions", body).json()
    jsonschema.validate(json.loads(r["choices"][0]["message"]["content"]), schema)
    streamed = joined_stream(sse_events(server, "/v1/chat/completions", {**body, "stream": True}))
    jsonschema.validate(json.loads(streamed["content"]), schema)
    body = {
        "model": NAME,
        "messages": messages,
        "max_tokens": 16,
        "structured_outputs": {"regex": "(yes|no)"},
    }
    r = post(server, "/v1/chat/completions", body).json()
    assert r["choices"][0]["message"]["content"] in ("yes", "no")


# ------------------------------------------------------------------------------------------------ errors


CITY_TOOL = {"type": "function", "function": {"name": "pick_city", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}}}  # fmt: skip


@pytest.mark.parametrize("choice", ["named", "required"])
def test_forced_tool_choice(server: Server, choice: str):
    if not _structured_outputs_wired():
        pytest.skip("glimpse.engine.structured is not wired into the engine yet")
    tool_choice = {"type": "function", "function": {"name": "pick_city"}} if choice == "named" else "required"
    messages = [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "Pick a city."}]
    body = {"model": NAME, "messages": messages, "max_tokens": 60, "temperature": 0,
            "tools": [CITY_TOOL, *TOOLS] if choice == "named" else [CITY_TOOL], "tool_choice": tool_choice,
            "parallel_tool_calls": False}  # fmt: skip
    whole = post(server, "/v1/chat/completions", body).json()
    (c,) = whole["choices"]
    assert c["message"]["content"] is None, c
    calls = c["message"]["tool_calls"]
    assert calls and c["finish_reason"] == ("stop" if choice == "named" else "tool_calls")
    assert len(calls) == 1
    for call in calls:
        assert call["function"]["name"] == "pick_city"
        assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Rome")
    streamed = joined_stream(sse_events(server, "/v1/chat/completions", {**body, "stream": True}))
    assert streamed["finish_reason"] == c["finish_reason"] and streamed["content"] is None
    assert [(d["function"]["name"], d["function"]["arguments"]) for d in streamed["tool_calls"]] == [
        (x["function"]["name"], x["function"]["arguments"]) for x in calls
    ]


def test_bad_requests(server: Server, client: openai.OpenAI):
    check_error(
        post(server, "/v1/chat/completions", b'{"model": "x", "messages": ['), 400, "invalid_request_error"
    )
    check_error(post(server, "/v1/chat/completions", b"[1, 2]"), 400, "invalid_request_error")
    err = check_error(post(server, "/v1/chat/completions", {"messages": []}), 400, "invalid_request_error")
    assert err["param"] == "messages"
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}
    assert (
        check_error(post(server, "/v1/chat/completions", body), 400, "invalid_request_error")["param"]
        == "temperature"
    )
    err = check_error(post(server, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}),
                      404, "not_found_error")  # fmt: skip
    assert err["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt=[100000], max_tokens=1)  # outside the vocabulary
    check_error(
        httpx.get(f"{server.url}/v1/nothing", headers=server.headers, timeout=10), 404, "not_found_error"
    )
    # Media sent to the text-only model: a 400 that names the problem.
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    body = {
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": "?"}]}],
        "max_tokens": 1,
    }
    err = check_error(post(server, "/v1/chat/completions", body), 400, "invalid_request_error")
    assert "text only" in err["message"]


def test_body_too_large(server: Server):
    # By Content-Length, before a byte of the body is read: raw socket, headers only.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {API_KEY}\r\nContent-Length: 999999999\r\n\r\n".encode()
        )
        reply = b""
        while b'"code":413' not in reply.replace(b" ", b"") and (data := s.recv(65536)):
            reply += data
    reply = reply.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413"), reply
    assert '"code":413' in reply.replace(" ", "")
    # Chunked (no Content-Length): counted while reading.
    chunks = [b" " * 10_000] * (BODY_LIMIT // 10_000 + 1)
    r = httpx.post(f"{server.url}/v1/completions", content=iter(chunks), headers=server.headers, timeout=30)
    check_error(r, 413, "invalid_request_error")
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_prompt_over_context(server: Server, client: openai.OpenAI):
    max_len = client.models.list().data[0].model_extra["max_model_len"]
    long_ids = [7] * (max_len + 5)
    err = check_error(
        post(server, "/v1/completions", {"prompt": long_ids, "max_tokens": 1}), 400, "invalid_request_error"
    )
    assert err["param"] == "prompt" and str(max_len) in err["message"]
    err = check_error(post(server, "/v1/completions", {"prompt": long_ids, "max_tokens": 1, "stream": True}), 400,
                      "invalid_request_error")  # fmt: skip
    # Exactly filling the context leaves no room for a token.
    check_error(
        post(server, "/v1/completions", {"prompt": [7] * max_len, "max_tokens": 1}),
        400,
        "invalid_request_error",
    )
    words = "hello " * (max_len + 10)
    body = {"messages": [{"role": "user", "content": words}], "max_tokens": 1, "stream": True}
    err = check_error(post(server, "/v1/chat/completions", body), 400, "invalid_request_error")
    assert err["param"] == "messages"
    # As vLLM: a max_tokens the client set that does not fit in the room left is a 400 ...
    err = check_error(post(server, "/v1/completions", {"prompt": [7] * (max_len - 2), "max_tokens": 5}), 400,
                      "invalid_request_error")  # fmt: skip
    assert err["param"] == "max_tokens" and str(max_len) in err["message"]
    # ... while the default length (16 for completions) is capped to the room left.
    ok = post(server, "/v1/completions", {"prompt": [7] * (max_len - 2)})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 2


# ------------------------------------------------------------------------------------ load and disconnects


def test_concurrent_streams_with_disconnects(server: Server):
    """50 streaming clients at once; every fifth leaves after two chunks. All end cleanly, the engine
    frees every block and slot, and the server still answers."""

    async def one(i: int, http: httpx.AsyncClient) -> str:
        leaves = i % 5 == 0
        body = {"model": NAME, "messages": [{"role": "user", "content": f"client {i}"}], "stream": True,
                "max_tokens": 2000 if leaves else 6, "ignore_eos": True}  # fmt: skip
        seen = 0
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                seen += 1
                if leaves and seen >= 3:
                    return "left"
                if line == "data: [DONE]":
                    return "done"
        return "cut"

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers, timeout=120, limits=limits
        ) as http:
            return await asyncio.gather(*(one(i, http) for i in range(50)))

    before = metrics(server)
    results = asyncio.run(run())
    assert results.count("left") == 10 and results.count("done") == 40
    after = wait_idle(server, timeout=30)
    aborted = after.get('request_success_total{model_name="glimpse-tiny",finished_reason="abort"}', 0)
    aborted -= before.get('request_success_total{model_name="glimpse-tiny",finished_reason="abort"}', 0)
    assert aborted == 10
    r = post(
        server,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "still there?"}], "max_tokens": 2},
    )
    assert r.status_code == 200


def test_non_streaming_disconnect_aborts(server: Server):
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": "a long one"}],
        "max_tokens": 5000,
        "ignore_eos": True,
    }
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/chat/completions", body, timeout=1.5)
    start = time.monotonic()
    wait_idle(server, timeout=15)  # 5000 tokens would take over a minute: only an abort frees it this soon
    assert time.monotonic() - start < 15


def test_metrics(server: Server):
    before = metrics(server)
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "count me"}], "max_tokens": 3,
                                              "ignore_eos": True})  # fmt: skip
    usage = r.json()["usage"]
    raw = httpx.get(f"{server.url}/metrics", timeout=10)
    assert raw.headers["content-type"].startswith("text/plain")
    assert "# TYPE glimpse:time_to_first_token_seconds histogram" in raw.text
    after = metrics(server)
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == usage["prompt_tokens"]
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == 3
    assert after["time_to_first_token_seconds_count"] == before["time_to_first_token_seconds_count"] + 1
    assert after["e2e_request_latency_seconds_count"] == before["e2e_request_latency_seconds_count"] + 1
    ok = 'http_requests_total{method="POST",path="/v1/chat/completions",status="200"}'
    assert after[ok] >= 1
    assert after['http_requests_total{method="POST",path="/v1/chat/completions",status="401"}'] >= 1
    for name in ("num_requests_running", "num_requests_waiting", "kv_blocks_used", "kv_blocks_total",
                 "state_slots_used", "state_slots_total", "encoder_cache_hits_total", "video_tokens_total",
                 "video_tokens_kept_total", "engine_idle"):  # fmt: skip
        assert name in after, name
    assert httpx.get(f"{server.url}/health", timeout=10).json()["idle"] in (True, False)
