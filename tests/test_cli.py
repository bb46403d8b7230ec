"""The README's commands, run as a user runs them (a subprocess each)."""

from __future__ import annotations

import json
import subprocess
import sys


def glimpse(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "glimpse.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_make_tiny_then_generate(tmp_path):
    made = glimpse("make-tiny", str(tmp_path / "tiny"), "--seed", "1")
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "tiny" / "config.json").is_file()
    out = glimpse("generate", str(tmp_path / "tiny"), "--prompt", "Hello", "--max-tokens", "8", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["token_ids"]) == 8 and result["finish_reason"] == "length"


def test_builtin_tiny_generates_deterministically():
    """`glimpse generate tiny ...` (the README's first command) needs no download and is reproducible."""
    a = glimpse("generate", "tiny", "--prompt", "Describe the chart.", "--max-tokens", "12", "--json")
    b = glimpse("generate", "tiny", "--prompt", "Describe the chart.", "--max-tokens", "12", "--json")
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


def test_bad_model_is_a_clear_error():
    out = glimpse("generate", "./no-such-dir", "--prompt", "x")
    assert out.returncode == 2
    assert "not a directory, a built-in model" in out.stderr
