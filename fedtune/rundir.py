"""The run directory that a campaign writes and later tools read, and how a run is resumed from it.

Layout::

    config.toml            the resolved campaign config (written once, never rewritten)
    metrics.jsonl          one JSON object per round (round 0 = the initial adapter)
    adapter/               the latest shared adapter, PEFT format
    checkpoints/round-N/   the shared adapter after round N, plus ``server_state.npz`` (adapter + optimizer)

Every file and folder is written through :mod:`fedtune.files` (temporary name, then rename), so a crash
leaves the previous complete version, never a half-written one. A run dir can still be damaged from outside
(a disk filling up, a copy cut short, an editor): :meth:`RunDir.check_resumable` finds the last round whose
metrics line *and* checkpoint are intact, moves anything damaged aside (``NAME.damaged-<time>``, never
deleted) and refuses a campaign that changed since the run started.

Pitfalls: completed rounds must stay byte-identical across resumes, so metrics lines are kept as the raw
text that was written, never re-serialised; checks here only read until every check has passed, and the
usability probe of a run dir leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.config import CampaignConfig, ConfigError, load_config
from fedtune.files import atomic_write_text

LEDGER_FILENAME = "ledger.sqlite"
"""The run's embedded credit ledger (SQLite) unless ``[credit] db`` names another database."""
SERVER_STATE = "server_state.npz"
"""In each checkpoint: the adapter tensors (``adapter/NAME``) and the server optimizer's state."""
RESUMABLE_CHANGES = frozenset({("campaign", "run_dir"), ("federation", "rounds")})
"""Campaign keys ``--resume`` accepts a new value for: where the run lives, and how many rounds it runs to."""


def fresh_run_dir(requested: Path) -> Path:
    """``requested`` if it is free, else the first free ``requested-2``, ``requested-3``, …"""
    candidate, n = requested, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = requested.with_name(f"{requested.name}-{n}")
    return candidate


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. permission denied on a parent: treat as not there; the probe says why
        return False


def usable_run_dir(requested: Path, source: str | Path, resume: bool = False, key: str = "--run-dir") -> Path:
    """The run dir a run will write: ``requested`` (resume) or the first free ``requested[-N]``.

    Refused with a :class:`ConfigError` (nothing written): the filesystem root, a file, a path under a file,
    a place where no directory can be created or written (``/proc``, ``/sys``, a read-only mount).
    """
    requested = Path(requested).expanduser().absolute()

    def refuse(expected: str) -> ConfigError:
        return ConfigError(source, key, expected, str(requested))

    if requested == Path(requested.anchor):
        raise refuse("a directory below the filesystem root")
    if _exists(requested) and not requested.is_dir():
        raise refuse("a directory, not a file")
    existing = requested
    while not _exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise refuse(f"a path whose parents are directories ({existing} is a file)")
    target = requested if resume else fresh_run_dir(requested)
    _probe_writable(target if _exists(target) else existing, refuse)
    return target


def _probe_writable(folder: Path, refuse: Any) -> None:
    """Create and remove a directory in ``folder``: the only reliable test (root ignores permission bits)."""
    try:
        probe = tempfile.mkdtemp(prefix=".fedtune-probe-", dir=folder)
    except OSError as exc:
        raise refuse(f"a directory fedtune can create and write ({folder}: {exc.strerror or exc})") from None
    os.rmdir(probe)


@dataclass
class ResumePoint:
    """The last round whose metrics line and checkpoint are both intact, ready to load."""

    round: int
    rows: list[dict[str, Any]]
    adapter: dict[str, Any]  # tensor name -> numpy array
    strategy_state: dict[str, Any]  # what ``restore_strategy_state`` takes


@dataclass
class _Scan:
    lines: list[str]  # raw metrics lines of rounds 0..n, in order, each ending in a newline
    rows: list[dict[str, Any]]
    damaged_text: bool  # metrics.jsonl holds something after the last intact line
    intact: int | None  # last round with an intact metrics line and checkpoint
    bad_checkpoints: list[int]  # checkpoints of recorded rounds that exist but do not load


class RunDir:
    """Paths, writers and resume logic of one campaign run."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    def checkpoint(self, server_round: int) -> Path:
        return self.root / "checkpoints" / f"round-{server_round}"

    def server_state(self, server_round: int) -> Path:
        return self.checkpoint(server_round) / SERVER_STATE

    def contributor_state(self, contributor: str) -> Path:
        return self.root / "contributors" / contributor

    def create(self, config_toml: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config, config_toml)

    # ------------------------------------------------------------------------------------------ metrics

    def _metrics_lines(self) -> tuple[list[str], list[dict[str, Any]], bool]:
        """(raw lines, rows) of the intact prefix of rounds 0, 1, 2, …, and whether anything follows it."""
        try:
            text = self.metrics.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return [], [], False
        lines, rows = [], []
        for line in text.splitlines(keepends=True):
            try:
                row = json.loads(line) if line.endswith("\n") else None  # no newline: cut short mid-write
            except ValueError:
                row = None
            if not isinstance(row, dict) or row.get("round") != len(rows):
                break
            lines.append(line)
            rows.append(row)
        return lines, rows, sum(map(len, lines)) < len(text)

    def read_metrics(self) -> list[dict[str, Any]]:
        """Rows of the intact prefix of ``metrics.jsonl`` (a damaged tail is left out, never a crash)."""
        return self._metrics_lines()[1]

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Add (or replace) a round's row; earlier rows stay byte for byte as they were written."""
        lines, rows, _ = self._metrics_lines()
        kept = [line for line, r in zip(lines, rows, strict=True) if r.get("round") != row.get("round")]
        atomic_write_text(self.metrics, "".join(kept) + json.dumps(row, sort_keys=True) + "\n")

    # ------------------------------------------------------------------------------------------- resume

    def load_server_state(self, server_round: int) -> dict[str, Any] | None:
        """Every array of a checkpoint's server state, or ``None`` when it is missing or does not load."""
        import zipfile

        import numpy as np

        path = self.server_state(server_round)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}  # reads every member: a corrupt one fails its CRC
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
            return None

    def _scan(self) -> _Scan:
        lines, rows, damaged = self._metrics_lines()
        bad = []
        for server_round in range(len(rows) - 1, -1, -1):
            if self.load_server_state(server_round) is not None:
                return _Scan(lines, rows, damaged, server_round, bad)
            if self.checkpoint(server_round).exists():
                bad.append(server_round)
        return _Scan(lines, rows, damaged, None, bad)

    def resume_point(self) -> ResumePoint | None:
        """The last round with an intact metrics line and checkpoint, loaded; ``None`` when there is none."""
        scan = self._scan()
        if scan.intact is None:
            return None
        state = self.load_server_state(scan.intact) or {}
        return ResumePoint(
            round=scan.intact,
            rows=scan.rows[: scan.intact + 1],
            adapter={k.removeprefix("adapter/"): v for k, v in state.items() if k.startswith("adapter/")},
            strategy_state={k: v for k, v in state.items() if not k.startswith("adapter/")},
        )

    def config_changes(self, cfg: CampaignConfig) -> list[str]:
        """What differs between the campaign the run started with and ``cfg`` (keys ``--resume`` may not change)."""
        stored = load_config(self.config).to_dict()
        wanted = cfg.to_dict()
        changes = []
        for section, values in stored.items():
            for key, old in values.items():
                new = wanted.get(section, {}).get(key)
                if new != old and (section, key) not in RESUMABLE_CHANGES:
                    changes.append(f"[{section}] {key} {old!r} -> {new!r}")
        return changes

    def check_resumable(self, cfg: CampaignConfig, source: str | Path) -> ResumePlan:
        """What resuming ``cfg`` here takes; raises :class:`ConfigError` (nothing written) when it cannot be done.

        Refused: a run dir without ``config.toml``, a changed campaign (``RESUMABLE_CHANGES`` aside), a run whose
        recorded rounds all lack an intact checkpoint, fewer rounds than already completed. Nothing is moved
        until :meth:`ResumePlan.apply`, so callers finish their other checks first.
        """

        def refuse(expected: str, found: object) -> ConfigError:
            return ConfigError(source, "--resume", expected, found)

        if not self.config.is_file():
            what = "no config.toml in it" if _exists(self.root) else "nothing at that path"
            raise refuse(f"a run dir started by fedtune simulate ({self.root})", what)
        changes = self.config_changes(cfg)
        if changes:
            raise refuse(
                f"the campaign {self.config} was started with (start a new run dir to change it)",
                "; ".join(changes),
            )
        scan = self._scan()
        if scan.intact is None and scan.rows:
            raise refuse(
                f"a checkpoint of a recorded round in {self.root / 'checkpoints'}",
                f"rounds 0-{len(scan.rows) - 1} recorded but no intact {SERVER_STATE}; nothing to resume from",
            )
        done = -1 if scan.intact is None else scan.intact
        if cfg.federation.rounds < done:
            raise refuse(f"[federation] rounds of at least {done} (rounds already completed)", cfg.federation.rounds)
        return ResumePlan(self, scan, done)


@dataclass
class ResumePlan:
    """A checked resume: the last complete round, and the damaged files :meth:`apply` moves aside."""

    run_dir: RunDir
    scan: _Scan
    done: int  # last complete round, -1: none (the run starts at round 0)

    def apply(self) -> list[str]:
        """Move damaged checkpoints and the damaged tail of ``metrics.jsonl`` aside; one line per thing moved.

        The whole old ``metrics.jsonl`` is kept as ``metrics.jsonl.damaged-<time>``; the new one holds the
        intact lines of rounds 0..done exactly as they were written.
        """
        rd, scan, done = self.run_dir, self.scan, self.done
        stamp = time.strftime("%Y%m%d-%H%M%S")
        notes = []
        for server_round in scan.bad_checkpoints:
            folder = rd.checkpoint(server_round)
            aside = folder.with_name(f"{folder.name}.damaged-{stamp}")
            folder.rename(aside)
            notes.append(f"checkpoint of round {server_round} does not load: moved to {aside}")
        if scan.damaged_text or len(scan.rows) > done + 1:
            aside = rd.metrics.with_name(f"{rd.metrics.name}.damaged-{stamp}")
            rd.metrics.rename(aside)
            if done >= 0:
                atomic_write_text(rd.metrics, "".join(scan.lines[: done + 1]))
            notes.append(
                f"{rd.metrics.name} after round {done} is damaged or lacks a checkpoint: moved to {aside}; "
                f"resuming after round {done}"
            )
        return notes
