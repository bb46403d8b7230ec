// A video in the conversation: the player, and under it the frames the model saw, placed at their true
// times on a ruler, with a strip of thumbnails. `seek(start, end)` plays a cited range and marks it.

import { grabFrames } from "./media.js";
import { clock, el, number } from "./ui.js";

const THUMBS_AT_MOST = 256;  // frames past this get a tick on the ruler but no picture

export class VideoPanel {
  constructor(attachment) {
    this.attachment = attachment;
    this.duration = attachment.duration || 0;
    this.player = el("video", {
      class: "player", controls: true, preload: "metadata", playsinline: true, src: attachment.url,
      "aria-label": `Video ${attachment.name}`,
    });
    this.cursor = el("div", { class: "cursor" });
    this.range = el("div", { class: "range", hidden: true });
    this.ticks = el("div", { class: "ticks" });
    this.ruler = el("div", { class: "ruler", "aria-hidden": "true", title: "Click to seek" },
      this.ticks, this.range, this.cursor);
    this.frames = el("ol", { class: "frames", "aria-label": "Frames the model saw" });
    this.caption = el("p", { class: "timeline-caption", text: "The frames the model sees appear here once it answers." });
    this.node = el("figure", { class: "video-panel" }, this.player,
      el("div", { class: "timeline" }, this.ruler, this.frames), el("figcaption", {}, this.caption));
    this.ruler.addEventListener("click", (e) => {
      const box = this.ruler.getBoundingClientRect();
      this.seek(this.span() * (e.clientX - box.left) / box.width);
    });
    this.stopAt = null;  // the end of a cited range being played
    this.ownSeek = false;
    this.player.addEventListener("timeupdate", () => {
      this.showTime();
      if (this.stopAt !== null && this.player.currentTime >= this.stopAt) {
        this.stopAt = null;
        this.player.pause();
      }
    });
    this.player.addEventListener("seeking", () => { if (!this.ownSeek) this.stopAt = null; });
    this.player.addEventListener("seeked", () => { this.ownSeek = false; });
    this.player.addEventListener("loadedmetadata", () => {
      this.duration = this.player.duration;
      this.place();
    });
    if (attachment.report) this.setReport(attachment.report);
  }

  span() {
    const seconds = (this.report && this.report.seconds) || [];
    return this.duration || Math.max(1, ...seconds);
  }

  /** The engine's report for this video: {frame_indices, seconds, tokens, tokens_kept}. */
  setReport(report) {
    if (this.report && JSON.stringify(this.report.seconds) === JSON.stringify(report.seconds)) {
      this.report = report;
      this.describe();
      return;
    }
    this.report = report;
    const seconds = report.seconds || [];
    this.ticks.replaceChildren(...seconds.map(() => el("span", { class: "tick" })));
    this.frames.replaceChildren(...seconds.map((t, i) => el("li", {},
      el("button", {
        type: "button", class: "frame", dataset: { t: String(t), index: String(report.frame_indices[i]) },
        "aria-label": `Frame ${i + 1} of ${seconds.length}, at ${clock(t, true)}: play from here`,
        onclick: () => this.seek(t),
      }, el("span", { class: "frame-image" }), el("span", { class: "frame-time", text: clock(t, true) })))));
    this.place();
    this.describe();
    const wanted = seconds.slice(0, THUMBS_AT_MOST);
    const buttons = [...this.frames.querySelectorAll(".frame-image")];
    grabFrames(this.attachment.url, wanted, 96, (i, image) => {
      buttons[i].replaceChildren(el("img", { src: image, alt: "" }));
    }).then((info) => {
      this.duration = this.duration || info.duration;
      this.place();
      this.node.dataset.framesDrawn = String(wanted.length);
    }).catch(() => { this.node.dataset.framesDrawn = "failed"; });
  }

  describe() {
    const r = this.report;
    const n = (r.seconds || []).length;
    let text = `${number(n)} frame${n === 1 ? "" : "s"} sampled`;
    if (r.tokens) {
      const share = r.tokens ? Math.round((100 * r.tokens_kept) / r.tokens) : 100;
      text += ` · ${number(r.tokens_kept)} of ${number(r.tokens)} video tokens kept (${share}%)`;
    }
    this.caption.textContent = text;
  }

  place() {
    const span = this.span();
    const seconds = (this.report && this.report.seconds) || [];
    [...this.ticks.children].forEach((tick, i) => {
      tick.style.left = `${Math.min(100, (100 * seconds[i]) / span)}%`;
    });
    this.showTime();
  }

  showTime() {
    const t = this.player.currentTime || 0;
    this.cursor.style.left = `${Math.min(100, (100 * t) / this.span())}%`;
    const seconds = (this.report && this.report.seconds) || [];
    let current = -1;
    seconds.forEach((s, i) => { if (s <= t + 0.05) current = i; });
    this.frames.querySelectorAll(".frame").forEach((f, i) => f.classList.toggle("current", i === current));
    if (current !== this.current) {
      this.current = current;
      const item = this.frames.children[current];
      if (item) {  // keep the current frame in view inside the strip (never scrolls the page)
        const strip = this.frames;
        if (item.offsetLeft < strip.scrollLeft || item.offsetLeft + item.offsetWidth > strip.scrollLeft + strip.clientWidth) {
          strip.scrollLeft = item.offsetLeft - strip.clientWidth / 2 + item.offsetWidth / 2;
        }
      }
    }
  }

  /** Play from `start`; mark `start`..`end` on the ruler when it is a range. */
  seek(start, end = start) {
    const span = this.span();
    if (end > start) {
      this.range.hidden = false;
      this.range.style.left = `${Math.min(100, (100 * start) / span)}%`;
      this.range.style.width = `${Math.max(0.5, Math.min(100, (100 * (end - start)) / span))}%`;
    } else {
      this.range.hidden = true;
    }
    this.stopAt = end > start ? end : null;
    this.ownSeek = true;
    this.player.currentTime = start;
    this.showTime();
    const playing = this.player.play();
    if (playing && playing.catch) playing.catch(() => {});
  }
}
