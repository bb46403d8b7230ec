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


def test_bench_runs_the_agents_scenarios_on_tiny_inputs(tmp_path):
    """The agents scenarios end to end on tiny-vl: a half-minute video's notes pass and four PDF pages
    extracted, each with its timing breakdown; the generated inputs are kept for the next run."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "glimpse.cli", "bench", "--model", "tiny-vl", "--scenarios",
         "agents-video,agents-extract", "--agents-video-minutes", "0.75", "--agents-video-size", "320x180",
         "--agents-segment-seconds", "20", "--agents-frames-per-segment", "4", "--agents-notes-max-tokens", "8",
         "--agents-pages", "4", "--agents-pages-per-doc", "2", "--agents-extract-tiles", "1",
         "--agents-extract-max-tokens", "8", "--agents-dir", str(tmp_path / "inputs"), "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    video, pdfs = json.loads(out.read_text())["results"]
    assert video["scenario"] == "agents_video" and pdfs["scenario"] == "agents_extract"
    assert video["segments"] >= 2 and video["frames_sampled"] >= 2 * video["segments"]
    assert (video["width"], video["height"], video["file_fps"]) == (320, 180, 10) and not video["file_reused"]
    assert video["engine"]["vision_calls"] >= video["segments"] and video["engine"]["prefill_tokens"] > 0
    assert video["usage"]["requests"] == video["segments"]
    assert pdfs["documents"] == 2 and pdfs["pages_per_s"] > 0 and pdfs["engine"]["vision_calls"] >= 2
    for r in (video, pdfs):
        parts = r["breakdown_s"]
        assert all(v >= 0 for k, v in parts.items() if k != "other")
        assert abs(sum(parts.values()) - r["total_s"]) < 0.01 and parts["prefill"] > 0
    assert "agents video  0.75 min 180p" in proc.stdout and "pages/s (target 5)" in proc.stdout


def test_agents_bench_inputs_are_made_once_and_as_stated(tmp_path):
    import pypdfium2

    from glimpse.agents import media
    from glimpse.bench.agents_bench import VideoSpec, invoice_pages, make_video, text_pdf

    spec = VideoSpec(minutes=0.2, width=128, height=96, fps=5)
    path, made = make_video(spec, tmp_path, workers=2)
    assert not made["reused"] and made["parts"] == 2
    info = media.probe(path)
    assert (info.width, info.height, round(info.fps), round(info.duration)) == (128, 96, 5, 12)
    frames = [f for _, f in media.frames_at(path, [0.0, 0.2, 5.8, 6.0, 11.8], size=None)]
    assert all((a != b).any() for a, b in zip(frames, frames[1:]))  # every frame differs, across parts too
    again, meta = make_video(spec, tmp_path)
    assert again == path and meta["reused"]

    document = pypdfium2.PdfDocument(text_pdf(invoice_pages(3, 2)))
    try:
        assert len(document) == 2 and document[0].get_size() == (612, 792)
        text = document[0].get_textpage().get_text_range()
    finally:
        document.close()
    assert "INVOICE No. INV-00003" in text and len(text.splitlines()) >= 55  # 60 lines, one blank
