// Voices: the enrolled voiceprints (/voiceprint/list, an admin key), enrol by recording or
// uploading, delete, and identification of a recording.

import { api, el, explain, show } from "./api.js";
import { record, wav } from "./capture.js";

const $ = (id) => document.getElementById(id);
let names = [];

function fail(e) {
  show($("voices-error"), explain(e));
}

export async function refresh() {
  show($("voices-error"), "");
  try {
    const r = await api("/voiceprint/list");
    names = r.speakers.map((s) => s.speaker_id);
    $("voice-list").replaceChildren(...r.speakers.map((s) => {
      const del = el("button", { class: "delete" }, "delete");
      del.onclick = () => remove(s.speaker_id);
      return el("tr", { dataset: { speaker: s.speaker_id } }, el("td", {}, s.speaker_id), el("td", {}, String(s.samples)),
        el("td", {}, s.model), el("td", {}, new Date(s.updated_at * 1000).toLocaleString()), el("td", {}, del));
    }));
    if (!r.speakers.length) $("voice-list").replaceChildren(el("tr", {}, el("td", { colspan: "5", class: "muted" }, "none enrolled")));
  } catch (e) {
    fail(e);
  }
}

async function remove(name) {
  try {
    await api(`/voiceprint/${encodeURIComponent(name)}`, { method: "DELETE" });
  } catch (e) {
    fail(e);
  }
  await refresh();
}

async function enrol(blobs) {
  const name = $("enrol-name").value.trim();
  if (!name) {
    show($("voices-error"), "Give the voice a name first.");
    return;
  }
  show($("voices-error"), "");
  try {
    for (const [i, blob] of blobs.entries()) {
      $("enrol-state").textContent = `enrolling ${i + 1} of ${blobs.length}…`;
      const form = new FormData();
      form.append("speaker_id", name);
      form.append("file", blob, blob.name || "recording.wav");
      await api("/voiceprint/register", { method: "POST", body: form });
    }
    $("enrol-state").textContent = `enrolled ${name}`;
  } catch (e) {
    $("enrol-state").textContent = "";
    fail(e);
  }
  await refresh();
}

async function recording(seconds, label) {
  const samples = await record(seconds, (f) => (label.textContent = `recording… ${Math.round(f * 100)} %`));
  return wav(samples);
}

async function identify(blob) {
  const out = $("identify-result");
  if (!names.length) {
    out.textContent = "enrol a voice first";
    return;
  }
  try {
    const form = new FormData();
    form.append("speaker_ids", names.join(","));
    form.append("file", blob, blob.name || "recording.wav");
    const r = await api("/voiceprint/identify", { method: "POST", body: form });
    out.textContent = r.speaker_id ? `${r.speaker_id} (score ${r.score.toFixed(2)})` : `nobody enrolled (best score ${r.score.toFixed(2)})`;
  } catch (e) {
    out.textContent = "";
    fail(e);
  }
}

export function setup() {
  $("enrol-record").onclick = async () => {
    try {
      await enrol([await recording(Number($("enrol-seconds").value) || 6, $("enrol-state"))]);
    } catch (e) {
      fail(e);
    }
  };
  $("enrol-files").onchange = (e) => enrol([...e.target.files]);
  $("identify-record").onclick = async () => {
    try {
      await identify(await recording(4, $("identify-result")));
    } catch (e) {
      fail(e);
    }
  };
  $("identify-file").onchange = (e) => e.target.files.length && identify(e.target.files[0]);
}
