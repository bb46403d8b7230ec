"""`glimpse serve --tensor-parallel-size 2` (CPU, gloo): answers like the unsplit server, and when a
follower rank is killed mid-request the server exits with the reason within a bounded time."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import httpx

from tests.server.server_process import start_server


def test_killed_rank_brings_the_server_down_with_the_reason():
    server = start_server("tiny", "--device", "cpu", "--tensor-parallel-size", "2", "--max-num-seqs", "4")
    try:
        found = re.search(r"ranks 1\.\.1 in processes \[(\d+)\]", server.log())
        assert found, server.log()
        follower = int(found.group(1))
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
        first = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 8
        answers: list[httpx.Response | Exception] = []

        def long_request() -> None:
            try:
                body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4000, "ignore_eos": True}
                answers.append(httpx.post(f"{server.url}/v1/completions", json=body, timeout=90))
            except Exception as e:  # noqa: BLE001 - the connection may close under it
                answers.append(e)

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(1.5)  # mid-request
        killed = time.monotonic()
        os.kill(follower, signal.SIGKILL)
        code = server.proc.wait(timeout=60)
        assert time.monotonic() - killed < 60
        thread.join(timeout=30)
        log = server.log()
        assert code != 0, log
        assert "tensor-parallel rank 1" in log and "exited with code -9" in log, log
        assert "glimpse serve stopped" in log, log
        assert answers and (isinstance(answers[0], Exception) or answers[0].status_code >= 500)
    finally:
        server.stop()
        server.remove_log()
