"""[G8] Property-based fuzz of the request schema: no body a client can send gets a 5xx.

Bodies start from a valid, cheap request and get up to five fields replaced or added: the fields the
server's own OpenAPI document lists for the route (so new fields are fuzzed as soon as they exist), plus
unknown names. Values are junk of every JSON shape: wrong types, huge, negative, NaN and infinite
numbers (sent as `NaN`, `Infinity` or `1e400` in the raw text), nested lists and objects, and sometimes
the body is cut short. The server runs the tiny text model with a 256-token context, so even a request
the server accepts costs at most a few hundred tokens. A response must not be a 5xx, and a stream must
not carry a 5xx error event. The run is bounded: 150 examples, each request within 20 s.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.server.server_process import Server, start_server

MODEL = "tiny-vl"
ROUTES = ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize")
ROUTE_WEIGHTS = ROUTES[:1] * 5 + ROUTES[1:2] * 3 + ROUTES[2:]  # chat is the largest surface
SCHEMAS = {"/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest"}
BASE = {
    "/v1/chat/completions": {
        "model": MODEL,
        "max_tokens": 2,
        "messages": [{"role": "user", "content": "Hi"}],
    },
    "/v1/completions": {"model": MODEL, "max_tokens": 2, "prompt": "Hi"},
    "/tokenize": {"model": MODEL, "prompt": "Hi"},
    "/detokenize": {"model": MODEL, "tokens": [5, 6, 7]},
}
# Fields fuzzed even if the OpenAPI document doesn't list them (vLLM extras and the new routes' fields).
EXTRA_FIELDS = ("chat_template", "chat_template_kwargs", "echo", "logprobs", "top_logprobs", "prompt_logprobs",
                "tokens", "messages", "prompt", "add_generation_prompt", "add_special_tokens",
                "mm_processor_kwargs", "media_io_kwargs", "structured_outputs", "guided_json",
                "response_format", "tools", "tool_choice", "stream", "stream_options")  # fmt: skip
NESTED_KEYS = ("type", "role", "content", "text", "name", "json_schema", "schema", "function", "url",
               "image_url", "video_url", "file", "file_data", "file_url", "parameters", "include_usage",
               "regex", "json", "choice", "enable_thinking", "max_num_tiles", "video", "fps", "num_frames",
               "arguments", "tool_calls", "strict")  # fmt: skip
ROLES = ("system", "developer", "user", "assistant", "tool", "wizard", "")
PART_TYPES = ("text", "image_url", "video_url", "file", "input_file", "input_text", "audio_url", "")
HUGE = (2**31, 2**53 + 1, 2**63, 2**64, 10**12, 10**30, -(2**63) - 1, -(10**30))
# An 8 x 8 PNG: a real image, cheap to decode and 256 tokens in the prompt.
PNG_8 = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFElEQVR4nGPkOiHHgA0wYRUdtBIAwJQBAJoPke8AAAAASUVORK5CYII="
WORDS = ("", "auto", "none", "required", "text", "json_object", "json_schema", "function", "user", MODEL,
         PNG_8, "data:image/png;base64,AAAA", "data:application/pdf;base64,JVBERi0=", "file:///etc/passwd",
         "http://127.0.0.1:9/x.png", "\u0000media0\u0000", "\u0000media7\u0000", "<image>", "<video>",
         "<img>", "</think>", "x" * 300)  # fmt: skip

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from(HUGE),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=16),
    st.sampled_from(WORDS),
)
junk = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(NESTED_KEYS) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
words = st.sampled_from(WORDS) | st.text(max_size=40)
url = st.sampled_from(WORDS) | junk
part = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(PART_TYPES), "text": words | junk}),
    st.fixed_dictionaries({"type": st.sampled_from(PART_TYPES), "image_url": st.fixed_dictionaries({"url": url}) | url}),
    st.fixed_dictionaries({"type": st.sampled_from(PART_TYPES), "video_url": st.fixed_dictionaries({"url": url}) | url}),
    st.fixed_dictionaries({"type": st.sampled_from(PART_TYPES), "file": st.dictionaries(
        st.sampled_from(("file_data", "file_url", "file_id", "filename")), url, max_size=3)}),
    junk,
)  # fmt: skip
message = st.fixed_dictionaries(
    {
        "role": st.one_of(*[st.sampled_from(ROLES)] * 3, junk),
        "content": words | st.lists(part, max_size=3) | junk,
    },
    optional={"name": junk, "tool_calls": junk, "tool_call_id": junk, "reasoning_content": junk},
)
messages = st.lists(message, max_size=3) | junk


@pytest.fixture(scope="module")
def server():
    s = start_server(MODEL, "--max-model-len", "1024", test_hooks=False)
    yield s
    s.stop()
    assert "Traceback" not in s.log(), s.log()[-5000:]
    s.remove_log()


@pytest.fixture(scope="module")
def fields(server: Server) -> dict[str, list[str]]:
    """Per route: the request fields the OpenAPI document lists, plus EXTRA_FIELDS."""
    schema = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    components = schema.get("components", {}).get("schemas", {})
    out = {}
    for route in ROUTES:
        listed = components.get(SCHEMAS.get(route, ""), {}).get("properties", {})
        out[route] = sorted(set(listed) | set(EXTRA_FIELDS) | set(BASE[route]))
    return out


def body_text(body: dict, big_literal: bool, cut: int | None) -> str:
    text = json.dumps(body, allow_nan=True)  # NaN and Infinity as JavaScript spells them
    if big_literal:
        text = text.replace("-Infinity", "-1e400").replace("Infinity", "1e400")
    return text[:cut] if cut is not None else text


def server_errors(r: httpx.Response, text: str) -> list[str]:
    """5xx answers, and 5xx error events inside a stream."""
    found = [f"HTTP {r.status_code}: {text[:300]}"] if r.status_code >= 500 else []
    for line in text.splitlines():
        if line.startswith("data: {") and '"error"' in line:
            code = json.loads(line[6:]).get("error", {}).get("code")
            if isinstance(code, int) and code >= 500:
                found.append(line[:300])
    return found


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(data=st.data())
def test_no_request_body_gets_a_server_error(server: Server, fields: dict[str, list[str]], data):
    route = data.draw(st.sampled_from(ROUTE_WEIGHTS), label="route")
    names = st.sampled_from(fields[route]) | st.text(min_size=1, max_size=12)
    changes = data.draw(st.dictionaries(names, junk, max_size=5), label="changes")
    if route in ("/v1/chat/completions", "/tokenize") and data.draw(st.booleans(), label="fuzz messages"):
        changes["messages"] = data.draw(messages, label="messages")
    body = {**BASE[route], **changes}
    cut = (
        data.draw(st.integers(0, 200), label="cut")
        if data.draw(st.integers(0, 9), label="truncate?") == 0
        else None
    )
    text = body_text(body, data.draw(st.booleans(), label="1e400"), cut)
    started = time.monotonic()
    try:
        with httpx.stream("POST", f"{server.url}{route}", content=text, timeout=20,
                          headers={"Content-Type": "application/json"}) as r:  # fmt: skip
            answer = r.read().decode(errors="replace")
    except httpx.TimeoutException:
        pytest.fail(f"no answer in 20 s to {route} {text[:500]}")
    event(f"{route} -> {r.status_code}")  # shown with --hypothesis-show-statistics
    assert not server_errors(r, answer), f"{route} {text[:500]} -> {server_errors(r, answer)}"
    assert time.monotonic() - started < 20


def test_server_still_serves_after_the_fuzz(server: Server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text[:500]
    assert "Traceback" not in server.log(), server.log()[-5000:]
