// Small helpers on the page's elements: lookup, errors in plain words, base64,
// blob URLs of the current result, and the value readout under the cursor.

export const $ = (id) => document.getElementById(id);

export function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

export function hideError() {
  $("error").hidden = true;
}

// The error object's message of a failed answer, with its Retry-After.
export async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      const retry = response.headers.get("Retry-After");
      const message = body.error.message.charAt(0).toUpperCase() + body.error.message.slice(1);
      return message + (retry ? ` (retry in about ${retry} s)` : "");
    }
  } catch (e) {
    // not JSON: fall through
  }
  return `The server answered ${response.status} ${response.statusText}.`;
}

export function base64ToBytes(b64) {
  const binary = atob(b64);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

// blob: URLs of the current result, revoked when the next one arrives.
let objectUrls = [];

export function blobUrl(bytes, type) {
  const url = URL.createObjectURL(new Blob([bytes], { type }));
  objectUrls.push(url);
  return url;
}

export function revokeResultUrls() {
  objectUrls.forEach((u) => URL.revokeObjectURL(u));
  objectUrls = [];
}

// The pixel of `data` ({ width, height }) under pointer event `e` on `img`, or null.
export function pixelUnder(img, e, data) {
  const rect = img.getBoundingClientRect();
  const x = Math.floor(((e.clientX - rect.left) / rect.width) * data.width);
  const y = Math.floor(((e.clientY - rect.top) / rect.height) * data.height);
  return x < 0 || y < 0 || x >= data.width || y >= data.height ? null : { x, y, rect };
}

// Shows the value under the cursor of a map drawn as an image: `data()` gives the current
// { width, height, values } (or null), `describe(v, i)` the text for one value.
export function wireReadout(img, readout, data, describe) {
  img.addEventListener("mousemove", (e) => {
    const map = data();
    if (!map) return;
    const at = pixelUnder(img, e, map);
    if (!at) return;
    const i = at.y * map.width + at.x;
    readout.textContent = `x ${at.x}, y ${at.y}: ${describe(map.values[i], i)}`;
    readout.style.left = `${e.clientX - at.rect.left + 12}px`;
    readout.style.top = `${e.clientY - at.rect.top + 12}px`;
    readout.hidden = false;
  });
  img.addEventListener("mouseleave", () => (readout.hidden = true));
}
