"""``fedtune report``: one self-contained HTML page (plus PNGs) comparing runs round by round.

Figures, every run on the same axes: eval loss and perplexity; each task metric; ε spent per contributor;
participants, declines and failures; bytes moved (cumulative); credit per contributor (from the run's ledger).
A table lists each run's summary and the config keys in which the runs differ; the loss definition is quoted
from ``metrics.jsonl``. PNGs are drawn with matplotlib's Agg backend (no display needed) and embedded in the
HTML as base64, so the page can be mailed or archived alone.

A RUN argument may be a run dir or a sweep folder (all its points). Pitfalls: figures without data (no DP, no
tasks, no ledger) are left out rather than drawn empty; a run's label is its campaign name unless ``labels``
are given; runs are read, never written.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedtune.files import atomic_write_bytes, atomic_write_text
from fedtune.research.summary import RunSummary, differing_keys, fmt, read_config, summarize
from fedtune.rundir import LEDGER_FILENAME, RunDir


@dataclass
class Run:
    """A run dir loaded for plotting."""

    path: Path
    label: str
    rows: list[dict[str, Any]]
    config: dict[str, Any]
    summary: RunSummary


def expand_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run dirs named directly, or every point of a sweep folder (``sweep.json``), in order."""
    out: list[Path] = []
    for p in map(Path, paths):
        spec = p / "sweep.json"
        if spec.is_file():
            names = [pt["name"] for pt in json.loads(spec.read_text(encoding="utf-8"))["points"]]
            out += [p / "points" / n for n in names if (p / "points" / n / "metrics.jsonl").is_file()]
        elif (p / "metrics.jsonl").is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: not a run dir (no metrics.jsonl) nor a sweep folder (no sweep.json)")
    return out


def load_runs(paths: Sequence[Path], labels: Sequence[str] | None = None) -> list[Run]:
    runs = []
    for i, path in enumerate(paths):
        cfg = read_config(path)
        label = labels[i] if labels and i < len(labels) else str(cfg.get("campaign", {}).get("name", path.name))
        runs.append(Run(path, label, RunDir(path).read_metrics(), cfg, summarize(path)))
    return runs


def _series(run: Run, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], float(r[key])) for r in run.rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _figure(ncols: int, title: str):  # -> (Figure, list[Axes])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, ncols, figsize=(max(7.0, 5.2 * ncols), 3.6), squeeze=False)
    fig.suptitle(title)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return fig, list(axes[0])


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _legend(ax, runs: list[Run]) -> None:
    if len(runs) > 1 or ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def plot_loss(runs: list[Run]) -> bytes:
    fig, (ax_loss, ax_ppl) = _figure(2, "held-out evaluation")
    for run in runs:
        ax_loss.plot(*_series(run, "eval_loss"), marker="o", ms=3, label=run.label)
        ax_ppl.plot(*_series(run, "perplexity"), marker="o", ms=3, label=run.label)
    ax_loss.set(xlabel="round", ylabel="eval loss (nats)")
    ax_ppl.set(xlabel="round", ylabel="perplexity")
    _legend(ax_loss, runs)
    return _png(fig)


def task_metrics(runs: list[Run]) -> list[str]:
    """``task/metric`` names any run reported (counts left out)."""
    skip = {"n", "timeouts"}
    return sorted(
        {f"{t}/{m}" for run in runs for r in run.rows for t, ms in (r.get("tasks") or {}).items() for m in ms}
        - {f"{t}/{m}" for run in runs for r in run.rows for t in (r.get("tasks") or {}) for m in skip}
    )


def plot_tasks(runs: list[Run]) -> bytes | None:
    metrics = task_metrics(runs)
    if not metrics:
        return None
    fig, axes = _figure(len(metrics), "task metrics on the shared adapter")
    for ax, metric in zip(axes, metrics, strict=True):
        task, name = metric.split("/", 1)
        for run in runs:
            pts = [
                (r["round"], r["tasks"][task][name]) for r in run.rows if name in (r.get("tasks") or {}).get(task, {})
            ]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=run.label)
        ax.set(xlabel="round", ylabel=metric, ylim=(-0.02, 1.02))
        _legend(ax, runs)
    return _png(fig)


def plot_epsilon(runs: list[Run]) -> bytes | None:
    if not any(r.get("epsilon") for run in runs for r in run.rows):
        return None
    fig, (ax,) = _figure(1, "ε spent per contributor (DP-SGD, each contributor's own accountant)")
    for i, run in enumerate(runs):
        color = f"C{i}"
        names = sorted({n for r in run.rows for n in (r.get("epsilon") or {})})
        if not names:
            continue
        for name in names:
            pts = [(r["round"], r["epsilon"][name]) for r in run.rows if name in (r.get("epsilon") or {})]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, alpha=0.35, lw=1)
        ax.plot(*_series(run, "epsilon_max"), color=color, lw=2, marker="o", ms=3, label=f"{run.label} (max)")
        target = run.config.get("privacy", {}).get("target_epsilon")
        if run.config.get("privacy", {}).get("mechanism") == "dp-sgd" and target:
            ax.axhline(float(target), color=color, ls=":", lw=1)
    ax.set(xlabel="round", ylabel="ε (dotted: campaign target)")
    _legend(ax, runs)
    return _png(fig)


def plot_participation(runs: list[Run]) -> bytes:
    from matplotlib.ticker import MaxNLocator

    fig, (ax_in, ax_out) = _figure(2, "participation (declined: solid, failed or dropped: dashed)")
    for i, run in enumerate(runs):
        rows = [r for r in run.rows if r["round"] > 0]
        rounds = [r["round"] for r in rows]
        ax_in.plot(rounds, [r.get("participants", 0) for r in rows], marker="o", ms=3, color=f"C{i}", label=run.label)
        ax_out.plot(rounds, [r.get("declined", 0) for r in rows], marker="v", ms=4, color=f"C{i}", label=run.label)
        ax_out.plot(rounds, [r.get("failed", 0) for r in rows], marker="x", ms=4, ls="--", color=f"C{i}")
    ax_in.set(xlabel="round", ylabel="contributors in the aggregate")
    ax_out.set(xlabel="round", ylabel="declined / failed")
    for ax in (ax_in, ax_out):
        ax.set_ylim(bottom=0, top=max(1.0, ax.get_ylim()[1]))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(ax_in, runs)
    _legend(ax_out, runs)
    return _png(fig)


def plot_bytes(runs: list[Run]) -> bytes:
    fig, (ax,) = _figure(1, "adapter payload moved (cumulative, all contributors)")
    for i, run in enumerate(runs):
        rounds = [r["round"] for r in run.rows]
        for key, style in (("bytes_up", "-"), ("bytes_down", "--")):
            total, ys = 0, []
            for r in run.rows:
                total += int(r.get(key) or 0)
                ys.append(total / 1e6)
            ax.plot(rounds, ys, ls=style, color=f"C{i}", label=f"{run.label} {key.split('_')[1]}")
    ax.set(xlabel="round", ylabel="MB")
    _legend(ax, runs)
    return _png(fig)


def credit_by_contributor(run: Run) -> dict[str, list[tuple[int, float]]]:
    """Cumulative credit per contributor name after each round, from the run's own SQLite ledger."""
    db = run.path / LEDGER_FILENAME
    if not db.is_file() or run.config.get("credit", {}).get("db"):
        return {}
    from fedtune.credit.ledger import Ledger, default_url

    campaign = str(run.config.get("campaign", {}).get("name", ""))
    out: dict[str, list[tuple[int, float]]] = {}
    with Ledger.open(default_url(run.path), migrate=False) as ledger:
        totals: dict[str, float] = {}
        names = {}
        for r in run.rows:
            if r["round"] == 0:
                continue
            for entry in ledger.round_entries(campaign, r["round"]):
                if entry.contributor_id not in names:
                    who = ledger.contributor(entry.contributor_id)
                    names[entry.contributor_id] = who.name if who else entry.contributor_id[:8]
                totals[entry.contributor_id] = totals.get(entry.contributor_id, 0.0) + entry.credit
            for cid, total in totals.items():
                out.setdefault(names[cid], []).append((r["round"], total))
    return out


def plot_credit(runs: list[Run]) -> bytes | None:
    credits = [(run, credit_by_contributor(run)) for run in runs]
    if not any(c for _, c in credits):
        return None
    fig, (ax,) = _figure(1, "credit per contributor (cumulative TFLOP-credits, from the ledger)")
    for i, (run, per_name) in enumerate(credits):
        for j, (_name, pts) in enumerate(sorted(per_name.items())):
            label = f"{run.label}" if j == 0 else None
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", alpha=0.8, lw=1, marker=".", label=label)
    ax.set(xlabel="round", ylabel="credit (one line per contributor)")
    _legend(ax, runs)
    return _png(fig)


def summary_table(runs: list[Run]) -> str:
    keys = differing_keys([r.config for r in runs]) if len(runs) > 1 else []
    metrics = task_metrics(runs)
    head = ["run", *keys, "rounds", "loss 0", "loss final", "drop %", *metrics, "ε max", "MB moved", "wall s"]
    lines = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for run in runs:
        s = run.summary
        flat = {f"{sec}.{k}": v for sec, vals in run.config.items() for k, v in vals.items()}
        cells = [run.label, *(flat.get(k) for k in keys), f"{s.rounds_done}/{s.planned_rounds}"]
        cells += [fmt(s.eval_loss_initial), fmt(s.eval_loss_final), fmt(s.loss_drop_pct, 1)]
        cells += [fmt(s.tasks.get(m.split("/")[0], {}).get(m.split("/", 1)[1])) for m in metrics]
        cells += [fmt(s.epsilon_max, 2), fmt((s.bytes_up + s.bytes_down) / 1e6, 3), fmt(s.wall_s, 1)]
        lines.append("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in cells) + "</tr>")
    return "\n".join([*lines, "</table>"])


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:0.9em;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}img{max-width:100%;margin:0.5em 0}code{background:#f5f5f5;padding:1px 4px}"""


def build_report(
    paths: Sequence[str | Path], out: Path, title: str = "fedtune report", labels: Sequence[str] | None = None
) -> dict[str, Path]:
    """Write ``out/report.html`` (PNGs embedded) and ``out/NAME.png``; returns the written files by name."""
    runs = load_runs(expand_runs(paths), labels)
    if not runs:
        raise FileNotFoundError("no runs with metrics to report on")
    figures = {
        "loss": plot_loss(runs),
        "tasks": plot_tasks(runs),
        "epsilon": plot_epsilon(runs),
        "participation": plot_participation(runs),
        "bytes": plot_bytes(runs),
        "credit": plot_credit(runs),
    }
    written: dict[str, Path] = {}
    sections = []
    for name, png in figures.items():
        if png is None:
            continue
        atomic_write_bytes(out / f"{name}.png", png)
        written[name] = out / f"{name}.png"
        data = base64.b64encode(png).decode("ascii")
        sections.append(f'<h2>{html.escape(name)}</h2>\n<img alt="{name}" src="data:image/png;base64,{data}">')
    definitions = sorted({r.summary.eval_loss_def for r in runs if r.summary.eval_loss_def})
    page = "\n".join(
        [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            f"<p>{len(runs)} run(s), generated {datetime.now(UTC).isoformat(timespec='seconds')}: "
            + ", ".join(f"<code>{html.escape(str(r.path))}</code>" for r in runs)
            + "</p>",
            summary_table(runs),
            *(f"<p>eval loss: {html.escape(d)}</p>" for d in definitions),
            *sections,
            "</body></html>",
        ]
    )
    atomic_write_text(out / "report.html", page)
    written["html"] = out / "report.html"
    return written
