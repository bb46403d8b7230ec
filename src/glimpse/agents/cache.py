"""Finished work kept on disk, so an interrupted run resumes where it stopped.

A file is known by a hash of its size and three 4 MiB samples (start, middle, end): cheap for a
3-hour video, and any edit that keeps the size and those bytes is vanishingly unlikely in practice.
Results live under `root/kind/<file key>-<parameters key>/NAME.json`; each is written to a temporary
file and renamed into place, so a result is either whole or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

SAMPLE_BYTES = 4 << 20


def default_cache_dir() -> Path:
    return Path(os.environ.get("GLIMPSE_CACHE", Path.home() / ".cache" / "glimpse")) / "agents"


def file_key(path: str | Path) -> str:
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
            f.seek(offset)
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:24]


def params_key(params: Any) -> str:
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: Any, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=indent)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultCache:
    """Results of one input under one set of parameters; `None` root keeps nothing."""

    def __init__(self, root: Path | None, kind: str, file_key: str, params: Any) -> None:
        self.dir = None if root is None else Path(root) / kind / f"{file_key}-{params_key(params)}"

    def get(self, name: str) -> Any | None:
        if self.dir is None:
            return None
        try:
            with open(self.dir / f"{name}.json", encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def put(self, name: str, data: Any) -> None:
        if self.dir is not None:
            write_json_atomic(self.dir / f"{name}.json", data)
