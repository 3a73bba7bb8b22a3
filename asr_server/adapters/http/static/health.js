// Health at a glance, from the status messages of /v1/live: models, queues, batch sizes, latency
// percentiles of the last minutes as a chart, errors by kind.

import { el, ms } from "./api.js";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function chart(latency) {
  const box = $("latency-chart");
  const W = 600, H = 160, PAD = 24;
  const series = latency.series.filter((b) => b.count > 0);
  const top = Math.max(100, ...series.map((b) => b.p99 || 0)) * 1.1;
  const now = Date.now() / 1000;
  const from = now - latency.window_s;
  const x = (t) => PAD + ((t - from) / latency.window_s) * (W - PAD * 2);
  const y = (v) => H - PAD - (v / top) * (H - PAD * 2);
  const nodes = [];
  for (const f of [0, 0.5, 1]) {
    nodes.push(svg("line", { x1: PAD, x2: W - PAD, y1: y(top * f / 1.1), y2: y(top * f / 1.1) }));
    nodes.push(svg("text", { x: 2, y: y(top * f / 1.1) + 3 }, `${Math.round(top * f / 1.1)}`));
  }
  nodes.push(svg("text", { x: PAD, y: H - 6 }, `-${Math.round(latency.window_s / 60)} min`));
  nodes.push(svg("text", { x: W - PAD - 20, y: H - 6 }, "now"));
  for (const p of ["p50", "p90", "p99"]) {
    const pts = series.map((b) => [x(b.start + latency.bin_s / 2), y(b[p])]);
    if (pts.length) nodes.push(svg("polyline", { class: p, points: pts.map((q) => q.join(",")).join(" ") }));
    for (const [cx, cy] of pts) nodes.push(svg("circle", { class: p, cx, cy, r: 3 }));
  }
  box.replaceChildren(...nodes);
  $("latency-legend").textContent = series.length
    ? `ms per ${Math.round(latency.bin_s)} s: p50 (blue), p90 (amber), p99 (red); ${latency.count} utterances`
    : "no utterances in the last minutes";
}

function rows(id, entries, make) {
  $(id).replaceChildren(...(entries.length ? entries.map(make) : [el("tr", {}, el("td", { colspan: "4", class: "muted" }, "none"))]));
}

export function render(s) {
  $("h-ready").textContent = s.ready ? "yes" : "no";
  $("h-sessions").textContent = String(s.sessions_open);
  $("h-workers").textContent = String(s.server.workers);
  $("h-queue").textContent = String(s.queues.asr ?? 0);
  const l = s.latency;
  $("h-latency").textContent = l.count ? `${ms(l.p50)} / ${ms(l.p90)} / ${ms(l.p99)}` : "–";
  chart(l);
  rows("h-models", s.models, (m) => el("tr", {}, el("td", {}, m.name), el("td", {}, m.file), el("td", {}, m.backend),
    el("td", {}, m.provider), el("td", {}, m.device), el("td", {}, m.precision)));
  rows("h-queues", Object.entries(s.queues), ([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, String(v))));
  rows("h-batches", Object.entries(s.batches), ([k, b]) => el("tr", {}, el("td", {}, k), el("td", {}, String(b.count)),
    el("td", {}, b.mean === null ? "–" : String(b.mean)),
    el("td", {}, Object.entries(b.buckets).map(([le, n]) => `≤${le.replace(".0", "")}: ${n}`).join(", "))));
  rows("h-errors", Object.entries(s.errors).sort((a, b) => b[1] - a[1]),
    ([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, String(v))));
}
