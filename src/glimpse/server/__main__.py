"""`python -m glimpse.server < config.json`: serve a configuration given as data, not as flags.

The JSON is `{"engine": {...}, "server": {...}}` with the flat setting names (`configs_to_json` writes
it); it comes on stdin so that an API key never shows in a process list. Programs that start a server
(the online benchmark) use this; people use `glimpse serve`.
"""

from __future__ import annotations

import sys

from glimpse.server.app import run_server
from glimpse.server.config import configs_from_json

if __name__ == "__main__":
    run_server(*configs_from_json(sys.stdin.read()))
