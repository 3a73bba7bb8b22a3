"""plot.png: latency percentiles against clients, and the latency CDF of each step.

matplotlib is optional (`pip install matplotlib`); without it the run says so and writes the
other outputs. In sink mode the plot shows frame send lateness instead of reply latency.
"""

from __future__ import annotations

from pathlib import Path

from .report import LoadReport, StepReport


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed, so no PNG."""


def _lateness_cdf(step: StepReport) -> tuple[list[float], list[float]]:
    hist = step.lateness
    total = hist.total
    xs: list[float] = []
    ys: list[float] = []
    seen = 0
    for key in sorted(hist.counts):
        seen += hist.counts[key]
        xs.append((key + 1) * hist.RESOLUTION_MS)
        ys.append(seen / total)
    return xs, ys


def write_plot(report: LoadReport, path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed: no plot.png (pip install matplotlib)") from None
    sink = report.sink_mode
    opts = report.options
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    clients = [s.stats.clients for s in report.steps]
    for q in ("p50", "p90", "p95", "p99"):
        series = [getattr(s.stats.lateness if sink else s.stats.latency, q) for s in report.steps]
        pts = [(c, v) for c, v in zip(clients, series) if v is not None]
        if pts:
            left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=q)
    budget = opts["lateness_budget_ms"] if sink else opts["budget_ms"]
    left.axhline(budget, color="red", linestyle="--", linewidth=1, label=f"budget {budget:g} ms")
    left.set_xlabel("clients")
    left.set_ylabel("frame send lateness (ms)" if sink else "end of speech -> stt (ms)")
    left.set_title("generator lateness vs clients" if sink else "latency percentiles vs clients")
    if len(clients) > 1 and max(clients) / max(1, min(clients)) >= 8:
        left.set_xscale("log")
    left.grid(True, alpha=0.3)
    left.legend(fontsize="small")
    for s in report.steps:
        if sink:
            xs, ys = _lateness_cdf(s)
        else:
            xs = sorted(x.latency_ms for x in s.samples if x.outcome == "ok" and x.latency_ms is not None)
            n = s.stats.utterances or 1  # unanswered utterances keep the curve below 1
            ys = [(i + 1) / n for i in range(len(xs))]
        if xs:
            right.step(xs, ys, where="post", label=f"{s.stats.clients} clients")
    right.axvline(budget, color="red", linestyle="--", linewidth=1)
    right.set_xlabel("frame send lateness (ms)" if sink else "end of speech -> stt (ms)")
    right.set_ylabel("fraction of frames" if sink else "fraction of utterances")
    right.set_ylim(0, 1.02)
    right.set_title("lateness CDF per step" if sink else "latency CDF per step")
    right.grid(True, alpha=0.3)
    right.legend(fontsize="small")
    fig.suptitle(f"{opts['url']}  mode {opts['mode']}  {opts['duration_s']:g} s per step", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
