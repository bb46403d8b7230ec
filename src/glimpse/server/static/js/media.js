// Files a user attaches: their kind, a thumbnail, frames grabbed from a video at given times, PDF pages.

import { apiJSON } from "./api.js";
import { once } from "./ui.js";

export function kindOf(file) {
  const type = (file.type || "").toLowerCase();
  const name = (file.name || "").toLowerCase();
  if (type === "application/pdf" || name.endsWith(".pdf")) return "pdf";
  if (type.startsWith("image/")) return "image";
  if (type.startsWith("video/") || /\.(mp4|m4v|mov|webm|mkv|avi)$/.test(name)) return "video";
  return null;
}

export function dataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function drawTo(source, width, height) {
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = Math.max(1, Math.round(height));
  canvas.getContext("2d").drawImage(source, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", 0.75);
}

/** A JPEG data: URL `width` pixels wide of an image blob. */
export async function imageThumbnail(blob, width = 160) {
  const bitmap = await createImageBitmap(blob);
  try {
    return drawTo(bitmap, width, (width * bitmap.height) / bitmap.width);
  } finally {
    bitmap.close();
  }
}

/**
 * Frames of a video at `times` (seconds), `width` pixels wide, handed to `onFrame(i, dataUrl)` as they
 * come; a separate hidden element seeks, so a player showing the same file is left alone.
 * Resolves to the video's {duration, width, height}.
 */
export async function grabFrames(url, times, width, onFrame = () => {}) {
  const video = document.createElement("video");
  video.muted = true;
  video.preload = "auto";
  video.playsInline = true;
  video.src = url;
  try {
    await once(video, "loadeddata");
    const info = { duration: video.duration, width: video.videoWidth, height: video.videoHeight };
    for (let i = 0; i < times.length; i++) {
      const t = Math.min(Math.max(0, times[i]), Math.max(0, video.duration - 0.01));
      if (Math.abs(video.currentTime - t) > 1e-3) {
        video.currentTime = t;
        await once(video, "seeked");
      }
      onFrame(i, drawTo(video, width, (width * video.videoHeight) / video.videoWidth));
    }
    return info;
  } finally {
    video.removeAttribute("src");
    video.load();
  }
}

/** Server-rendered page images of a PDF: [{page, width, height, image}]. */
export async function pdfPages(blob, width = 240) {
  const body = await apiJSON(`/v1/glimpse/pages?width=${width}`, {
    method: "POST", body: blob, headers: { "Content-Type": "application/pdf" },
  });
  return body.pages;
}

/** What an attachment shows before it is sent: {thumb, detail} (detail: "3 pages", "0:42"). */
export async function preview(attachment) {
  const { kind, blob } = attachment;
  if (kind === "image") return { thumb: await imageThumbnail(blob), detail: "" };
  if (kind === "pdf") {
    const pages = await pdfPages(blob, 160);
    return { thumb: pages[0].image, detail: pages.length === 1 ? "1 page" : `${pages.length} pages`, pages: pages.length };
  }
  const url = URL.createObjectURL(blob);
  try {
    let thumb = null;
    const info = await grabFrames(url, [0.5], 160, (_, image) => { thumb = image; });
    return { thumb, duration: info.duration };
  } finally {
    URL.revokeObjectURL(url);
  }
}
