"""End to end on tiny-vl in this process: a generated video of several minutes and generated documents
give outputs valid under their schemas, with times and pages inside the input; resuming skips finished
work; a corrupt file gets its error line while the others finish; the HTML report works in Chromium.

The tiny model's weights are random: these tests check structure, never meaning. Sizes are minimal
(one frame per segment, one-character strings) to keep the CPU time small.
"""

from __future__ import annotations

import json
import os
import shutil

import jsonschema
import pytest

from glimpse.agents import (
    EXTRACT_LINE_SCHEMA,
    REPORT_SCHEMA,
    ExtractOptions,
    InProcessClient,
    LoopLimits,
    ModelClient,
    VideoOptions,
    analyze_video,
    extract,
    write_video_reports,
)

TINY_VIDEO = dict(
    segment_seconds=100, fps=0.02, frames_per_segment=1, max_chars=1, max_items=1, notes_max_tokens=300,
    answer_max_tokens=300, max_citations=2, max_chapters=2, limits=LoopLimits(max_steps=1, max_tokens_per_step=4),
    progress=False,
)  # fmt: skip
DOC_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 3},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "lines": {"type": "array", "maxItems": 1, "items": {
            "type": "object", "properties": {"item": {"type": "string", "maxLength": 2}}, "required": ["item"]}},
    },
    "required": ["title", "count"],
}  # fmt: skip
DOC_PAGES = {"a-invoice.pdf": 5, "b-short.pdf": 2, "d-receipt.png": 1}


class Counting(ModelClient):
    """Passes requests on and keeps them."""

    def __init__(self, client: ModelClient) -> None:
        self.client, self.name, self.requests = client, client.name, []

    def complete(self, requests, on_done=None):
        self.requests += requests
        return self.client.complete(requests, on_done)

    def clip_requests(self) -> int:
        return sum(any(p.get("type") == "clip" for m in r.messages if isinstance(m["content"], list)
                       for p in m["content"]) for r in self.requests)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    return InProcessClient("tiny-vl")


@pytest.fixture(scope="module")
def video_run(tiny, video_file, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    options = VideoOptions(question="What colour is the square?", summary=True, chapters=True, cache_dir=cache,
                           **TINY_VIDEO)  # fmt: skip
    result = analyze_video(video_file, tiny, options)
    out = tmp_path_factory.mktemp("report")
    paths = write_video_reports(result.report, result.thumbnails, video_file, out)
    return result, paths, cache


def check_times(report):
    d = report["duration"]
    assert d == pytest.approx(200.0)
    ranges = []
    for seg in report["segments"]:
        ranges.append(seg)
        assert all(seg["start"] <= t <= seg["end"] for t in seg["frames"])
        for kind in ("events", "people", "on_screen_text"):
            for item in seg[kind]:
                assert seg["start"] <= item["start"] <= item["end"] <= seg["end"]
    for key in ("answer", "summary"):
        ranges += report[key]["citations"]
    ranges += report["chapters"] or []
    for r in ranges:
        assert isinstance(r["start"], int | float) and isinstance(r["end"], int | float)
        assert 0 <= r["start"] <= r["end"] <= d


def test_video_report_is_valid_and_inside_the_file(video_run):
    result, paths, _ = video_run
    report = json.loads(paths["json"].read_text())
    jsonschema.validate(report, REPORT_SCHEMA)
    assert report["errors"] == [], report["errors"]
    segments = report["segments"]
    assert [(s["start"], s["end"]) for s in segments] == [
        (0, 80),
        (80, 200),
    ]  # boundary moved to the cut at 80 s
    assert report["scene_changes"] == [40, 80, 120, 160]
    assert report["sampling"]["frames_per_segment"] == 1 and report["sampling"]["fps"] == 0.02
    assert all(s["error"] is None and len(s["frames"]) == 1 for s in segments)
    check_times(report)
    assert report["answer"]["stopped"] == "answered" and report["answer"]["steps"]
    assert 1 <= len(report["chapters"]) <= 2
    assert set(result.thumbnails) == {0, 1}
    md = paths["md"].read_text()
    assert "## Answer" in md and "## Chapters" in md and "## Notes by segment" in md


def test_video_resumes_from_finished_segments(tiny, video_file, video_run):
    _, _, cache = video_run
    segment_files = sorted(cache.rglob("segment-*.json"))
    assert len(segment_files) == 2
    segment_files[1].unlink()  # as if the run stopped before the last segment finished
    counting = Counting(tiny)
    again = analyze_video(video_file, counting, VideoOptions(cache_dir=cache, **TINY_VIDEO))
    assert counting.clip_requests() == 1 and len(counting.requests) == 1  # one segment redone; no tasks asked
    assert len(again.report["segments"]) == 2 and again.report["answer"] is None
    assert len(sorted(cache.rglob("segment-*.json"))) == 2


def test_html_report_in_headless_chromium(video_run, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    driver_path = shutil.which("chromedriver")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not driver_path or not browser:
        if os.environ.get("CI"):  # .ci/run installs them: their absence there is a failure, not a skip
            pytest.fail("CI needs Debian's chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    _, paths, _ = video_run
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1200,1600", "--autoplay-policy=no-user-gesture-required"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(paths["html"].resolve().as_uri())
        assert len(driver.find_elements(By.CSS_SELECTOR, "#timeline .kf img")) == 2
        assert driver.find_elements(By.CSS_SELECTOR, "#ruler .chapter")
        cites = driver.find_elements(By.CSS_SELECTOR, "#answer a.cite")
        assert cites, "the answer cites time ranges"
        target = float(cites[0].get_attribute("data-start"))
        cites[0].click()
        assert driver.execute_script("return location.hash") == f"#t={cites[0].get_attribute('data-start')}"
        left = driver.execute_script("return document.getElementById('cursor').style.left")
        assert left == f"{min(100, 100 * target / 200)}%" or left.startswith(f"{100 * target / 200:.0f}")
        driver.execute_script("window.scrollTo(0, 0)")
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == [], severe
    finally:
        driver.quit()


def test_extract_batch_with_a_corrupt_file_and_resume(tiny, documents, tmp_path):
    cache = tmp_path / "cache"
    options = ExtractOptions(max_num_tiles=1, max_tokens=300, cache_dir=cache, progress=False,
                             limits=LoopLimits(max_steps=1, max_tokens_per_step=4), tables_dir=tmp_path / "tables")  # fmt: skip
    out = tmp_path / "results.jsonl"
    extract([d for d in documents], DOC_SCHEMA, tiny, options, out=out)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [line["file"] for line in lines] == [str(d) for d in documents]  # input order
    for line in lines:
        jsonschema.validate(line, EXTRACT_LINE_SCHEMA)
    corrupt = lines[2]
    assert corrupt["data"] is None and corrupt["pages"] is None and "corrupt" in corrupt["error"]
    for line in lines[:2] + lines[3:]:
        assert line["error"] is None, line["error"]
        jsonschema.validate(line["data"], DOC_SCHEMA)
        n = DOC_PAGES[line["file"].rsplit("/", 1)[1]]
        assert set(line["pages"]) == set(line["data"]) == set(line["confidence"])
        assert all(1 <= p <= n for p in line["pages"].values())
        assert all(0 < c <= 1 for c in line["confidence"].values())  # the engine's own logprobs

    counting = Counting(tiny)
    again = extract([documents[0].parent], DOC_SCHEMA, counting, options)  # a directory: walked, sorted
    assert counting.requests == []  # every finished document came from the cache
    assert [x["data"] for x in again] == [x["data"] for x in lines]


class ForcedGroupAnswer(InProcessClient):
    """The tiny model, made to write `text` as every group's answer (SamplingParams.forced_token_ids):
    the values are valid, and their log-probabilities are still the random model's own."""

    def __init__(self, base: InProcessClient, text: str) -> None:
        super().__init__(base.llm, name=base.name)
        self.text, self.requests = text, []

    def complete(self, requests, on_done=None):
        self.requests += requests
        return super().complete(requests, on_done)

    def _params(self, req):
        params = super()._params(req)
        if req.json_schema is not None and "Extract the fields" in req.messages[-1]["content"][-1]["text"]:
            params.forced_token_ids = self.tokenizer.encode(self.text, add_special_tokens=False)
        return params


def test_extract_reasks_uncertain_fields_in_process(tiny, documents):
    """Valid values the random model is unsure of (its probabilities are tiny) are re-asked once, with
    the zoom tool and a final answer that asks for logprobs; every field's confidence is in the line."""
    forced = '{"title": {"value": "Inv", "page": 1}, "count": {"value": 7, "page": 1}, "lines": null}'
    client = ForcedGroupAnswer(tiny, forced)
    options = ExtractOptions(max_num_tiles=1, max_tokens=300, cache_dir=None, progress=False,
                             limits=LoopLimits(max_steps=1, max_tokens_per_step=4))  # fmt: skip
    (line,) = extract([documents[3]], DOC_SCHEMA, client, options)
    assert line["error"] is None, line["error"]
    jsonschema.validate(line, EXTRACT_LINE_SCHEMA)
    first, *rest = client.requests
    assert first.logprobs and first.json_schema is not None and not first.tools
    (step,) = [r for r in rest if r.tools]
    assert [t["function"]["name"] for t in step.tools] == ["zoom"]
    prompt = step.messages[1]["content"][-1]["text"]
    assert (
        "low confidence" in prompt and "['title', 'count']" in prompt and "missing or invalid" not in prompt
    )
    final = rest[-1]
    assert final.logprobs and set(final.json_schema["properties"]) == {"title", "count"}
    assert set(line["confidence"]) == set(line["data"]) == {"title", "count"}
    assert all(0 < c < 0.5 for c in line["confidence"].values())


class ForcedToolSteps(InProcessClient):
    """The tiny model, made to write given texts on tool steps (SamplingParams.forced_token_ids, the
    engine's hook for testing parsers end to end): the in-process path renders the tools and the calls
    with the chat template and parses `<TOOLCALL>` from the output itself."""

    def __init__(self, base: InProcessClient, texts: list[str]) -> None:
        super().__init__(base.llm, name=base.name)
        self.texts, self.tool_prompts = list(texts), []

    def _prompt(self, req):
        prompt = super()._prompt(req)
        if req.tools:
            self.tool_prompts.append(prompt["prompt"])
        return prompt

    def _params(self, req):
        params = super()._params(req)
        if req.tools:
            params.forced_token_ids = self.tokenizer.encode(self.texts.pop(0), add_special_tokens=False)
        return params


def test_in_process_tool_calls_go_through_the_chat_template(tiny):
    from glimpse.agents import Task, Tool, run_loops
    from glimpse.agents.loop import done

    seen = []

    def plan(args):
        seen.append(args)
        return done(f"found {args['query']}", args)

    client = ForcedToolSteps(tiny, ['<TOOLCALL>[{"name": "search_notes", "arguments": {"query": "red"}}]</TOOLCALL>',
                                    "no more tools"])  # fmt: skip
    tool = Tool("search_notes", "search", {"query": {"type": "string"}}, ["query"], plan)
    task = Task([{"role": "system", "content": "/no_think"}, {"role": "user", "content": "find red"}], "answer",
                {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}, final_max_tokens=32)  # fmt: skip
    (result,) = run_loops(client, [task], [tool], LoopLimits(max_steps=3, max_tokens_per_step=64))
    assert seen == [{"query": "red"}]
    assert result.stopped == "answered" and isinstance(result.final["ok"], bool)
    first, second = client.tool_prompts
    assert "<AVAILABLE_TOOLS>" in first and '"search_notes"' in first
    assert '<TOOLCALL>[{"name": "search_notes", "arguments": {"query": "red"}}]</TOOLCALL>' in second
    assert "<TOOL_RESPONSE>found red</TOOL_RESPONSE>" in second
