"""A CPU smoke run of `glimpse bench` on the tiny model, so the command cannot rot (figures: docs/)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_runs_every_language_model_scenario(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "glimpse.cli", "bench", "--model", "tiny", "--scenarios",
         "decode1,decode,prefill,drift,hf-reference", "--concurrency", "3", "--prompt-len", "24",
         "--output-len", "6", "--prefill-lens", "48", "--drift-steps", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    kinds = [r["scenario"] for r in data["results"]]
    assert kinds.count("decode") == 4  # batch 1 and 3, each with an fp32 and a bf16 SSM state
    assert {"prefill", "ssm_state_drift", "hf-reference-decode", "hf-reference-prefill"} <= set(kinds)
    for r in data["results"]:
        if r["scenario"] in ("decode", "prefill"):
            assert r["tokens_per_s"] > 0 and 0 < r["fraction_of_floor"]
    assert data["environment"]["bandwidth_GBps"] > 0
    assert "% of floor" in proc.stdout
