// Small DOM helpers shared by the views. Text always goes in through textContent, never as HTML.

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

export const $ = (id) => document.getElementById(id);

/** "1:05", "12:00:03"; `precise` adds tenths ("0:02.5") when the time is not a whole second. */
export function clock(seconds, precise = false) {
  const t = Math.max(0, seconds || 0);
  const whole = Math.floor(t);
  const h = Math.floor(whole / 3600), m = Math.floor((whole % 3600) / 60), s = whole % 60;
  const tenths = precise && Math.abs(t - whole) >= 0.05 ? "." + Math.floor((t - whole) * 10 + 1e-6) : "";
  const ss = String(s).padStart(2, "0") + tenths;
  return h ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

export function bytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KB", "MB", "GB", "TB"];
  let v = n / 1024, i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v < 10 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

export const number = (n) => Number(n).toLocaleString("en-US");

let announceTimer = 0;
/** Say something to screen readers (the polite live region). */
export function announce(message) {
  const region = $("announcer");
  clearTimeout(announceTimer);
  region.textContent = "";
  announceTimer = setTimeout(() => { region.textContent = message; }, 50);
}

/** Resolve on the first of `events` from `target`; reject on "error" or after `ms`. */
export function once(target, events, ms = 15000) {
  return new Promise((resolve, reject) => {
    const names = [].concat(events);
    const done = (fn, value) => {
      clearTimeout(timer);
      for (const n of names) target.removeEventListener(n, ok);
      target.removeEventListener("error", bad);
      fn(value);
    };
    const ok = (e) => done(resolve, e);
    const bad = () => done(reject, new Error(`${names.join("/")} failed`));
    const timer = setTimeout(() => done(reject, new Error(`${names.join("/")} timed out`)), ms);
    for (const n of names) target.addEventListener(n, ok);
    target.addEventListener("error", bad);
  });
}

/** Parse a JSON object typed by a user; an Error whose message says what is wrong. */
export function parseObject(text, what) {
  if (!text.trim()) return {};
  let value;
  try { value = JSON.parse(text); } catch (e) { throw new Error(`${what} is not valid JSON: ${e.message}`); }
  if (!value || typeof value !== "object" || Array.isArray(value)) throw new Error(`${what} must be a JSON object`);
  return value;
}

/** A download link's target for `data` (kept until the page goes). */
export function blobUrl(data, type) {
  return URL.createObjectURL(new Blob([data], { type }));
}
