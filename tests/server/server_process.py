"""Start `glimpse serve` in a subprocess on 127.0.0.1 and a free port, as a user would; stop it after."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    api_key: str | None
    log_path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def remove_log(self) -> None:
        os.unlink(self.log_path)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(model: str, *flags: str, api_key: str | None = None, test_hooks: bool = True,
                 timeout: float = 180.0) -> Server:  # fmt: skip
    """Run `python -m glimpse.cli serve MODEL --port P FLAGS` and wait until /health answers."""
    port = free_port()
    env = dict(os.environ)
    env["GLIMPSE_TEST_HOOKS"] = "1" if test_hooks else "0"
    env.pop("GLIMPSE_API_KEY", None)
    env.setdefault("OMP_NUM_THREADS", "2")
    cmd = [sys.executable, "-m", "glimpse.cli", "serve", model, "--port", str(port),
           "--uvicorn-log-level", "warning", *flags]  # fmt: skip
    if api_key:
        cmd += ["--api-key", api_key]
    log = tempfile.NamedTemporaryFile("w", prefix="glimpse-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, port, api_key, log.name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"the server did not come up in {timeout} s:\n{server.log()}")


def metrics(server: Server) -> dict[str, float]:
    """/metrics as {"name": value} for the samples labelled only by model (or unlabelled)."""
    from glimpse.server.metrics import parse_text

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for key, value in parse_text(text).items():
        name, _, labels = key.partition("{")
        if not labels or labels.count("=") == 1:
            out[name.removeprefix("glimpse:")] = value
        else:
            out[key.removeprefix("glimpse:")] = value
    return out


def wait_idle(server: Server, timeout: float = 30.0) -> dict[str, float]:
    """Poll until the engine reports idle with no block or slot held by a sequence; the last metrics."""
    deadline = time.monotonic() + timeout
    m: dict[str, float] = {}
    while time.monotonic() < deadline:
        m = metrics(server)
        if m.get("engine_idle") == 1 and m.get("kv_blocks_active") == 0 and m.get("state_slots_active") == 0:
            return m
        time.sleep(0.2)
    raise AssertionError(f"the engine did not become idle in {timeout} s: {m}")
