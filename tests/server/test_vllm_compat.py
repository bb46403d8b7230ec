"""[G8] Drop-in for vLLM users: `glimpse serve` takes vLLM's flags and answers vLLM's extra routes and fields.

Three servers: `server` (the tiny text model, one served name, test hooks on) for the routes and request
fields; `flags_server`, started the way a vLLM user would (`serve --model tiny-vl` with several served
names, CORS, media limits in vLLM's `image=4,video=1` form and the flags that mean nothing to Glimpse);
and an HTTPS server from --ssl-keyfile/--ssl-certfile. Flag parsing alone is checked in-process too,
one flag at a time, so a missing flag is named on its own.

Contracts not spelt out in the issue, chosen here as vLLM behaves: `--max-logprobs N` is enforced
(logprobs / top_logprobs above N is a 400); `/tokenize` counts a prompt as /v1/completions does and
messages as /v1/chat/completions does (generation prompt included); a flag that does nothing in Glimpse
leaves one log line that names it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time

import httpx
import openai
import pytest

from tests.server.server_process import Server, start_server
from tests.server.watch import launch, wait_for_log

NAME = "glimpse-tiny"
NAMES = ("vl-a", "vl-b")
ALLOWED_ORIGIN = "http://a.example"
OTHER_ORIGIN = "http://b.example"
MAX_LOGPROBS = 25  # above OpenAI's 20: the cap is the server's flag, not the schema's
NOOP_FLAGS = ("--trust-remote-code", "--disable-log-requests", "--enable-auto-tool-choice",
              "--tool-call-parser", "--reasoning-parser")  # fmt: skip


@pytest.fixture(scope="module")
def server():
    s = start_server("tiny", "--served-model-name", NAME)
    yield s
    s.stop()
    assert "Traceback" not in s.log(), s.log()[-5000:]
    s.remove_log()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from glimpse.model.loading import resolve_model_path

    return AutoTokenizer.from_pretrained(str(resolve_model_path("tiny")))


@pytest.fixture(scope="module")
def flags_server(tmp_path_factory):
    from glimpse.model.loading import resolve_model_path

    download = tmp_path_factory.mktemp("downloads")
    s = launch([
        "serve", "--model", "tiny-vl", "--served-model-name", *NAMES,
        "--trust-remote-code", "--disable-log-requests", "--enable-auto-tool-choice",
        "--tool-call-parser", "hermes", "--reasoning-parser", "deepseek_r1",
        "--max-logprobs", str(MAX_LOGPROBS), "--limit-mm-per-prompt", "image=4,video=1",
        "--tokenizer", str(resolve_model_path("tiny-vl")), "--revision", "main", "--download-dir", str(download),
        "--allowed-origins", json.dumps([ALLOWED_ORIGIN]), "--allowed-methods", json.dumps(["GET", "POST"]),
        "--allowed-headers", json.dumps(["Authorization", "Content-Type"]),
    ])  # fmt: skip
    yield s
    s.stop()
    assert "Traceback" not in s.log(), s.log()[-5000:]
    s.remove_log()


def post(server: Server, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=timeout)


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, f"{r.status_code}: {r.text[:500]}"
    return r.json()


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:500]}"
    err = r.json()["error"]
    assert err["code"] == status and err["message"]
    return err


def chat_body(model: str, text: str = "Say hi.", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 2, **extra}


# ----------------------------------------------------------------------------- flags, parsed in-process

FLAGS = {
    "model-flag": ["--model", "tiny"],
    "served-model-names": ["tiny", "--served-model-name", "a", "b"],
    "trust-remote-code": ["tiny", "--trust-remote-code"],
    "enable-auto-tool-choice": ["tiny", "--enable-auto-tool-choice"],
    "tool-call-parser": ["tiny", "--tool-call-parser", "hermes"],
    "reasoning-parser": ["tiny", "--reasoning-parser", "deepseek_r1"],
    "max-logprobs": ["tiny", "--max-logprobs", "20"],
    "disable-log-requests": ["tiny", "--disable-log-requests"],
    "limit-mm-key-value": ["tiny", "--limit-mm-per-prompt", "image=4,video=1"],
    "limit-mm-json": ["tiny", "--limit-mm-per-prompt", '{"image": 4, "video": 1}'],
    "quantization": ["tiny", "--quantization", "modelopt"],
    "tokenizer": ["tiny", "--tokenizer", "tiny"],
    "revision": ["tiny", "--revision", "main"],
    "download-dir": ["tiny", "--download-dir", "/tmp/glimpse-downloads"],
    "ssl": ["tiny", "--ssl-keyfile", "key.pem", "--ssl-certfile", "cert.pem"],
    "allowed-origins": ["tiny", "--allowed-origins", '["http://a.example"]'],
    "allowed-methods": ["tiny", "--allowed-methods", '["GET", "POST"]'],
    "allowed-headers": ["tiny", "--allowed-headers", '["*"]'],
}


def parse_serve(flags: list[str]):
    from glimpse.cli import build_parser

    try:
        return build_parser().parse_args(["serve", *flags])
    except SystemExit:
        pytest.fail(f"`glimpse serve {' '.join(flags)}` is refused by the flag parser")


@pytest.mark.parametrize("flags", list(FLAGS.values()), ids=list(FLAGS))
def test_serve_accepts_vllm_flag(flags: list[str]):
    """[fix] every flag vLLM users pass to `vllm serve` is accepted by `glimpse serve`."""
    parse_serve(flags)


def test_model_flag_and_positional_mean_the_same():
    """[fix] `glimpse serve --model M` is `glimpse serve M` (vLLM accepts both)."""
    assert parse_serve(["--model", "tiny"]).model == parse_serve(["tiny"]).model == "tiny"


def test_limit_mm_forms_mean_the_same():
    """[fix] `--limit-mm-per-prompt image=4,video=1` (vLLM's key=value form) is the JSON form."""
    kv = parse_serve(["tiny", "--limit-mm-per-prompt", "image=4,video=1"]).limit_mm_per_prompt
    js = parse_serve(["tiny", "--limit-mm-per-prompt", '{"image": 4, "video": 1}']).limit_mm_per_prompt
    assert kv == js


# ----------------------------------------------------------------------------------- the flags server


def test_models_lists_every_served_name(flags_server: Server):
    """[fix] `--served-model-name a b`: /v1/models lists both, in order; /v1/models/{id} answers each."""
    listed = ok(httpx.get(f"{flags_server.url}/v1/models", timeout=30))
    assert [m["id"] for m in listed["data"]] == list(NAMES)
    for name in NAMES:
        assert ok(httpx.get(f"{flags_server.url}/v1/models/{name}", timeout=30))["id"] == name
    error(httpx.get(f"{flags_server.url}/v1/models/tiny-vl", timeout=30), 404)


def test_requests_with_any_served_name(flags_server: Server):
    """[fix] a request naming any of the served names is answered; another name is a 404."""
    for name in NAMES:
        assert ok(post(flags_server, "/v1/chat/completions", chat_body(name)))["choices"]
        assert ok(post(flags_server, "/v1/completions", {"model": name, "prompt": "Hi", "max_tokens": 2}))
    error(post(flags_server, "/v1/chat/completions", chat_body("tiny-vl")), 404)


def test_cors_preflight_follows_allowed_origins(flags_server: Server):
    """[fix] --allowed-origins '["http://a.example"]': a preflight from that origin is answered with
    Access-Control-Allow-Origin; one from another origin gets no such header. The same for a GET."""
    url = f"{flags_server.url}/v1/chat/completions"
    asked = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    r = httpx.options(url, headers={"Origin": ALLOWED_ORIGIN, **asked}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers.get("access-control-allow-origin") in (ALLOWED_ORIGIN, "*"), dict(r.headers)
    assert "POST" in r.headers.get("access-control-allow-methods", ""), dict(r.headers)
    r = httpx.options(url, headers={"Origin": OTHER_ORIGIN, **asked}, timeout=30)
    assert "access-control-allow-origin" not in r.headers, dict(r.headers)
    r = httpx.get(f"{flags_server.url}/v1/models", headers={"Origin": ALLOWED_ORIGIN}, timeout=30)
    assert r.headers.get("access-control-allow-origin") in (ALLOWED_ORIGIN, "*"), dict(r.headers)
    r = httpx.get(f"{flags_server.url}/v1/models", headers={"Origin": OTHER_ORIGIN}, timeout=30)
    assert "access-control-allow-origin" not in r.headers, dict(r.headers)


def test_noop_flags_are_noted_in_the_log(flags_server: Server):
    """[fix] flags that change nothing in Glimpse are accepted with a one-line note naming each."""
    lines = [line.lower().replace("_", "-") for line in flags_server.log().splitlines()]
    for flag in NOOP_FLAGS:
        noting = [line for line in lines if flag[2:] in line]
        assert noting, f"no log line notes {flag}"


def test_limit_mm_key_value_form_holds(flags_server: Server):
    """[fix] `--limit-mm-per-prompt image=4,video=1`: 5 images or 2 videos in a request are a 400 that
    names the limit (nothing is decoded to find out)."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    for parts, allowed in (([image] * 5, 4), ([video] * 2, 1)):
        body = {"model": NAMES[0], "max_tokens": 1,
                "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}]}  # fmt: skip
        err = error(post(flags_server, "/v1/chat/completions", body), 400)
        assert "limit-mm-per-prompt" in err["message"] and str(allowed) in err["message"], err


def test_max_logprobs_is_enforced(flags_server: Server):
    """[fix] as vLLM: with --max-logprobs N, asking for more than N log-probabilities is a 400 naming N,
    and up to N (here 25, over OpenAI's 20) is answered with that many, on both endpoints."""
    over = MAX_LOGPROBS + 1
    chat = chat_body(NAMES[0], logprobs=True, top_logprobs=over)
    err = error(post(flags_server, "/v1/chat/completions", chat), 400)
    assert str(MAX_LOGPROBS) in err["message"] and "max-logprobs" in err["message"], err
    assert err["param"] == "top_logprobs", err
    body = {"model": NAMES[0], "prompt": "Hi", "max_tokens": 2, "logprobs": over}
    err = error(post(flags_server, "/v1/completions", body), 400)
    assert str(MAX_LOGPROBS) in err["message"] and err["param"] == "logprobs", err

    answer = ok(post(flags_server, "/v1/chat/completions",
                     chat_body(NAMES[0], logprobs=True, top_logprobs=MAX_LOGPROBS)))  # fmt: skip
    steps = answer["choices"][0]["logprobs"]["content"]
    assert steps and all(len(step["top_logprobs"]) == MAX_LOGPROBS for step in steps)
    # (completions' top_logprobs are keyed by text, so tokens that decode alike share an entry: no count)
    answer = ok(post(flags_server, "/v1/completions", body | {"logprobs": MAX_LOGPROBS}))
    assert answer["choices"][0]["logprobs"]["top_logprobs"]


def test_default_max_logprobs_is_20(server: Server):
    """Without the flag the cap is vLLM's default, 20: 21 is a 400 that names it."""
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 1, "logprobs": 21}
    err = error(post(server, "/v1/completions", body), 400)
    assert "20" in err["message"] and "max-logprobs" in err["message"], err
    ok(post(server, "/v1/completions", body | {"logprobs": 20}))


# ------------------------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    """(key file, certificate file): a self-signed certificate for 127.0.0.1, made with `cryptography`
    if installed, else with the openssl command; skipped if neither is there."""
    folder = tmp_path_factory.mktemp("tls")
    key, cert = str(folder / "key.pem"), str(folder / "cert.pem")
    try:
        self_signed_with_cryptography(key, cert)
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("neither the cryptography package nor the openssl command is available")
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True)  # fmt: skip
    return key, cert


def self_signed_with_cryptography(key_path: str, cert_path: str) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))  # fmt: skip
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def test_https_with_ssl_flags(certificate: tuple[str, str]):
    """[fix] --ssl-keyfile/--ssl-certfile: the server speaks HTTPS with that certificate (and the openai
    client talks to it)."""
    import ssl

    key, cert = certificate
    s = launch(["serve", "tiny", "--ssl-keyfile", key, "--ssl-certfile", cert], tls_ca=cert)
    try:
        context = ssl.create_default_context(cafile=cert)
        assert httpx.get(f"{s.url}/health", verify=context, timeout=30).status_code == 200
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0,
                               http_client=httpx.Client(verify=context, timeout=60))  # fmt: skip
        assert [m.id for m in client.models.list().data] == ["tiny"]
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{s.port}/health", timeout=10)
    finally:
        s.stop()
    assert "Traceback" not in s.log(), s.log()[-5000:]
    s.remove_log()


# ------------------------------------------------------------------------------------------------ routes


def test_tokenize_a_prompt(server: Server, tokenizer):
    """[fix] POST /tokenize {"model", "prompt"} -> {"count", "max_model_len", "tokens"}, counted as
    /v1/completions counts the same prompt."""
    prompt = "Hello world, how are you?"
    out = ok(post(server, "/tokenize", {"model": NAME, "prompt": prompt}))
    assert out["tokens"] == tokenizer.encode(prompt)
    assert out["count"] == len(out["tokens"])
    models = ok(httpx.get(f"{server.url}/v1/models", timeout=30))
    assert out["max_model_len"] == models["data"][0]["max_model_len"]
    usage = ok(post(server, "/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 1}))["usage"]
    assert out["count"] == usage["prompt_tokens"]


def test_tokenize_messages(server: Server):
    """[fix] POST /tokenize {"model", "messages"} counts the rendered chat prompt (with the generation
    prompt) exactly as /v1/chat/completions does."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    out = ok(post(server, "/tokenize", {"model": NAME, "messages": messages}))
    usage = ok(post(server, "/v1/chat/completions", {"model": NAME, "messages": messages, "max_tokens": 1}))
    assert out["count"] == len(out["tokens"]) == usage["usage"]["prompt_tokens"]


def test_detokenize(server: Server, tokenizer):
    """[fix] POST /detokenize {"model", "tokens"} -> {"prompt"}."""
    text = "Hello world, how are you?"
    out = ok(post(server, "/detokenize", {"model": NAME, "tokens": tokenizer.encode(text)}))
    assert out["prompt"] == text


def test_tokenize_routes_check_the_model(server: Server):
    """[fix] /tokenize and /detokenize name the model like every other route: another name is a 404."""
    ok(post(server, "/tokenize", {"model": NAME, "prompt": "hi"}))
    ok(post(server, "/detokenize", {"model": NAME, "tokens": [5, 6]}))
    error(post(server, "/tokenize", {"model": "no-such-model", "prompt": "hi"}), 404)
    error(post(server, "/detokenize", {"model": "no-such-model", "tokens": [5, 6]}), 404)


def test_version_and_ping(server: Server):
    """[fix] GET /version -> {"version": "..."}; GET /ping -> 200."""
    version = ok(httpx.get(f"{server.url}/version", timeout=30))["version"]
    assert isinstance(version, str) and version
    assert httpx.get(f"{server.url}/ping", timeout=30).status_code == 200


def test_model_by_id(server: Server):
    """[fix] GET /v1/models/{id}: the card for the served name, a 404 (not_found_error) for any other."""
    card = ok(httpx.get(f"{server.url}/v1/models/{NAME}", timeout=30))
    assert card["id"] == NAME and card["object"] == "model"
    err = error(httpx.get(f"{server.url}/v1/models/other", timeout=30), 404)
    assert err["type"] == "not_found_error"


# ---------------------------------------------------------------------------------------- request fields


def test_chat_template_in_the_request(server: Server, tokenizer):
    """[fix] `chat_template` in a chat request replaces the model's template for that request."""
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    messages = [{"role": "user", "content": "Name a colour."}]
    rendered = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)  # fmt: skip
    expected = len(tokenizer.encode(rendered, add_special_tokens=False))
    default = ok(post(server, "/v1/chat/completions", chat_body(NAME, "Name a colour.")))["usage"]
    custom = ok(
        post(server, "/v1/chat/completions", chat_body(NAME, "Name a colour.", chat_template=template))
    )
    assert default["prompt_tokens"] != expected, "the test template must differ from the model's"
    assert custom["usage"]["prompt_tokens"] == expected


def test_chat_template_kwargs_reach_the_template(server: Server, tokenizer):
    """`chat_template_kwargs` are passed to the template (enable_thinking changes the prompt)."""
    messages = [{"role": "user", "content": "Name a colour."}]
    for kwargs in ({"enable_thinking": False}, {"enable_thinking": True}):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        expected = len(tokenizer.encode(text, add_special_tokens=False))
        usage = ok(
            post(
                server, "/v1/chat/completions", chat_body(NAME, "Name a colour.", chat_template_kwargs=kwargs)
            )
        )
        assert usage["usage"]["prompt_tokens"] == expected, kwargs


def test_unknown_fields_are_warned_about(server: Server):
    """[fix] a field the server does not know is ignored (still 200) with a warning in the log naming it."""
    for path, body in (
        ("/v1/chat/completions", chat_body(NAME, frobnicate_level_q7=3)),
        ("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 2, "zorp_mode_k2": True}),
    ):
        ok(post(server, path, body))
    log = wait_for_log(server, "zorp_mode_k2")
    assert "frobnicate_level_q7" in log and "zorp_mode_k2" in log, "no warning names the unknown fields"


def test_failed_request_is_logged_with_its_reason(server: Server):
    """[fix] a refused request leaves a log line with the reason the client was given."""
    err = error(post(server, "/v1/chat/completions", chat_body("no-such-model-5kq")), 404)
    over = {"model": NAME, "prompt": list(range(5, 15)) * 900, "max_tokens": 1}  # 9,000 tokens > 8,192
    err400 = error(post(server, "/v1/completions", over), 400)
    log = wait_for_log(server, err400["message"])
    for message in (err["message"], err400["message"]):
        assert message in log, f"the log lacks the reason {message!r}"


def test_completions_echo_with_prompt_logprobs(server: Server, tokenizer):
    """[fix] completions with echo and logprobs return the prompt's tokens with their log-probabilities
    (the first one's is null) before the generated ones, as vLLM does."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
    prompt = "Hello world, this is a test"
    for sent in (prompt, tokenizer.encode("Once upon a time")):
        r = client.completions.create(model=NAME, prompt=sent, max_tokens=3, echo=True, logprobs=1,
                                      extra_body={"ignore_eos": True})  # fmt: skip
        lp, n_prompt = r.choices[0].logprobs, r.usage.prompt_tokens
        assert lp.token_logprobs[0] is None
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n_prompt + 3
        assert all(x is not None and math.isfinite(x) and x <= 0 for x in lp.token_logprobs[1:])
        assert "".join(lp.tokens) == r.choices[0].text
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        if isinstance(sent, str):
            assert r.choices[0].text.startswith(prompt)


def test_chat_logprob_bytes_are_the_tokens_bytes(server: Server, tokenizer):
    """[fix] chat logprobs `bytes` are each token's real UTF-8 bytes: a token that holds part of a
    multi-byte character has those partial bytes (not the replacement character's), so the bytes of all
    tokens join to the text's bytes. Checked whole and streamed."""
    forced = "é 漢字 🙂 ok"
    ids = tokenizer.encode(forced, add_special_tokens=False)
    n = len(ids)
    expected = [token_bytes(tokenizer, i) for i in ids]
    assert b"".join(expected) == forced.encode()
    assert any(not is_utf8(b) for b in expected), "the text must have tokens that split a character"
    body = chat_body(NAME, max_tokens=64, logprobs=True, top_logprobs=1, glimpse_forced_output=forced)
    content = ok(post(server, "/v1/chat/completions", body))["choices"][0]["logprobs"]["content"]
    assert [bytes(e["bytes"]) for e in content[:n]] == expected
    streamed = []
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    streamed += (choice.get("logprobs") or {}).get("content") or []
    assert [bytes(e["bytes"]) for e in streamed[:n]] == expected


def is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes a byte-level BPE token stands for: its characters mapped back through GPT-2's table
    (printable Latin-1 bytes are themselves, the other bytes are the characters from U+0100 on)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    byte_of = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in byte_of.values()]
    byte_of.update({chr(256 + k): b for k, b in enumerate(others)})
    return bytes(byte_of[c] for c in tokenizer.convert_ids_to_tokens(token_id))


def test_docs_work_offline(server: Server):
    """[fix] /docs loads nothing from a CDN (the page and what it references come from this server), or
    the server answers 404 there."""
    r = httpx.get(f"{server.url}/docs", timeout=30)
    if r.status_code == 404:
        return
    assert r.status_code == 200
    external = re.findall(r"""(?:src|href|url)\s*[=:(]\s*["']?(https?://[^"')\s]+)""", r.text)
    assert not external and "cdn" not in r.text.lower(), f"/docs loads from elsewhere: {external}"
    for ref in re.findall(r"""(?:src|href)\s*=\s*["'](/[^"']+)""", r.text):
        assert httpx.get(f"{server.url}{ref}", timeout=30).status_code == 200, ref


def test_server_still_serves(server: Server):
    started = time.monotonic()
    ok(post(server, "/v1/chat/completions", chat_body(NAME)))
    assert time.monotonic() - started < 30
