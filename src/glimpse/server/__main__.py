"""`python -m glimpse.server < config.json`: serve a configuration given as data, not as flags.

The JSON is `{"engine": {...}, "server": {...}}` with the flat setting names (`configs_to_json` writes
it); it comes on stdin so that an API key never shows in a process list. Programs that start a server
(the online benchmark) use this; people use `glimpse serve`.
"""

from __future__ import annotations

import sys

from glimpse.server.app import run_server
from glimpse.server.config import configs_from_json
from glimpse.server.startup import StartupError

if __name__ == "__main__":
    try:
        run_server(*configs_from_json(sys.stdin.read()))
    except StartupError as e:  # the port taken, a TLS file unreadable: one line, as `glimpse serve` says it
        print(f"glimpse.server: error: {e}", file=sys.stderr)
        sys.exit(2)
