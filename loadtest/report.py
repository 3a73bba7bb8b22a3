"""What a load run measured: per-utterance samples, per-step statistics, and their renderings
(terminal table, progress line, Markdown summary, JSON with every sample)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .probe import ServerStages
from .stats import Histogram, Percentiles, summarize

Outcome = Literal["ok", "missing", "error", "disconnected", "sent"]
UNANSWERED: tuple[Outcome, ...] = ("missing", "error", "disconnected")


@dataclass(frozen=True, slots=True)
class UtteranceSample:
    """One utterance sent by one client, and what came back.

    `latency_ms`: from the moment the frame holding the last speech sample left to the `stt`.
    `server_ms`: the part the server's processing adds: in auto/realtime mode the latency less
    the server's configured end-of-speech silence, in manual mode the time from `listen stop`.
    `outcome`: ok (an `stt`), error (an `error` message instead, or the server shed the device
    with a 1013 close: then no latency), missing (nothing within the
    reply timeout), disconnected (the connection dropped first), sent (sink mode: no reply
    expected).
    """

    client: int
    clip: str
    outcome: Outcome
    eos_s: float | None  # when the last speech frame left, seconds after the step start
    latency_ms: float | None
    server_ms: float | None
    speech_ms: float
    text: str | None = None
    error: str | None = None
    reported_latency_ms: float | None = None  # the server's own `latency_ms` field, if any
    early_replies: int = 0  # replies that came while the clip was still being sent
    timings: dict[str, Any] | None = None  # the server's `timings` field: where the time went
    tts_ms: float | None = None  # relay: end of speech -> the first TTS audio frame at the device


@dataclass(frozen=True, slots=True)
class StageStats:
    """Where the answered utterances' time went, from the `timings` each `stt` carries: the wait
    for the recogniser and the embedder, their compute, and the share whose text a speculation
    had started before the endpoint. Empty when the server sends no timings."""

    asr_queue: Percentiles
    asr: Percentiles
    embed_queue: Percentiles
    embed: Percentiles
    speculated_percent: float | None

    @staticmethod
    def of(samples: Sequence[UtteranceSample]) -> StageStats:
        t = [s.timings for s in samples if s.outcome == "ok" and isinstance(s.timings, dict)]

        def col(key: str) -> Percentiles:
            return summarize(float(x[key]) for x in t if isinstance(x.get(key), (int, float)))

        spec = [x.get("speculated") for x in t if isinstance(x.get("speculated"), bool)]
        return StageStats(
            col("asr_queue_ms"),
            col("asr_ms"),
            col("embed_queue_ms"),
            col("embed_ms"),
            100.0 * sum(spec) / len(spec) if spec else None,
        )


@dataclass(slots=True)
class Counters:
    """Connection-level events of one step (mutable while the step runs)."""

    connects: int = 0
    refused: int = 0
    connect_timeouts: int = 0
    hello_timeouts: int = 0
    hello_rejected: int = 0
    disconnects: int = 0
    late_replies: int = 0  # stt/error that came after its utterance was given up on
    frames_sent: int = 0
    client_errors: int = 0  # a client task failed unexpectedly (a harness bug: should stay 0)
    cancelled: int = 0  # clients still running at the hard deadline
    connected: int = 0  # now, for the progress line
    utterances: int = 0
    answered: int = 0
    wakes_while_awake: int = 0  # wake shape: wake-ups that fell while the device was still in its conversation


@dataclass(frozen=True, slots=True)
class StepStats:
    clients: int
    wall_s: float
    utterances: int
    answered: int
    missing: int
    errors: int
    disconnected: int
    sent: int  # sink mode: utterances sent with no reply expected
    counters: Counters
    latency: Percentiles  # end of speech -> stt, answered utterances
    server: Percentiles  # latency less the end-of-speech silence
    hello: Percentiles
    lateness: Percentiles  # how late frames left against the device clock
    p95_all_ms: float | None  # p95 counting every unanswered utterance as infinitely late; None = infinite
    within_budget: bool
    generator_on_time: bool
    generator_cpu_percent: float | None
    server_cpu_percent: float | None = None
    server_rss_peak_mb: float | None = None
    server_rss_end_mb: float | None = None
    probe_error: str | None = None
    client_error_messages: tuple[str, ...] = ()
    stages: StageStats | None = None
    server_stages: ServerStages | None = None
    shed: int = 0  # of `errors`: utterances the server shed because it was behind (its error says so)
    tts: Percentiles | None = None  # relay: end of speech -> first TTS audio, where measured
    p95_admitted_ms: float | None = None  # p95 counting the unanswered, but not the shed, as late
    admitted_within_budget: bool = False
    """The overload verdict: what the server kept, it answered in budget (`p95_admitted_ms` under
    it), the surplus refused or shed counted apart. `within_budget` is the capacity verdict, where
    a shed utterance is one the box did not serve."""
    kept_out: int = 0  # clients that sent no utterance in the whole step (refused all along)

    def consistent(self) -> bool:
        """Every utterance is answered or counted unanswered; percentiles are ordered."""
        return self.answered + self.missing + self.errors + self.disconnected + self.sent == self.utterances and all(
            p.ordered() for p in (self.latency, self.server, self.hello, self.lateness)
        )


@dataclass(slots=True)
class StepReport:
    index: int
    stats: StepStats
    samples: list[UtteranceSample]
    hello_ms: list[float]
    lateness: Histogram
    records: list[Any] = field(default_factory=list)  # a shape's own records (the wake shape's wake-ups)
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-ready figures a shape adds to samples.json


@dataclass(frozen=True, slots=True)
class Section:
    """A table a traffic shape adds to the report, after the step table (the wake shape's wake-ups)."""

    title: str
    columns: tuple[str, ...]
    rows: list[list[str]]


@dataclass(slots=True)
class LoadReport:
    """The whole run: one step per client count. `capacity` is the largest client count whose
    step stayed within budget (p95 under `budget_ms`; in sink mode, frame lateness p99 under
    `lateness_budget_ms`), None when none did."""

    options: dict[str, Any]
    started_at: str
    steps: list[StepReport] = field(default_factory=list)
    sink_mode: bool = False
    sections: list[Section] = field(default_factory=list)

    @property
    def capacity(self) -> int | None:
        ok = [s.stats.clients for s in self.steps if s.stats.within_budget]
        return max(ok) if ok else None


@dataclass(frozen=True, slots=True)
class Progress:
    """A live view of the running step."""

    step: int
    steps: int
    clients: int
    elapsed_s: float
    duration_s: float
    connected: int
    utterances: int
    answered: int
    missing: int
    errors: int
    disconnects: int
    refused: int
    latency_p50: float | None
    latency_p95: float | None
    lateness_p99: float | None


def p95_counting_unanswered(latencies: Sequence[float], unanswered: int) -> float | None:
    """Nearest-rank p95 where each unanswered utterance is an infinite latency (None)."""
    total = len(latencies) + unanswered
    if total == 0:
        return None
    rank = max(1, math.ceil(0.95 * total))
    vals = sorted(latencies)
    return float(vals[rank - 1]) if rank <= len(vals) else None


def build_step_stats(
    clients: int,
    wall_s: float,
    samples: Sequence[UtteranceSample],
    counters: Counters,
    hello_ms: Sequence[float],
    lateness: Histogram,
    *,
    budget_ms: float,
    lateness_budget_ms: float,
    expect_replies: bool,
    generator_cpu_percent: float | None,
    client_error_messages: Sequence[str] = (),
) -> StepStats:
    by = {o: 0 for o in ("ok", "missing", "error", "disconnected", "sent")}
    for s in samples:
        by[s.outcome] += 1
    latencies = [s.latency_ms for s in samples if s.outcome == "ok" and s.latency_ms is not None]
    server = [s.server_ms for s in samples if s.outcome == "ok" and s.server_ms is not None]
    unanswered = by["missing"] + by["error"] + by["disconnected"]
    lat = lateness.summary()
    on_time = lat.p99 is not None and lat.p99 < lateness_budget_ms
    shed = count_shed(samples)
    kept_out = max(0, clients - len({s.client for s in samples})) if expect_replies else 0
    if expect_replies:
        p95_all = p95_counting_unanswered(latencies, unanswered)
        # A box that turned devices away for the whole step served fewer than `clients` of them.
        within = bool(samples) and p95_all is not None and p95_all < budget_ms and not kept_out
        p95_admitted = p95_counting_unanswered(latencies, unanswered - shed)
        admitted_within = bool(latencies) and p95_admitted is not None and p95_admitted < budget_ms
    else:
        p95_all = p95_admitted = None
        within = admitted_within = on_time and counters.connects > 0
    return StepStats(
        clients=clients,
        wall_s=wall_s,
        utterances=len(samples),
        answered=by["ok"],
        missing=by["missing"],
        errors=by["error"],
        disconnected=by["disconnected"],
        sent=by["sent"],
        counters=counters,
        latency=summarize(latencies),
        server=summarize(server),
        hello=summarize(hello_ms),
        lateness=lat,
        p95_all_ms=p95_all,
        within_budget=within,
        generator_on_time=on_time,
        generator_cpu_percent=generator_cpu_percent,
        client_error_messages=tuple(client_error_messages),
        stages=StageStats.of(samples),
        shed=shed,
        tts=summarize(tts) if (tts := [s.tts_ms for s in samples if s.tts_ms is not None]) else None,
        p95_admitted_ms=p95_admitted,
        admitted_within_budget=admitted_within,
        kept_out=kept_out,
    )


WAKE_SERVED_SHARE = 0.99
"""The wake shape's verdict: the share of wake-ups a box must serve (the issue's 99 %)."""

WINDOW_S = 15.0
"""The over-time table's window: short enough to show a reconnect wave's first seconds apart
from the steady state that follows, long enough to hold a p95 at tens of devices."""


@dataclass(frozen=True, slots=True)
class WindowStats:
    """The utterances of one step whose speech ended in [start_s, end_s) of it."""

    clients: int
    start_s: float
    end_s: float
    utterances: int
    answered: int
    shed: int
    latency: Percentiles
    p95_all_ms: float | None  # unanswered counted as infinitely late; None = infinite (or no utterance)
    p95_admitted_ms: float | None  # the same with the shed left out (the overload verdict's figure)


def windows(clients: int, samples: Sequence[UtteranceSample], window_s: float = WINDOW_S) -> list[WindowStats]:
    """One step's utterances by when their speech ended, `window_s` at a time: a step's p95 hides
    a first half-minute over budget behind a steady state within it."""
    by: dict[int, list[UtteranceSample]] = {}
    for s in samples:
        if s.eos_s is not None:
            by.setdefault(int(s.eos_s // window_s), []).append(s)
    out = []
    for i in range(max(by) + 1 if by else 0):
        lo, hi = i * window_s, (i + 1) * window_s
        ws = by.get(i, [])
        ok = [s.latency_ms for s in ws if s.outcome == "ok" and s.latency_ms is not None]
        unanswered = sum(1 for s in ws if s.outcome in UNANSWERED)
        shed = count_shed(ws)
        out.append(
            WindowStats(
                clients=clients,
                start_s=lo,
                end_s=hi,
                utterances=len(ws),
                answered=len(ok),
                shed=shed,
                latency=summarize(ok),
                p95_all_ms=p95_counting_unanswered(ok, unanswered),
                p95_admitted_ms=p95_counting_unanswered(ok, unanswered - shed),
            )
        )
    return out


_WINDOW_COLUMNS = ("clients", "window s", "utts", "ok", "shed", "p50", "p95", "p95 adm", "p95 all", "max")


def _p95_cell(utterances: int, p95: float | None) -> str:
    """A p95 that counts the unanswered as late: `inf` when more than 5 % went unanswered."""
    return "-" if not utterances else "inf" if p95 is None else _ms(p95)


def _window_rows(report: LoadReport) -> list[list[str]]:
    rows = []
    for step in report.steps:
        for w in windows(step.stats.clients, step.samples):
            rows.append(
                [
                    str(w.clients),
                    f"{w.start_s:g}-{w.end_s:g}",
                    str(w.utterances),
                    str(w.answered),
                    str(w.shed),
                    _ms(w.latency.p50),
                    _ms(w.latency.p95),
                    _p95_cell(w.utterances - w.shed, w.p95_admitted_ms),
                    _p95_cell(w.utterances, w.p95_all_ms),
                    _ms(w.latency.max),
                ]
            )
    return rows


def has_windows(report: LoadReport) -> bool:
    """Worth a table: replies were expected and some step lasted more than two windows."""
    return not report.sink_mode and any(
        s.eos_s is not None and s.eos_s >= 2 * WINDOW_S for step in report.steps for s in step.samples
    )


def count_shed(samples: Sequence[UtteranceSample]) -> int:
    """The utterances the server shed: an error reply that says so (`is_shed`)."""
    return sum(1 for s in samples if s.outcome == "error" and is_shed(s.error))


def is_shed(error: str | None) -> bool:
    """An error reply that says the server shed the utterance or was at a limit (vs. a failure)."""
    return error is not None and ("shed" in error or "busy" in error or "overloaded" in error)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _ms1(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def format_progress(p: Progress) -> str:
    return (
        f"step {p.step}/{p.steps} | {p.connected}/{p.clients} connected | {p.elapsed_s:4.0f}/{p.duration_s:.0f} s"
        f" | utt {p.utterances} ok {p.answered} miss {p.missing} err {p.errors}"
        f" | p50 {_ms(p.latency_p50)} p95 {_ms(p.latency_p95)} ms | late p99 {_ms1(p.lateness_p99)} ms"
        f" | disc {p.disconnects} refused {p.refused}"
    )


_COLUMNS = (
    "clients",
    "utts",
    "ok",
    "miss",
    "err",
    "shed",
    "disc",
    "refused",
    "p50",
    "p90",
    "p95",
    "p99",
    "max",
    "srv p95",
    "hello p95",
    "late p99",
    "srv CPU",
    "srv RSS MB",
    "gen CPU",
    "pass",
    "adm p95",
    "adm pass",
)


def _refused(s: StepStats) -> int:
    """Connections the server turned away: 503s, connect and hello timeouts, rejected hellos."""
    c = s.counters
    return c.refused + c.connect_timeouts + c.hello_timeouts + c.hello_rejected


def _row(s: StepStats) -> list[str]:
    c = s.counters
    refused = _refused(s)
    return [
        str(s.clients),
        str(s.utterances),
        str(s.answered),
        str(s.missing),
        str(s.errors),
        str(s.shed),
        str(c.disconnects),
        str(refused),
        _ms(s.latency.p50),
        _ms(s.latency.p90),
        _ms(s.latency.p95),
        _ms(s.latency.p99),
        _ms(s.latency.max),
        _ms(s.server.p95),
        _ms(s.hello.p95),
        _ms1(s.lateness.p99),
        _pct(s.server_cpu_percent),
        _ms(s.server_rss_peak_mb),
        _pct(s.generator_cpu_percent),
        "yes" if s.within_budget else "no",
        _p95_cell(s.utterances - s.shed, s.p95_admitted_ms),
        "yes" if s.admitted_within_budget else "no",
    ]


_WINDOWS_TITLE = f"over time (ms; each step's utterances by when their speech ended, {WINDOW_S:g} s at a time)"


def _aligned(rows: list[list[str]]) -> str:
    """Right-aligned columns with a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_tts_table(report: LoadReport) -> str:
    rows = [["clients", "answered", "p50", "p95", "p99", "max"]]
    for st in report.steps:
        t = st.stats.tts
        if t is not None:
            rows.append([str(st.stats.clients), str(t.count), _ms(t.p50), _ms(t.p95), _ms(t.p99), _ms(t.max)])
    return _aligned(rows)


def format_table(report: LoadReport) -> str:
    """The terminal table: one row per step, latencies in ms."""
    lines = [_aligned([list(_COLUMNS)] + [_row(s.stats) for s in report.steps])]
    for sec in report.sections:
        lines += ["", sec.title + ":", _aligned([list(sec.columns), *sec.rows])]
    if has_stages(report):
        lines += [
            "",
            "where the time went (ms; asr/emb = compute of the utterance's batch):",
            format_stage_table(report),
        ]
    if any(s.stats.tts is not None for s in report.steps):
        lines += ["", "end of speech -> first TTS audio at the device (ms, relay):", format_tts_table(report)]
    if has_windows(report):
        lines += ["", _WINDOWS_TITLE + ":", _aligned([list(_WINDOW_COLUMNS), *_window_rows(report)])]
    lines.append("")
    lines.append(f"traffic: {traffic_line(report.options)}")
    lines.append(capacity_line(report))
    return "\n".join(lines)


_STAGE_COLUMNS = (
    "clients",
    "asr wait p50",
    "asr wait p95",
    "asr p50",
    "asr p95",
    "emb wait p95",
    "emb p95",
    "speculated",
    "loop lag p95",
    "spec used/dropped/discarded",
    "wasted CPU s",
)


def _stage_row(s: StepStats) -> list[str]:
    st, sv = s.stages, s.server_stages
    spec = wasted = lag = "-"
    if sv is not None:
        spec = "/".join(f"{sv.speculations.get(k, 0):.0f}" for k in ("used", "dropped", "discarded"))
        wasted = f"{sum(sv.discarded_compute_s.values()):.1f}"
        lag = "-" if sv.loop_lag_p95_ms is None else f"<={sv.loop_lag_p95_ms:g}"
    if st is None:
        return [str(s.clients)] + ["-"] * 7 + [lag, spec, wasted]
    return [
        str(s.clients),
        _ms(st.asr_queue.p50),
        _ms(st.asr_queue.p95),
        _ms(st.asr.p50),
        _ms(st.asr.p95),
        _ms(st.embed_queue.p95),
        _ms(st.embed.p95),
        _pct(st.speculated_percent),
        lag,
        spec,
        wasted,
    ]


def has_stages(report: LoadReport) -> bool:
    return any(
        (s.stats.stages is not None and s.stats.stages.asr.count) or s.stats.server_stages is not None
        for s in report.steps
    )


def format_stage_table(report: LoadReport) -> str:
    """Where the time went, per step: engine waits and compute (ms), speculation, event-loop lag."""
    return _aligned([list(_STAGE_COLUMNS)] + [_stage_row(s.stats) for s in report.steps])


def traffic_line(options: dict[str, Any]) -> str:
    """The traffic shape in words: every load figure is stated with it."""
    think = f"think {options['think_ms'][0] / 1000:g}-{options['think_ms'][1] / 1000:g} s"
    reply = options.get("reply_ms", (0.0, 0.0))
    if options.get("shape") == "wake":
        group = options.get("group_wake")
        turns = options["turns"]
        every = options["wake_every_s"]
        gaps = f"wakes at exponential gaps of mean {every:g} s" if every else "wakes only in the group wake"
        return (
            f"wake (each device {gaps}{f', {group} of them within the first second' if group else ''},"
            " connects once and never retries,"
            f" talks {turns[0]}-{turns[1]} turns (answer plays {reply[0] / 1000:g}-{reply[1] / 1000:g} s, {think}),"
            f" closes after {options['idle_close_s']:g} s of silence)"
        )
    if options.get("shape") == "conversation":
        return (
            f"conversation (speak, wait for the answer, microphone off while it plays "
            f"{reply[0] / 1000:g}-{reply[1] / 1000:g} s, then {think})"
        )
    return f"continuous talkers (microphone always on, {think} between utterances)"


def capacity_line(report: LoadReport) -> str:
    opts = report.options
    cap = report.capacity
    if report.sink_mode:
        crit = f"frame send lateness p99 < {opts['lateness_budget_ms']:g} ms"
        what = "generator ceiling (clients kept on time by this generator)"
    else:
        crit = f"end-of-speech -> stt p95 < {opts['budget_ms']:g} ms, unanswered counted as late, every client in"
        what = "capacity"
    wake = opts.get("shape") == "wake"
    if wake:
        crit = (
            f">= {WAKE_SERVED_SHARE:.0%} of wake-ups served, every turn's stt < {opts['budget_ms']:g} ms,"
            " none refused while the recogniser had room"
        )
        what = "devices per box"
    line = f"{what}: {cap if cap is not None else 'none of the steps'} ({crit})"
    over = [s.stats for s in report.steps if not s.stats.within_budget and not report.sink_mode and not wake]
    if over:
        line += (
            f"\nover capacity, the admitted devices (p95 of what was not shed < {opts['budget_ms']:g} ms): "
            + "; ".join(
                f"{st.clients} {'yes' if st.admitted_within_budget else 'no'}"
                f" ({_p95_cell(st.utterances - st.shed, st.p95_admitted_ms)} ms; {_refused(st)} refused, {st.shed} shed"
                f"{f', {st.kept_out} clients never got in' if st.kept_out else ''})"
                for st in over
            )
        )
    late = [s.stats.clients for s in report.steps if not s.stats.generator_on_time and not report.sink_mode]
    if late:
        line += (
            f"\nwarning: the generator fell behind (frame lateness p99 >= {opts['lateness_budget_ms']:g} ms)"
            f" at {', '.join(map(str, late))} clients: use --procs or a second machine"
        )
    return line


def _markdown_table(columns: Sequence[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines: the header, right-aligned columns, one line per row."""
    lines = ["| " + " | ".join(r) + " |" for r in [list(columns), *rows]]
    lines.insert(1, "|" + "---:|" * len(columns))
    return lines


def render_markdown(report: LoadReport) -> str:
    o = report.options
    head = [
        "# Load test summary",
        "",
        f"- started: {report.started_at}",
        f"- target: `{o['url']}` (protocol v{o['protocol_version']}, mode {o['mode']},"
        f" {o['frame_ms']} ms Opus frames{', sink mode' if report.sink_mode else ''})",
        f"- steps: {', '.join(str(s.stats.clients) for s in report.steps)} clients, {o['duration_s']:g} s each,"
        f" {o['procs']} generator process(es), seed {o['seed']}",
        f"- traffic: {traffic_line(o)}; reply timeout {o['reply_timeout_s']:g} s,"
        f" server end-of-speech silence {o['server_silence_ms']:g} ms",
        f"- **{capacity_line(report)}**",
        "",
        "Latencies in ms, from the send time of the last frame holding speech to the `stt`; `srv` is the"
        " same less the server's end-of-speech silence; `late` is how late frames left against the"
        " device clock; `shed` counts the errors that say the server shed the utterance or was at a limit;"
        " `refused` adds refused connections (a 503 while the server is behind), connect and hello timeouts;"
        " `pass` is the capacity verdict (p95 counting every unanswered utterance as late), `adm p95` and"
        " `adm pass` the overload one (the utterances the server kept, i.e. all but the shed, within budget).",
        "",
    ]
    table = _markdown_table(_COLUMNS, [_row(s.stats) for s in report.steps])
    for sec in report.sections:
        table += ["", sec.title + ":", ""] + _markdown_table(sec.columns, sec.rows)
    if has_stages(report):
        table += [
            "",
            "Where the time went (ms; `asr`/`emb` are the compute of the utterance's batch, `wait` the"
            " queue before it; loop lag from the server's metrics, a histogram bucket's upper bound):",
            "",
        ]
        table += _markdown_table(_STAGE_COLUMNS, [_stage_row(s.stats) for s in report.steps])
    if has_windows(report):
        table += ["", _WINDOWS_TITLE + " (`p95 all` counts the unanswered as late, `p95 adm` all but the shed):", ""]
        table += _markdown_table(_WINDOW_COLUMNS, _window_rows(report))
    notes: list[str] = []
    for s in report.steps:
        st = s.stats
        c = st.counters
        if c.client_errors:
            notes.append(
                f"- {st.clients} clients: {c.client_errors} client task errors: "
                + "; ".join(st.client_error_messages[:3])
            )
        if st.probe_error:
            notes.append(f"- {st.clients} clients: server probe: {st.probe_error}")
        if c.late_replies:
            notes.append(f"- {st.clients} clients: {c.late_replies} replies came after their utterance was given up")
    return "\n".join(head + table + ([""] + notes if notes else [])) + "\n"


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def report_to_dict(report: LoadReport) -> dict[str, Any]:
    """Everything, every sample included, as JSON-ready data."""
    steps = []
    for s in report.steps:
        stats = dataclasses.asdict(s.stats)
        steps.append(
            {
                "index": s.index,
                "stats": stats,
                "hello_ms": s.hello_ms,
                "lateness_histogram_0.1ms": s.lateness.to_dict(),
                "samples": [dataclasses.asdict(x) for x in s.samples],
                **s.extra,
            }
        )
    return _clean(
        {
            "options": report.options,
            "started_at": report.started_at,
            "sink_mode": report.sink_mode,
            "capacity": report.capacity,
            "steps": steps,
        }
    )


def write_outputs(report: LoadReport, out_dir: Path, plot: bool = True) -> tuple[list[Path], str | None]:
    """Write samples.json, summary.md and (when matplotlib is there) plot.png into `out_dir`.
    Returns the files written and, if the plot was skipped, why."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    p = out_dir / "samples.json"
    p.write_text(json.dumps(report_to_dict(report), ensure_ascii=False, indent=1), encoding="utf-8")
    files.append(p)
    p = out_dir / "summary.md"
    p.write_text(render_markdown(report), encoding="utf-8")
    files.append(p)
    skipped: str | None = "plot not asked for"
    if plot:
        from .plot import PlotUnavailable, write_plot

        try:
            files.append(write_plot(report, out_dir / "plot.png"))
            skipped = None
        except PlotUnavailable as e:
            skipped = str(e)
    return files, skipped
