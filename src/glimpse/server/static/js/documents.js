// The documents view: PDFs and images as page thumbnails, the document agent run with a pasted JSON
// schema, and each extracted field shown beside the page it was read from.

import { api, apiJSON, watchJob } from "./api.js";
import { dataUrl, imageThumbnail, kindOf, pdfPages } from "./media.js";
import { $, announce, blobUrl, bytes, el, number, parseObject } from "./ui.js";

const EXAMPLE_SCHEMA = {
  type: "object",
  properties: {
    title: { type: "string", description: "the document's title" },
    date: { type: "string", description: "the date the document was issued" },
    total: { type: "number", description: "the total amount" },
  },
  required: ["title"],
};

export class DocumentsView {
  constructor() {
    this.docs = [];
    this.job = null;
    $("schema").value = JSON.stringify(EXAMPLE_SCHEMA, null, 2);
    $("docs-choose").addEventListener("click", () => $("docs-input").click());
    $("docs-input").addEventListener("change", (e) => { this.addFiles([...e.target.files]); e.target.value = ""; });
    $("extract-form").addEventListener("submit", (e) => { e.preventDefault(); this.extract(); });
    $("extract-cancel").addEventListener("click", () => this.cancel());
  }

  addFiles(files) {
    for (const file of files) {
      const kind = kindOf(file);
      const doc = { id: Math.random().toString(36).slice(2), name: file.name || "pasted image", blob: file, kind,
        size: file.size, pages: [], error: null, loading: true };
      this.docs.push(doc);
      if (kind !== "pdf" && kind !== "image") {
        Object.assign(doc, { loading: false, error: `${doc.name} is not a PDF or an image` });
        continue;
      }
      const pages = kind === "pdf" ? pdfPages(file, 200)
        : imageThumbnail(file, 200).then((image) => [{ page: 1, image }]);
      pages.then((p) => { doc.pages = p; })
        .catch((e) => {  // a PDF the server can't read can't be sent; an image this browser can't show still can
          if (kind === "pdf") doc.error = e.message;
          else doc.note = "no preview in this browser";
        })
        .finally(() => { doc.loading = false; this.renderDocs(); });
    }
    this.renderDocs();
    announce(`${files.length} document${files.length === 1 ? "" : "s"} added`);
  }

  pageButton(doc, number_, small = true) {
    const page = doc.pages.find((p) => p.page === number_);
    if (!page) return el("span", { class: "no-page", text: number_ ? `page ${number_}` : "no page" });
    return el("button", {
      type: "button", class: small ? "page-thumb" : "page-thumb large", dataset: { page: String(number_) },
      "aria-label": `Show page ${number_} of ${doc.name}`, onclick: () => this.showPage(doc, number_),
    }, el("img", { src: page.image, alt: "" }), el("span", { text: `p. ${number_}` }));
  }

  renderDocs() {
    $("docs-list").replaceChildren(...this.docs.map((doc) => el("li", { class: "doc-card", dataset: { doc: doc.id } },
      el("div", { class: "doc-head" },
        el("strong", { class: "doc-name", text: doc.name }),
        el("span", { class: "muted", text: [bytes(doc.size), doc.pages.length ? `${doc.pages.length} page${doc.pages.length === 1 ? "" : "s"}` : ""].filter(Boolean).join(" · ") }),
        el("span", { class: "grow" }),
        el("button", {
          type: "button", class: "icon-button", "aria-label": `Remove ${doc.name}`, text: "×",
          onclick: () => { this.docs = this.docs.filter((d) => d !== doc); this.renderDocs(); },
        })),
      doc.error ? el("p", { class: "error-text", role: "alert", text: doc.error }) : null,
      doc.loading ? el("p", { class: "muted", text: "Rendering pages…" }) : null,
      doc.note ? el("p", { class: "muted", text: doc.note }) : null,
      el("ol", { class: "page-strip", "aria-label": `Pages of ${doc.name}` },
        doc.pages.map((p) => el("li", {}, this.pageButton(doc, p.page)))))));
  }

  async showPage(doc, page) {
    const dialog = $("page-dialog");
    $("page-title").textContent = `${doc.name}, page ${page}`;
    const image = $("page-image");
    image.alt = `Page ${page} of ${doc.name}`;
    image.src = doc.pages.find((p) => p.page === page).image;
    dialog.showModal();
    if (doc.kind === "image") {
      image.src = doc.url || (doc.url = URL.createObjectURL(doc.blob));
    } else {
      doc.large = doc.large || (await pdfPages(doc.blob, 1000).catch(() => null));
      const large = doc.large && doc.large.find((p) => p.page === page);
      if (large && dialog.open) image.src = large.image;
    }
  }

  setStatus(text, done = null, total = null) {
    $("extract-status").textContent = text;
    const bar = $("extract-progress");
    bar.hidden = total === null;
    if (total !== null) { bar.max = Math.max(1, total); bar.value = done; }
  }

  async extract() {
    $("extract-error").textContent = "";
    const docs = this.docs.filter((d) => !d.error && !d.loading);
    if (!docs.length) {
      $("extract-error").textContent = "Add a PDF or an image first.";
      return;
    }
    let schema, extra;
    try {
      schema = parseObject($("schema").value, "The schema");
      extra = parseObject($("ex-extra").value, "More options");
    } catch (e) {
      $("extract-error").textContent = e.message;
      return;
    }
    const options = { pages_per_request: Number($("ex-pages").value), max_num_tiles: Number($("ex-tiles").value), ...extra };
    $("extract").disabled = true;
    $("extract-results").replaceChildren(el("p", { class: "placeholder", text: "Waiting for the first document…" }));
    this.setStatus("Uploading…");
    try {
      const files = await Promise.all(docs.map(async (d) => ({ name: d.name, data: await dataUrl(d.blob) })));
      const job = await apiJSON("/v1/glimpse/extract", { method: "POST", json: { schema, files, options } });
      this.job = job.id;
      $("extract-cancel").hidden = false;
      const ended = await watchJob(job.id, (j) => {
        const p = j.progress;
        this.setStatus(j.status === "queued" ? "Waiting for a free slot…"
          : `Extracting: ${p.done} of ${p.total} document${p.total === 1 ? "" : "s"} · ${number(p.requests)} model requests`,
        p.done, p.total);
        this.renderResults(docs, (j.result && j.result.lines) || []);
      });
      if (ended.status === "failed") $("extract-error").textContent = ended.error;
      this.setStatus(ended.status === "done" ? `Done in ${ended.elapsed_s.toFixed(1)} s` : ended.status);
      announce(ended.status === "done" ? "The extraction is done" : `The extraction ${ended.status}`);
    } catch (e) {
      $("extract-error").textContent = e.message;
      this.setStatus("");
    } finally {
      this.job = null;
      $("extract").disabled = false;
      $("extract-cancel").hidden = true;
    }
  }

  async cancel() {
    if (!this.job) return;
    await api(`/v1/glimpse/jobs/${this.job}`, { method: "DELETE" }).catch(() => {});
  }

  renderResults(docs, lines) {
    const cards = lines.map((line, i) => {
      const doc = docs[i];
      const card = el("article", { class: "result-card card", dataset: { file: line.file } }, el("h3", { text: line.file }));
      if (line.error) {
        card.append(el("p", { class: "error-text", text: line.error }));
        return card;
      }
      const byPage = new Map();
      for (const [name, value] of Object.entries(line.data || {})) {
        const page = (line.pages || {})[name] || 0;
        if (!byPage.has(page)) byPage.set(page, []);
        byPage.get(page).push([name, value]);
      }
      for (const page of [...byPage.keys()].sort((a, b) => (a || 1e9) - (b || 1e9))) {
        const fields = el("dl", { class: "fields" });
        for (const [name, value] of byPage.get(page)) {
          fields.append(el("dt", { text: name }), el("dd", { dataset: { field: name, page: String(page) } },
            typeof value === "object" && value !== null ? el("pre", { text: JSON.stringify(value, null, 2) }) : String(value)));
        }
        card.append(el("div", { class: "page-group" }, doc ? this.pageButton(doc, page, false) : null, fields));
      }
      return card;
    });
    if (lines.length) {
      const jsonl = lines.map((l) => JSON.stringify(l)).join("\n") + "\n";
      cards.push(el("a", { class: "button ghost", href: blobUrl(jsonl, "application/x-ndjson"), download: "extracted.jsonl", text: "Download the lines (JSONL)" }));
    }
    if (cards.length) $("extract-results").replaceChildren(...cards);
  }
}
