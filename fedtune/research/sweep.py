"""``fedtune sweep``: a grid of campaign variants run in simulation, resumably, then one comparison table.

``--set section.key=v1,v2`` (repeatable) spans the grid; every point is the campaign with those values. The
sweep folder holds::

    sweep.json              what was asked (campaign file, the --set axes, the points)
    configs/POINT.toml      each point's resolved campaign
    points/POINT/           each point's run dir (what ``fedtune simulate`` writes)
    points/POINT.log        the point's console output
    summary.json / .txt     the comparison table (final loss, drop, task metrics, ε, bytes, wall time)

Resuming: a point whose run has every round is skipped; an interrupted one is carried on with
``simulate --resume`` from its last completed round; the rest start fresh. SIGINT or SIGTERM on the sweep is
passed to the running point, which stops cleanly before the sweep exits (:class:`SweepInterrupted`): a point left
running would write into the run dir the next sweep resumes. Asking a folder for a different grid
is refused, so results of two grids never mix. Every point is validated (config and preflight) before the first
one runs, so a typo in the last value costs nothing.

Values are TOML: ``8``, ``1e-3``, ``true``, ``"text"`` or bare words (taken as strings), lists in brackets
(``lora.target_modules=[q_proj,v_proj],[q_proj,k_proj,v_proj]``: commas inside brackets do not split).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.config import CampaignConfig, ConfigError, load_config
from fedtune.files import atomic_write_text
from fedtune.research.summary import RunSummary, fmt, summarize
from fedtune.rundir import RunDir

SCHEMA = "fedtune.sweep/1"


@dataclass(frozen=True)
class Axis:
    """One ``--set``: a ``section.key`` and the values it takes."""

    section: str
    key: str
    values: tuple[Any, ...]

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


@dataclass(frozen=True)
class Point:
    """One grid point: its name (also its folder) and the values it sets."""

    name: str
    values: tuple[tuple[str, Any], ...]

    def overrides(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for dotted, value in self.values:
            section, key = dotted.split(".", 1)
            out.setdefault(section, {})[key] = value
        return out


def split_values(text: str) -> list[str]:
    """Split on commas that are not inside brackets or quotes."""
    parts, depth, quote, current = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += ch
    return [*parts, current]


def parse_value(text: str) -> Any:
    """A TOML value; a bare word (``ffa``) or a bracketed list of bare words is taken as strings."""
    text = text.strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if text.startswith("[") and text.endswith("]"):
            return [parse_value(v) for v in split_values(text[1:-1]) if v.strip()]
        return text


def parse_axis(spec: str, source: str | Path = "--set") -> Axis:
    """``section.key=v1,v2`` -> :class:`Axis`; the key itself is checked against the schema when points load."""
    dotted, sep, values = spec.partition("=")
    section, dot, key = dotted.strip().partition(".")
    if not sep or not dot or not key or not values.strip():
        raise ConfigError(source, f"--set {spec}", "section.key=value1,value2,...", spec)
    return Axis(section, key, tuple(parse_value(v) for v in split_values(values)))


def _slug(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "empty"


def grid(axes: list[Axis]) -> list[Point]:
    """Every combination, in the order the axes and values were given."""
    points = []
    for combo in itertools.product(*(a.values for a in axes)):
        values = tuple((a.name, v) for a, v in zip(axes, combo, strict=True))
        name = "_".join(f"{a.name}={_slug(v)}" for a, v in zip(axes, combo, strict=True)) or "base"
        points.append(Point(name, values))
    if len({p.name for p in points}) != len(points):
        raise ConfigError("--set", "(values)", "values that stay distinct as folder names", [p.name for p in points])
    return points


@dataclass
class Sweep:
    """A grid of points of one campaign file, in one folder."""

    config: Path
    axes: list[Axis]
    root: Path
    overrides: dict[str, dict[str, Any]]
    explicit: list[Point] | None = None  # named points instead of the grid (benchmarks compare chosen variants)

    @property
    def points(self) -> list[Point]:
        return list(self.explicit) if self.explicit is not None else grid(self.axes)

    def spec(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "config": str(self.config.resolve()),
            "axes": {a.name: list(a.values) for a in self.axes},
            "overrides": self.overrides,
            "explicit": [p.name for p in self.explicit] if self.explicit is not None else None,
            "points": [{"name": p.name, "values": dict(p.values)} for p in self.points],
        }

    def run_dir(self, point: Point) -> Path:
        return self.root / "points" / point.name

    def point_config(self, point: Point) -> CampaignConfig:
        merged = {s: dict(v) for s, v in self.overrides.items()}
        for section, values in point.overrides().items():
            merged.setdefault(section, {}).update(values)
        cfg = load_config(self.config, merged)
        cfg.campaign.run_dir = str(self.run_dir(point))
        cfg.campaign.name = f"{cfg.campaign.name}-{point.name}"
        return cfg

    def validate(self, check: Callable[[CampaignConfig], Any] | None = None) -> list[CampaignConfig]:
        """Load every point's config (and run ``check`` on it) before anything is written; refuse another grid."""
        spec_file = self.root / "sweep.json"
        if spec_file.is_file():
            old = json.loads(spec_file.read_text(encoding="utf-8"))
            keys = ("config", "axes", "overrides", "explicit")
            if {k: old.get(k) for k in keys} != {k: self.spec()[k] for k in keys}:
                started = old.get("explicit") or old.get("axes")
                raise ConfigError(
                    spec_file,
                    "(sweep)",
                    "the campaign file, --set axes and overrides it was started with (or another --out)",
                    f"{Path(old.get('config', '?')).name} {started} {old.get('overrides') or ''}".strip(),
                )
        cfgs = []
        for point in self.points:
            cfg = self.point_config(point)
            if check is not None:
                check(cfg)
            cfgs.append(cfg)
        return cfgs

    def status(self, point: Point, cfg: CampaignConfig) -> str:
        """``done``, ``partial`` (resumable) or ``new``."""
        run = RunDir(self.run_dir(point))
        if not run.config.is_file():
            return "new"
        rows = run.read_metrics()
        return "done" if rows and rows[-1]["round"] >= cfg.federation.rounds else "partial"

    def write_spec(self, cfgs: list[CampaignConfig]) -> None:
        atomic_write_text(self.root / "sweep.json", json.dumps(self.spec(), indent=2, default=str) + "\n")
        for point, cfg in zip(self.points, cfgs, strict=True):
            atomic_write_text(self.root / "configs" / f"{point.name}.toml", cfg.to_toml())

    def run_point(self, point: Point, verbose: bool = False) -> int:
        """Run (or resume) one point as a ``fedtune simulate`` process; its output goes to ``points/POINT.log``."""
        log = self.root / "points" / f"{point.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "fedtune.cli",
            "simulate",
            str(self.root / "configs" / f"{point.name}.toml"),
            "--run-dir",
            str(self.run_dir(point)),
        ]
        if self.run_dir(point).exists():  # an interrupted point; --resume refuses a run dir that does not exist
            cmd.append("--resume")
        with log.open("a", encoding="utf-8") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            out = None if verbose else fh
            proc = subprocess.Popen(cmd, stdout=out, stderr=None if verbose else subprocess.STDOUT)
            return _wait_forwarding_stop(proc, point)

    def summaries(self) -> list[tuple[Point, RunSummary | None]]:
        return [
            (p, summarize(self.run_dir(p)) if (self.run_dir(p) / "config.toml").is_file() else None)
            for p in self.points
        ]


def _wait_forwarding_stop(proc: subprocess.Popen[bytes], point: Point, grace_s: float = 60.0) -> int:
    """Wait for a point's ``simulate``; on SIGINT or SIGTERM here, stop it cleanly, then raise SweepInterrupted.

    SIGTERM to the sweep alone (``kill``, a scheduler) used to end the sweep at once and leave the point's
    ``simulate`` training on, orphaned, into a run dir the next ``fedtune sweep`` would resume beside it; Ctrl-C gave
    it 0.25 s (``subprocess.run``) before SIGKILL cut its own clean stop short. Now the point gets SIGTERM (its
    :func:`fedtune.cli.interrupt.stop_on_interrupt` stops Ray and keeps the completed rounds) and up to ``grace_s``.
    """
    got: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if not got:
            deadline = threading.Timer(grace_s, proc.kill)  # a point that does not stop in time is killed
            deadline.daemon = True
            deadline.start()
        got.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)  # after Ctrl-C it has SIGINT too; a second signal is ignored there

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()  # a signal runs ``forward`` and the wait goes on (PEP 475)
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)
    if got:
        raise SweepInterrupted(got[0], point)
    return rc


class SweepInterrupted(Exception):
    """The sweep got SIGINT or SIGTERM while ``point`` ran; that point was stopped cleanly."""

    def __init__(self, signum: int, point: Point) -> None:
        super().__init__(f"signal {signum} while {point.name} ran")
        self.signum, self.point = signum, point


def run_sweep(
    sweep: Sweep,
    check: Callable[[CampaignConfig], Any] | None = None,
    say: Callable[[str], None] = print,
    verbose: bool = False,
) -> int:
    """Validate every point, run the unfinished ones in order, write the table; 0 if every point finished."""
    cfgs = sweep.validate(check)
    sweep.write_spec(cfgs)
    say(f"sweep of {len(cfgs)} point(s) in {sweep.root}")
    failed = []
    for i, (point, cfg) in enumerate(zip(sweep.points, cfgs, strict=True), start=1):
        state = sweep.status(point, cfg)
        if state == "done":
            say(f"[{i}/{len(cfgs)}] {point.name}: done, skipped")
            continue
        say(f"[{i}/{len(cfgs)}] {point.name}: {'resuming' if state == 'partial' else 'running'} ...")
        start = time.perf_counter()
        rc = sweep.run_point(point, verbose)
        took = time.perf_counter() - start
        if rc != 0 or sweep.status(point, cfg) != "done":
            failed.append(point.name)
            say(f"[{i}/{len(cfgs)}] {point.name}: failed (exit {rc}) after {took:.0f} s; see points/{point.name}.log")
        else:
            say(f"[{i}/{len(cfgs)}] {point.name}: finished in {took:.0f} s")
    table = write_summary(sweep)
    say(table)
    if failed:
        say(f"{len(failed)} point(s) did not finish: {', '.join(failed)} (run the same command again to resume)")
    return 1 if failed else 0


def summary_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """One JSON object per point: its values, status and :class:`RunSummary` fields."""
    rows = []
    for point, summary in sweep.summaries():
        row: dict[str, Any] = {"point": point.name, "values": dict(point.values)}
        row |= summary.to_json() if summary else {"complete": False, "rounds_done": -1}
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], axes: list[str], named: bool = False) -> str:
    """The comparison as fixed-width text: (point,) axes, final loss, drop, task metrics, ε, MB moved, wall seconds."""
    skip = {"n", "timeouts"}
    metric_cols = sorted(
        {f"{t}/{m}" for r in rows for t, ms in (r.get("tasks") or {}).items() for m in ms if m not in skip}
    )
    header = [
        *(["point"] if named else []),
        *axes,
        "rounds",
        "loss 0",
        "loss final",
        "drop",
        "drop %",
        *metric_cols,
        "ε max",
        "MB",
        "wall s",
    ]

    body = []
    for r in rows:
        tasks = r.get("tasks") or {}
        metrics = [fmt(tasks.get(c.split("/")[0], {}).get(c.split("/", 1)[1])) for c in metric_cols]
        done = f"{r.get('rounds_done', -1)}/{r.get('planned_rounds', '?')}"
        body.append(
            [
                *([r["point"]] if named else []),
                *(fmt(r["values"].get(a)) for a in axes),
                done,
                fmt(r.get("eval_loss_initial")),
                fmt(r.get("eval_loss_final")),
                fmt(r.get("loss_drop")),
                fmt(r.get("loss_drop_pct"), 1),
                *metrics,
                fmt(r.get("epsilon_max"), 2),
                fmt((r.get("bytes_total") or 0) / 1e6, 3),
                fmt(r.get("wall_s"), 1),
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    lines = ["  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True)) for line in [header, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_summary(sweep: Sweep) -> str:
    """Write ``summary.json`` and ``summary.txt``; return the text table."""
    rows = summary_rows(sweep)
    axes = [a.name for a in sweep.axes] or list(dict.fromkeys(k for p in sweep.points for k, _ in p.values))
    table = format_table(rows, axes, named=sweep.explicit is not None)
    payload = {"schema": SCHEMA, "config": str(sweep.config.resolve()), "points": rows}
    atomic_write_text(sweep.root / "summary.json", json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write_text(sweep.root / "summary.txt", table + "\n")
    return table
