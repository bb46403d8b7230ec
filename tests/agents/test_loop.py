"""The tool loop against a scripted OpenAI-compatible server: the right tools run with the right
arguments, their results flow back to the model, and the loop stops at its bounds."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest

from glimpse.agents import (
    EXTRACT_LINE_SCHEMA,
    REPORT_SCHEMA,
    ExtractOptions,
    HTTPClient,
    LoopLimits,
    Task,
    Tool,
    ToolPlan,
    VideoOptions,
    analyze_video,
    extract,
    run_loops,
)
from glimpse.agents.loop import done
from tests.agents.scripted_server import ScriptedServer


def video_options(**kw) -> VideoOptions:
    base = dict(segment_seconds=40, fps=0.1, frames_per_segment=2, cache_dir=None, progress=False)
    return VideoOptions(**{**base, **kw})


def calls(*items):
    return {"tool_calls": [{"name": n, "arguments": a} for n, a in items]}


def tool_messages(body):
    return [m for m in body["messages"] if m["role"] == "tool"]


def test_video_tools_run_with_their_arguments_and_results_flow_back(video_file):
    script = [
        calls(
            ("inspect", {"start": 40, "end": 60, "fps": 1}),
            ("search_notes", {"query": "x"}),
            ("frame", {"t": 100}),
        ),
        calls(("read_notes", {"start": 0, "end": 50}), ("inspect", {"start": 190, "end": 900})),
        {"content": "the square is white"},
    ]
    server = ScriptedServer(script)
    try:
        client = HTTPClient(server.url, api_key="k")
        result = analyze_video(video_file, client, video_options(question="What moves?"))
    finally:
        server.close()
    report = result.report
    jsonschema.validate(report, REPORT_SCHEMA)
    turns = server.tool_requests()
    assert len(turns) == 3
    first = turns[0]["messages"]
    assert "What moves?" in first[-1]["content"] and "[0.0-40.0 s]" in first[-1]["content"]
    assert {t["function"]["name"] for t in turns[0]["tools"]} == {
        "inspect",
        "frame",
        "search_notes",
        "read_notes",
    }

    # Step 2 sees step 1's three results, answered in order under their call ids.
    second = turns[1]["messages"]
    asked = second[-4]["tool_calls"]
    results = tool_messages(turns[1])
    assert [r["tool_call_id"] for r in results] == [c["id"] for c in asked]
    inspected = json.loads(results[0]["content"])
    assert (inspected["start"], inspected["end"]) == (40, 60)
    assert all(40 <= e["start"] <= e["end"] <= 60 for e in inspected["events"])
    assert isinstance(json.loads(results[1]["content"]), list)
    assert json.loads(results[2]["content"])["t"] == 100

    # The tools' own model requests: a denser clip of 40-60 s, one frame at full tiling.
    clips = [r for r in server.requests if "media_io_kwargs" in r]
    inspect_req = next(r for r in clips if "40.0 s to 60.0 s" in json.dumps(r["messages"]))
    assert inspect_req["media_io_kwargs"]["video"]["num_frames"] == 20
    frame_req = next(r for r in server.requests if r.get("mm_processor_kwargs") == {"max_num_tiles": 12})
    assert frame_req["messages"][1]["content"][0]["type"] == "image_url"

    # Step 3: read_notes covered segments 0-80 s; the second inspect was clamped to the file's end.
    third = tool_messages(turns[2])[-2:]
    assert [s["start"] for s in json.loads(third[0]["content"])] == [0.0, 40.0]
    assert json.loads(third[1]["content"])["end"] == 200.0

    answer = report["answer"]
    assert answer["stopped"] == "answered" and answer["error"] is None
    assert [c["name"] for s in answer["steps"] for c in s["calls"]] == [
        "inspect", "search_notes", "frame", "read_notes", "inspect"
    ]  # fmt: skip
    assert answer["steps"][1]["calls"][1]["arguments"] == {"start": 190.0, "end": 200.0, "fps": 2.0}
    final = server.requests[-1]
    assert final["response_format"]["type"] == "json_schema"
    assert final["messages"][-1]["role"] == "user" and "final answer" in final["messages"][-1]["content"]
    for c in answer["citations"]:
        assert 0 <= c["start"] <= c["end"] <= report["duration"]


def _local_tool(log):
    def plan(args):
        log.append(args)
        return done(f"echo {args.get('x')}", args)

    return Tool("echo", "echo x", {"x": {"type": "integer"}}, ["x"], plan)


def test_loop_stops_at_max_steps():
    server = ScriptedServer(lambda turn, body: calls(("echo", {"x": turn})))
    log = []
    try:
        task = Task([{"role": "user", "content": "go"}], "answer now", {"type": "object", "properties": {
            "text": {"type": "string"}}, "required": ["text"]})  # fmt: skip
        (result,) = run_loops(HTTPClient(server.url), [task], [_local_tool(log)], LoopLimits(max_steps=3))
    finally:
        server.close()
    assert result.stopped == "max_steps" and result.final == {"text": "x"}
    assert log == [{"x": 0}, {"x": 1}, {"x": 2}]
    assert len(server.tool_requests()) == 3
    last = server.requests[-1]
    assert "tools" not in last and [m["content"] for m in tool_messages(last)] == [
        "echo 0",
        "echo 1",
        "echo 2",
    ]


def test_loop_stops_at_its_token_budget_and_caps_each_step():
    server = ScriptedServer(lambda turn, body: {**calls(("echo", {"x": 1})), "completion_tokens": 100})
    try:
        task = Task([{"role": "user", "content": "go"}], "answer now", {"type": "object", "properties": {}})
        limits = LoopLimits(max_steps=10, max_tokens_per_step=120, max_total_tokens=150)
        (result,) = run_loops(HTTPClient(server.url), [task], [_local_tool([])], limits)
    finally:
        server.close()
    assert result.stopped == "max_tokens"
    assert [r["max_tokens"] for r in server.tool_requests()] == [120, 50]


def test_bad_calls_answer_with_an_error_and_the_loop_goes_on():
    script = [calls(("nope", {}), ("echo", {})), calls(("echo", {"x": 7})), {"content": "ok"}]
    server = ScriptedServer(script)
    log = []
    try:
        task = Task([{"role": "user", "content": "go"}], "answer", {"type": "object", "properties": {}})
        (result,) = run_loops(HTTPClient(server.url), [task], [_local_tool(log)], LoopLimits(max_steps=5))
    finally:
        server.close()
    errors = [m["content"] for m in tool_messages(server.tool_requests()[1])]
    assert errors[0].startswith("error: no tool named 'nope'") and errors[1] == "error: echo needs ['x']"
    assert log == [{"x": 7}] and result.stopped == "answered"


def test_tasks_run_in_lockstep_with_their_own_tools():
    """Two tasks: each step is one batch; a task's own tools replace the shared ones."""
    seen = []

    def script(turn, body):
        seen.append(sorted(t["function"]["name"] for t in body["tools"]))
        return {"content": "done"}

    server = ScriptedServer(script)
    try:
        mine = Tool("mine", "m", {}, [], lambda a: ToolPlan([], lambda _: "", a))
        tasks = [Task([{"role": "user", "content": "a"}], "f", {"type": "object", "properties": {}}),
                 Task([{"role": "user", "content": "b"}], "f", {"type": "object", "properties": {}}, tools=[mine])]  # fmt: skip
        results = run_loops(HTTPClient(server.url), tasks, [_local_tool([])])
    finally:
        server.close()
    assert sorted(seen) == [["echo"], ["mine"]]
    assert [r.stopped for r in results] == ["answered", "answered"]


def test_extract_reasks_with_zoom_and_cites_pages(documents, tmp_path):
    schema = {"type": "object", "properties": {
        "title": {"type": "string"}, "total": {"type": "number"},
        "items": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
    }, "required": ["title", "total", "items"]}  # fmt: skip

    def structured(body):
        schema = body["response_format"]["json_schema"]["schema"]
        props = schema["properties"]
        if "title" in props and "anyOf" in props["title"] and "value" in json.dumps(props["title"]):
            # a group: the title is not found anywhere; items on every group's first page
            first = props["items"]["anyOf"][1]["properties"]["page"]["minimum"]
            return {"title": None, "total": {"value": 12.5, "page": first},
                    "items": {"value": [{"name": f"p{first}"}], "page": first}}  # fmt: skip
        from tests.agents.scripted_server import example

        return example(schema)

    script = [calls(("zoom", {"page": 2, "box": [0.1, 0.2, 0.6, 0.5]})), {"content": "found it"}]
    server = ScriptedServer(script, structured=structured)
    out = tmp_path / "results.jsonl"
    try:
        options = ExtractOptions(cache_dir=None, progress=False, tables_dir=tmp_path / "tables")
        lines = extract([documents[0]], schema, HTTPClient(server.url), options, out=out)
    finally:
        server.close()
    (line,) = lines
    assert line["error"] is None, line
    assert line["data"]["items"] == [{"name": "p1"}, {"name": "p5"}]  # joined across the two groups
    assert line["pages"] == {"total": 1, "items": 1, "title": 3}  # the re-ask's page: the middle of 1..5
    assert json.loads(out.read_text()) == line
    group_requests = [r for r in server.requests if r.get("mm_processor_kwargs") == {"max_num_tiles": 6}]
    pages_sent = sorted(
        sum(p["type"] == "image_url" for p in r["messages"][1]["content"]) for r in group_requests
    )
    assert pages_sent == [1, 4]  # pages 1-4, then page 5
    zoom = [r for r in server.requests if r.get("mm_processor_kwargs") == {"max_num_tiles": 12}]
    assert len(zoom) == 1 and "page 2" in zoom[0]["messages"][1]["content"][1]["text"]
    reask = server.tool_requests()[0]
    assert [t["function"]["name"] for t in reask["tools"]] == ["zoom"] and "title" in reask["messages"][1][
        "content"
    ][-1]["text"]
    assert (tmp_path / "tables").is_dir() and len(list((tmp_path / "tables").glob("*.items.csv"))) == 1


@pytest.mark.parametrize(
    "bad", [{"type": "string"}, {"type": "object"}, {"type": "object", "properties": {"a": {"type": 5}}}]
)
def test_unusable_schemas_are_refused(bad):
    from glimpse.agents import SchemaProblem

    with pytest.raises(SchemaProblem):
        extract([], bad, HTTPClient.__new__(HTTPClient))


INVOICE = {"type": "object", "properties": {"title": {"type": "string"}, "total": {"type": "number"}},
           "required": ["title", "total"]}  # fmt: skip


def _total_span(text: str) -> tuple[int, int]:
    start = text.index('"total": {"value": ') + len('"total": {"value": ')
    return start, text.index(",", start)


@pytest.mark.parametrize("reask_sure", [1.0, 0.1])
def test_uncertain_fields_are_reasked_through_zoom_and_marked(documents, reask_sure):
    """The group answers `total` with its digits at probability 0.2 (below the 0.5 default): it is asked
    again through zoom; the re-ask's value wins when it is surer, else the first value stays. Every field
    carries its confidence; `title` (certain) is never re-asked."""

    def structured(body):
        props = body["response_format"]["json_schema"]["schema"]["properties"]
        if body.get("mm_processor_kwargs") == {"max_num_tiles": 6}:  # a group of pages
            first = props["total"]["anyOf"][1]["properties"]["page"]["minimum"]
            return {"title": {"value": "Invoice", "page": first}, "total": {"value": 12.5, "page": first}}
        assert list(props) == ["total"]  # the re-ask's final answer: only the uncertain field
        return {"total": {"value": 99.5, "page": 2}}

    def logprob(body, text, token, at):
        if '"total": {"value": ' not in text:
            return 0.0
        start, end = _total_span(text)
        if not start <= at < end:
            return 0.0
        first_answer = body.get("mm_processor_kwargs") == {"max_num_tiles": 6}
        return math.log(0.2 if first_answer else reask_sure)

    script = [calls(("zoom", {"page": 2, "box": [0.5, 0.7, 1, 1]})), {"content": "read it"}]
    server = ScriptedServer(script, structured=structured, logprob=logprob)
    try:
        options = ExtractOptions(pages_per_request=8, cache_dir=None, progress=False)
        (line,) = extract([documents[0]], INVOICE, HTTPClient(server.url), options)
    finally:
        server.close()
    assert line["error"] is None, line
    jsonschema.validate(line, EXTRACT_LINE_SCHEMA)
    group = [r for r in server.requests if r.get("mm_processor_kwargs") == {"max_num_tiles": 6}]
    assert len(group) == 1 and group[0]["logprobs"] is True
    (reask,) = server.tool_requests()[:1]
    prompt = reask["messages"][1]["content"][-1]["text"]
    assert "low confidence" in prompt and "['total']" in prompt and "missing or invalid" not in prompt
    zoom = [r for r in server.requests if r.get("mm_processor_kwargs") == {"max_num_tiles": 12}]
    assert len(zoom) == 1 and "['total']" in zoom[0]["messages"][1]["content"][1]["text"]
    final = [r for r in server.requests if r.get("response_format") and not r.get("tools")][-1]
    assert final["logprobs"] is True
    if reask_sure == 1.0:
        assert line["data"] == {"title": "Invoice", "total": 99.5} and line["pages"]["total"] == 2
        assert line["confidence"] == {"title": 1.0, "total": 1.0}
    else:  # the re-ask was less sure (0.1) than the first reading (0.2): the first value stays
        assert line["data"] == {"title": "Invoice", "total": 12.5} and line["pages"]["total"] == 1
        assert line["confidence"] == {"title": 1.0, "total": 0.2}


def test_a_threshold_of_zero_reasks_only_failing_fields(documents):
    def logprob(body, text, token, at):
        start, end = _total_span(text)
        return math.log(0.01) if start <= at < end else 0.0

    def structured(body):
        return {"title": {"value": "Invoice", "page": 1}, "total": {"value": 7, "page": 1}}

    server = ScriptedServer([], structured=structured, logprob=logprob)
    try:
        options = ExtractOptions(pages_per_request=8, cache_dir=None, progress=False, uncertain_below=0.0)
        (line,) = extract([documents[0]], INVOICE, HTTPClient(server.url), options)
    finally:
        server.close()
    assert server.tool_requests() == [] and line["data"] == {"title": "Invoice", "total": 7}
    assert line["confidence"] == {"title": 1.0, "total": 0.01}
