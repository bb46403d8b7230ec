"""Watching a `glimpse serve` subprocess under attack: /health latency, resident memory, and CLI runs.

`Watch` polls /health from one side thread and the server's VmRSS from another while a heavy request
runs, so a test can say "the event loop kept answering" and "memory stayed bounded" with numbers.
`launch` starts `python -m glimpse.cli ARGV...` with any argument list (the model as `--model`, TLS);
`run_cli` runs a short command with a wall-clock and address-space limit and reports its peak RSS.
"""

from __future__ import annotations

import os
import resource
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

import glimpse
from tests.server.server_process import Server, free_port

# /health must answer within 100 ms while a heavy request is being handled. The assertion uses 0.5 s: the
# test machines have 2 cores shared with other work, where a scheduling hiccup alone can take 100 ms.
# A server whose event loop is blocked by parsing or tokenising misses it by seconds.
HEALTH_TARGET_S = 0.1
HEALTH_MAX_S = 0.5
HEALTH_POLL_S = 0.05
RSS_POLL_S = 0.02


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (VmRSS), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


@dataclass
class Watch:
    """`with Watch(server) as w:` ... then `w.check_health()`, `w.rss_growth_mb`, `w.health_max`.

    The health bound is HEALTH_MAX_S, or twice the slowest of a few answers of the idle server measured
    on entry if the machine is so loaded that even those are slower (the bound must measure the
    server, not the machine).
    """

    server: Server
    latencies: list[float] = field(default_factory=list)
    idle_max: float = 0.0
    rss_before: float = 0.0
    rss_peak: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Watch:
        with httpx.Client(timeout=60) as client:  # long enough for a server still busy from before
            idle = []
            for _ in range(5):
                t = time.monotonic()
                client.get(f"{self.server.url}/health")
                idle.append(time.monotonic() - t)
        self.idle_max = max(idle)
        self.rss_before = self.rss_peak = rss_mb(self.server.proc.pid)
        self._threads = [threading.Thread(target=self._poll_health, daemon=True),
                         threading.Thread(target=self._poll_rss, daemon=True)]  # fmt: skip
        for t in self._threads:
            t.start()
        self._wait_for_polls(1)  # measuring before the request starts: a fast refusal is still watched
        return self

    def __exit__(self, *exc) -> None:
        # A request refused within milliseconds ends before the second poll: wait for it (it measures
        # the server just after the request), so that check_health judges the server, not its speed.
        deadline = time.monotonic() + 10
        while len(self.latencies) < 2 and time.monotonic() < deadline:
            time.sleep(HEALTH_POLL_S / 5)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)

    def _wait_for_polls(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.latencies) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def _poll_health(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                t = time.monotonic()
                try:
                    client.get(f"{self.server.url}/health")
                except httpx.HTTPError:
                    pass  # a timeout counts with its full wait
                self.latencies.append(time.monotonic() - t)
                self._stop.wait(HEALTH_POLL_S)

    def _poll_rss(self) -> None:
        while not self._stop.is_set():
            self.rss_peak = max(self.rss_peak, rss_mb(self.server.proc.pid))
            self._stop.wait(RSS_POLL_S)

    @property
    def health_bound(self) -> float:
        return max(HEALTH_MAX_S, 2 * self.idle_max)

    @property
    def health_max(self) -> float:
        return max(self.latencies, default=float("inf"))

    @property
    def rss_growth_mb(self) -> float:
        return self.rss_peak - self.rss_before

    def check_health(self) -> None:
        assert len(self.latencies) >= 2, f"/health was polled only {len(self.latencies)} times"
        worst = sorted(self.latencies)[-3:]
        assert self.health_max < self.health_bound, (
            f"/health took up to {self.health_max:.2f} s during the request (bound {self.health_bound:.2f} s, "
            f"target {HEALTH_TARGET_S} s; slowest answers {[round(x, 2) for x in worst]}): the event loop "
            "was blocked"
        )

    def check_rss(self, limit_mb: float) -> None:
        assert self.rss_growth_mb < limit_mb, (
            f"the server's RSS grew by {self.rss_growth_mb:.0f} MiB ({self.rss_before:.0f} -> "
            f"{self.rss_peak:.0f} MiB); at most {limit_mb:.0f} MiB allowed"
        )


# ------------------------------------------------------------------------------------------ launching


class TLSServer(Server):
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def _env(test_hooks: bool) -> dict[str, str]:
    """The test's environment, with the glimpse package this test imported first on the path (a relative
    PYTHONPATH would not survive another working directory)."""
    env = dict(os.environ)
    source = str(Path(glimpse.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([source, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    env["GLIMPSE_TEST_HOOKS"] = "1" if test_hooks else "0"
    env.pop("GLIMPSE_API_KEY", None)
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def launch(argv: list[str], *, tls_ca: str | None = None, test_hooks: bool = True,
           timeout: float = 240.0) -> Server:  # fmt: skip
    """Run `python -m glimpse.cli ARGV --port P --uvicorn-log-level warning` and wait for /health.

    `tls_ca`: the server speaks HTTPS with a certificate this CA file verifies.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "glimpse.cli", *argv, "--port", str(port), "--uvicorn-log-level", "warning"]
    log = tempfile.NamedTemporaryFile("w", prefix="glimpse-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(test_hooks))
    server: Server = (TLSServer if tls_ca else Server)(proc, port, None, log.name)
    verify = ssl.create_default_context(cafile=tls_ca) if tls_ca else True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = server.log()
            server.remove_log()
            raise RuntimeError(f"`glimpse {' '.join(argv)}` exited with {proc.returncode}:\n{text}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1, verify=verify).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"`glimpse {' '.join(argv)}` did not come up in {timeout} s:\n{server.log()}")


def wait_for_log(server: Server, needle: str, timeout: float = 5.0) -> str:
    """The server's log once it contains `needle` (case-insensitive), or the log at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        text = server.log()
        if needle.lower() in text.lower() or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


@dataclass
class CLIResult:
    returncode: int
    output: str  # stdout and stderr together
    seconds: float
    peak_rss_mb: float
    timed_out: bool


def run_cli(argv: list[str], *, timeout: float = 120.0, address_space_gb: float = 8.0,
            cwd: str | None = None) -> CLIResult:  # fmt: skip
    """Run `python -m glimpse.cli ARGV` to its end (killed after `timeout` s) with its address space capped,
    so a command that tries to allocate tens of GB fails inside the cap instead of taking the machine."""
    limit = int(address_space_gb * 2**30)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    with tempfile.TemporaryFile("w+") as out:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "glimpse.cli", *argv], stdout=out,
                                stderr=subprocess.STDOUT, env=_env(False), preexec_fn=cap, cwd=cwd)  # fmt: skip
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        seconds = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return CLIResult(proc.returncode, out.read(), seconds, usage.ru_maxrss / 1024, seconds >= timeout)
