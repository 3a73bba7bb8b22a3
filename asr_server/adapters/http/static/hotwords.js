// Hotwords: each device's list (/v1/devices/{id}/hotwords, an admin key), one word or phrase a
// line with an optional weight ("张三 2"); the server merges it with the config's asr.hotwords and
// biases the device's next utterances towards them.

import { api, el, explain, show } from "./api.js";

const $ = (id) => document.getElementById(id);

function fail(e) {
  show($("hotwords-error"), explain(e));
}

const path = (device) => `/v1/devices/${encodeURIComponent(device)}/hotwords`;

function device() {
  const id = $("hotwords-device").value.trim();
  if (!id) show($("hotwords-error"), "Give a device id first.");
  return id;
}

export async function refresh() {
  show($("hotwords-error"), "");
  if (!$("hotwords-device").value) $("hotwords-device").value = $("talk-device").value;
  try {
    const r = await api("/v1/hotwords");
    const rows = Object.entries(r.devices).map(([id, n]) => {
      const edit = el("button", {}, "edit");
      edit.onclick = () => load(id);
      return el("tr", { dataset: { device: id } }, el("td", {}, id), el("td", { class: "count" }, String(n)), el("td", {}, edit));
    });
    $("hotword-devices").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: "3", class: "muted" }, "no device has hotwords"))]));
  } catch (e) {
    fail(e);
  }
}

async function load(id) {
  $("hotwords-device").value = id;
  try {
    const r = await api(path(id));
    $("hotwords-text").value = r.hotwords.map((h) => (h.weight === null ? h.word : `${h.word} ${h.weight}`)).join("\n");
    $("hotwords-state").textContent = `${r.hotwords.length} words`;
  } catch (e) {
    fail(e);
  }
}

async function save() {
  const id = device();
  if (!id) return;
  show($("hotwords-error"), "");
  try {
    const r = await api(path(id), { method: "PUT", body: JSON.stringify({ hotwords: $("hotwords-text").value }) });
    $("hotwords-state").textContent = `saved ${r.hotwords.length} words for ${id}`;
  } catch (e) {
    $("hotwords-state").textContent = "";
    fail(e);
    return; // the stored list is unchanged: keep the message and the editor as they are
  }
  await refresh();
}

async function remove() {
  const id = device();
  if (!id) return;
  try {
    await api(path(id), { method: "DELETE" });
    $("hotwords-text").value = "";
    $("hotwords-state").textContent = `deleted the list of ${id}`;
  } catch (e) {
    fail(e);
  }
  await refresh();
}

export function setup() {
  $("hotwords-load").onclick = () => device() && load(device());
  $("hotwords-save").onclick = save;
  $("hotwords-delete").onclick = remove;
}
