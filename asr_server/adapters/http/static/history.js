// History: what was said, from the archive (/v1/utterances, archive.enabled): search, filter by
// device and speaker, play, correct the text, delete, erase a device, export (an admin key edits).

import { api, apiBlob, el, explain, show } from "./api.js";

const $ = (id) => document.getElementById(id);
let next = null;

function fail(e) {
  show($("history-error"), explain(e));
}

function filters() {
  const params = new URLSearchParams();
  for (const [name, id] of [["q", "history-q"], ["device_id", "history-device"], ["speaker", "history-speaker"]]) {
    const v = $(id).value.trim();
    if (v) params.set(name, v);
  }
  return params;
}

function row(u) {
  const text = el("input", { class: "correction", size: "40", value: u.corrected_text ?? u.text });
  const save = el("button", {}, "save");
  const play = el("button", {}, "play");
  const del = el("button", { class: "delete" }, "delete");
  const player = el("td", { class: "player" }, play);
  save.onclick = () => correct(u, text.value, save);
  play.onclick = () => listen(u, player);
  del.onclick = () => remove(u);
  const recognised = u.corrected_text !== null ? el("div", { class: "muted" }, `heard: ${u.text}`) : "";
  return el("tr", { dataset: { id: u.id } },
    el("td", {}, new Date(u.time * 1000).toLocaleString()),
    el("td", {}, u.device_id ?? u.protocol),
    el("td", {}, u.speaker ?? "–"),
    el("td", {}, text, save, recognised),
    el("td", {}, [u.language, u.emotion, u.event].filter(Boolean).join(" · ")),
    el("td", {}, `${(u.audio_ms / 1000).toFixed(1)} s`),
    player,
    el("td", {}, del));
}

export async function search(more = false) {
  show($("history-error"), "");
  const params = filters();
  if (more && next) params.set("cursor", next);
  try {
    const page = await api(`/v1/utterances?${params}`);
    const rows = page.data.map(row);
    if (more) $("history-list").append(...rows);
    else $("history-list").replaceChildren(...rows);
    if (!more && !rows.length) $("history-list").replaceChildren(el("tr", {}, el("td", { colspan: "8", class: "muted" }, "nothing kept matches")));
    next = page.next;
    $("history-more").hidden = !next;
  } catch (e) {
    fail(e);
  }
}

async function listen(u, cell) {
  try {
    const audio = el("audio", { controls: "", autoplay: "" });
    audio.src = URL.createObjectURL(await apiBlob(`/v1/utterances/${u.id}/audio`));
    cell.replaceChildren(audio);
  } catch (e) {
    fail(e);
  }
}

async function correct(u, text, button) {
  try {
    const body = JSON.stringify({ corrected_text: text === u.text ? null : text });
    const updated = await api(`/v1/utterances/${u.id}`, { method: "PATCH", body, json: true });
    Object.assign(u, updated);
    button.textContent = "saved";
  } catch (e) {
    fail(e);
  }
}

async function remove(u) {
  try {
    await api(`/v1/utterances/${u.id}`, { method: "DELETE" });
    document.querySelector(`#history-list tr[data-id="${u.id}"]`)?.remove();
  } catch (e) {
    fail(e);
  }
}

async function eraseDevice() {
  const device = $("history-device").value.trim();
  if (!device) {
    show($("history-error"), "Type the device id to erase first.");
    return;
  }
  if (!confirm(`Erase everything kept of ${device}?`)) return;
  try {
    const r = await api(`/v1/utterances?device_id=${encodeURIComponent(device)}`, { method: "DELETE" });
    $("history-state").textContent = `erased ${r.deleted} utterances of ${device}`;
    await search();
  } catch (e) {
    fail(e);
  }
}

async function exportTar() {
  try {
    const blob = await apiBlob(`/v1/utterances/export?${filters()}`);
    const link = el("a", { href: URL.createObjectURL(blob), download: "utterances.tar" });
    link.click();
    $("history-state").textContent = `exported ${(blob.size / 1024).toFixed(0)} KB`;
  } catch (e) {
    fail(e);
  }
}

export function setup() {
  $("history-form").onsubmit = (e) => {
    e.preventDefault();
    search();
  };
  $("history-more").onclick = () => search(true);
  $("history-erase").onclick = eraseDevice;
  $("history-export").onclick = exportTar;
}
