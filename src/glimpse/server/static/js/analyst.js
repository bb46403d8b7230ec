// The video analyst view: upload a video, watch the job's progress, open its report (the report's player
// plays the file this browser holds, else the server's copy).

import { api, apiJSON, upload, watchJob } from "./api.js";
import { grabFrames } from "./media.js";
import { $, announce, blobUrl, bytes, clock, el, number, parseObject } from "./ui.js";

const RECENT = "glimpse.analyses";
const STAGES = {
  queued: () => "Waiting for a free slot…",
  scanning: () => "Looking for scene changes…",
  notes: (p) => `Writing notes: ${p.done} of about ${p.total} segment${p.total === 1 ? "" : "s"}`,
  answering: (p) => `Answering from the notes: ${number(p.requests)} model requests so far`,
  done: () => "Done",
};

export class AnalystView {
  constructor() {
    this.file = null;
    this.files = new Map();  // job id -> the File this browser uploaded
    this.job = null;
    this.controller = null;
    $("video-choose").addEventListener("click", () => $("video-input").click());
    $("video-input").addEventListener("change", (e) => { if (e.target.files[0]) this.pick(e.target.files[0]); e.target.value = ""; });
    $("analyst-form").addEventListener("submit", (e) => { e.preventDefault(); this.analyse(); });
    $("analyse-cancel").addEventListener("click", () => this.cancel());
    $("report-open").addEventListener("click", () => { if (this.reportUrl) window.open(this.reportUrl, "_blank"); });
    this.renderRecent();
  }

  addFiles(files) {
    if (files.length) this.pick(files[0]);
  }

  async pick(file) {
    this.file = file;
    const box = $("video-picked");
    box.hidden = false;
    const info = el("span", { class: "muted", text: bytes(file.size) });
    box.replaceChildren(el("span", { class: "thumb" }), el("strong", { text: file.name }), info);
    const url = URL.createObjectURL(file);
    try {
      const meta = await grabFrames(url, [0.5], 160, (_, image) => box.firstChild.replaceChildren(el("img", { src: image, alt: "" })));
      info.textContent = `${clock(meta.duration)} · ${meta.width}×${meta.height} · ${bytes(file.size)}`;
    } catch {
      info.textContent = `${bytes(file.size)} · this browser can't preview it; the server may still read it`;
    } finally {
      URL.revokeObjectURL(url);
    }
  }

  options() {
    const num = (id) => Number($(id).value);
    const question = $("an-question").value.trim();
    return {
      ...(question && { question }),
      summary: $("an-summary").checked, chapters: $("an-chapters").checked,
      segment_seconds: num("an-segment"), fps: num("an-fps"), frames_per_segment: num("an-frames"),
      video_pruning_rate: num("an-evs"), ...parseObject($("an-extra").value, "More options"),
    };
  }

  setStatus(text, done = null, total = null) {
    $("analyst-status").textContent = text;
    const bar = $("analyst-progress");
    bar.hidden = total === null;
    if (total !== null) { bar.max = Math.max(1, total); bar.value = Math.min(done, total); }
  }

  async analyse() {
    $("analyst-error").textContent = "";
    if (!this.file) {
      $("analyst-error").textContent = "Choose a video first.";
      return;
    }
    let options;
    try { options = this.options(); } catch (e) { $("analyst-error").textContent = e.message; return; }
    const file = this.file;
    const query = new URLSearchParams({ name: file.name || "video.mp4", options: JSON.stringify(options) });
    this.controller = new AbortController();
    $("analyse").disabled = true;
    $("analyse-cancel").hidden = false;
    $("report").hidden = true;
    try {
      this.setStatus("Uploading…", 0, 1);
      const job = await upload(`/v1/glimpse/video?${query}`, file, (share) => this.setStatus(`Uploading: ${Math.round(100 * share)}%`, share, 1), this.controller.signal);
      this.job = job.id;
      this.files.set(job.id, file);
      this.remember(job);
      const ended = await watchJob(job.id, (j) => {
        const p = j.progress;
        this.setStatus((STAGES[j.stage] || (() => j.stage))(p), p.done, j.stage === "notes" ? p.total : null);
      }, { signal: this.controller.signal });
      this.remember(ended);
      if (ended.status === "done") {
        this.setStatus(`Done in ${ended.elapsed_s.toFixed(1)} s · ${number(ended.progress.requests)} model requests`);
        await this.showReport(ended);
        announce("The report is ready");
      } else {
        this.setStatus(ended.status);
        if (ended.error) $("analyst-error").textContent = ended.error;
      }
    } catch (e) {
      if (e.name !== "AbortError") $("analyst-error").textContent = e.message;
      this.setStatus(e.name === "AbortError" ? "Cancelled" : "");
    } finally {
      this.job = null;
      this.controller = null;
      $("analyse").disabled = false;
      $("analyse-cancel").hidden = true;
      this.renderRecent();
    }
  }

  async cancel() {
    if (this.job) await api(`/v1/glimpse/jobs/${this.job}`, { method: "DELETE" }).catch(() => {});
    if (this.controller) this.controller.abort();
  }

  /** The report page, its player pointed at the video this browser holds (or fetched from the server). */
  async showReport(job) {
    let file = this.files.get(job.id);
    if (!file) file = await (await api(`/v1/glimpse/jobs/${job.id}/video`)).blob();
    const videoUrl = URL.createObjectURL(file);
    const html = await (await api(`/v1/glimpse/jobs/${job.id}/report.html?video_src=${encodeURIComponent(videoUrl)}`)).text();
    this.reportUrl = blobUrl(html, "text/html");
    $("report-frame").src = this.reportUrl;
    $("report-title").textContent = `Report: ${job.name}`;
    $("report-json").href = blobUrl(JSON.stringify(job.result, null, 2), "application/json");
    $("report").hidden = false;
    $("report").scrollIntoView({ block: "start", behavior: "smooth" });
  }

  remember(job) {
    const recent = this.recent().filter((j) => j.id !== job.id);
    recent.unshift({ id: job.id, name: job.name, created: job.created, status: job.status });
    localStorage.setItem(RECENT, JSON.stringify(recent.slice(0, 20)));
  }

  recent() {
    try { return JSON.parse(localStorage.getItem(RECENT) || "[]"); } catch { return []; }
  }

  renderRecent() {
    const recent = this.recent();
    $("jobs").replaceChildren(...(recent.length ? recent.map((j) => el("li", { class: "job" },
      el("span", { class: "job-name", text: j.name }),
      el("span", { class: "muted", text: `${new Date(j.created * 1000).toLocaleString()} · ${j.status}` }),
      el("span", { class: "grow" }),
      j.status === "done" ? el("button", {
        type: "button", class: "ghost small", text: "Open report", "aria-label": `Open the report on ${j.name}`,
        onclick: () => this.reopen(j.id),
      }) : null)) : [el("li", { class: "muted", text: "None yet." })]));
  }

  async reopen(id) {
    $("analyst-error").textContent = "";
    try {
      const job = await apiJSON(`/v1/glimpse/jobs/${id}`);
      if (job.status !== "done") throw new Error(`the job is ${job.status}`);
      await this.showReport(job);
    } catch (e) {
      $("analyst-error").textContent = e.message;
    }
  }
}
