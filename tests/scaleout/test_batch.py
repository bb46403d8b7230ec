"""Batch jobs on a real local Ray cluster, tiny-vl in every actor: documents and videos end to end; an
actor killed in the middle of the job loses no document and duplicates none; a rerun after completion
starts no engine and changes nothing. The tiny model's weights are random: structure is checked, never
meaning."""

from __future__ import annotations

import json
import os
import signal

import jsonschema
import pytest

from glimpse.agents import EXTRACT_LINE_SCHEMA, REPORT_SCHEMA, ExtractOptions, LoopLimits, VideoOptions
from glimpse.cli import main
from glimpse.scaleout.batch import RayOptions, analyze_videos_on_ray, extract_on_ray
from tests.agents.generated import make_image, make_pdf, make_video

DOC_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 3}, "count": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["title", "count"],
}  # fmt: skip
LINE_SCHEMA = {**EXTRACT_LINE_SCHEMA, "required": [*EXTRACT_LINE_SCHEMA["required"], "key"],
               "properties": {**EXTRACT_LINE_SCHEMA["properties"], "key": {"type": ["string", "null"]}}}  # fmt: skip
TINY_LIMITS = LoopLimits(max_steps=1, max_tokens_per_step=4)


def lines_of(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    corrupt = root / "corrupt.pdf"
    corrupt.write_bytes(b"%PDF-1.4\nthis is not a real PDF\n")
    pages = {}
    for k in range(4):
        pages[str(make_pdf(root / f"invoice-{k}.pdf", pages=1 + k % 3, title=f"Invoice {k}"))] = 1 + k % 3
    pages[str(make_image(root / "receipt.png"))] = 1
    return [*pages, str(corrupt)], pages


def test_documents_survive_a_killed_actor_and_a_rerun_does_nothing(ray_cluster, documents, tmp_path):
    inputs, pages = documents
    out = tmp_path / "results.jsonl"
    options = ExtractOptions(max_num_tiles=1, max_tokens=300, cache_dir=tmp_path / "cache", progress=False,
                             limits=TINY_LIMITS)  # fmt: skip
    workers: list[str] = []
    killed: list[int] = []

    def kill_the_first_worker(line, worker):
        workers.append(worker)
        if not killed:  # it holds another document by now (two calls in flight per actor)
            killed.append(int(worker.rsplit(":", 1)[1]))
            os.kill(killed[0], signal.SIGKILL)

    ray_options = RayOptions(actors=2, batch_size=1, progress=False, on_result=kill_the_first_worker,
                             parquet=tmp_path / "results.parquet")  # fmt: skip
    summary = extract_on_ray(inputs, DOC_SCHEMA, "tiny-vl", out, options, ray_options)

    lines = lines_of(out)
    # each document once: none lost, none twice
    assert sorted(line["file"] for line in lines) == sorted(inputs)
    assert (summary.done, summary.failed, summary.actors) == (len(inputs) - 1, 1, 2)
    # the two first engines, and the one Ray started in place of the killed one, which redid its call
    # (lines the killed engine had finished before it died may still arrive after the kill: they count)
    assert len(set(workers)) >= 3
    for line in lines:
        jsonschema.validate(line, LINE_SCHEMA)
        if line["file"].endswith("corrupt.pdf"):
            assert line["data"] is None and line["error"]
            continue
        assert line["error"] is None, line["error"]
        jsonschema.validate(line["data"], DOC_SCHEMA)
        assert all(1 <= p <= pages[line["file"]] for p in line["pages"].values())
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "results.parquet").to_pylist()
    assert sorted(row["file"] for row in table) == sorted(inputs)

    again = extract_on_ray(inputs, DOC_SCHEMA, "tiny-vl", out, options, RayOptions(progress=False))
    assert (again.skipped, again.done, again.failed, again.actors) == (len(inputs), 0, 0, 0)
    assert sorted(map(json.dumps, lines_of(out))) == sorted(map(json.dumps, lines))


def test_videos_end_to_end_and_a_rerun_does_nothing(ray_cluster, tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    make_video(root / "a.mp4", seconds=60, scene_seconds=20)
    make_video(root / "b.mp4", seconds=40, scene_seconds=20)
    (root / "broken.mp4").write_bytes(b"\x00" * 1000)
    options = VideoOptions(
        summary=True, segment_seconds=100, fps=0.02, frames_per_segment=1, max_chars=1, max_items=1,
        notes_max_tokens=300, answer_max_tokens=300, max_citations=2, limits=TINY_LIMITS,
        cache_dir=tmp_path / "cache", progress=False,
    )  # fmt: skip
    out = tmp_path / "reports"
    summary = analyze_videos_on_ray([root], "tiny-vl", out, options, RayOptions(actors=1, progress=False))
    assert (summary.total, summary.done, summary.failed) == (3, 2, 1)
    lines = {os.path.basename(line["file"]): line for line in lines_of(out / "results.jsonl")}
    assert sorted(lines) == ["a.mp4", "b.mp4", "broken.mp4"]
    assert lines["broken.mp4"]["report"] is None and lines["broken.mp4"]["error"]
    for name, seconds in (("a.mp4", 60), ("b.mp4", 40)):
        line = lines[name]
        assert line["error"] is None, line["error"]
        jsonschema.validate(line["report"], REPORT_SCHEMA)
        assert abs(line["report"]["duration"] - seconds) < 1
        written = json.loads((out / os.path.basename(line["report_dir"]) / "report.json").read_text())
        assert written["summary"] == line["report"]["summary"]
        assert "<html" in (out / os.path.basename(line["report_dir"]) / "report.html").read_text()

    again = analyze_videos_on_ray([root], "tiny-vl", out, options, RayOptions(progress=False))
    assert (again.skipped, again.done, again.actors) == (3, 0, 0)


def test_cli_ray_flags(ray_cluster, tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(DOC_SCHEMA))
    out = tmp_path / "out.jsonl"
    missing = tmp_path / "missing.pdf"
    args = ["extract", str(missing), "--schema", str(schema), "--out", str(out), "--model", "tiny-vl",
            "--no-progress", "--ray"]  # fmt: skip
    assert main(args) == 0  # an unreadable input is an error line; no engine starts for it
    (line,) = lines_of(out)
    assert line["file"] == str(missing) and "cannot read the file" in line["error"]
    assert "1 documents" in capsys.readouterr().err
    assert main([*args[:-1], "--base-url", "http://localhost:1/v1", "--ray"]) == 2
    assert "does not take --base-url" in capsys.readouterr().err
