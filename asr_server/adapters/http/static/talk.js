// Talk: the microphone to the device endpoint exactly as a xiaozhi device streams it (hello,
// listen start in the chosen mode, 16 kHz mono Opus frames of 60 ms, protocol version 1), each
// `stt` shown as it arrives; and a dropped file through /v1/audio/transcriptions.

import { api, el, explain, ms, show } from "./api.js";
import { Microphone, RATE } from "./capture.js";

const FRAME = (RATE * 60) / 1000; // 960 samples: one 60 ms Opus frame
const OPUS = { codec: "opus", sampleRate: RATE, numberOfChannels: 1, bitrate: 32000, opus: { frameDuration: 60000 } };

const $ = (id) => document.getElementById(id);

// Frames microphone samples into 60 ms AudioData for a WebCodecs Opus encoder.
class OpusStream {
  constructor(onFrame) {
    this.pending = new Float32Array(FRAME);
    this.filled = 0;
    this.timestamp = 0;
    this.encoder = new AudioEncoder({
      output: (chunk) => {
        const bytes = new Uint8Array(chunk.byteLength);
        chunk.copyTo(bytes);
        onFrame(bytes);
      },
      error: (e) => showError(`Opus encoder: ${e.message}`),
    });
    this.encoder.configure(OPUS);
  }

  push(samples) {
    let at = 0;
    while (at < samples.length) {
      const n = Math.min(FRAME - this.filled, samples.length - at);
      this.pending.set(samples.subarray(at, at + n), this.filled);
      this.filled += n;
      at += n;
      if (this.filled === FRAME) {
        const data = new AudioData({
          format: "f32-planar", sampleRate: RATE, numberOfFrames: FRAME, numberOfChannels: 1,
          timestamp: this.timestamp, data: this.pending,
        });
        this.encoder.encode(data);
        data.close();
        this.timestamp += (FRAME * 1e6) / RATE;
        this.filled = 0;
      }
    }
  }

  close() {
    if (this.encoder.state !== "closed") this.encoder.close();
  }
}

export async function opusSupported() {
  if (typeof AudioEncoder === "undefined") return false;
  try {
    return (await AudioEncoder.isConfigSupported(OPUS)).supported;
  } catch {
    return false;
  }
}

let state = null; // {ws, mic, opus, listening}

function showError(text) {
  show($("talk-error"), text);
}

function setState(text) {
  $("talk-state").textContent = text;
}

function meter(prob, speech) {
  const bar = $("vad-bar");
  bar.style.width = `${Math.round(prob * 100)}%`;
  bar.classList.toggle("speech", !!speech);
  $("vad-value").textContent = prob.toFixed(2);
}

function addStt(msg) {
  const sp = msg.speaker ? `${msg.speaker.name} (${msg.speaker.score.toFixed(2)})` : "–";
  const row = el("tr", { class: "stt" },
    el("td", { class: "text" }, msg.text), el("td", {}, msg.language || "–"), el("td", {}, msg.emotion || "–"),
    el("td", {}, msg.event || "–"), el("td", { class: "speaker" }, sp), el("td", {}, ms(msg.latency_ms)));
  $("stt-list").prepend(row);
}

function send(obj) {
  if (state && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(obj));
}

function listen(on) {
  if (!state || state.listening === on) return;
  state.listening = on;
  send({ type: "listen", state: on ? "start" : "stop", mode: $("talk-mode").value });
  $("talk-ptt").classList.toggle("held", on);
  setState(on ? "listening" : "connected: hold the button to talk");
}

async function start(status) {
  showError("");
  if (!(await opusSupported())) {
    showError("This browser has no WebCodecs Opus encoder (AudioEncoder): use a current Chromium, Chrome, Edge or Firefox.");
    return;
  }
  const url = new URL($("talk-url").value);
  url.searchParams.set("device-id", $("talk-device").value);
  url.searchParams.set("client-id", crypto.randomUUID());
  url.searchParams.set("protocol-version", "1");
  const token = $("talk-token").value;
  if (status && status.device.auth && token) url.searchParams.set("authorization", `Bearer ${token}`);
  const manual = $("talk-mode").value === "manual";
  const s = { ws: null, mic: null, opus: null, listening: false, open: false };
  state = s;
  s.opus = new OpusStream((bytes) => {
    if (s.listening && s.ws.readyState === WebSocket.OPEN) s.ws.send(bytes);
  });
  s.mic = new Microphone((samples) => s.open && s.opus.push(samples));
  try {
    await s.mic.open();
  } catch (e) {
    showError(`No microphone: ${e.message}`);
    await stop();
    return;
  }
  s.ws = new WebSocket(url);
  s.ws.binaryType = "arraybuffer";
  setState("connecting…");
  s.ws.onopen = () => {
    s.ws.send(JSON.stringify({
      type: "hello", version: 1, transport: "websocket", features: { vad_meter: true },
      audio_params: { format: "opus", sample_rate: RATE, channels: 1, frame_duration: 60 },
    }));
  };
  s.ws.onmessage = (e) => {
    if (typeof e.data !== "string") return; // TTS audio (relay mode): not played here
    const msg = JSON.parse(e.data);
    if (msg.type === "hello") {
      s.open = true;
      $("talk-session").textContent = msg.session_id || "";
      if (manual) {
        $("talk-ptt").disabled = false;
        setState("connected: hold the button to talk");
      } else {
        listen(true);
        setState("listening (hands-free)");
      }
    } else if (msg.type === "stt") addStt(msg);
    else if (msg.type === "vad") meter(msg.prob, msg.speech);
    else if (msg.type === "error") showError(`server: ${msg.message}`);
  };
  s.ws.onclose = (e) => {
    if (state !== s) return;
    if (!s.open) {
      showError(status && status.device.auth
        ? "The device endpoint refused the connection: device auth is on, check the device token."
        : `The device endpoint closed the connection${e.reason ? `: ${e.reason}` : ""} (is ${url.origin} reachable?).`);
    } else if (e.code !== 1000) showError(`connection closed: ${e.code} ${e.reason}`);
    stop();
  };
  $("talk-connect").textContent = "Stop";
}

async function stop() {
  const s = state;
  state = null;
  if (!s) return;
  s.open = false;
  if (s.ws && s.ws.readyState === WebSocket.OPEN) s.ws.close(1000, "console stopped");
  if (s.opus) s.opus.close();
  if (s.mic) await s.mic.close();
  $("talk-connect").textContent = "Start talking";
  $("talk-ptt").disabled = true;
  $("talk-ptt").classList.remove("held");
  $("talk-session").textContent = "";
  setState("not connected");
  meter(0, false);
}

// --- a dropped file ---------------------------------------------------------------------------

async function transcribeFile(file) {
  show($("file-error"), "");
  $("file-result").hidden = true;
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("model", "sensevoice-small");
  form.append("response_format", "verbose_json");
  form.append("timestamp_granularities[]", "word");
  form.append("timestamp_granularities[]", "segment");
  $("file-meta").textContent = "";
  try {
    const r = await api("/v1/audio/transcriptions", { method: "POST", body: form });
    $("file-text").textContent = r.text || "(no speech)";
    $("file-meta").textContent = `${r.language || "–"} · ${r.duration.toFixed(1)} s · ${file.name}`;
    $("file-segments").replaceChildren(...r.segments.map((s) => el("tr", {},
      el("td", {}, s.start.toFixed(2)), el("td", {}, s.end.toFixed(2)), el("td", {}, s.text),
      el("td", {}, s.language || "–"), el("td", {}, s.emotion || "–"),
      el("td", {}, s.speaker ? s.speaker.name : "–"))));
    $("file-words").replaceChildren(...(r.words || []).map((w) =>
      el("span", { class: "word" }, w.word, el("small", {}, `${w.start.toFixed(2)}–${w.end.toFixed(2)}`))));
    $("file-result").hidden = false;
  } catch (e) {
    show($("file-error"), explain(e));
  }
}

export function setup(getStatus) {
  $("talk-device").value = `console-${Math.random().toString(16).slice(2, 10)}`;
  $("talk-connect").onclick = () => (state ? stop() : start(getStatus()));
  const ptt = $("talk-ptt");
  ptt.addEventListener("pointerdown", () => listen(true));
  for (const ev of ["pointerup", "pointerleave"]) ptt.addEventListener(ev, () => listen(false));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) transcribeFile(e.dataTransfer.files[0]);
  });
  $("drop-file").onchange = (e) => e.target.files.length && transcribeFile(e.target.files[0]);
}

// The server's status arrived: where the device endpoint is, whether it needs a token.
export function configure(status) {
  const url = $("talk-url");
  if (!url.value && status.device.port) {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    url.value = `${scheme}://${location.hostname}:${status.device.port}${status.device.path}`;
  }
  $("talk-token-label").hidden = !status.device.auth;
}
