"""`python -m tests.server.health_probe PORT [INTERVAL_S]`: poll http://127.0.0.1:PORT/health until killed.

Each answer is one line on stdout, `START SECONDS STATUS`: when the request was sent (time.monotonic(),
which every process of the machine shares), how long the answer took, and its HTTP status (0: no
answer: a refused connection or a 10 s timeout, counted with its full wait).

It polls every INTERVAL_S seconds (default 0.02). It runs in a process of its own so that it measures the server alone: polled from a thread of the test
process, /health seemed to take 258 ms during a 78 MB chat body and 229 ms during 16 big images, while
this probe measured 13 ms and 39 ms: the test's own thread held the GIL (json.dumps of the body) and
the poller waited for it.
"""

from __future__ import annotations

import http.client
import sys
import time

TIMEOUT_S = 10.0


def main(port: int, interval: float) -> None:
    conn: http.client.HTTPConnection | None = None
    while True:
        start = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            if conn is not None:
                conn.close()
            conn, status = None, 0
        print(f"{start:.6f} {time.monotonic() - start:.6f} {status}", flush=True)
        time.sleep(interval)


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.02)
    except (BrokenPipeError, KeyboardInterrupt):
        pass
