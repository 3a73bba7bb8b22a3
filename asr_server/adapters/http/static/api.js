// The public API with the console's key: fetch wrappers, WebSocket URLs and clear messages for
// the two ways a call fails on its key (none given where one is needed, or a wrong one).

const STORE = "asr-console-key";

export function getKey() {
  return sessionStorage.getItem(STORE) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(STORE, key);
  else sessionStorage.removeItem(STORE);
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// What to tell the operator about a failed call.
export function explain(err) {
  if (!(err instanceof ApiError)) return `request failed: ${err.message || err}`;
  if (err.status === 401) {
    return getKey()
      ? `The server refused this API key (${err.message}). Check it and enter it again above.`
      : "This server needs an API key: enter it above (http.api_keys or http.read_keys).";
  }
  if (err.status === 403) return `Not allowed with this key: ${err.message}.`;
  return `${err.status}: ${err.message}`;
}

function authHeaders() {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// A call of the API; throws ApiError with the server's own message (OpenAI or voiceprint-api shape).
export async function api(path, { method = "GET", body, json = false, blob = false } = {}) {
  let response;
  const headers = { ...authHeaders(), ...(json ? { "Content-Type": "application/json" } : {}) };
  try {
    response = await fetch(path, { method, body, headers });
  } catch (e) {
    throw new ApiError(0, `the server did not answer (${e.message})`);
  }
  const type = response.headers.get("Content-Type") || "";
  if (blob && response.ok) return await response.blob();
  const data = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const message = (data && data.error && data.error.message) || (data && data.detail) || response.statusText;
    const err = new ApiError(response.status, message);
    if (err.status === 401 || err.status === 403) {
      window.dispatchEvent(new CustomEvent("api-auth", { detail: { err, path } }));
    }
    throw err;
  }
  return data;
}

// A binary answer (audio, an export) as a Blob, with the key in the header.
export function apiBlob(path) {
  return api(path, { blob: true });
}

// ws(s):// on this origin, the key as ?key= (browsers cannot set headers on a WebSocket).
export function socketUrl(path, params = {}) {
  const url = new URL(path, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  for (const [k, v] of Object.entries(params)) url.searchParams.set(k, v);
  const key = getKey();
  if (key) url.searchParams.set("key", key);
  return url.toString();
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

export function show(node, text) {
  node.textContent = text || "";
  node.hidden = !text;
}

export function ms(v) {
  return v === null || v === undefined ? "–" : `${Math.round(v)} ms`;
}
