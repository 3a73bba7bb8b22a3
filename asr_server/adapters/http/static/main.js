// The console: tabs, the API key, and the first status call, which says whether a key is
// needed (or was wrong) before any stream is opened.

import { api, explain, getKey, setKey, show } from "./api.js";
import * as health from "./health.js";
import * as history from "./history.js";
import * as live from "./live.js";
import * as talk from "./talk.js";
import * as hotwords from "./hotwords.js";
import * as voices from "./voices.js";

const $ = (id) => document.getElementById(id);
let status = null;

function onStatus(s) {
  status = s;
  talk.configure(s);
  health.render(s);
}

async function start() {
  live.disconnect();
  show($("auth-message"), "");
  try {
    onStatus(await api("/v1/status"));
  } catch (e) {
    show($("auth-message"), explain(e));
    if (e.status === 401) $("key").focus();
    return;
  }
  live.connect(onStatus);
  voices.refresh();
}

function selectTab(name) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of document.querySelectorAll("section.tab")) s.hidden = s.id !== name;
  if (name === "voices" && status) voices.refresh();
  if (name === "history" && status) history.search();
  if (name === "hotwords" && status) hotwords.refresh();
}

window.addEventListener("api-auth", (e) => {
  if (e.detail.err.status === 401) show($("auth-message"), explain(e.detail.err));
});

for (const b of document.querySelectorAll("#tabs button")) b.onclick = () => selectTab(b.dataset.tab);
$("key").value = getKey();
$("key-form").onsubmit = (e) => {
  e.preventDefault();
  setKey($("key").value.trim());
  start();
};
talk.setup(() => status);
voices.setup();
history.setup();
hotwords.setup();
start();
