// Calls to the server's API with its key, when the server asks for one: the
// first 401 prompts for the key once, keeps it in this tab's session storage
// (gone when the tab closes), and repeats the call with it.

const STORAGE = "stereo-recon-api-key";

// The key this tab was given, if any (the video stream offers it as a subprotocol).
export function storedKey() {
  return sessionStorage.getItem(STORAGE);
}

function withKey(options) {
  const key = storedKey();
  if (!key) return options;
  const headers = new Headers(options.headers || {});
  headers.set("Authorization", `Bearer ${key}`);
  return { ...options, headers };
}

export async function apiFetch(url, options = {}) {
  let response = await fetch(url, withKey(options));
  if (response.status !== 401) return response;
  const key = window.prompt("This server needs an API key:");
  if (!key) return response;
  sessionStorage.setItem(STORAGE, key.trim());
  response = await fetch(url, withKey(options));
  if (response.status === 401) sessionStorage.removeItem(STORAGE);
  return response;
}
