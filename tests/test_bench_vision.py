"""CPU smoke runs of the [G6] bench scenarios (vision, video-ttft, video-decode, online) on tiny sizes,
so the commands cannot rot; the figures themselves come from the GPU (docs/PERFORMANCE.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from glimpse.bench import serving_bench, vision_bench
from glimpse.bench.random_model import (
    bench_tokenizer,
    nemotron_nano_12b_v2_vl,
    random_model,
    restrict_vocab,
)
from glimpse.config_radio import RadioConfig

ONLINE_TINY = [
    "--online-concurrency", "2", "--online-requests", "4", "--online-mix", "text:1,image:1,pdf:1,video:1",
    "--online-output-len", "4", "--online-system-words", "16", "--online-text-words", "24",
    "--online-image-size", "64x64", "--online-pdf-pages", "2", "--online-pdf-page-size", "100x100",
    "--online-video-frames", "4", "--online-video-size", "64x64", "--online-startup-timeout", "120",
]  # fmt: skip


def _bench(tmp_path, *flags: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run([sys.executable, "-m", "glimpse.cli", "bench", *flags, "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def _check_online(rows: list[dict], modes: list[bool]) -> None:
    assert [r["prefix_caching"] for r in rows] == modes
    for r in rows:
        assert r["errors"] == 0, r["error_samples"]
        assert r["completed"] == r["requests"] == 4 and r["concurrency"] == 2
        assert (
            r["request_throughput"] > 0
            and r["output_token_throughput"] > 0
            and r["total_token_throughput"] > 0
        )
        for stat in ("ttft_ms", "tpot_ms", "latency_ms"):
            assert 0 < r[stat]["p50"] <= r[stat]["p90"] <= r[stat]["p99"], (stat, r[stat])
        assert set(r["by_kind"]) == {"text", "image", "pdf", "video"}
        assert r["output_tokens_mean"] == 4 and r["prompt_tokens_mean"] > 0
        if not r["prefix_caching"]:
            assert r["cached_prompt_tokens"] == 0 and r["prefix_caching_off_via"]


def test_every_g6_scenario_on_tiny_vl(tmp_path):
    data, stdout = _bench(
        tmp_path, "--model", "tiny-vl", "--scenarios", "vision,video-ttft,video-decode,online",
        "--vision-batch", "2", "--vision-repeats", "1", "--video-frames", "4", "--pruning-rates", "0,0.75",
        "--decode-width", "64", "--decode-height", "48", "--decode-segment-seconds", "2", "--decode-segments", "4",
        "--decode-frames", "6", "--decode-repeats", "1", "--decode-baseline-seconds", "3",
        "--decode-dir", str(tmp_path / "video"), *ONLINE_TINY,
    )  # fmt: skip
    by = {}
    for r in data["results"]:
        by.setdefault(r["scenario"], []).append(r)

    (v,) = by["vision"]
    assert v["batch"] == 2 and v["tiles_per_s"] > 0 and v["vit_tiles_per_s"] > 0
    assert v["ceiling_tiles_per_s"] > 0 and v["fraction_of_ceiling"] > 0 and v["vit_flops_per_tile"] > 0

    ttft = {r["pruning_rate"]: r for r in by["video_ttft"]}
    assert set(ttft) == {0.0, 0.75}
    for r in ttft.values():
        assert r["ttft_s"] > 0 and r["video_tokens"] == 4 * 256 and r["frames"] == 4
    assert ttft[0.0]["video_tokens_kept"] == 1024
    assert ttft[0.75]["video_tokens_kept"] == 256  # max(256, int(1024 * 0.25))
    assert ttft[0.75]["prompt_tokens"] < ttft[0.0]["prompt_tokens"]

    (d,) = by["video_decode"]
    assert d["total_frames"] == 4 * 60 and d["sampled_frames"] == 6 and d["keyint"] == 60
    assert d["glimpse_s"] > 0 and d["baseline_s"] > 0 and d["speedup"] > 0
    assert d["baseline_extrapolated"] and d["baseline_frames_decoded"] == 90
    assert d["file_bytes"] > 0

    _check_online(by["online"], [True, False])
    assert by["online"][0]["cached_prompt_tokens"] > 0  # the shared system prompt came from the prefix cache
    assert "tiles/s" in stdout and "TTFT" in stdout and "every frame in order" in stdout


def test_random_vl_model_through_the_bench_and_the_server(tmp_path):
    """The random-weight VL builder in the bench process and behind the server's bench launcher."""
    data, _ = _bench(
        tmp_path, "--random-weights", "nemotron-nano-vl-tiny", "--scenarios", "vision,online",
        "--vision-batch", "2", "--vision-repeats", "1", "--online-prefix-caching", "off", *ONLINE_TINY,
    )  # fmt: skip
    rows = {r["scenario"]: r for r in data["results"]}
    assert rows["vision"]["tiles_per_s"] > 0
    _check_online([rows["online"]], [False])
    assert (
        rows["online"]["weights"] == "random" and "--bench-random-weights" in rows["online"]["server_command"]
    )


# ------------------------------------------------------------------------------------------- pieces


def test_vit_h_flops_match_the_issue_anchor():
    """ViT-H/16 at 512²: 1,024 patches + 8 prefix tokens, 32 blocks; 794 TFLOP/s gives 538 tiles/s."""
    flops = vision_bench.vit_flops_per_tile(RadioConfig(), 512, 512)
    assert flops["total"] == pytest.approx(1.4753e12, rel=1e-3)
    assert 794e12 / flops["total"] == pytest.approx(538, abs=1)


def test_full_size_vl_preset_has_the_real_shapes():
    config, radio = nemotron_nano_12b_v2_vl()
    assert (radio.hidden_size, radio.depth, radio.num_heads, radio.intermediate_size) == (1280, 32, 16, 5120)
    assert (radio.patch_size, radio.max_grid, radio.num_prefix_tokens) == (16, 128, 8)
    assert config.projector_hidden_size == 20480 and config.llm.hidden_size == 5120
    assert config.llm.vocab_size == 131072 and config.tokens_per_tile == 256
    tok = bench_tokenizer()
    ids = tok.convert_tokens_to_ids(["<img>", "<image>", "</img>"])
    assert tok.unk_token_id not in ids and max(ids) < config.llm.vocab_size


def test_restrict_vocab_makes_sampled_tokens_spellable():
    model = random_model("nemotron-nano-vl-tiny", torch.device("cpu"), torch.float32)
    restrict_vocab(model, 100)
    logits = model.language_model.lm_head(torch.randn(64, model.llm_config.hidden_size))
    assert int(logits.argmax(-1).max()) < 100


def test_request_mix_and_launcher_choice():
    mix = serving_bench.parse_mix("text:2,image:1,video:1")
    kinds = serving_bench.kind_sequence(mix, 10, np.random.default_rng(0))
    assert len(kinds) == 10 and kinds.count("text") == 5 and "pdf" not in kinds
    with pytest.raises(ValueError, match="unknown request kind"):
        serving_bench.parse_mix("audio:1")
    cfg = serving_bench.OnlineConfig(model="tiny-vl", server_settings={"block_size": 32})
    assert serving_bench.server_command(cfg)[1:] == ["-m", "glimpse.server"]
    on, server = serving_bench.server_configs(cfg, 1234, True)
    off, _ = serving_bench.server_configs(cfg, 1234, False)
    assert on.model == "tiny-vl" and on.cache.enable_prefix_caching and not off.cache.enable_prefix_caching
    assert on.cache.block_size == 32 and server.port == 1234 and server.served_model_name == "bench"
    assert not on.media.allow_private_media_urls  # the server's default, as `glimpse serve` has it
    random = serving_bench.server_command(serving_bench.OnlineConfig(model=None, random_weights="arch"))
    assert "glimpse.bench.serving_bench" in random and "--bench-random-weights" in random
    given = serving_bench.parse_server_args("--block-size 32 --no-enable-prefix-caching --max-video-frames 8")
    assert given == {"block_size": 32, "enable_prefix_caching": False, "max_video_frames": 8}
