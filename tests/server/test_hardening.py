"""[G8] What a hostile client can do to `glimpse serve`, and what the server must do instead.

Each test sends one attack to a real server subprocess and checks the contract of the fix: refused
early with a 400 that says why, in bounded time and memory, while /health keeps answering (see
tests/server/watch.py for the bounds), and the server still serves a normal request afterwards. The
attacks are sized so that a fixed server refuses them in about a second, while a server that does the
work first takes minutes or gigabytes (the timeouts cut those short).

/health must answer within 100 ms during every heavy request (watch.py, Watch: polled every 20 ms by a
process of its own). Slowest answer per watched test on the 2-core test machine (load 4-10), before the
fixes -> after: 20,000 prompts 13 -> 18-63 ms; n=128 40 -> 3-14; 78 MB chat body 258 (the test's own
poller thread waiting for the test's GIL) -> 28-32; 2.4 MB prompt 174 -> 14-18; 24 MB 13 -> 17-22;
trickling media 152-573 (a TLS context built per fetch) -> 14-84, with single answers of 172 and 250 ms
at load 10; PDFs 8 -> 2-18; 16 big images 13-690 (a full garbage collection) -> 24-57.

Two servers: the tiny text model with a 2,048-token context, and tiny-vl with private media URLs
allowed (the trickling media server runs on 127.0.0.1) and at most 8 frames per video. The command
line checks at the end start their own processes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.server.server_process import Server, metrics, start_server
from tests.server.watch import Watch, run_cli

MAX_MODEL_LEN = 2048  # the text server's context
# A refusal that needs no real work must come back within this (plus the time of a trivial request).
FAST_S = 2.0
WORDS = "the quick brown fox jumps over the lazy dog while seven wise owls watch from the old oak "


@pytest.fixture(scope="module")
def text_server():
    s = start_server("tiny", "--max-model-len", str(MAX_MODEL_LEN))
    yield s
    s.stop()
    assert "Traceback" not in s.log(), s.log()[-5000:]
    s.remove_log()


@pytest.fixture(scope="module")
def vl_server():
    s = start_server("tiny-vl", "--allow-private-media-urls", "--max-video-frames", "8")
    yield s
    s.stop()
    assert "Traceback" not in s.log(), s.log()[-5000:]
    s.remove_log()


# ------------------------------------------------------------------------------------------- helpers


def post(
    server: Server, path: str, body: dict | str | bytes, timeout: float = 60
) -> tuple[httpx.Response, float]:
    """POST a body (a dict, or raw JSON text); the response and the seconds it took. A response that
    does not come within `timeout` fails the test (the server kept working on something it should have
    refused)."""
    content = json.dumps(body) if isinstance(body, dict) else body
    started = time.monotonic()
    try:
        r = httpx.post(f"{server.url}{path}", content=content, timeout=timeout,
                       headers={"Content-Type": "application/json"})  # fmt: skip
    except httpx.TimeoutException:
        pytest.fail(f"POST {path} got no answer in {timeout:g} s")
    return r, time.monotonic() - started


def refused(r: httpx.Response, *statuses: int) -> dict:
    """The error object of a refusal with one of `statuses` (default 400)."""
    statuses = statuses or (400,)
    assert r.status_code in statuses, f"expected {statuses}, got {r.status_code}: {r.text[:500]}"
    err = r.json()["error"]
    assert err["code"] == r.status_code and err["type"] == "invalid_request_error" and err["message"]
    return err


def trivial_seconds(server: Server) -> float:
    """How long a request refused by validation takes right now: the machine's own latency."""
    _, seconds = post(server, "/v1/completions", {"model": "x", "prompt": "hi", "max_tokens": 0}, timeout=30)
    return seconds


def assert_serves(server: Server, model: str) -> None:
    """A normal request still gets its answer."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
    r, _ = post(server, "/v1/chat/completions", body, timeout=60)
    assert r.status_code == 200, r.text[:500]
    assert r.json()["usage"]["completion_tokens"] >= 1


def forward_tokens(server: Server) -> float:
    return metrics(server)["forward_tokens_total"]


def numbers_in(text: str) -> list[int]:
    return [int(x.replace(",", "")) for x in re.findall(r"\d[\d,]*", text)]


# ---------------------------------------------------------------------------- 6. numbers must be finite

PROMPTS = {
    "/v1/completions": '"prompt": "Hello"',
    "/v1/chat/completions": '"messages": [{"role": "user", "content": "Hello"}]',
}
NON_FINITE = [
    ("temperature", "Infinity"),
    ("temperature", "1e400"),  # valid JSON; overflows to inf
    ("temperature", "NaN"),
    ("repetition_penalty", "Infinity"),
    ("repetition_penalty", "1e400"),
    ("top_p", "NaN"),
    ("presence_penalty", "-Infinity"),
    ("min_p", "NaN"),
]


@pytest.mark.parametrize("path", list(PROMPTS))
@pytest.mark.parametrize(("field", "literal"), NON_FINITE)
def test_non_finite_numbers_are_refused(text_server: Server, path: str, field: str, literal: str):
    """[fix] every float field must be finite: `Infinity`, `1e400` and `NaN` in the raw JSON are a 400
    naming the field (never a 200 sampled with an infinite temperature, never a 500)."""
    body = f'{{"model": "tiny", "max_tokens": 1, {PROMPTS[path]}, "{field}": {literal}}}'
    r, _ = post(text_server, path, body)
    err = refused(r)
    assert field in err["message"] or err["param"] == field, err


@pytest.mark.parametrize("path", list(PROMPTS))
def test_max_tokens_over_the_room_left_is_refused(text_server: Server, path: str):
    """[fix] as vLLM: max_tokens (or max_completion_tokens) above max_model_len - prompt tokens is a 400,
    not silently capped (today 10**12 is capped and the request generates up to the context's end)."""
    base = json.loads("{" + PROMPTS[path] + "}") | {"model": "tiny"}
    names = ["max_tokens"] + (["max_completion_tokens"] if "chat" in path else [])
    for name in names:
        for value in (10**12, MAX_MODEL_LEN):  # the prompt takes at least one token of the context
            r, _ = post(text_server, path, base | {name: value}, timeout=30)
            err = refused(r)
            assert "max_tokens" in err["message"] or "max_completion_tokens" in err["message"], err
            assert str(MAX_MODEL_LEN) in err["message"], f"the message should give the context length: {err}"


@pytest.mark.parametrize("path", list(PROMPTS))
def test_json_schema_format_needs_its_schema(text_server: Server, path: str):
    """[fix] response_format {"type": "json_schema", "json_schema": {"name": ...}} without "schema" is a 400
    (today it silently becomes "any JSON object")."""
    base = json.loads("{" + PROMPTS[path] + "}")
    body = base | {"model": "tiny", "max_tokens": 4,
                   "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}  # fmt: skip
    r, _ = post(text_server, path, body)
    err = refused(r)
    assert "schema" in err["message"], err


# --------------------------------------------------------------------- 1. unbounded completions batches

TEN_IDS = list(range(5, 15))


@pytest.mark.parametrize(
    ("prompts", "n"),
    [(20_000, 1), (100, 128)],
    ids=["20000-prompts", "100-prompts-n128"],
)
def test_completions_batch_over_the_cap_is_refused_unprocessed(text_server: Server, prompts: int, n: int):
    """[fix] a cap on prompts per request and on n x prompts (sequences): over it is a 400 whose message
    names the cap, answered before any of them reaches the engine (no forward tokens counted).
    Today 20,000 prompts run one by one (minutes); so do 100 prompts x n=128."""
    before = forward_tokens(text_server)
    fast = FAST_S + trivial_seconds(text_server)
    body = {"model": "tiny", "prompt": [TEN_IDS] * prompts, "n": n, "max_tokens": 1}
    with Watch(text_server) as watch:
        r, seconds = post(text_server, "/v1/completions", body, timeout=20)
    err = refused(r)
    caps = [x for x in numbers_in(err["message"]) if 1 < x < prompts * n]
    assert caps, f"the message should name the cap (a number below {prompts * n}): {err['message']}"
    assert seconds < fast, f"refused only after {seconds:.1f} s"
    assert forward_tokens(text_server) == before, "the engine ran some of the prompts before refusing"
    watch.check_health()
    assert_serves(text_server, "tiny")


# ------------------------------------------------------------------------------ 2. event loop blocks


def words(size: int) -> str:
    return (WORDS * (size // len(WORDS) + 1))[:size]


def test_huge_chat_body_is_parsed_off_the_event_loop(text_server: Server):
    """[fix] a 78 MB chat body (under --max-request-bytes) is parsed off the event loop and its one
    message, far over the context, refused with a 400 without rendering or tokenising it; /health
    answers all along. Today the loop parses it and a thread tokenises it for minutes."""
    size = 78_000_000
    head = b'{"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "'
    body = head + words(size).encode() + b'"}]}'
    with Watch(text_server) as watch:
        r, seconds = post(text_server, "/v1/chat/completions", body, timeout=40)
    refused(r)
    assert seconds < 10, f"refused only after {seconds:.1f} s (sending and parsing 78 MB takes ~1 s)"
    watch.check_health()
    watch.check_rss(8 * size / 2**20 + 150)
    assert_serves(text_server, "tiny")


@pytest.mark.parametrize("size", [2_400_000, 24_000_000], ids=["2.4MB", "24MB"])
def test_prompt_far_over_the_context_is_refused_before_tokenising(text_server: Server, size: int):
    """[fix] a prompt whose length in characters is far over the context (chars > a small multiple of
    max_model_len: here 1,170 and 11,700 characters per token of context) is a 400 before tokenising,
    in about the time of a trivial request; /health keeps answering; memory stays near the body's size.
    Today the prompt is tokenised on the event loop: 2.4 MB blocks /health for ~9 s, 24 MB for minutes
    and ~3 GB."""
    body = json.dumps({"model": "tiny", "prompt": words(size), "max_tokens": 1})
    fast = FAST_S + trivial_seconds(text_server)
    with Watch(text_server) as watch:
        r, seconds = post(text_server, "/v1/completions", body, timeout=30)
    refused(r)
    assert seconds < fast, f"refused only after {seconds:.1f} s"
    watch.check_health()
    watch.check_rss(8 * size / 2**20 + 150)
    assert_serves(text_server, "tiny")


# ------------------------------------------------------------------- 3. media work starves everything


class TrickleServer:
    """An HTTP server on 127.0.0.1 whose every GET promises a 100,000-byte PNG and sends one byte per
    0.5 s. `started` counts the fetches that began, `active` those still connected."""

    def __init__(self) -> None:
        self.started = 0
        self.active = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner.lock:
                    owner.started += 1
                    owner.active += 1
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    for _ in range(100_000):
                        if owner.stopping.is_set():
                            break
                        self.wfile.write(b"\x89")
                        self.wfile.flush()
                        owner.stopping.wait(0.5)
                except OSError:  # the fetcher hung up: exactly what the test hopes for
                    pass
                finally:
                    with owner.lock:
                        owner.active -= 1

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self) -> TrickleServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def wait(self, condition, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if condition(self):
                    return True
            time.sleep(0.05)
        return False


def test_trickling_media_does_not_starve_text_requests(vl_server: Server):
    """[fix] media fetching and decoding run in a pool of their own with a bounded queue, and a request's
    media work is cancelled when its client disconnects. With 8 requests (more on bigger machines:
    cores + 5, the size of Python's default thread pool + 1) whose image trickles in at 1 byte per
    0.5 s, a plain text request completes in < 2 s; once their clients give up (after 5 s), their
    fetches stop within 5 s. Today the fetches fill the thread pool the text request also needs, which
    then waits for the 30 s fetch timeout; and fetches go on after their clients are gone."""
    hanging = max(8, (os.cpu_count() or 1) + 5)
    give_up_s = 5.0
    fast = FAST_S + trivial_seconds(vl_server)

    def hang(i: int, url: str) -> None:
        part = {"type": "image_url", "image_url": {"url": url}}
        body = {"model": "tiny-vl", "max_tokens": 1,
                "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}]}  # fmt: skip
        try:
            httpx.post(f"{vl_server.url}/v1/chat/completions", json=body, timeout=give_up_s)
        except httpx.HTTPError:
            pass  # timed out: the client disconnects

    with TrickleServer() as trickle, Watch(vl_server) as watch:
        clients = [
            threading.Thread(target=hang, args=(i, trickle.url(f"slow{i}.png"))) for i in range(hanging)
        ]
        for c in clients:
            c.start()
        assert trickle.wait(lambda t: t.started >= 1, timeout=give_up_s - 1), "no media fetch began"
        time.sleep(0.5)
        text = {"model": "tiny-vl", "max_tokens": 2, "messages": [{"role": "user", "content": "Say hi."}]}
        r, seconds = post(vl_server, "/v1/chat/completions", text, timeout=20)
        assert r.status_code == 200, r.text[:500]
        assert seconds < fast, f"a text request took {seconds:.1f} s while media trickled in"
        for c in clients:
            c.join()
        stopped = trickle.wait(lambda t: t.active == 0, timeout=5.0)
        assert stopped, f"{trickle.active} media fetches still running 5 s after their clients disconnected"
    watch.check_health()
    assert_serves(vl_server, "tiny-vl")


# ------------------------------------------------------------------------------- 4. marker injection

MARKER = "\u0000media{}\u0000"  # the shape of the processor's internal placeholder


def png(width: int, height: int, color=(200, 40, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def image_part(data: bytes) -> dict:
    return {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()},
    }


def vl_chat(server: Server, parts: list[dict], text: str, timeout: float = 120, **extra) -> httpx.Response:
    body = {"model": "tiny-vl", "max_tokens": 1,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}], **extra}  # fmt: skip
    r, _ = post(server, "/v1/chat/completions", body, timeout=timeout)
    return r


def prompt_tokens(r: httpx.Response) -> int:
    assert r.status_code == 200, r.text[:500]
    return r.json()["usage"]["prompt_tokens"]


def test_marker_text_is_not_a_placeholder(vl_server: Server):
    """[fix] text can never form the processor's internal media placeholder. Today a message containing
    "\\0media7\\0" is a 500 (IndexError), with or without an image attached."""
    small = image_part(png(64, 64))
    assert vl_chat(vl_server, [], "look: " + MARKER.format(7)).status_code == 200
    assert vl_chat(vl_server, [small], "look: " + MARKER.format(7)).status_code == 200
    assert vl_chat(vl_server, [small], "look: " + MARKER.format(0)).status_code == 200
    system = {"role": "system", "content": MARKER.format(3)}
    body = {"model": "tiny-vl", "max_tokens": 1,
            "messages": [system, {"role": "user", "content": [small, {"type": "text", "text": "hi"}]}]}  # fmt: skip
    r, _ = post(vl_server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text[:500]


def test_marker_cannot_repeat_an_attached_image(vl_server: Server):
    """[fix] with one image attached and 50 copies of its placeholder in the text, the image is in the
    prompt once (the markers' text is stripped or escaped), so --limit-mm-per-prompt holds.

    Measured without knowing how the text is escaped: the same request is sent with the image cut into
    1 tile and into 4 tiles + a thumbnail (mm_processor_kwargs.max_num_tiles); the difference in
    prompt tokens is the image's extra 1,024 tokens once. Today every marker splices the image again:
    51 images, over the 49,152-token context at 5 tiles each."""
    square = image_part(png(1024, 1024))
    markers = "compare " + MARKER.format(0) * 50
    plain = {k: prompt_tokens(vl_chat(vl_server, [square], "compare", mm_processor_kwargs={"max_num_tiles": k}))
             for k in (1, 4)}  # fmt: skip
    once = plain[4] - plain[1]
    assert once == 4 * 256, f"one image at 4 tiles + thumbnail vs 1 tile should differ by 1024, got {once}"
    r4 = vl_chat(vl_server, [square], markers, mm_processor_kwargs={"max_num_tiles": 4})
    assert r4.status_code == 200, f"the markers were spliced as images: {r4.text[:300]}"
    r1 = vl_chat(vl_server, [square], markers, mm_processor_kwargs={"max_num_tiles": 1})
    spliced = prompt_tokens(r4) - prompt_tokens(r1)
    assert spliced == once, f"the image is in the prompt {spliced / once:g} times"


# ----------------------------------------------------------------------------- 5. limits checked late


def blank_pdf(pages: int) -> bytes:
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument.new()
    for _ in range(pages):
        doc.new_page(612, 792)  # US letter: 1020 x 1320 px at 120 dpi, 12 tiles + thumbnail
    buf = io.BytesIO()
    doc.save(buf)
    doc.close()
    return buf.getvalue()


def test_pdf_pages_times_tiles_refused_before_rendering(vl_server: Server):
    """[fix] 4 PDFs of 32 blank letter pages each (every limit met one by one: 4 files, 32 pages) make a
    prompt of ~427,000 tokens: refused from pages x tiles estimated before rendering, within ~2 s and
    without the memory of 128 rendered pages. Today all 128 pages are rendered and tiled first
    (~50 s on 2 busy cores, +1.4 GB) and only then refused for the context."""
    data = "data:application/pdf;base64," + base64.b64encode(blank_pdf(32)).decode()
    files = [{"type": "file", "file": {"file_data": data, "filename": f"blank{i}.pdf"}} for i in range(4)]
    fast = FAST_S + trivial_seconds(vl_server)
    with Watch(vl_server) as watch:
        r, seconds = post(vl_server, "/v1/chat/completions",
                          {"model": "tiny-vl", "max_tokens": 1,
                           "messages": [{"role": "user", "content": [*files, {"type": "text", "text": "Sum up."}]}]},
                          timeout=20)  # fmt: skip
    refused(r, 400, 413)
    assert seconds < fast, f"refused only after {seconds:.1f} s"
    watch.check_rss(300)
    watch.check_health()
    assert_serves(vl_server, "tiny-vl")


def mp4(frames: int, fps: int, size: int = 64) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(frames):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def without_pictures(video: bytes) -> bytes:
    """The same MP4 with its coded pictures zeroed: the container metadata (frame count, rate) is intact,
    but not one frame decodes."""
    at = video.find(b"mdat")
    size = int.from_bytes(video[at - 4 : at], "big")
    return video[: at + 4] + bytes(size - 8) + video[at - 4 + size :]


def test_video_frames_limit_checked_from_metadata(vl_server: Server):
    """[fix] a video whose sampling gives more frames than --max-video-frames (here 10 s at 8 fps sampled
    at 2 fps: 20 > 8) is a 413 from the container's metadata, before any frame is decoded: the same clip
    with undecodable pictures gets the same 413. Today the first frame is decoded first, so the broken
    clip is a 400 "can't be decoded" instead."""
    clip = mp4(frames=80, fps=8)
    for data in (clip, without_pictures(clip)):
        part = {
            "type": "video_url",
            "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()},
        }
        r = vl_chat(
            vl_server, [part], "What happens?", media_io_kwargs={"video": {"fps": 2, "num_frames": 128}}
        )
        err = refused(r, 413)
        assert "frames" in err["message"] and 8 in numbers_in(err["message"]), err


def test_repeated_big_image_is_decoded_once(vl_server: Server):
    """[fix] 16 copies of one big PNG (6000 x 6000, 36 MP, flat) in one request are decoded once (same
    bytes, same result). Timed against 16 copies of a 64 x 64 PNG with the same prompt length (one tile
    each), so the prefill cancels out: the big copies may cost at most ~3 decodes more, not 16. Today
    each copy is decoded and tiled again."""
    big, small = image_part(png(6000, 6000)), image_part(png(64, 64))
    one_tile = {"mm_processor_kwargs": {"max_num_tiles": 1}}

    def seconds(parts: list[dict], timeout: float = 300) -> float:
        started = time.monotonic()
        r = vl_chat(vl_server, parts, "Describe.", timeout=timeout, **one_tile)
        assert r.status_code == 200, r.text[:500]
        return time.monotonic() - started

    decode = seconds([big]) - seconds([small])
    baseline = seconds([small] * 16)
    allowed = baseline + 3 * max(decode, 0.2) + 1.0
    with Watch(vl_server) as watch:
        took = seconds([big] * 16, timeout=allowed + 5)
    assert took < allowed, (
        f"16 copies took {took:.1f} s; one decode is {decode:.1f} s, the prompt {baseline:.1f} s"
    )
    watch.check_rss(1024)
    assert_serves(vl_server, "tiny-vl")


# ------------------------------------------------------------------------- 7. start-up failures


def assert_clean_failure(res, *needles: str) -> None:
    """Exited non-zero with one error line naming `needles`, no traceback, and no model loaded."""
    tail = res.output[-3000:]
    assert not res.timed_out, f"still running after {res.seconds:.0f} s:\n{tail}"
    assert res.returncode != 0, tail
    assert "Traceback" not in res.output, tail
    assert "engine ready" not in res.output, f"the model was loaded before the failure:\n{tail}"
    errors = [line for line in res.output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, f"expected one error line, got {errors}:\n{tail}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"


def test_serve_on_an_impossible_port_fails_before_loading(tmp_path):
    """[fix] `glimpse serve tiny --port 99999`: refused when the flags are read. Today the model loads
    first, then uvicorn's bind raises OverflowError with a traceback."""
    assert_clean_failure(run_cli(["serve", "tiny", "--port", "99999"], cwd=str(tmp_path)), "99999")


def test_serve_on_a_busy_port_fails_before_loading(tmp_path):
    """[fix] the port is checked (bound) before the model loads: a busy port is a one-line error naming
    it. Today the model loads first, then uvicorn reports the busy address."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        res = run_cli(["serve", "tiny", "--host", "127.0.0.1", "--port", port], cwd=str(tmp_path))
    assert_clean_failure(res, port)


def test_make_tiny_onto_a_file_is_a_clean_error(tmp_path):
    """[fix] `glimpse make-tiny DIR` where DIR is an existing file: one error line, no traceback (today a
    FileExistsError traceback)."""
    target = tmp_path / "not-a-dir"
    target.write_text("keep me")
    assert_clean_failure(run_cli(["make-tiny", str(target)], cwd=str(tmp_path)), str(target))
    assert target.read_text() == "keep me"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_bench_full_size_random_weights_on_cpu_is_a_clean_error(tmp_path):
    """[fix] `glimpse bench --random-weights nemotron-nano-12b-v2` on a CPU-only machine is refused at
    once (a 12B model in float32 is ~48 GB) with one error line, before allocating it. Run under an
    8 GiB address-space cap; today it allocates until the cap stops it, with a traceback."""
    res = run_cli(["bench", "--random-weights", "nemotron-nano-12b-v2", "--json", str(tmp_path / "b.json")],
                  timeout=120, cwd=str(tmp_path))  # fmt: skip
    tail = res.output[-3000:]
    assert not res.timed_out and res.returncode != 0, tail
    assert "Traceback" not in res.output, tail
    assert res.seconds < 60, f"took {res.seconds:.0f} s to refuse"
    assert res.peak_rss_mb < 2048, f"peaked at {res.peak_rss_mb:.0f} MiB before refusing"
    errors = [line for line in res.output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, errors
