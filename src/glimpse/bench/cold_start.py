"""Cold start of `glimpse serve` on a GPU: seconds from the command to ready, the engine's own breakdown
(load, memory profile, CUDA graphs, warm-up), and the first requests' TTFT against the same requests once
warm; then a restart on the same machine (Triton's compiled kernels kept on disk), and optionally a start
without the warm-up.

A fresh machine is imitated by an empty Triton kernel cache (TRITON_CACHE_DIR in a new directory); the
checkpoint's files are read once before, so they sit in the page cache as the target assumes. The
checkpoint is the full-size 12B language model with random weights, written once in the real layout.

    python -m glimpse.bench.cold_start --dir /tmp/nano12b [--no-warmup-too] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from glimpse.bench.random_model import random_model
from glimpse.model.tiny import build_tokenizer, write_safetensors, write_tokenizer_files

ARCH = "nemotron-nano-12b-v2"
# (name, prompt tokens): the kinds of request a server meets first, each a new shape
REQUESTS = [
    ("1024 tokens", 1024),
    ("700 tokens", 700),
    ("1 token", 1),
    ("3000 tokens", 3000),
    ("37 tokens", 37),
]


def write_checkpoint(out: Path) -> float:
    """The random full-size model as a NemotronHForCausalLM checkpoint (5 shards, bf16); seconds taken."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model = random_model(ARCH, "cuda", torch.bfloat16)
    state = {k: v.detach().to("cpu", torch.bfloat16) for k, v in model.state_dict().items()}
    config = model.llm_config
    del model
    torch.cuda.empty_cache()
    write_safetensors(state, out, shards=5)
    (out / "config.json").write_text(json.dumps(config.to_dict("nvidia"), indent=2))
    write_tokenizer_files(build_tokenizer(), out, config)
    (out / ".complete").write_text("ok\n")
    return time.perf_counter() - start


def read_into_page_cache(folder: Path) -> float:
    start = time.perf_counter()
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - start


def ttft(url: str, model: str, n_tokens: int, seed: int) -> float:
    """Seconds to the first streamed token of a completions request with `n_tokens` random prompt ids."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(100, 500, (n_tokens,), generator=gen).tolist()  # inside every vocabulary here
    body = {"model": model, "prompt": prompt, "max_tokens": 4, "stream": True, "temperature": 0}
    start = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.read().decode(errors='replace')[:500]}")
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.perf_counter() - start
    raise RuntimeError("the stream ended without a token")


def serve_once(folder: Path, warmup: bool, port: int, kernel_cache: str) -> dict:
    """Start the server with Triton's kernel cache in `kernel_cache` (an empty folder: a fresh machine),
    time it to ready, then the first and the warm requests."""
    fresh = not any(Path(kernel_cache).iterdir())
    env = dict(os.environ, TRITON_CACHE_DIR=kernel_cache, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "glimpse.cli", "serve", str(folder), "--port", str(port)]
    if not warmup:
        cmd.append("--no-warmup")
    log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log", delete=False)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{Path(log.name).read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        ready = time.perf_counter() - start
        first = [ttft(url, str(folder), n, seed=i) for i, (_, n) in enumerate(REQUESTS)]
        warm = [ttft(url, str(folder), n, seed=100 + i) for i, (_, n) in enumerate(REQUESTS)]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    text = Path(log.name).read_text()
    phases = re.search(r"engine startup: (.*)", text)
    loaded = re.search(r"loaded (.*)", text)
    return {
        "warmup": warmup, "kernel_cache": "empty" if fresh else "kept", "ready_s": round(ready, 2), "engine_startup": phases.group(1) if phases else None,
        "loaded": loaded.group(1) if loaded else None,
        "requests": [
            {"request": name, "first_ttft_s": round(f, 3), "warm_ttft_s": round(w, 3), "ratio": round(f / w, 2)}
            for (name, _), f, w in zip(REQUESTS, first, warm, strict=True)
        ],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dir", default="/tmp/nano12b", help="where the random checkpoint is (written if missing)"
    )
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--no-warmup-too", action="store_true", help="also start once with --no-warmup")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    folder = Path(args.dir)
    result: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    if not (folder / ".complete").is_file():
        result["write_checkpoint_s"] = round(write_checkpoint(folder), 1)
    result["page_cache_read_s"] = round(read_into_page_cache(folder), 1)
    kept = tempfile.mkdtemp(prefix="triton-")
    runs = [serve_once(folder, warmup=True, port=args.port, kernel_cache=kept)]
    runs.append(serve_once(folder, warmup=True, port=args.port + 1, kernel_cache=kept))  # a restart
    if args.no_warmup_too:
        runs.append(serve_once(folder, warmup=False, port=args.port + 2, kernel_cache=tempfile.mkdtemp()))
    result["runs"] = runs
    print(json.dumps(result, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
