// Live: the whole server's open sessions from /v1/live (pushed, never polled) and the recent
// transcripts from /v1/events. A closed session stays a while, struck through, then goes.

import { el, ms, socketUrl } from "./api.js";

const $ = (id) => document.getElementById(id);
const KEEP_CLOSED_MS = 30000;
const MAX_TRANSCRIPTS = 50;

const sessions = new Map(); // session_id -> {view, closedAt}
let sockets = [];
let retry = null;

function render() {
  const rows = [...sessions.values()].sort((a, b) => a.view.opened_at - b.view.opened_at).map(({ view: v, closedAt }) =>
    el("tr", { class: closedAt ? "closed" : "open", dataset: { session: v.session_id, device: v.device_id || "" } },
      el("td", {}, v.device_id || v.client_id || "–"), el("td", {}, v.version ? `${v.protocol} v${v.version}` : v.protocol), el("td", {}, v.mode),
      el("td", { class: "state" }, closedAt ? "closed" : v.state), el("td", {}, String(v.frames)),
      el("td", {}, String(v.utterances)), el("td", { class: "text" }, v.last_text || "–"),
      el("td", { class: "speaker" }, v.speaker || "–"), el("td", {}, String(v.worker))));
  $("session-list").replaceChildren(...rows);
}

function onSession(msg) {
  if (msg.type === "sessions") {
    for (const [id, s] of sessions) if (!s.closedAt) sessions.delete(id);
    for (const v of msg.sessions) sessions.set(v.session_id, { view: v, closedAt: null });
  } else if (msg.op === "close") {
    sessions.set(msg.session.session_id, { view: msg.session, closedAt: Date.now() });
    setTimeout(() => {
      const s = sessions.get(msg.session.session_id);
      if (s && s.closedAt) {
        sessions.delete(msg.session.session_id);
        render();
      }
    }, KEEP_CLOSED_MS);
  } else {
    sessions.set(msg.session.session_id, { view: msg.session, closedAt: null });
  }
  render();
}

function onTranscript(t) {
  if (t.type !== "transcript") return;
  const when = new Date(t.timestamp * 1000).toLocaleTimeString();
  $("transcript-list").prepend(el("tr", { class: "transcript" }, el("td", {}, when), el("td", {}, t.device_id || "–"),
    el("td", { class: "text" }, t.text), el("td", {}, t.language || "–"),
    el("td", {}, t.speaker ? t.speaker.name : "–"), el("td", {}, ms(t.latency_ms))));
  const list = $("transcript-list");
  while (list.children.length > MAX_TRANSCRIPTS) list.lastChild.remove();
}

export function disconnect() {
  clearTimeout(retry);
  for (const ws of sockets) {
    ws.onclose = null;
    ws.close();
  }
  sockets = [];
}

// Subscribe (again); `onStatus` hears the status messages of the stream.
export function connect(onStatus) {
  disconnect();
  $("transcript-list").replaceChildren();
  const live = new WebSocket(socketUrl("/v1/live"));
  live.onmessage = (e) => {
    const msg = JSON.parse(e.data);
    if (msg.type === "status") onStatus(msg);
    else onSession(msg);
  };
  live.onopen = () => ($("live-state").textContent = "live");
  const events = new WebSocket(socketUrl("/v1/events", { recent: "20" }));
  events.onmessage = (e) => onTranscript(JSON.parse(e.data));
  const lost = () => {
    $("live-state").textContent = "connection lost: reconnecting…";
    disconnect();
    retry = setTimeout(() => connect(onStatus), 3000);
  };
  live.onclose = events.onclose = lost;
  sockets = [live, events];
}
