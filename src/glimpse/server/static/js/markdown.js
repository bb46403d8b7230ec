// The answer as DOM: a small, safe subset of Markdown (code blocks, headings, lists, quotes, paragraphs,
// inline code, bold, italics, http links), built with createElement, so model output is never HTML.
// With `maxTime`, times and time ranges in the text ("0:12", "1:02-1:10", "12.5 seconds",
// "between 3 and 5 s") become links that seek the player.

import { clock, el } from "./ui.js";

const NUM = String.raw`\d+(?:\.\d+)?`;
const CLOCK = String.raw`(?:\d{1,2}:)?\d{1,2}:\d{2}(?:\.\d+)?`;
const UNIT = String.raw`(?:s|secs?|seconds?)(?![\p{L}\d])`;
const SEP = String.raw`\s*(?:-|–|—|to|and|until)\s*`;
const TIME = new RegExp(
  String.raw`(?<![\d:.])(?:(?<c1>${CLOCK})(?:${SEP}(?<c2>${CLOCK}))?(?![\d:])` +
  String.raw`|(?<s1>${NUM})(?:\s*${UNIT})?${SEP}(?<s2>${NUM})\s*${UNIT}` +
  String.raw`|(?<s3>${NUM})\s*${UNIT})`,
  "gu",
);

export function parseClock(text) {
  return text.split(":").reduce((total, part) => total * 60 + Number(part), 0);
}

/** Each time or time range in `text`: {index, length, start, end} (seconds), none past `maxTime`. */
export function findTimes(text, maxTime = Infinity) {
  const found = [];
  for (const m of text.matchAll(TIME)) {
    const g = m.groups;
    let start, end;
    if (g.c1) [start, end] = [parseClock(g.c1), g.c2 ? parseClock(g.c2) : null];
    else if (g.s1) [start, end] = [Number(g.s1), Number(g.s2)];
    else [start, end] = [Number(g.s3), null];
    if (end !== null && end < start) continue;
    if (start > maxTime + 0.5) continue;
    found.push({ index: m.index, length: m[0].length, start, end: end === null ? start : Math.min(end, maxTime) });
  }
  return found;
}

function timeLink(text, start, end) {
  const label = end > start ? `${clock(start, true)} to ${clock(end, true)}` : clock(start, true);
  return el("a", {
    class: "time", href: `#t=${start}`, text,
    dataset: { start: String(start), end: String(end) },
    title: `Play from ${label}`, "aria-label": `${text}: play the video from ${label}`,
  });
}

function addText(parent, text, options) {
  if (!options.maxTime) {
    parent.append(text);
    return;
  }
  let at = 0;
  for (const t of findTimes(text, options.maxTime)) {
    parent.append(text.slice(at, t.index), timeLink(text.slice(t.index, t.index + t.length), t.start, t.end));
    at = t.index + t.length;
  }
  parent.append(text.slice(at));
}

const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([\s\S]+?)\*\*|__([\s\S]+?)__|\*([^*\s](?:[^*]*[^*\s])?)\*|\b_([^_\s](?:[^_]*[^_\s])?)_\b|\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g;

function addInline(parent, text, options) {
  let at = 0;
  for (const m of text.matchAll(INLINE)) {
    addText(parent, text.slice(at, m.index), options);
    if (m[1]) parent.append(el("code", { text: m[2] }));
    else if (m[3] || m[4]) addInline(parent.appendChild(el("strong")), m[3] || m[4], options);
    else if (m[5] || m[6]) addInline(parent.appendChild(el("em")), m[5] || m[6], options);
    else parent.append(el("a", { href: m[8], text: m[7], target: "_blank", rel: "noopener noreferrer" }));
    at = m.index + m[0].length;
  }
  addText(parent, text.slice(at), options);
}

function addLines(parent, lines, options) {
  lines.forEach((line, i) => {
    if (i) parent.append(el("br"));
    addInline(parent, line, options);
  });
}

const FENCE = /^\s*(```|~~~)/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const ORDERED = /^\s*(\d+)[.)]\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;
const startsBlock = (line) => FENCE.test(line) || HEADING.test(line) || BULLET.test(line) || ORDERED.test(line)
  || QUOTE.test(line);

/** `text` as a fragment of safe DOM. */
export function renderMarkdown(text, options = {}) {
  const out = document.createDocumentFragment();
  const lines = String(text || "").replace(/\r\n/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) { i++; continue; }
    const fence = FENCE.exec(line);
    if (fence) {
      const body = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) body.push(lines[i]);
      i++;
      out.append(el("pre", {}, el("code", { text: body.join("\n") })));
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      const h = el(`h${Math.min(6, heading[1].length + 2)}`);
      addInline(h, heading[2], options);
      out.append(h);
      i++;
      continue;
    }
    const bullet = BULLET.test(line);
    if (bullet || ORDERED.test(line)) {
      const pattern = bullet ? BULLET : ORDERED;
      const list = el(bullet ? "ul" : "ol");
      const first = ORDERED.exec(line);
      if (!bullet && first[1] !== "1") list.setAttribute("start", first[1]);
      while (i < lines.length && pattern.test(lines[i])) {
        const m = pattern.exec(lines[i]);
        const item = [m[m.length - 1]];
        for (i++; i < lines.length && /^\s{2,}\S/.test(lines[i]) && !startsBlock(lines[i]); i++) item.push(lines[i].trim());
        const li = el("li");
        addLines(li, item, options);
        list.append(li);
      }
      out.append(list);
      continue;
    }
    if (QUOTE.test(line)) {
      const body = [];
      for (; i < lines.length && QUOTE.test(lines[i]); i++) body.push(QUOTE.exec(lines[i])[1]);
      const quote = el("blockquote");
      addLines(quote, body, options);
      out.append(quote);
      continue;
    }
    const para = [];
    for (; i < lines.length && lines[i].trim() && (!para.length || !startsBlock(lines[i])); i++) para.push(lines[i]);
    const p = el("p");
    addLines(p, para, options);
    out.append(p);
  }
  return out;
}
