"""The extraction agent: PDFs and images -> one JSON record per document, valid under the user's schema.

Each document becomes pages (PDF pages rendered, an image is one page, a multi-frame TIFF one page per
frame); pages go to the model `pages_per_request` at a time (4 by default: what the model reads well
in one request). Under a schema derived from the user's, each group answers every top-level field
with its value and the page it is on, or null; the groups' answers are merged (the first page that
has a field wins; lists are joined in page order). Each field's confidence is the lowest probability
of its value's tokens (the model's own log-probabilities, see confidence.py). The record is validated
with `jsonschema`; when fields fail, or are valid but less sure than `uncertain_below`, the model is
asked once more, for those fields only, with small views of the pages and a `zoom(page, box)` tool that
re-reads a region with more tiles (an uncertain field keeps its first value when the re-ask is even
less sure). Every line carries `confidence`: field -> that probability, or null when the server sent
no log-probabilities. A document that still fails, or cannot be read, gets its error in its line; the
batch goes on. Documents run in chunks, every request of a chunk in one batched call; finished
documents are cached, so an interrupted batch resumes.
"""

from __future__ import annotations

import csv
import json
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
from PIL import Image, ImageSequence
from tqdm import tqdm

from glimpse.agents.cache import ResultCache, default_cache_dir, file_key
from glimpse.agents.client import Completion, ModelClient, ModelRequest
from glimpse.agents.confidence import member_confidences
from glimpse.agents.loop import LoopLimits, Task, Tool, ToolError, ToolPlan, dumps, run_loops
from glimpse.agents.schemas import decoding_schema
from glimpse.processing.pdf import render_pdf

EXTRACT_VERSION = 2  # bump when prompts or the derived schemas change: cached results then no longer apply
PDF_SUFFIXES = {".pdf"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
SYSTEM = (
    "/no_think\nYou extract data from documents into JSON. Copy values exactly as the document writes "
    "them; never guess a value that the pages do not show."
)


class SchemaProblem(ValueError):
    """The user's schema can't drive an extraction (not an object schema with properties, or invalid)."""


@dataclass
class ExtractOptions:
    pages_per_request: int = 4
    max_pages: int = 64
    max_num_tiles: int = 6  # per page, in the groups
    zoom_tiles: int = 12
    overview_pages: int = 8  # pages shown (one tile each) when re-asking
    dpi: float = 120.0
    max_string: int = 2000  # bound for strings the schema leaves unbounded (decoding only)
    max_items: int = 256  # bound for arrays the schema leaves unbounded (decoding only)
    max_tokens: int = 4096
    batch_documents: int = 32  # documents per batched model call, at most
    batch_pages: int = 256  # pages per batched model call, about (a chunk closes once it has this many)
    prefetch_documents: int = 8  # documents loaded ahead of the model
    reask: bool = True
    # A valid field is re-asked when its value's confidence (the lowest probability of its tokens, see
    # confidence.py) is below this; 0 re-asks only missing or invalid fields.
    uncertain_below: float = 0.5
    limits: LoopLimits = field(default_factory=lambda: LoopLimits(max_steps=3))
    temperature: float = 0.0
    tables_dir: Path | None = None  # write list-of-object fields as CSV here
    cache_dir: Path | None = field(default_factory=default_cache_dir)
    progress: bool = True

    def params(self, model: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {
            "v": EXTRACT_VERSION, "model": model, "schema": schema, "group": self.pages_per_request,
            "max_pages": self.max_pages, "tiles": self.max_num_tiles, "zoom": self.zoom_tiles, "dpi": self.dpi,
            "string": self.max_string, "items": self.max_items, "max_tokens": self.max_tokens,
            "reask": self.reask, "overview": self.overview_pages, "temperature": self.temperature,
            "steps": self.limits.max_steps, "uncertain_below": self.uncertain_below,
        }  # fmt: skip


def expand_inputs(items: list[str | Path]) -> list[Path]:
    """Files as given; directories walked (sorted) for PDFs and images."""
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            out += sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in PDF_SUFFIXES | IMAGE_SUFFIXES
            )
        else:
            out.append(path)
    return out


def load_pages(path: Path, max_pages: int, dpi: float) -> list[Image.Image]:
    """A PDF's pages or an image's frames, as RGB images; ValueError (with a reason) when unreadable."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:1024].find(b"%PDF") != -1 or path.suffix.lower() in PDF_SUFFIXES:
        try:
            return render_pdf(data, max_pages=max_pages, dpi=dpi)
        except Exception as e:  # MediaError, LimitExceededError: the message says why
            raise ValueError(str(e)) from None
    try:
        with Image.open(path) as image:
            pages = [frame.convert("RGB") for frame in ImageSequence.Iterator(image)]
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a PDF or a readable image ({e})") from None
    if len(pages) > max_pages:
        raise ValueError(f"the image has {len(pages)} frames; at most {max_pages} pages are allowed")
    return pages


def _check_schema(schema: Any) -> None:
    if (
        not isinstance(schema, dict)
        or not isinstance(schema.get("properties"), dict)
        or not schema["properties"]
    ):
        raise SchemaProblem("the schema must be a JSON object schema with top-level properties")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise SchemaProblem(f"the schema is not a valid JSON Schema: {e.message}") from None


def _is_list(prop: dict[str, Any]) -> bool:
    types = prop.get("type")
    return types == "array" or (isinstance(types, list) and "array" in types)


@dataclass
class _Doc:
    index: int
    path: Path
    key: str | None = None
    pages: list[Image.Image] = field(default_factory=list)
    line: dict[str, Any] | None = None  # set once the document is done
    record: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)
    confidence: dict[str, float | None] = field(default_factory=dict)


class ExtractAgent:
    def __init__(
        self, client: ModelClient, schema: dict[str, Any], options: ExtractOptions | None = None
    ) -> None:
        _check_schema(schema)
        self.client = client
        self.schema = schema
        self.options = options or ExtractOptions()
        self.validator = jsonschema.validators.validator_for(schema)(schema)
        o = self.options
        self.fields = list(schema["properties"])
        self.defs = {k: decoding_schema(schema[k], o.max_string, o.max_items)
                     for k in ("$defs", "definitions") if k in schema}  # fmt: skip
        self.field_schemas = {
            name: decoding_schema(prop, o.max_string, o.max_items)
            for name, prop in schema["properties"].items()
        }
        self.params = o.params(client.name, schema)
        # Wall seconds per phase (a benchmark reads them): pages_wait (the model waiting for documents to
        # load), pages_load_threads (reading and rendering, summed over the loading threads), reask.
        self.timings: defaultdict[str, float] = defaultdict(float)
        self._timings_lock = threading.Lock()

    # ---------------------------------------------------------------------------------------- schemas
    def _object(self, properties: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object", "properties": properties, "required": list(properties),
                "additionalProperties": False, **self.defs}  # fmt: skip

    def _cited_field(self, name: str, first: int, last: int) -> dict[str, Any]:
        return self._object({"value": self.field_schemas[name],
                             "page": {"type": "integer", "minimum": first, "maximum": last}})  # fmt: skip

    def group_schema(self, first: int, last: int) -> dict[str, Any]:
        """Every field: null (not on these pages) or its value with the page it is on."""
        return self._object(
            {
                name: {"anyOf": [{"type": "null"}, self._cited_field(name, first, last)]}
                for name in self.fields
            }
        )

    # ---------------------------------------------------------------------------------------- requests
    def _schema_text(self) -> str:
        return json.dumps(self.schema, ensure_ascii=False)

    def group_request(self, doc: _Doc, first: int, last: int) -> ModelRequest:
        """Pages first..last (1-based, inclusive) of `doc`."""
        o = self.options
        content: list[dict[str, Any]] = []
        for number in range(first, last + 1):
            content += [
                {"type": "text", "text": f"Page {number}:"},
                {"type": "image", "image": doc.pages[number - 1]},
            ]
        content.append({"type": "text", "text": (
            f"These are pages {first} to {last} of {len(doc.pages)} of the document {doc.path.name}. Extract the "
            f"fields of this JSON schema: {self._schema_text()}\nFor each field give its value and the number of "
            "the page it appears on, or null when these pages do not show it."
        )})  # fmt: skip
        return ModelRequest(
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}],
            json_schema=self.group_schema(first, last), max_tokens=o.max_tokens, max_num_tiles=o.max_num_tiles,
            temperature=o.temperature, logprobs=True,
        )  # fmt: skip

    def _groups(self, doc: _Doc) -> list[tuple[int, int]]:
        n, size = len(doc.pages), self.options.pages_per_request
        return [(first, min(n, first + size - 1)) for first in range(1, n + 1, size)]

    # ---------------------------------------------------------------------------------------- merging
    def merge(
        self, doc: _Doc, answers: list[dict[str, Any] | None], groups: list[tuple[int, int]],
        confidences: list[dict[str, float | None]] | None = None,
    ) -> None:  # fmt: skip
        """The groups' answers into one record: the first group that has a field gives it (a list field
        joins every group's items, its confidence the lowest of theirs)."""
        confidences = confidences or [{} for _ in answers]
        for name in self.fields:
            found = []
            for answer, (first, last), sure in zip(answers, groups, confidences):
                item = (answer or {}).get(name)
                if isinstance(item, dict) and "value" in item:
                    page = item.get("page")
                    page = page if isinstance(page, int) and first <= page <= last else first
                    found.append((item["value"], page, sure.get(name)))
            if not found:
                continue
            if _is_list(self.schema["properties"][name]) and all(isinstance(v, list) for v, _, _ in found):
                doc.record[name] = [x for v, _, _ in found for x in v]
                known = [c for _, _, c in found if c is not None]
                doc.confidence[name] = min(known) if len(known) == len(found) else None
            else:
                doc.record[name] = found[0][0]
                doc.confidence[name] = found[0][2]
            doc.sources[name] = found[0][1]

    def uncertain_fields(self, doc: _Doc, skip: list[str]) -> list[str]:
        """Fields whose value's confidence is below `uncertain_below` (not those in `skip`)."""
        bar = self.options.uncertain_below
        return [name for name in self.fields if name not in skip and
                (c := doc.confidence.get(name)) is not None and c < bar]  # fmt: skip

    def failing_fields(self, record: dict[str, Any]) -> tuple[list[str], list[str]]:
        """(fields to ask again, validation messages)."""
        names, messages = set(), []
        for error in self.validator.iter_errors(record):
            messages.append(error.message)
            if error.path:
                names.add(str(error.path[0]))
            elif error.validator == "required":
                names.update(k for k in error.validator_value if k not in record)
            else:
                names.update(self.fields)
        return [f for f in self.fields if f in names], messages

    # ---------------------------------------------------------------------------------------- re-asking
    def _zoom_tool(self, doc: _Doc, names: list[str]) -> Tool:
        o = self.options

        def zoom(args: dict[str, Any]) -> ToolPlan:
            try:
                page = int(args.get("page"))
                box = [float(x) for x in args.get("box", [0, 0, 1, 1])]
            except (TypeError, ValueError):
                raise ToolError(
                    "page must be a page number and box four numbers [left, top, right, bottom]"
                ) from None
            if not 1 <= page <= len(doc.pages):
                raise ToolError(f"page must be between 1 and {len(doc.pages)}")
            if len(box) != 4:
                raise ToolError("box must be four numbers [left, top, right, bottom], fractions of the page")
            x0, y0, x1, y1 = (min(1.0, max(0.0, v)) for v in box)
            x0, x1 = sorted((x0, x1))
            y0, y1 = sorted((y0, y1))
            x1, y1 = max(x1, min(1.0, x0 + 0.05)), max(y1, min(1.0, y0 + 0.05))
            image = doc.pages[page - 1]
            w, h = image.size
            crop = image.crop(
                (
                    int(x0 * w),
                    int(y0 * h),
                    max(int(x0 * w) + 1, int(x1 * w)),
                    max(int(y0 * h) + 1, int(y1 * h)),
                )
            )
            schema = self._object({n: {"anyOf": [{"type": "null"}, self.field_schemas[n]]} for n in names})
            req = ModelRequest(
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": [
                    {"type": "image", "image": crop},
                    {"type": "text", "text": f"This is a region of page {page} of the document {doc.path.name}. "
                                             f"Read these fields from it, or null when it does not show them: {names}"},
                ]}],
                json_schema=schema, max_tokens=o.max_tokens, max_num_tiles=o.zoom_tiles, temperature=o.temperature,
            )  # fmt: skip
            arguments = {"page": page, "box": [round(v, 4) for v in (x0, y0, x1, y1)]}

            def finish(outs: list[Completion]) -> str:
                try:
                    return dumps({"page": page, "box": arguments["box"], "fields": outs[0].json()})
                except ValueError:
                    return "error: the region could not be read"

            return ToolPlan([req], finish, arguments)

        number = {"type": "integer", "description": "1-based page number"}
        box = {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
               "description": "[left, top, right, bottom] as fractions of the page, 0 to 1"}  # fmt: skip
        return Tool("zoom", "Re-read a region of a page at high resolution.", {"page": number, "box": box},
                    ["page", "box"], zoom)  # fmt: skip

    def reask_task(
        self, doc: _Doc, names: list[str], messages: list[str], uncertain: list[str] | None = None
    ) -> Task:
        """Ask again for `names` (missing or invalid, per `messages`) and `uncertain` (valid, but read
        with low confidence), with small views of the pages and the zoom tool."""
        uncertain = uncertain or []
        asked = [n for n in self.fields if n in set(names) | set(uncertain)]
        o = self.options
        shown = min(len(doc.pages), o.overview_pages)
        content: list[dict[str, Any]] = []
        for number in range(1, shown + 1):
            content += [
                {"type": "text", "text": f"Page {number}:"},
                {"type": "image", "image": doc.pages[number - 1]},
            ]
        problems = []
        if names:
            problems.append(f"These fields are missing or invalid: {names} ({'; '.join(messages[:10])}).")
        if uncertain:
            where = {n: doc.sources.get(n) for n in uncertain}
            problems.append(f"These fields were read with low confidence and may be wrong: {uncertain} (from "
                            f"pages {where}); read them again closely.")  # fmt: skip
        content.append({"type": "text", "text": (
            f"These are pages 1 to {shown} of {len(doc.pages)} of the document {doc.path.name}, shown small. "
            f"The schema is {self._schema_text()}\nThe extraction so far: {dumps(doc.record)}\n{' '.join(problems)} "
            "Use zoom(page, box) to read a region of a page at high resolution where they may be; box is "
            "[left, top, right, bottom] as fractions of the page."
        )})  # fmt: skip
        names = asked
        final = self._object({name: self._cited_field(name, 1, len(doc.pages)) for name in names})
        return Task(
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}],
            final_instruction=f"Now give the fields {names} as JSON, each with its value and the number of the "
            "page it appears on.",
            final_schema=final, final_max_tokens=o.max_tokens, tools=[self._zoom_tool(doc, names)], max_num_tiles=1,
            final_logprobs=True,
        )  # fmt: skip

    # ---------------------------------------------------------------------------------------- running
    def _error(self, doc: _Doc, message: str) -> None:
        doc.line = {"file": str(doc.path), "data": None, "pages": None, "error": message}

    def _load(self, doc: _Doc, cache_root) -> None:
        started = time.monotonic()
        try:
            self._load_pages(doc, cache_root)
        finally:
            with self._timings_lock:
                self.timings["pages_load_threads"] += time.monotonic() - started

    def _load_pages(self, doc: _Doc, cache_root) -> None:
        o = self.options
        try:
            doc.key = file_key(doc.path)
        except OSError as e:
            self._error(doc, f"cannot read the file ({e.strerror or e})")
            return
        cached = ResultCache(cache_root, "extract", doc.key, self.params).get("result")
        if cached is not None:
            doc.line = {**cached, "file": str(doc.path)}
            return
        try:
            doc.pages = load_pages(doc.path, o.max_pages, o.dpi)
        except (
            Exception
        ) as e:  # whatever a broken file makes the PDF or image library raise: its line says so
            self._error(doc, str(e) or type(e).__name__)

    def _chunk(self, docs: list[_Doc]) -> None:
        """Every loaded document of `docs` to its line: groups, merge, validation, one re-ask."""
        o = self.options
        todo = [d for d in docs if d.line is None]
        plan = [(d, g) for d in todo for g in self._groups(d)]
        outs = self.client.complete([self.group_request(d, *g) for d, g in plan])
        answers: dict[int, list] = {d.index: [] for d in todo}
        for (d, g), out in zip(plan, outs):
            if out.error:
                self._error(d, f"the model request failed: {out.error}")
                continue
            try:
                answers[d.index].append((out.json(), g, self._confidences(out)))
            except ValueError as e:
                answers[d.index].append((None, g, {}))
                if out.finish_reason == "length":
                    self._error(d, f"the answer for pages {g[0]}-{g[1]} ran out of tokens ({e})")
        todo = [d for d in todo if d.line is None]
        for d in todo:
            got = answers[d.index]
            self.merge(d, [a for a, _, _ in got], [g for _, g, _ in got], [c for _, _, c in got])
        failing = {d.index: self.failing_fields(d.record) for d in todo}
        doubtful = {d.index: self.uncertain_fields(d, failing[d.index][0]) for d in todo}
        retry = [d for d in todo if failing[d.index][0] or doubtful[d.index]] if o.reask else []
        if retry:
            started = time.monotonic()
            tasks = [self.reask_task(d, *failing[d.index], doubtful[d.index]) for d in retry]
            for d, result in zip(retry, run_loops(self.client, tasks, [], o.limits, o.temperature)):
                self._take_reasked(d, result, doubtful[d.index])
            self.timings["reask"] += time.monotonic() - started
        for d in todo:
            names, messages = self.failing_fields(d.record)
            if messages:
                self._error(d, "the record does not validate under the schema: " + "; ".join(messages[:5]))
                continue
            pages = {name: d.sources.get(name) for name in self.fields if name in d.record}
            sure = {name: _rounded(d.confidence.get(name)) for name in self.fields if name in d.record}
            d.line = {
                "file": str(d.path),
                "data": d.record,
                "pages": pages,
                "error": None,
                "confidence": sure,
            }
            ResultCache(o.cache_dir, "extract", d.key, self.params).put("result", d.line)
            if o.tables_dir is not None:
                write_tables(d.record, Path(o.tables_dir), f"{d.path.stem}-{d.key[:8]}")
        for d in docs:
            d.pages = []  # free the page images

    def _confidences(self, out: Completion) -> dict[str, float | None]:
        """Each field's confidence in an answer shaped {field: {"value", "page"} | null}."""
        return member_confidences(out.text, out.token_logprobs, {n: (n, "value") for n in self.fields})

    def _take_reasked(self, doc: _Doc, result: Any, uncertain: list[str]) -> None:
        """The re-ask's values into the record. A field that was only uncertain keeps its first value
        when the re-ask is less sure of its own; a missing or invalid one takes the new value."""
        final = result.final or {}
        sure = self._confidences(result.final_completion) if result.final_completion else {}
        for name, item in final.items():
            if not (isinstance(item, dict) and "value" in item):
                continue
            new, old = sure.get(name), doc.confidence.get(name)
            if name in uncertain and old is not None and (new is None or new < old):
                continue
            doc.record[name] = item["value"]
            doc.confidence[name] = new
            page = item.get("page")
            doc.sources[name] = page if isinstance(page, int) and 1 <= page <= len(doc.pages) else 1

    def run(self, inputs: list[str | Path]) -> Iterator[dict[str, Any]]:
        """One line per input file, in input order.

        Documents load (read, render) a few ahead in threads while the model works on the current
        chunk; a chunk closes at `batch_documents` documents or `batch_pages` pages, which bounds memory.
        """
        paths = expand_inputs(inputs)
        o = self.options
        bar = tqdm(total=len(paths), desc="documents", unit="doc", disable=not o.progress, leave=False)
        pending = iter(enumerate(paths))
        window: deque[tuple[_Doc, Future]] = deque()
        with ThreadPoolExecutor(4) as pool:

            def load_next() -> None:
                for index, path in pending:
                    doc = _Doc(index, path)
                    window.append((doc, pool.submit(self._load, doc, o.cache_dir)))
                    return

            for _ in range(o.prefetch_documents):
                load_next()
            chunk: list[_Doc] = []
            pages = 0
            try:
                while window:
                    doc, loading = window.popleft()
                    waited = time.monotonic()
                    loading.result()
                    self.timings["pages_wait"] += time.monotonic() - waited
                    load_next()
                    chunk.append(doc)
                    pages += len(doc.pages)
                    if len(chunk) >= o.batch_documents or pages >= o.batch_pages or not window:
                        self._chunk(chunk)
                        for d in chunk:
                            bar.update(1)
                            yield d.line
                        chunk, pages = [], 0
            finally:
                bar.close()


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def write_tables(record: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """Each field holding a list of objects, as `stem.FIELD.csv` (nested values as JSON)."""
    written = []
    for name, value in record.items():
        if not isinstance(value, list) or not value or not all(isinstance(r, dict) for r in value):
            continue
        columns = list(dict.fromkeys(k for row in value for k in row))
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{stem}.{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for row in value:
                writer.writerow([
                    json.dumps(row[c], ensure_ascii=False) if isinstance(row.get(c), dict | list) else row.get(c, "")
                    for c in columns
                ])  # fmt: skip
        written.append(path)
    return written


def extract(
    inputs: list[str | Path], schema: dict[str, Any], client: ModelClient, options: ExtractOptions | None = None,
    out: str | Path | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run the extraction; with `out`, also write the lines there (JSONL, flushed as they come)."""
    agent = ExtractAgent(client, schema, options)
    lines = []
    handle = open(out, "w", encoding="utf-8") if out is not None else None
    try:
        for line in agent.run(inputs):
            lines.append(line)
            if handle is not None:
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
                handle.flush()
    finally:
        if handle is not None:
            handle.close()
    return lines
