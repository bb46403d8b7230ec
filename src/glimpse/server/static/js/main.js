// The playground's entry: tabs, the served model's name, the API key dialog, and files dropped or pasted
// anywhere going to the open view.

import { ApiError, apiJSON, apiKey, onKeyNeeded, setApiKey } from "./api.js";
import { AnalystView } from "./analyst.js";
import { ChatView } from "./chat.js";
import { DocumentsView } from "./documents.js";
import { $, announce } from "./ui.js";

const TABS = { chat: "tab-chat", documents: "tab-docs", video: "tab-video" };

let asking = null;  // one dialog at a time: requests that need the key meanwhile wait for the same answer

function askForKey(message) {
  if (!asking) asking = showKeyDialog(message).finally(() => { asking = null; });
  else $("key-error").textContent = message || "";
  return asking;
}

function showKeyDialog(message) {
  const dialog = $("key-dialog");
  $("key-error").textContent = message || "";
  $("key-input").value = apiKey();
  return new Promise((resolve) => {
    const done = (given) => {
      $("key-form").onsubmit = null;
      $("key-cancel").onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      showKeyButton();
      resolve(given);
    };
    $("key-form").onsubmit = (e) => {
      e.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      setApiKey(key);
      done(true);
    };
    $("key-cancel").onclick = () => done(false);
    $("key-forget").onclick = () => { setApiKey(""); $("key-input").value = ""; };
    dialog.onclose = () => done(false);
    if (!dialog.open) dialog.showModal();
    $("key-input").focus();
  });
}

function showKeyButton() {
  const button = $("key-button");
  button.hidden = !apiKey();
  button.textContent = "API key ✓";
  button.setAttribute("aria-label", "Change or forget the API key");
}

function selectTab(name, focus = false) {
  for (const [key, id] of Object.entries(TABS)) {
    const tab = $(id);
    const on = key === name;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    $(tab.getAttribute("aria-controls")).hidden = !on;
    if (on && focus) tab.focus();
  }
  document.body.dataset.view = name;
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

function bindTabs() {
  const names = Object.keys(TABS);
  for (const [name, id] of Object.entries(TABS)) {
    $(id).addEventListener("click", () => selectTab(name));
    $(id).addEventListener("keydown", (e) => {
      const at = names.indexOf(name);
      const to = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: names.length - 1 }[e.key];
      if (to === undefined) return;
      e.preventDefault();
      selectTab(names[(to + names.length) % names.length], true);
    });
  }
  const start = location.hash.slice(1);
  selectTab(TABS[start] ? start : "chat");
}

function bindFiles(views) {
  const overlay = $("drop-overlay");
  let depth = 0;
  const hasFiles = (e) => e.dataTransfer && [...e.dataTransfer.types].includes("Files");
  window.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    depth += 1;
    overlay.hidden = false;
  });
  window.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) overlay.hidden = true;
  });
  window.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  window.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0;
    overlay.hidden = true;
    views[document.body.dataset.view].addFiles([...e.dataTransfer.files]);
  });
  document.addEventListener("paste", (e) => {
    const files = [...((e.clipboardData && e.clipboardData.files) || [])];
    if (!files.length) return;
    e.preventDefault();
    views[document.body.dataset.view].addFiles(files);
  });
}

async function main() {
  onKeyNeeded(askForKey);
  $("key-button").addEventListener("click", () => askForKey(""));
  showKeyButton();
  bindTabs();
  if (document.documentElement.dataset.apiKey === "required" && !apiKey()) await askForKey("");
  let model = null;
  try {
    const models = await apiJSON("/v1/models");
    model = models.data[0].id;
    $("model").textContent = model;
  } catch (e) {
    $("model").textContent = e instanceof ApiError ? `server: ${e.message}` : String(e.message);
    $("model").classList.add("error-text");
  }
  const views = { chat: new ChatView(model), documents: new DocumentsView(), video: new AnalystView() };
  bindFiles(views);
  await views.chat.start();
  document.body.dataset.ready = "true";
  announce(model ? `Connected to ${model}` : "The server did not list a model");
}

main();
