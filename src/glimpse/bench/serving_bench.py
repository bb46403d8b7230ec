"""(f) `online`: Glimpse as users meet it, through the HTTP server under load.

The server runs in a subprocess on 127.0.0.1 and a free port, built by `glimpse.server.app.build_server`
from an `EngineConfig` and a `ServerConfig` (`python -m glimpse.server`, the configuration as JSON on
stdin); N concurrent clients (asyncio + httpx) send a mix of text, image, multi-page PDF and video chat
requests, streaming, each with fresh random content (pictures, pages, frames and words made before the
clock starts), behind one shared system prompt (the part a prefix cache can serve). Measured per run:
time to first token, time per output token, end-to-end latency (mean, p50, p90, p99), request and token
throughput; once with prefix caching on and once with it off (a fresh server each).

The server needs a checkpoint, or the random full-size VL model: `--random-weights ARCH` starts it
through this module's launcher (`python -m glimpse.bench.serving_bench serve --bench-random-weights
ARCH`, the same JSON on stdin), which builds the random model on the device and serves it with the small
bench tokenizer.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from glimpse.engine.config import EngineConfig
from glimpse.server.app import run_server
from glimpse.server.config import SERVER_ENGINE_DEFAULTS, ServerConfig, configs_from_json, configs_to_json
from glimpse.settings import add_flags, from_flat, setting_names, to_flat

log = logging.getLogger(__name__)

KINDS = ("text", "image", "pdf", "video")


@dataclass
class OnlineConfig:
    model: str | None = "tiny-vl"  # a checkpoint directory or built-in name; None with random_weights
    random_weights: str | None = None  # e.g. nemotron-nano-12b-v2-vl (served by this module's launcher)
    concurrency: list[int] = field(default_factory=lambda: [16])
    num_requests: int = 200  # per concurrency level
    mix: dict[str, float] = field(
        default_factory=lambda: {"text": 0.4, "image": 0.3, "pdf": 0.15, "video": 0.15}
    )
    prefix_caching: list[bool] = field(default_factory=lambda: [True, False])
    output_len: int = 128
    temperature: float = 0.0
    system_words: int = 400  # the shared system prompt
    text_words: int = 600  # each request's own random words (text requests; media requests get 40)
    image_size: tuple[int, int] = (1280, 720)
    pdf_pages: int = 3
    pdf_page_size: tuple[int, int] = (612, 792)  # points (US letter): 1020x1320 px at the server's 120 dpi
    video_frames: int = 32
    video_size: tuple[int, int] = (640, 360)
    video_fps: float = 2.0  # every frame is sampled at the server's default 2 fps
    device: str = "auto"
    dtype: str = "auto"
    # Flat engine and server settings over the bench's own (from --online-server-args), e.g. block_size.
    server_settings: dict[str, Any] = field(default_factory=dict)
    startup_timeout: float = 900.0
    request_timeout: float = 600.0
    seed: int = 0


# --------------------------------------------------------------------------------------------- payloads


def parse_mix(text: str) -> dict[str, float]:
    """`text:4,image:3,pdf:1,video:2` -> weights (normalised); kinds left out get none."""
    mix: dict[str, float] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        kind, _, weight = item.partition(":")
        kind = kind.strip()
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r} in the mix; the kinds are {', '.join(KINDS)}")
        mix[kind] = float(weight or 1)
    total = sum(mix.values())
    if total <= 0:
        raise ValueError("the request mix has no weight")
    return {k: v / total for k, v in mix.items() if v > 0}


def kind_sequence(mix: dict[str, float], n: int, rng: np.random.Generator) -> list[str]:
    """Exactly round(share·n) of each kind (largest remainders), in a random order."""
    shares = {k: v * n for k, v in mix.items()}
    counts = {k: int(v) for k, v in shares.items()}
    for k in sorted(shares, key=lambda k: shares[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    kinds = [k for k, c in counts.items() for _ in range(c)]
    rng.shuffle(kinds)
    return kinds


def random_words(rng: np.random.Generator, n: int) -> str:
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    lengths = rng.integers(2, 9, n)
    chars = letters[rng.integers(0, 26, int(lengths.sum()))].tobytes().decode()
    words, at = [], 0
    for length in lengths:
        words.append(chars[at : at + length])
        at += length
    return " ".join(words)


def _picture(rng: np.random.Generator, width: int, height: int):
    """A smooth random picture with a few shapes and a little grain: distinct, and cheap to compress."""
    from PIL import Image, ImageDraw

    coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(4, max(5, width // 3))), y0 + int(rng.integers(4, max(5, height // 3)))
        draw.rectangle([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    grain = rng.integers(-8, 9, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8))


def image_bytes(rng: np.random.Generator, width: int, height: int) -> bytes:
    buf = io.BytesIO()
    _picture(rng, width, height).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def pdf_bytes(rng: np.random.Generator, pages: int, width_pt: int, height_pt: int) -> bytes:
    """A PDF of `pages` distinct picture pages, each `width_pt` x `height_pt` points."""
    images = [_picture(rng, width_pt, height_pt) for _ in range(pages)]
    buf = io.BytesIO()
    images[0].save(buf, format="PDF", save_all=True, append_images=images[1:], resolution=72.0)
    return buf.getvalue()


def video_bytes(rng: np.random.Generator, frames: int, width: int, height: int, fps: float) -> bytes:
    """An mp4 of `frames` distinct frames: a picture panning under fresh grain (libx264, else mpeg4)."""
    from fractions import Fraction

    import av

    width, height = width // 2 * 2, height // 2 * 2
    base = np.asarray(_picture(rng, width + 64, height + 64))
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        opts = {"preset": "ultrafast"} if codec == "libx264" else {}
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000), options=opts)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(frames):
            dy, dx = (k * 7) % 64, (k * 11) % 64
            frame = base[dy : dy + height, dx : dx + width].astype(np.int16)
            frame += rng.integers(-12, 13, frame.shape, dtype=np.int16)
            vf = av.VideoFrame.from_ndarray(np.clip(frame, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(vf):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


async def _sse_lines(resp):
    """Lines of an event stream split at \\n only, as the SSE format says (httpx's aiter_lines also splits
    at U+2028 and friends, which may sit raw inside a JSON string)."""
    buf = ""
    async for text in resp.aiter_text():
        buf += text
        *lines, buf = buf.split("\n")
        for line in lines:
            yield line.rstrip("\r")
    if buf:
        yield buf


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def build_request(kind: str, cfg: OnlineConfig, rng: np.random.Generator, system: str, index: int) -> bytes:
    """One chat request body (JSON bytes, serialised before the clock starts)."""
    words = random_words(rng, cfg.text_words if kind == "text" else 40)
    question = f"Request {index}. {words}\nAnswer in detail."
    if kind == "text":
        content: Any = question
    else:
        if kind == "image":
            part = {"type": "image_url",
                    "image_url": {"url": _data_uri(image_bytes(rng, *cfg.image_size), "image/jpeg")}}  # fmt: skip
        elif kind == "pdf":
            data = pdf_bytes(rng, cfg.pdf_pages, *cfg.pdf_page_size)
            part = {
                "type": "file",
                "file": {"file_data": _data_uri(data, "application/pdf"), "filename": "doc.pdf"},
            }
        elif kind == "video":
            data = video_bytes(rng, cfg.video_frames, *cfg.video_size, cfg.video_fps)
            part = {"type": "video_url", "video_url": {"url": _data_uri(data, "video/mp4")}}
        else:
            raise ValueError(f"unknown request kind {kind!r}")
        content = [part, {"type": "text", "text": question}]
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    body = {
        "model": "bench", "messages": messages, "max_tokens": cfg.output_len, "temperature": cfg.temperature,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    return json.dumps(body).encode()


# --------------------------------------------------------------------------------------------- clients


@dataclass
class RequestResult:
    kind: str
    ok: bool
    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


async def _one(client, url: str, kind: str, body: bytes) -> RequestResult:
    headers = {"Content-Type": "application/json"}
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    usage: dict | None = None
    try:
        async with client.stream("POST", url, content=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return RequestResult(kind, False, latency_s=time.perf_counter() - t0,
                                     error=f"HTTP {resp.status_code}: {text[:300]}")  # fmt: skip
            async for line in _sse_lines(resp):
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if obj.get("error"):
                    return RequestResult(kind, False, latency_s=time.perf_counter() - t0,
                                         error=json.dumps(obj["error"])[:300])  # fmt: skip
                if obj.get("usage"):
                    usage = obj["usage"]
                for choice in obj.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        chunks += 1
    except Exception as e:  # a client-side failure is a failed request, not a failed benchmark
        return RequestResult(
            kind, False, latency_s=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"
        )
    end = time.perf_counter()
    out = int(usage.get("completion_tokens", chunks)) if usage else chunks
    cached = int(((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    tpot = (last - first) / (out - 1) if first is not None and out > 1 else None
    return RequestResult(
        kind, first is not None, ttft_s=None if first is None else first - t0, tpot_s=tpot, latency_s=end - t0,
        prompt_tokens=int((usage or {}).get("prompt_tokens", 0)), output_tokens=out, cached_tokens=cached,
        error=None if first is not None else "the stream carried no token",
    )  # fmt: skip


async def run_clients(base_url: str, requests: list[tuple[str, bytes]], concurrency: int,
                      timeout: float) -> tuple[list[RequestResult], float]:  # fmt: skip
    """`concurrency` clients, each sending its next request as soon as its last one ends."""
    import httpx

    url = f"{base_url}/v1/chat/completions"
    queue = list(reversed(requests))
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:

        async def worker() -> None:
            while queue:
                kind, body = queue.pop()
                results.append(await _one(client, url, kind, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
        return results, time.perf_counter() - t0


def _stats(values: list[float], scale: float = 1e3) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values) * scale
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}  # fmt: skip


def summarise(results: list[RequestResult], seconds: float) -> dict[str, Any]:
    good = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in good)
    prompt_tokens = sum(r.prompt_tokens for r in good)
    by_kind = {}
    for kind in KINDS:
        rs = [r for r in good if r.kind == kind]
        if rs:
            by_kind[kind] = {"n": len(rs), "ttft_ms": _stats([r.ttft_s for r in rs]),
                             "prompt_tokens_mean": sum(r.prompt_tokens for r in rs) / len(rs)}  # fmt: skip
    return {
        "requests": len(results), "completed": len(good), "errors": len(results) - len(good),
        "error_samples": [r.error for r in results if not r.ok][:5], "duration_s": seconds,
        "request_throughput": len(good) / seconds, "output_token_throughput": out_tokens / seconds,
        "total_token_throughput": (out_tokens + prompt_tokens) / seconds,
        "prompt_tokens_mean": prompt_tokens / max(1, len(good)), "output_tokens_mean": out_tokens / max(1, len(good)),
        "cached_prompt_tokens": sum(r.cached_tokens for r in good),
        "ttft_ms": _stats([r.ttft_s for r in good]),
        "tpot_ms": _stats([r.tpot_s for r in good if r.tpot_s is not None]),
        "latency_ms": _stats([r.latency_s for r in good]), "by_kind": by_kind,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: str
    command: list[str]
    start_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 4000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.unlink(self.log_path)
        except OSError:
            pass


def server_configs(cfg: OnlineConfig, port: int, prefix_caching: bool) -> tuple[EngineConfig, ServerConfig]:
    """The server's configuration for one prefix-caching setting; `server_settings` override the rest."""
    settings: dict[str, Any] = {
        **SERVER_ENGINE_DEFAULTS, "device": cfg.device, "dtype": cfg.dtype, "host": "127.0.0.1",
        "served_model_name": "bench", "uvicorn_log_level": "warning", **cfg.server_settings, "port": port,
    }  # fmt: skip
    if not prefix_caching:
        settings["enable_prefix_caching"] = False
    model = f"random:{cfg.random_weights}" if cfg.random_weights else str(cfg.model)
    engine_names = set(setting_names(EngineConfig))
    engine = EngineConfig.from_kwargs(model, **{k: v for k, v in settings.items() if k in engine_names})
    server = from_flat(ServerConfig, **{k: v for k, v in settings.items() if k not in engine_names})
    return engine, server


def server_command(cfg: OnlineConfig) -> list[str]:
    """The public server entry, or this module's launcher for a random-weight model."""
    if cfg.random_weights:
        return [sys.executable, "-m", "glimpse.bench.serving_bench", "serve", "--bench-random-weights",
                cfg.random_weights]  # fmt: skip
    return [sys.executable, "-m", "glimpse.server"]


def parse_server_args(text: str) -> dict[str, Any]:
    """`--online-server-args '--block-size 32 ...'`: the `glimpse serve` flags given, as flat settings."""
    import shlex

    parser = argparse.ArgumentParser(prog="--online-server-args", add_help=False)
    for cls in (EngineConfig, ServerConfig):
        add_flags(parser, cls, defaults=dict.fromkeys(setting_names(cls), argparse.SUPPRESS))
    return vars(parser.parse_args(shlex.split(text)))


def start_server(command: list[str], configs: str, port: int, timeout: float) -> ServerProcess:
    """Start `command` with the configuration JSON on stdin and wait until /health answers."""
    import httpx

    log_file = tempfile.NamedTemporaryFile("w", prefix="glimpse-bench-serve-", suffix=".log", delete=False)
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT,
                            env=dict(os.environ), text=True)  # fmt: skip
    proc.stdin.write(configs)
    proc.stdin.close()
    server = ServerProcess(proc, port, log_file.name, command)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = server.log_tail()
            server.stop()
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                server.start_s = time.perf_counter() - t0
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    tail = server.log_tail()
    server.stop()
    raise RuntimeError(f"the server did not answer /health in {timeout} s:\n{tail}")


# --------------------------------------------------------------------------------------------- scenario


def _requests(cfg: OnlineConfig, n: int, seed: int, system: str, kinds: list[str] | None = None):
    rng = np.random.default_rng(seed)
    kinds = kinds or kind_sequence(cfg.mix, n, rng)
    return [(k, build_request(k, cfg, rng, system, i)) for i, k in enumerate(kinds)]


def online(cfg: OnlineConfig) -> list[dict]:
    """One server per prefix-caching setting; per concurrency level, `num_requests` fresh requests."""
    system = random_words(np.random.default_rng(cfg.seed + 7), cfg.system_words) if cfg.system_words else ""
    results = []
    command = server_command(cfg)
    for mode_no, prefix in enumerate(cfg.prefix_caching):
        port = free_port()
        engine_cfg, server_cfg = server_configs(cfg, port, prefix)
        log.info("starting the server: %s with %s", " ".join(command), engine_cfg)
        server = start_server(command, configs_to_json(engine_cfg, server_cfg), port, cfg.startup_timeout)
        try:
            # warm: one request of each kind, one after another, untimed
            warm = _requests(cfg, 0, cfg.seed + 100 + mode_no, system, kinds=list(cfg.mix))
            warm_results, _ = asyncio.run(run_clients(server.url, warm, 1, cfg.request_timeout))
            failed = [r.error for r in warm_results if not r.ok]
            if failed:
                raise RuntimeError(f"warm-up requests failed: {failed[:3]}\n{server.log_tail()}")
            for level_no, n in enumerate(cfg.concurrency):
                seed = cfg.seed + 1000 * (mode_no + 1) + level_no
                reqs = _requests(cfg, cfg.num_requests, seed, system)
                got, seconds = asyncio.run(run_clients(server.url, reqs, n, cfg.request_timeout))
                row = {"scenario": "online", "prefix_caching": prefix,
                       "prefix_caching_off_via": None if prefix else "enable_prefix_caching=False",
                       "concurrency": n, "model": cfg.random_weights or cfg.model,
                       "weights": "random" if cfg.random_weights else "checkpoint",
                       "mix": {k: round(v, 4) for k, v in cfg.mix.items()}, "output_len": cfg.output_len,
                       "server_start_s": server.start_s, "server_command": " ".join(command[1:]),
                       "server_settings": _changed_settings(engine_cfg, server_cfg)}  # fmt: skip
                row |= summarise(got, seconds)
                if row["errors"]:
                    row["server_log_tail"] = server.log_tail(3000)
                results.append(row)
                print(_row_text(row), flush=True)
        finally:
            server.stop()
    return results


def _changed_settings(engine_cfg: EngineConfig, server_cfg: ServerConfig) -> dict[str, Any]:
    """The settings of the server that differ from their defaults (api_key left out)."""
    defaults = {**to_flat(EngineConfig(model=engine_cfg.model)), **to_flat(ServerConfig(api_key=None))}
    given = {**to_flat(engine_cfg), **to_flat(server_cfg)}
    return {k: v for k, v in given.items() if v != defaults[k] and k != "api_key"}


def _row_text(r: dict) -> str:
    def p(stat: dict | None) -> str:
        return "-" if not stat else f"{stat['p50']:.0f}/{stat['p90']:.0f}/{stat['p99']:.0f}"

    return (f"online  N={r['concurrency']:<4} prefix={'on ' if r['prefix_caching'] else 'off'} "
            f"{r['request_throughput']:7.2f} req/s  {r['output_token_throughput']:9.1f} out tok/s  "
            f"{r['total_token_throughput']:10.1f} tok/s  TTFT p50/90/99 {p(r['ttft_ms'])} ms  "
            f"TPOT {p(r['tpot_ms'])} ms  errors {r['errors']}/{r['requests']}")  # fmt: skip


def config_from_args(args) -> OnlineConfig:
    def pair(text: str) -> tuple[int, int]:
        w, _, h = text.lower().partition("x")
        return int(w), int(h)

    modes = {"on": True, "off": False}
    return OnlineConfig(
        model=None if args.random_weights else (args.model or "tiny-vl"), random_weights=args.random_weights,
        concurrency=list(args.online_concurrency), num_requests=args.online_requests,
        mix=parse_mix(args.online_mix), prefix_caching=[modes[m.strip()] for m in args.online_prefix_caching.split(",") if m.strip()],
        output_len=args.online_output_len, temperature=args.online_temperature,
        system_words=args.online_system_words, text_words=args.online_text_words,
        image_size=pair(args.online_image_size), pdf_pages=args.online_pdf_pages,
        pdf_page_size=pair(args.online_pdf_page_size), video_frames=args.online_video_frames,
        video_size=pair(args.online_video_size), video_fps=args.online_video_fps, device=args.device,
        dtype=args.dtype, server_settings=parse_server_args(args.online_server_args or ""),
        startup_timeout=args.online_startup_timeout, request_timeout=args.online_request_timeout,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- launcher


def serve_main(argv: list[str]) -> int:
    """`python -m glimpse.bench.serving_bench serve --bench-random-weights ARCH < config.json`:
    the server of `build_server` around a random-weight model built on the device."""
    ours = argparse.ArgumentParser(prog="glimpse.bench.serving_bench serve")
    ours.add_argument("--bench-random-weights", required=True, metavar="ARCH")
    arch = ours.parse_args(argv).bench_random_weights

    from glimpse.bench.random_model import bench_tokenizer, random_model, restrict_vocab
    from glimpse.engine.async_llm import AsyncLLM
    from glimpse.engine.engine import LLMEngine

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    engine_cfg, server_cfg = configs_from_json(sys.stdin.read())
    device = engine_cfg.resolve_device()
    model = random_model(arch, device, engine_cfg.resolve_dtype(device), seed=engine_cfg.seed)
    tokenizer = bench_tokenizer()
    restrict_vocab(model, len(tokenizer))
    run_server(engine_cfg, server_cfg, AsyncLLM(LLMEngine(engine_cfg, model=model, tokenizer=tokenizer)))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        sys.exit(serve_main(sys.argv[2:]))
    print("usage: python -m glimpse.bench.serving_bench serve --bench-random-weights ARCH < config.json",
          file=sys.stderr)  # fmt: skip
    sys.exit(2)
