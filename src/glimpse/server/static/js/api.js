// Talking to the server: the API key (asked once, kept in this tab's session), errors as the server
// words them, server-sent events, and uploads with progress.

const KEY = "glimpse.apiKey";

export class ApiError extends Error {
  constructor(status, message, type = null, param = null) {
    super(message);
    this.status = status;
    this.type = type;
    this.param = param;
  }
}

export const apiKey = () => sessionStorage.getItem(KEY) || "";
export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

let askForKey = null;
/** `ask(message)` shows the key dialog with the server's message; resolves true when a key was given. */
export function onKeyNeeded(ask) { askForKey = ask; }

function withKey(headers = {}) {
  const key = apiKey();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : { ...headers };
}

/** The server's error body ({"error": {"message", ...}}) as an ApiError, its message untouched. */
export async function errorOf(response) {
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) {
      return new ApiError(response.status, body.error.message, body.error.type, body.error.param);
    }
  } catch { /* not JSON: fall through */ }
  return new ApiError(response.status, text.trim() || `${response.status} ${response.statusText}`);
}

/** fetch() with the key; a 401 asks for a key and tries again; any other failure throws an ApiError. */
export async function api(path, { method = "GET", body, headers, signal } = {}) {
  for (;;) {
    let response;
    try {
      response = await fetch(path, { method, body, headers: withKey(headers), signal });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, `the server did not answer (${e.message})`);
    }
    if (response.ok) return response;
    const error = await errorOf(response);
    if (response.status === 401 && askForKey && (await askForKey(error.message))) continue;
    throw error;
  }
}

export async function apiJSON(path, options = {}) {
  const { json, ...rest } = options;
  if (json !== undefined) {
    rest.body = JSON.stringify(json);
    rest.headers = { ...(rest.headers || {}), "Content-Type": "application/json" };
  }
  return (await api(path, rest)).json();
}

/** The data of each server-sent event of a response, parsed; stops at "[DONE]". */
export async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  } finally {
    reader.releaseLock();
  }
}

/** POST a file as the body, reporting upload progress (fetch can't); resolves to the JSON answer. */
export function upload(path, file, onProgress, signal) {
  const attempt = () => new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [k, v] of Object.entries(withKey({ "Content-Type": file.type || "application/octet-stream" }))) {
      xhr.setRequestHeader(k, v);
    }
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onload = () => resolve(xhr);
    xhr.onerror = () => reject(new ApiError(0, "the upload failed: the server did not answer"));
    xhr.onabort = () => reject(new DOMException("aborted", "AbortError"));
    if (signal) signal.addEventListener("abort", () => xhr.abort(), { once: true });
    xhr.send(file);
  });
  return (async () => {
    for (;;) {
      const xhr = await attempt();
      if (xhr.status >= 200 && xhr.status < 300) return JSON.parse(xhr.responseText);
      const error = await errorOf(new Response(xhr.responseText, { status: xhr.status }));
      if (xhr.status === 401 && askForKey && (await askForKey(error.message))) continue;
      throw error;
    }
  })();
}

/** Poll a job until it ends, calling `onUpdate(job)` each time; resolves to the ended job. */
export async function watchJob(id, onUpdate, { interval = 1000, signal } = {}) {
  for (;;) {
    const job = await apiJSON(`/v1/glimpse/jobs/${encodeURIComponent(id)}`, { signal });
    onUpdate(job);
    if (["done", "failed", "cancelled"].includes(job.status)) return job;
    await new Promise((resolve) => setTimeout(resolve, interval));
    if (signal && signal.aborted) throw new DOMException("aborted", "AbortError");
  }
}
