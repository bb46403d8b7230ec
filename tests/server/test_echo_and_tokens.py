"""[G8] Beyond test_vllm_compat: echoed prompts with logprobs (max_tokens 0, streamed, sampled output
that splits characters or emits special tokens), /tokenize's options and refusals, and each token's real
bytes (TokenBytes) over the tiny tokenizer's whole vocabulary."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.server_process import Server, start_server

NAME = "tiny"


@pytest.fixture(scope="module")
def server():
    s = start_server(NAME)
    yield s
    s.stop()
    assert "Traceback" not in s.log(), s.log()[-5000:]
    s.remove_log()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from glimpse.model.loading import resolve_model_path

    return AutoTokenizer.from_pretrained(str(resolve_model_path(NAME)))


def post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, f"{r.status_code}: {r.text[:500]}"
    return r.json()


def completion(server: Server, **fields) -> dict:
    return ok(post(server, "/v1/completions", {"model": NAME, "ignore_eos": True, **fields}))


def test_echo_tokens_join_to_the_text_whatever_is_sampled(server: Server):
    """Sampled from the random tiny model, outputs often hold a token that leaves a character unfinished
    or a special token the text skips: `tokens` are each token's piece of the text, so they join to it and
    `text_offset` points into it."""
    for prompt in ("Hello world, this is a test", [10, 20, 30, 40, 50, 60]):
        out = completion(server, prompt=prompt, max_tokens=8, n=16, seed=1, echo=True, logprobs=2)
        n_prompt = out["usage"]["prompt_tokens"]
        for choice in out["choices"]:
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n_prompt + 8
            assert "".join(lp["tokens"]) == choice["text"]
            assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            assert all(x <= 0 for x in lp["token_logprobs"][1:])
            assert all(1 <= len(top) <= 3 for top in lp["top_logprobs"][1:])


def test_echo_with_max_tokens_zero_is_the_prompt_alone(server: Server, tokenizer):
    prompt = "Once upon a time there was"
    only = completion(server, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    more = completion(server, prompt=prompt, max_tokens=4, echo=True, logprobs=1)
    n_prompt = len(tokenizer.encode(prompt))
    choice = only["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert only["usage"]["prompt_tokens"] == n_prompt and only["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == n_prompt and "".join(lp["tokens"]) == prompt
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert lp[key] == more["choices"][0]["logprobs"][key][:n_prompt], key
    no_logprobs = completion(server, prompt=prompt, max_tokens=0, echo=True)["choices"][0]
    assert no_logprobs["text"] == prompt and no_logprobs["logprobs"] is None
    err = post(server, "/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 0})
    assert err.status_code == 400 and err.json()["error"]["param"] == "max_tokens"


def stream(server: Server, body: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    return chunks


def test_streamed_echo_equals_the_whole(server: Server):
    body = {"model": NAME, "prompt": "Hello world, this is a test", "max_tokens": 6, "echo": True,
            "logprobs": 2, "temperature": 0, "ignore_eos": True}  # fmt: skip
    whole = completion(server, **body)["choices"][0]
    chunks = stream(server, {**body, "stream": True})
    text = "".join(c["choices"][0]["text"] for c in chunks)
    merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        for key in merged:
            merged[key] += (c["choices"][0]["logprobs"] or {}).get(key, [])
    assert text == whole["text"]
    assert merged == whole["logprobs"]
    only = stream(
        server, {**body, "max_tokens": 0, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert "".join(c["choices"][0]["text"] for c in only if c["choices"]) == body["prompt"]
    assert only[-1]["usage"]["completion_tokens"] == 0


def test_tokenize_options(server: Server, tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}]
    with_prompt = ok(post(server, "/tokenize", {"model": NAME, "messages": messages}))
    bare = ok(
        post(server, "/tokenize", {"model": NAME, "messages": messages, "add_generation_prompt": False})
    )
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert bare["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert bare["count"] < with_prompt["count"]
    strs = ok(post(server, "/tokenize", {"model": NAME, "prompt": "Hello world", "return_token_strs": True}))
    assert strs["token_strs"] == tokenizer.convert_ids_to_tokens(strs["tokens"])
    plain = ok(post(server, "/tokenize", {"model": NAME, "prompt": "Hello", "add_special_tokens": False}))
    assert plain["tokens"] == tokenizer.encode("Hello", add_special_tokens=False)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    custom = ok(post(server, "/tokenize", {"model": NAME, "messages": messages, "chat_template": template}))
    assert custom["tokens"] == tokenizer.encode("Name a colour.", add_special_tokens=False)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/tokenize", {"prompt": 5}),
        ("/tokenize", {"messages": []}),
        ("/tokenize", {"messages": "hi"}),
        ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{% for %}"}),
        ("/tokenize", {}),
        ("/detokenize", {"tokens": [-1]}),
        ("/detokenize", {"tokens": [10**6]}),
        ("/detokenize", {"tokens": "abc"}),
    ],
)
def test_bad_token_requests_are_400(server: Server, path: str, body: dict):
    r = post(server, path, {"model": NAME, **body})
    assert r.status_code == 400, r.text


def test_token_bytes_over_the_whole_vocabulary(tokenizer):
    """Every token's bytes, and a text's tokens' bytes joining to the text's UTF-8."""
    from glimpse.server.logprobs import TokenBytes

    spell = TokenBytes(tokenizer)
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    for token_id in range(len(tokenizer)):
        raw = spell(token_id, tokenizer.decode([token_id]))
        if token_id in added:
            assert raw == added[token_id].encode()
        else:  # a lone token's bytes decode (with replacement) exactly as the tokenizer decodes it
            assert raw.decode(errors="replace") == tokenizer.decode([token_id]), token_id
    text = "naïve café — 東京 🙂 <think>ok</think>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert b"".join(spell(i, tokenizer.decode([i])) for i in ids) == text.encode()
