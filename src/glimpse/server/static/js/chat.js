// The chat view: streaming answers with the reasoning folded under them, /think, stop and regenerate,
// attachments (images, PDFs, videos) with previews, and conversations kept in this browser.

import { api, events } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import { dataUrl, kindOf, preview } from "./media.js";
import { deleteConversation, listConversations, saveConversation } from "./store.js";
import { VideoPanel } from "./timeline.js";
import { $, announce, bytes, clock, el, number, parseObject } from "./ui.js";

const SETTINGS = "glimpse.chatSettings";
const newId = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
const words = (text) => (text.trim() ? text.trim().split(/\s+/).length : 0);

export class ChatView {
  constructor(model) {
    this.model = model;  // the served model's id, or null when /v1/models did not answer
    this.conversation = null;
    this.pending = [];  // attachments for the next message
    this.panels = new Map();  // attachment id -> VideoPanel, kept across re-renders
    this.controller = null;
    this.messagesEl = $("messages");
    this.text = $("composer-text");
    this.bind();
    this.loadSettings();
  }

  async start() {
    const all = await listConversations();
    if (all.length) this.open(all[0]);
    else this.newConversation();
    await this.renderList();
  }

  // ---------------------------------------------------------------------------------------- events
  bind() {
    $("composer").addEventListener("submit", (e) => { e.preventDefault(); this.send(); });
    this.text.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); this.send(); }
    });
    document.addEventListener("keydown", (e) => {
      if (e.key !== "Escape" || document.querySelector("dialog[open]")) return;
      if (document.body.classList.contains("sidebar-open")) {
        this.toggleSidebar(false);
        $("menu").focus();
      } else if (!$("settings").hidden && $("settings").contains(document.activeElement)) {
        this.toggleSettings(false);
        $("settings-toggle").focus();
      } else if (this.controller) {
        this.stop();
      }
    });
    $("stop").addEventListener("click", () => this.stop());
    $("attach").addEventListener("click", () => $("attach-input").click());
    $("attach-input").addEventListener("change", (e) => { this.addFiles([...e.target.files]); e.target.value = ""; });
    $("new-chat").addEventListener("click", () => { this.newConversation(); this.renderList(); this.text.focus(); });
    $("settings-toggle").addEventListener("click", () => this.toggleSettings());
    $("settings-close").addEventListener("click", () => { this.toggleSettings(false); $("settings-toggle").focus(); });
    $("set-evs").addEventListener("input", () => { $("set-evs-value").value = Number($("set-evs").value).toFixed(2); });
    $("settings").addEventListener("change", () => this.saveSettings());
    $("think").addEventListener("change", () => this.saveSettings());
    this.messagesEl.addEventListener("click", (e) => this.onMessageClick(e));
    $("menu").addEventListener("click", () => this.toggleSidebar());
    $("sidebar-close").addEventListener("click", () => { this.toggleSidebar(false); $("menu").focus(); });
  }

  toggleSettings(open) {
    const panel = $("settings");
    const show = open === undefined ? panel.hidden : open;
    panel.hidden = !show;
    $("settings-toggle").setAttribute("aria-expanded", String(show));
  }

  toggleSidebar(open) {
    const show = open === undefined ? !document.body.classList.contains("sidebar-open") : open;
    document.body.classList.toggle("sidebar-open", show);
    $("menu").setAttribute("aria-expanded", String(show));
  }

  // -------------------------------------------------------------------------------------- settings
  loadSettings() {
    let saved = {};
    try { saved = JSON.parse(localStorage.getItem(SETTINGS) || "{}"); } catch { saved = {}; }
    for (const [id, value] of Object.entries(saved)) {
      const input = $(id);
      if (!input) continue;
      if (input.type === "checkbox") input.checked = Boolean(value);
      else input.value = value;
    }
    $("set-evs-value").value = Number($("set-evs").value).toFixed(2);
  }

  saveSettings() {
    const ids = ["think", "set-system", "set-max-tokens", "set-temperature", "set-top-p", "set-tiles", "set-fps",
      "set-frames", "set-evs", "set-extra"];
    const values = Object.fromEntries(ids.map((id) => [id, $(id).type === "checkbox" ? $(id).checked : $(id).value]));
    localStorage.setItem(SETTINGS, JSON.stringify(values));
  }

  /** The request's fields from the settings; throws an Error that names the bad setting. */
  requestFields() {
    $("settings-error").textContent = "";
    const num = (id, what) => {
      const raw = $(id).value.trim();
      if (!raw) return undefined;
      const value = Number(raw);
      if (!Number.isFinite(value)) throw new Error(`${what} must be a number`);
      return value;
    };
    const fields = {
      max_tokens: num("set-max-tokens", "Max tokens"),
      temperature: num("set-temperature", "Temperature"),
      top_p: num("set-top-p", "Top p"),
      video_pruning_rate: num("set-evs", "EVS"),
    };
    const tiles = num("set-tiles", "Tiles per image");
    if (tiles !== undefined) fields.mm_processor_kwargs = { max_num_tiles: tiles };
    const fps = num("set-fps", "Frames per second"), frames = num("set-frames", "Frames at most");
    if (fps !== undefined || frames !== undefined) {
      fields.media_io_kwargs = { video: { ...(fps !== undefined && { fps }), ...(frames !== undefined && { num_frames: frames }) } };
    }
    return { ...fields, ...parseObject($("set-extra").value, "Extra request fields") };
  }

  // ---------------------------------------------------------------------------------- attachments
  addFiles(files) {
    for (const file of files) {
      const kind = kindOf(file);
      const att = {
        id: newId(), kind, name: file.name || `pasted ${kind || "file"}`, type: file.type, size: file.size,
        blob: file, thumb: null, detail: "", error: null,
      };
      if (!kind) att.error = `${att.name} is not an image, a PDF or a video`;
      this.pending.push(att);
      if (!kind) continue;
      att.loading = preview(att).then((p) => Object.assign(att, p))
        .catch((e) => {  // a PDF the server refuses can't be sent; media this browser can't show still can
          if (kind === "pdf") att.error = e.message;
          else att.detail = "no preview in this browser";
        })
        .finally(() => { att.loading = null; this.renderTray(); });
    }
    this.renderTray();
    announce(`${files.length} file${files.length === 1 ? "" : "s"} attached`);
  }

  renderTray() {
    const tray = $("tray");
    tray.hidden = this.pending.length === 0;
    tray.replaceChildren(...this.pending.map((att) => {
      const picture = att.thumb ? el("img", { src: att.thumb, alt: "" }) : el("span", { class: `placeholder ${att.kind || "bad"}`, text: att.kind || "?" });
      const detail = att.error || [att.kind === "video" && att.duration ? clock(att.duration) : att.detail, bytes(att.size)]
        .filter(Boolean).join(" · ");
      return el("li", { class: `tray-item${att.error ? " has-error" : ""}${att.loading ? " loading" : ""}`, dataset: { kind: att.kind || "" } },
        picture,
        el("span", { class: "tray-name", text: att.name, title: att.name }),
        el("span", { class: att.error ? "tray-detail error-text" : "tray-detail", text: att.loading ? "preparing…" : detail }),
        el("button", {
          type: "button", class: "icon-button remove", "aria-label": `Remove ${att.name}`, text: "×",
          onclick: () => { this.pending = this.pending.filter((a) => a !== att); this.renderTray(); this.text.focus(); },
        }));
    }));
  }

  // -------------------------------------------------------------------------------- conversations
  newConversation() {
    this.stop();
    this.conversation = { id: newId(), title: "New chat", created: Date.now(), updated: Date.now(), messages: [] };
    this.render();
  }

  open(conversation) {
    this.stop();
    this.conversation = conversation;
    for (const m of conversation.messages) {
      for (const att of m.attachments || []) if (!att.url) att.url = URL.createObjectURL(att.blob);
    }
    this.render();
    this.toggleSidebar(false);
  }

  async renderList() {
    const all = await listConversations();
    const current = this.conversation && this.conversation.id;
    $("conversations").replaceChildren(...all.map((c) => el("li", { class: "conversation" },
      el("button", {
        type: "button", class: "conversation-open", "aria-current": c.id === current ? "true" : null,
        title: c.title, onclick: () => { this.open(c); this.renderList(); },
      }, el("span", { class: "conversation-title", text: c.title }),
      el("span", { class: "conversation-date", text: new Date(c.updated).toLocaleString() })),
      el("button", {
        type: "button", class: "icon-button", "aria-label": `Delete the conversation ${c.title}`, text: "×",
        onclick: async () => {
          await deleteConversation(c.id);
          if (c.id === current) this.newConversation();
          this.renderList();
        },
      }))));
  }

  async persist() {
    const c = this.conversation;
    if (!c.messages.length) return;
    const first = c.messages.find((m) => m.role === "user");
    if (first && c.title === "New chat") {
      const text = first.text.trim() || (first.attachments[0] && first.attachments[0].name) || "New chat";
      c.title = text.length > 60 ? text.slice(0, 57) + "…" : text;
    }
    try {
      await saveConversation(c);
    } catch (e) {
      announce(`The conversation could not be kept in this browser: ${e.message}`);
    }
    this.renderList();
  }

  // -------------------------------------------------------------------------------------- sending
  async send() {
    if (this.controller) return;
    const text = this.text.value.trim();
    const ready = this.pending.filter((a) => !a.error);
    if (!text && !ready.length) { this.text.focus(); return; }
    let fields;
    try {
      fields = this.requestFields();
    } catch (e) {
      this.toggleSettings(true);
      $("settings-error").textContent = e.message;
      return;
    }
    await Promise.all(ready.map((a) => a.loading));
    for (const att of ready) att.url = URL.createObjectURL(att.blob);
    this.conversation.messages.push({ role: "user", text, attachments: ready });
    this.pending = [];
    this.text.value = "";
    this.renderTray();
    this.render();
    this.persist();
    await this.generate(fields);
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  async regenerate() {
    if (this.controller) return;
    const messages = this.conversation.messages;
    if (messages.length && messages[messages.length - 1].role === "assistant") messages.pop();
    let fields;
    try {
      fields = this.requestFields();
    } catch (e) {
      this.toggleSettings(true);
      $("settings-error").textContent = e.message;
      return;
    }
    this.render();
    await this.generate(fields);
  }

  async requestMessages(think) {
    const system = $("set-system").value.trim();
    const out = [{ role: "system", content: (think ? "/think" : "/no_think") + (system ? `\n${system}` : "") }];
    for (const m of this.conversation.messages) {
      if (m.role === "assistant") {
        if (m.content) out.push({ role: "assistant", content: m.content });
        continue;
      }
      const parts = [];
      for (const att of m.attachments) {
        att.dataUrl = att.dataUrl || (await dataUrl(att.blob));
        if (att.kind === "image") parts.push({ type: "image_url", image_url: { url: att.dataUrl } });
        else if (att.kind === "video") parts.push({ type: "video_url", video_url: { url: att.dataUrl } });
        else parts.push({ type: "file", file: { file_data: att.dataUrl, filename: att.name } });
      }
      if (m.text) parts.push({ type: "text", text: m.text });
      out.push({ role: "user", content: parts.length === 1 && parts[0].type === "text" ? m.text : parts });
    }
    return out;
  }

  async generate(fields) {
    const think = $("think").checked;
    const msg = { role: "assistant", content: "", reasoning: "", chunks: 0, think, started: Date.now(), error: null };
    const messages = this.conversation.messages;
    messages.push(msg);
    const index = messages.length - 1;
    this.controller = new AbortController();
    this.setBusy(true);
    this.render();
    try {
      const body = {
        ...(this.model && { model: this.model }), messages: await this.requestMessages(think),
        stream: true, stream_options: { include_usage: true }, ...fields,
      };
      const response = await api("/v1/chat/completions", {
        method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" },
        signal: this.controller.signal,
      });
      for await (const event of events(response)) {
        if (event.error) {
          msg.error = { status: event.error.code, message: event.error.message };
          break;
        }
        if (event.media) this.applyMedia(event.media, index);
        if (event.usage) msg.usage = event.usage;
        for (const choice of event.choices || []) {
          if (choice.index !== 0) continue;
          const delta = choice.delta || {};
          msg.reasoning += delta.reasoning_content || "";
          msg.content += delta.content || "";
          if (choice.finish_reason) msg.finish = choice.finish_reason;
        }
        msg.chunks += 1;
        if (!msg.firstToken && (msg.content || msg.reasoning)) msg.firstToken = Date.now();
        this.scheduleUpdate(msg, index);
      }
    } catch (e) {
      if (e.name === "AbortError") msg.stopped = true;
      else msg.error = { status: e.status, message: e.message };
    } finally {
      msg.elapsed = (Date.now() - msg.started) / 1000;
      this.controller = null;
      this.setBusy(false);
      this.render();
      this.persist();
      announce(msg.error ? `Error: ${msg.error.message}` : msg.stopped ? "Stopped" : "The answer is complete");
    }
  }

  setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
    this.messagesEl.setAttribute("aria-busy", String(busy));
    document.body.classList.toggle("generating", busy);
  }

  scheduleUpdate(msg, index) {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      const node = this.messagesEl.querySelector(`[data-index="${index}"]`);
      if (node) node.replaceWith(this.renderAssistant(msg, index));
      this.stickToBottom();
    });
  }

  /** Hand the engine's per-media report to the attachments it describes, in prompt order. */
  applyMedia(media, upTo) {
    const attachments = this.conversation.messages.slice(0, upTo).filter((m) => m.role === "user")
      .flatMap((m) => m.attachments);
    const videos = media.filter((e) => e.type === "video");
    const images = media.filter((e) => e.type === "image");
    let v = 0, im = 0;
    for (const att of attachments) {
      if (att.kind === "video" && v < videos.length) {
        att.report = videos[v++];
        const panel = this.panels.get(att.id);
        if (panel) panel.setReport(att.report);
      } else if (att.kind === "image" && im < images.length) {
        att.tokens = images[im++].tokens;
      } else if (att.kind === "pdf") {
        let tokens = 0, pages = 0;
        while (im < images.length && images[im].page !== undefined && (pages === 0 || images[im].page > pages)) {
          tokens += images[im].tokens;
          pages = images[im++].page;
        }
        att.tokens = tokens;
      }
    }
    for (const att of attachments) {
      if (att.kind === "video") continue;
      const caption = this.messagesEl.querySelector(`[data-attachment="${att.id}"] .attachment-tokens`);
      if (caption && att.tokens) caption.textContent = `${number(att.tokens)} tokens`;
    }
  }

  // ------------------------------------------------------------------------------------ rendering
  render() {
    const messages = this.conversation.messages;
    const nodes = messages.map((m, i) => (m.role === "user" ? this.renderUser(m, i) : this.renderAssistant(m, i)));
    $("empty").hidden = messages.length > 0;
    this.messagesEl.replaceChildren($("empty"), ...nodes);
    const live = new Set(messages.flatMap((m) => (m.attachments || []).map((a) => a.id)));
    for (const id of this.panels.keys()) if (!live.has(id)) this.panels.delete(id);
    this.stickToBottom(true);
  }

  stickToBottom(force = false) {
    const box = this.messagesEl;
    const near = box.scrollHeight - box.scrollTop - box.clientHeight < 160;
    if (force || near) box.scrollTop = box.scrollHeight;
  }

  renderUser(m, index) {
    const attachments = m.attachments.map((att) => {
      if (att.kind === "video") {
        let panel = this.panels.get(att.id);
        if (!panel) {
          panel = new VideoPanel(att);
          this.panels.set(att.id, panel);
        }
        panel.node.dataset.attachment = att.id;
        return panel.node;
      }
      const picture = att.kind === "image" ? el("img", { src: att.url, alt: att.name })
        : el("img", { src: att.thumb, alt: `First page of ${att.name}` });
      return el("figure", { class: `attachment ${att.kind}`, dataset: { attachment: att.id } }, picture,
        el("figcaption", {}, el("span", { class: "attachment-name", text: att.name }),
          el("span", { class: "attachment-detail", text: att.detail || "" }),
          el("span", { class: "attachment-tokens", text: att.tokens ? `${number(att.tokens)} tokens` : "" })));
    });
    return el("article", { class: "message user", dataset: { index: String(index) }, "aria-label": "You" },
      attachments.length ? el("div", { class: "attachments" }, attachments) : null,
      m.text ? el("p", { class: "user-text", text: m.text }) : null);
  }

  /** The latest video at or before message `index` (what its cited times refer to). */
  videoFor(index) {
    for (let i = index; i >= 0; i--) {
      const m = this.conversation.messages[i];
      const videos = (m.attachments || []).filter((a) => a.kind === "video");
      if (videos.length) return videos[videos.length - 1];
    }
    return null;
  }

  renderAssistant(m, index) {
    const streaming = this.controller && index === this.conversation.messages.length - 1;
    const video = this.videoFor(index);
    const maxTime = video ? (this.panels.get(video.id) || {}).duration || video.duration || 86400 : 0;
    const answer = el("div", { class: "answer" });
    if (m.content) answer.append(renderMarkdown(m.content, { maxTime }));
    else if (streaming) answer.append(el("p", { class: "typing", text: m.reasoning ? "Reasoning…" : "Waiting for the model…" }));
    const parts = [answer];
    if (m.reasoning) {
      const details = el("details", { class: "reasoning" },
        el("summary", {}, el("span", { text: streaming && !m.content ? "Reasoning (live)" : "Reasoning" }),
          el("span", { class: "muted", text: ` · ${number(words(m.reasoning))} words` })),
        el("div", { class: "reasoning-body" }, renderMarkdown(m.reasoning, { maxTime })));
      const old = this.messagesEl.querySelector(`[data-index="${index}"] details.reasoning`);
      if (old && old.open) details.open = true;
      parts.push(details);
    }
    if (m.error) {
      parts.push(el("div", { class: "error", role: "alert" },
        el("span", { class: "error-label", text: m.error.status ? `Error ${m.error.status}` : "Error" }),
        el("span", { class: "error-message", text: m.error.message })));
    }
    if (m.stopped) parts.push(el("p", { class: "muted", text: "Stopped." }));
    if (!streaming) {
      parts.push(el("p", { class: "meta", text: this.describe(m) }));
      const last = index === this.conversation.messages.length - 1;
      parts.push(el("div", { class: "message-actions" },
        last ? el("button", { type: "button", class: "ghost small regenerate", text: "Regenerate", onclick: () => this.regenerate() }) : null,
        m.content ? el("button", {
          type: "button", class: "ghost small", text: "Copy",
          onclick: () => navigator.clipboard.writeText(m.content).then(() => announce("Copied"), () => announce("Copying is not allowed here")),
        }) : null));
    }
    return el("article", {
      class: `message assistant${streaming ? " streaming" : ""}`, "aria-label": "Model",
      dataset: { index: String(index), chunks: String(m.chunks || 0), finish: m.finish || "" },
    }, parts);
  }

  describe(m) {
    const bits = [];
    const u = m.usage;
    if (u) {
      bits.push(`${number(u.prompt_tokens)} prompt + ${number(u.completion_tokens)} generated tokens`);
      if (u.video_tokens) bits.push(`video tokens: ${number(u.video_tokens.kept)} kept of ${number(u.video_tokens.total)}`);
      if (u.prompt_tokens_details && u.prompt_tokens_details.cached_tokens) {
        bits.push(`${number(u.prompt_tokens_details.cached_tokens)} cached`);
      }
    }
    if (m.elapsed) bits.push(`${m.elapsed.toFixed(1)} s`);
    if (m.firstToken && u && u.completion_tokens > 1 && m.elapsed) {
      const decode = m.elapsed - (m.firstToken - m.started) / 1000;
      if (decode > 0) bits.push(`${(u.completion_tokens / decode).toFixed(1)} tokens/s`);
    }
    if (m.finish && m.finish !== "stop") bits.push(`finished: ${m.finish}`);
    if (m.think) bits.push("/think");
    return bits.join(" · ");
  }

  onMessageClick(e) {
    const link = e.target.closest("a.time");
    if (!link) return;
    e.preventDefault();
    const index = Number(link.closest("[data-index]").dataset.index);
    const video = this.videoFor(index);
    const panel = video && this.panels.get(video.id);
    if (!panel) return;
    const start = Number(link.dataset.start), end = Number(link.dataset.end);
    panel.seek(start, end);
    panel.node.scrollIntoView({ block: "nearest", behavior: matchMedia("(prefers-reduced-motion: reduce)").matches ? "auto" : "smooth" });
    announce(`Playing ${video.name} from ${clock(start, true)}`);
  }
}
