"""The same agents through a real `glimpse serve tiny-vl` (OpenAI-compatible HTTP), and the commands
end to end against a scripted server."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import httpx
import jsonschema
import pytest

from glimpse.agents import (
    EXTRACT_LINE_SCHEMA,
    REPORT_SCHEMA,
    ExtractOptions,
    HTTPClient,
    LoopLimits,
    VideoOptions,
    analyze_video,
    extract,
)
from tests.agents.generated import make_video
from tests.agents.scripted_server import ScriptedServer
from tests.agents.test_inprocess import DOC_SCHEMA, check_times
from tests.server.server_process import start_server


@pytest.fixture(scope="module")
def server():
    s = start_server("tiny-vl", api_key="secret")
    yield s
    s.stop()
    s.remove_log()


def test_video_and_extract_through_glimpse_serve(server, video_file, documents, tmp_path):
    client = HTTPClient(f"{server.url}/v1", api_key="secret", concurrency=4)
    assert client.model == "tiny-vl"
    options = VideoOptions(
        question="What colour is the square?", segment_seconds=100, fps=0.02, frames_per_segment=1, max_chars=1,
        max_items=0, notes_max_tokens=300, answer_max_tokens=300, max_citations=2,
        limits=LoopLimits(max_steps=1, max_tokens_per_step=4), cache_dir=tmp_path / "cache", progress=False,
    )  # fmt: skip
    report = analyze_video(video_file, client, options).report
    jsonschema.validate(report, REPORT_SCHEMA)
    assert report["errors"] == [] and all(s["error"] is None for s in report["segments"])
    assert report["model"].endswith("#tiny-vl") and len(report["segments"]) == 2
    check_times({**report, "summary": {"citations": []}})

    docs = [documents[1], documents[2]]  # a 2-page PDF and the corrupt one
    options = ExtractOptions(max_num_tiles=1, max_tokens=300, cache_dir=None, progress=False,
                             limits=LoopLimits(max_steps=1, max_tokens_per_step=4))  # fmt: skip
    good, bad = extract(docs, DOC_SCHEMA, client, options)
    for line in (good, bad):
        jsonschema.validate(line, EXTRACT_LINE_SCHEMA)
    assert good["error"] is None, good["error"]
    jsonschema.validate(good["data"], DOC_SCHEMA)
    assert all(1 <= p <= 2 for p in good["pages"].values())
    assert all(0 < c <= 1 for c in good["confidence"].values())  # the server's logprobs, placed in the text
    assert bad["data"] is None and bad["error"]


def _finished(http: httpx.Client, job: dict, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while job["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, f"job {job['id']} still {job['status']} ({job['stage']})"
        time.sleep(0.5)
        reply = http.get(f"/v1/glimpse/jobs/{job['id']}")
        assert reply.status_code == 200, reply.text
        job = reply.json()
    return job


def test_both_agents_as_jobs_over_plain_http(server, documents, tmp_path):
    """docs/API.md's job routes on a real `glimpse serve tiny-vl`: a document job (a PDF and a corrupt
    file) and a video job run to the end, their results valid under their schemas and inside the inputs."""
    video = make_video(tmp_path / "clip.mp4", seconds=12.0, fps=4, scene_seconds=6.0)
    http = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer secret"}, timeout=60)
    try:
        files = [{"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()} for p in documents[1:3]]
        options = {"max_num_tiles": 1, "max_tokens": 300, "max_steps": 1, "max_tokens_per_step": 4}
        started = http.post(
            "/v1/glimpse/extract", json={"schema": DOC_SCHEMA, "files": files, "options": options}
        )
        assert started.status_code == 202, started.text
        job = started.json()
        assert (
            job["object"] == "glimpse.job"
            and job["kind"] == "extract"
            and job["status"] in ("queued", "running")
        )
        job = _finished(http, job)
        assert job["status"] == "done" and job["error"] is None and job["progress"]["done"] == 2
        good, bad = job["result"]["lines"]
        assert (good["file"], bad["file"]) == (documents[1].name, documents[2].name)
        for line in (good, bad):
            jsonschema.validate(line, EXTRACT_LINE_SCHEMA)
        assert good["error"] is None, good["error"]
        jsonschema.validate(good["data"], DOC_SCHEMA)
        assert all(1 <= p <= 2 for p in good["pages"].values())
        assert bad["data"] is None and "corrupt" in bad["error"]
        assert http.get(f"/v1/glimpse/jobs/{job['id']}/report.json").status_code == 404  # not a video job

        options = {"question": "What moves?", "summary": True, "chapters": True, "segment_seconds": 6,
                   "fps": 0.5, "frames_per_segment": 2, "max_chars": 1, "max_items": 0, "notes_max_tokens": 300,
                   "answer_max_tokens": 300, "max_steps": 1, "max_tokens_per_step": 4}  # fmt: skip
        started = http.post("/v1/glimpse/video", params={"name": "clip.mp4", "options": json.dumps(options)},
                            content=video.read_bytes())  # fmt: skip
        assert started.status_code == 202, started.text
        job = _finished(http, started.json())
        assert job["status"] == "done" and job["error"] is None, job
        report = job["result"]
        jsonschema.validate(report, REPORT_SCHEMA)
        assert report["file"] == "clip.mp4" and report["duration"] == pytest.approx(12.0)
        assert len(report["segments"]) == 2 and all(s["error"] is None for s in report["segments"])
        ranges = [(s["start"], s["end"]) for s in report["segments"]]
        ranges += [(c["start"], c["end"]) for c in report["chapters"]]
        ranges += [(c["start"], c["end"]) for k in ("answer", "summary") for c in report[k]["citations"]]
        assert all(0 <= a <= b <= 12.0 for a, b in ranges)
        links = job["links"]
        assert http.get(links["report_json"]).json() == report
        html = http.get(links["report_html"])
        assert html.status_code == 200 and f'src="{links["video"]}"' in html.text
        assert http.get(links["video"]).content == video.read_bytes()
        gone = http.delete(f"/v1/glimpse/jobs/{job['id']}")
        assert gone.status_code == 200 and http.get(f"/v1/glimpse/jobs/{job['id']}").status_code == 404
        assert httpx.get(f"{server.url}/v1/glimpse/jobs/{job['id']}").status_code == 401  # no key
    finally:
        http.close()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glimpse.agents.cli", *args], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_commands_write_their_outputs(video_file, documents, tmp_path):
    scripted = ScriptedServer([{"content": "done"}] * 3)
    try:
        out = tmp_path / "report"
        done = run_cli("video", str(video_file), "--base-url", scripted.url, "--api-key", "k", "--out", str(out),
                       "--ask", "What moves?", "--chapters", "--segment-seconds", "60", "--fps", "0.05",
                       "--frames-per-segment", "2", "--no-cache", "--no-progress")  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "report.html"}
        report = json.loads((out / "report.json").read_text())
        jsonschema.validate(report, REPORT_SCHEMA)
        assert report["summary"] is None and report["chapters"] and report["answer"]
        assert report["sampling"] == {"segment_seconds": 60.0, "fps": 0.05, "frames_per_segment": 2,
                                      "video_pruning_rate": 0.5, "scene_threshold": 0.4}  # fmt: skip
        html = (out / "report.html").read_text()
        assert '<video id="player"' in html and "data:image/jpeg;base64," in html and "http" not in html.split(
            "<body", 1)[1].replace(scripted.url, "")  # fmt: skip

        schema = tmp_path / "schema.json"
        schema.write_text(json.dumps(DOC_SCHEMA))
        results = tmp_path / "results.jsonl"
        done = run_cli("extract", str(documents[1]), str(documents[2]), "--schema", str(schema), "--out",
                       str(results), "--base-url", scripted.url, "--no-cache", "--no-progress")  # fmt: skip
        assert done.returncode == 0, done.stderr
        lines = [json.loads(x) for x in results.read_text().splitlines()]
        assert [x["error"] is None for x in lines] == [
            True,
            False,
        ] and "2 documents, 1 with errors" in done.stderr
    finally:
        scripted.close()
    missing = run_cli("video", str(tmp_path / "nope.mp4"), "--base-url", "http://127.0.0.1:9/v1")
    assert missing.returncode == 2 and "no such file" in missing.stderr
