"""The video report as files: `report.json`, `report.md` and one self-contained `report.html`.

The HTML needs nothing but itself and the video beside it: styles and script inline, keyframes as
`data:` URIs, the `<video>` pointing at the input by a path relative to the report. Every time citation
is a link that seeks the player; the timeline shows the keyframes, the chapters and the cited ranges.
All text from the model is escaped.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from glimpse.agents.cache import write_json_atomic
from glimpse.agents.notes import NOTE_KINDS, clock

_CSS = """
:root { --fg: #1d232a; --muted: #5b6875; --line: #d8dee4; --accent: #0b6bcb; --cite: #e8590c; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, sans-serif; color: var(--fg); margin: 0; background: #f6f8fa; }
header, main { max-width: 1100px; margin: 0 auto; padding: 16px 24px; }
h1 { font-size: 22px; margin: 8px 0 4px; word-break: break-all; }
h2 { font-size: 17px; margin: 0 0 8px; }
.meta { color: var(--muted); margin: 0; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px; margin: 0 0 16px; }
video { width: 100%; max-height: 60vh; background: #000; border-radius: 6px; }
#ruler { position: relative; height: 34px; background: #eef2f6; border-radius: 4px; cursor: pointer; margin: 8px 0; }
#ruler .chapter { position: absolute; top: 0; height: 18px; border-left: 2px solid #fff; overflow: hidden;
  font-size: 11px; color: #fff; padding: 1px 4px; white-space: nowrap; text-decoration: none; }
#ruler .mark { position: absolute; top: 20px; height: 12px; min-width: 3px; background: var(--cite);
  border-radius: 2px; opacity: .85; }
#cursor { position: absolute; top: 0; bottom: 0; width: 2px; background: #000; left: 0; pointer-events: none; }
#timeline { display: flex; gap: 4px; overflow-x: auto; padding-bottom: 6px; }
.kf { flex: 1 0 96px; text-decoration: none; color: var(--muted); font-size: 12px; text-align: center;
  border: 2px solid transparent; border-radius: 4px; }
.kf img { width: 100%; display: block; border-radius: 3px; background: #ccc; min-height: 40px; }
.kf .nokf { display: block; min-height: 40px; background: #ccc; border-radius: 3px; padding-top: 10px; }
.kf.active { border-color: var(--accent); }
a.cite { color: var(--cite); text-decoration: none; font-variant-numeric: tabular-nums; white-space: nowrap; }
a.cite:hover { text-decoration: underline; }
.q { font-weight: 600; }
.text { white-space: pre-wrap; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
td, th { border-top: 1px solid var(--line); padding: 4px 6px; text-align: left; vertical-align: top; }
details { border-top: 1px solid var(--line); padding: 6px 0; }
summary { cursor: pointer; }
.error { color: #b42318; }
.steps { font-size: 13px; color: var(--muted); }
"""

_JS = """
(function () {
  const player = document.getElementById("player");
  const duration = Number(document.body.dataset.duration) || 1;
  const cursor = document.getElementById("cursor");
  const frames = Array.from(document.querySelectorAll(".kf"));
  function mark(t) {
    if (cursor) cursor.style.left = Math.min(100, 100 * t / duration) + "%";
    frames.forEach(function (f) {
      const on = t >= Number(f.dataset.start) && t < Number(f.dataset.end);
      f.classList.toggle("active", on);
    });
  }
  function seek(t) {
    mark(t);
    if (!player) return;
    player.currentTime = t;
    const playing = player.play();
    if (playing && playing.catch) playing.catch(function () {});
  }
  document.addEventListener("click", function (e) {
    const link = e.target.closest("[data-start]");
    if (link) {
      e.preventDefault();
      seek(Number(link.dataset.start));
      history.replaceState(null, "", "#t=" + link.dataset.start);
      return;
    }
    const ruler = e.target.closest("#ruler");
    if (ruler) {
      const box = ruler.getBoundingClientRect();
      seek(duration * (e.clientX - box.left) / box.width);
    }
  });
  if (player) player.addEventListener("timeupdate", function () { mark(player.currentTime); });
  const start = /^#t=([0-9.]+)$/.exec(location.hash);
  if (start) seek(Number(start[1]));
  else mark(0);
})();
"""

_COLOURS = ["#0b6bcb", "#2b8a3e", "#ae3ec9", "#e67700", "#1098ad", "#c2255c", "#5c7cfa", "#66a80f"]


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _span_label(start: float, end: float) -> str:
    return clock(start) if int(start) == int(end) else f"{clock(start)}–{clock(end)}"


def _cite(start: float, end: float) -> str:
    return (f'<a class="cite" href="#t={start:g}" data-start="{start:g}" data-end="{end:g}" '
            f'title="{start:.1f}–{end:.1f} s">{_span_label(start, end)}</a>')  # fmt: skip


def _video_src(video: Path, out_dir: Path) -> str:
    try:
        return quote(Path(os.path.relpath(video.resolve(), out_dir.resolve())).as_posix())
    except ValueError:  # another drive
        return video.resolve().as_uri()


def _cited_section(title: str, anchor: str, cited: dict[str, Any], question: str | None = None) -> str:
    parts = [f'<section id="{anchor}"><h2>{_e(title)}</h2>']
    if question:
        parts.append(f'<p class="q">{_e(question)}</p>')
    parts.append(f'<p class="text">{_e(cited["text"])}</p>')
    if cited["citations"]:
        links = " ".join(_cite(c["start"], c["end"]) for c in cited["citations"])
        parts.append(f'<p class="cites">Sources: {links}</p>')
    if cited.get("error"):
        parts.append(f'<p class="error">{_e(cited["error"])}</p>')
    steps = cited.get("steps") or []
    calls = [c for s in steps for c in s["calls"]]
    if calls:
        items = "".join(
            f"<li>{_e(c['name'])}({_e(json.dumps(c['arguments'], ensure_ascii=False))})</li>" for c in calls
        )
        counted = f"{_plural(len(calls), 'tool call')} in {_plural(len(steps), 'step')}"
        parts.append(f'<details class="steps"><summary>{counted} (stopped: {_e(cited.get("stopped"))})</summary>'
                     f"<ol>{items}</ol></details>")  # fmt: skip
    parts.append("</section>")
    return "".join(parts)


def render_html(report: dict[str, Any], thumbnails: dict[int, bytes], video_src: str) -> str:
    d = max(report["duration"], 1e-6)
    name = Path(report["file"]).name
    s = report["sampling"]
    meta = (f"{clock(report['duration'])} · {len(report['segments'])} segments of about {s['segment_seconds']:g} s · "
            f"{s['fps']:g} fps, at most {s['frames_per_segment']} frames per segment · EVS {s['video_pruning_rate']:g}"
            f" · model {report['model']}")  # fmt: skip
    ruler = []
    for k, c in enumerate(report.get("chapters") or []):
        left, width = 100 * c["start"] / d, max(0.3, 100 * (c["end"] - c["start"]) / d)
        ruler.append(
            f'<a class="chapter" style="left:{left:.3f}%;width:{width:.3f}%;background:{_COLOURS[k % len(_COLOURS)]}" '
            f'href="#t={c["start"]:g}" data-start="{c["start"]:g}" data-end="{c["end"]:g}" '
            f'title="{_e(c["title"])}">{_e(c["title"])}</a>'
        )
    for cited in (report.get("answer"), report.get("summary")):
        for c in (cited or {}).get("citations", []):
            left, width = 100 * c["start"] / d, 100 * (c["end"] - c["start"]) / d
            ruler.append(f'<span class="mark" style="left:{left:.3f}%;width:{width:.3f}%" '
                         f'title="cited {c["start"]:.1f}–{c["end"]:.1f} s"></span>')  # fmt: skip
    frames = []
    for seg in report["segments"]:
        jpeg = thumbnails.get(seg["index"])
        img = (f'<img alt="keyframe at {seg["keyframe"]:.1f} s" src="data:image/jpeg;base64,'
               f'{base64.b64encode(jpeg).decode("ascii")}">' if jpeg else '<span class="nokf">no keyframe</span>')  # fmt: skip
        frames.append(
            f'<a class="kf" href="#t={seg["start"]:g}" data-start="{seg["start"]:g}" data-end="{seg["end"]:g}" '
            f'style="flex-grow:{max(0.1, seg["end"] - seg["start"]):.2f}">{img}{clock(seg["start"])}</a>'
        )
    body = [
        f'<header><h1>{_e(name)}</h1><p class="meta">{_e(meta)}</p></header><main>',
        f'<section id="player-box"><video id="player" controls preload="metadata" src="{_e(video_src)}"></video>'
        f'<div id="ruler" title="click to seek">{"".join(ruler)}<div id="cursor"></div></div>'
        f'<div id="timeline">{"".join(frames)}</div></section>',
    ]
    if report.get("answer"):
        body.append(_cited_section("Answer", "answer", report["answer"], report.get("question")))
    if report.get("summary"):
        body.append(_cited_section("Summary", "summary", report["summary"]))
    if report.get("chapters") is not None:
        rows = "".join(
            f"<tr><td>{_cite(c['start'], c['end'])}</td><td><b>{_e(c['title'])}</b></td><td>{_e(c['summary'])}</td></tr>"
            for c in report["chapters"]
        )
        body.append(f'<section id="chapters"><h2>Chapters</h2><table>{rows}</table></section>')
    seg_html = []
    for seg in report["segments"]:
        rows = []
        for kind in NOTE_KINDS:
            for item in seg[kind]:
                rows.append(f"<tr><td>{_cite(item['start'], item['end'])}</td><td>{_e(kind.replace('_', ' '))}</td>"
                            f"<td>{_e(item['text'])}</td></tr>")  # fmt: skip
        error = f'<p class="error">{_e(seg["error"])}</p>' if seg.get("error") else ""
        seg_html.append(
            f"<details><summary>{_cite(seg['start'], seg['end'])} {_e(seg['summary'])}</summary>{error}"
            f"<table>{''.join(rows)}</table></details>"
        )
    body.append(f'<section id="segments"><h2>Notes by segment</h2>{"".join(seg_html)}</section>')
    if report.get("errors"):
        body.append('<section id="errors"><h2>Errors</h2>'
                    + "".join(f'<p class="error">{_e(x)}</p>' for x in report["errors"]) + "</section>")  # fmt: skip
    body.append("</main>")
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(name)}: video report</title><style>{_CSS}</style></head>"
        f'<body data-duration="{report["duration"]:g}">{"".join(body)}<script>{_JS}</script></body></html>\n'
    )


def _md(text: Any) -> str:
    return str(text).replace("\n", " ").replace("|", "\\|")


def render_markdown(report: dict[str, Any]) -> str:
    s = report["sampling"]
    out = [
        f"# Video report: {Path(report['file']).name}",
        "",
        f"- File: `{report['file']}` ({clock(report['duration'])}, {report['duration']:g} s)",
        f"- Model: {report['model']}",
        f"- Sampling: {len(report['segments'])} segments of about {s['segment_seconds']:g} s, {s['fps']:g} fps, "
        f"at most {s['frames_per_segment']} frames per segment, EVS pruning rate {s['video_pruning_rate']:g}",
        "",
    ]

    def cited(title: str, c: dict[str, Any], question: str | None = None) -> None:
        out.extend([f"## {title}", ""])
        if question:
            out.extend([f"**Q:** {_md(question)}", ""])
        out.extend([c["text"], ""])
        if c["citations"]:
            out.extend(
                [
                    "Sources: " + ", ".join(f"[{_span_label(x['start'], x['end'])}]" for x in c["citations"]),
                    "",
                ]
            )
        if c.get("error"):
            out.extend([f"_Error: {_md(c['error'])}_", ""])

    if report.get("answer"):
        cited("Answer", report["answer"], report.get("question"))
    if report.get("summary"):
        cited("Summary", report["summary"])
    if report.get("chapters") is not None:
        out.extend(["## Chapters", "", "| time | title | summary |", "|---|---|---|"])
        out += [f"| {_span_label(c['start'], c['end'])} | {_md(c['title'])} | {_md(c['summary'])} |"
                for c in report["chapters"]]  # fmt: skip
        out.append("")
    out.extend(["## Notes by segment", ""])
    for seg in report["segments"]:
        out.extend(
            [f"### {_span_label(seg['start'], seg['end'])}", "", _md(seg["summary"]) or "_(no summary)_", ""]
        )
        if seg.get("error"):
            out.extend([f"_Error: {_md(seg['error'])}_", ""])
        for kind in NOTE_KINDS:
            for item in seg[kind]:
                out.append(
                    f"- {kind.replace('_', ' ')} [{_span_label(item['start'], item['end'])}]: {_md(item['text'])}"
                )
        out.append("")
    return "\n".join(out)


def write_video_reports(
    report: dict[str, Any], thumbnails: dict[int, bytes], video: Path, out_dir: Path
) -> dict[str, Path]:
    """Write report.json, report.md and report.html into `out_dir`; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "html": out_dir / "report.html"}
    write_json_atomic(paths["json"], report, indent=2)
    paths["md"].write_text(render_markdown(report), encoding="utf-8")
    paths["html"].write_text(
        render_html(report, thumbnails, _video_src(Path(video), out_dir)), encoding="utf-8"
    )
    return paths
