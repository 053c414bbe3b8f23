"""The compute-credit ledger: who contributed what, per round, durably and exactly once.

Why a database: credit is the community's visible reward, so it must survive coordinator crashes and
restarts, and replaying a round after a crash must never credit twice, whatever the cohort of the replay.
A round is recorded once: the transaction that claims its ``recorded_rounds`` row (``INSERT ... ON CONFLICT
DO NOTHING`` on SQLite and PostgreSQL, a savepoint that meets the primary key elsewhere) writes all its
credit rows; any later call for that round, with the same or another cohort, writes nothing. Each
(campaign, round, contributor) also has at most one row (a unique constraint). Threat: a caller that replays a
round (a restarted coordinator, a stale Flower run still going) must not be able to get a second set of
contributors credited, so the rule lives here, not in the round pipeline.

Storage is SQLAlchemy 2.x: by default an embedded SQLite file ``RUN_DIR/ledger.sqlite``, or any SQLAlchemy
URL (``postgresql+psycopg://user:pw@host/db``). The schema is managed by Alembic; the migrations ship inside
the package (``fedtune/credit/migrations``) and :meth:`Ledger.open` upgrades the database to head. Readers
(``fedtune credits``) use :meth:`Ledger.open_readonly`, which never creates, migrates or writes a database: a
typo in a path must not leave an empty ledger behind, and a reader must not change a writer's schema.

Credit is computed here, from what the server assigned (see :mod:`fedtune.credit.formula` for the formula and unit),
never from what a contributor reports. Reported wall time is stored and checked against the contributor's
declared peak FLOP/s; impossible claims are flagged, not rewarded and not dropped. Totals and recent
average credit (7-day half-life) are computed at query time from an injectable clock.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import quote

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from fedtune.credit.formula import (
    DEFAULT_CLAIM_MARGIN,
    RAC_HALF_LIFE,
    assigned_flops,
    is_impossible_claim,
    rac_weight,
    round_credit,
)
from fedtune.rundir import LEDGER_FILENAME

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")

Status = Literal["included", "declined", "dropped", "failed"]
STATUSES: tuple[str, ...] = get_args(Status)

RAC_HORIZON = 40 * RAC_HALF_LIFE
"""Grants older than this weigh < 1e-12 in RAC and are not read back for it."""

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The default clock."""
    return datetime.now(UTC)


def _as_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment!r}: the ledger needs timezone-aware times")
    return moment.astimezone(UTC)


# ---------------------------------------------------------------------------------------------- schema


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware datetimes stored as naive UTC, so SQLite (no time zones) and PostgreSQL read back the same."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        return None if value is None else _as_utc(value).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = sa.MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class ContributorRow(Base):
    """A contributor: stable id (public-key fingerprint or simulated), display name, team, hardware."""

    __tablename__ = "contributors"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    team: Mapped[str | None] = mapped_column(sa.String(200), index=True)
    declared_peak_flops: Mapped[float | None] = mapped_column(sa.Double)
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RoundCreditRow(Base):
    """One contributor's outcome in one round: assigned work, credit granted, the claim and its check."""

    __tablename__ = "round_credits"
    __table_args__ = (
        sa.UniqueConstraint("campaign", "round", "contributor_id"),
        sa.CheckConstraint(sa.column("status").in_(STATUSES), name="status"),
        sa.Index(None, "contributor_id", "recorded_at"),
    )

    id: Mapped[int] = mapped_column(sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True)
    campaign: Mapped[str] = mapped_column(sa.String(200))
    round: Mapped[int] = mapped_column(sa.Integer)
    contributor_id: Mapped[str] = mapped_column(sa.ForeignKey("contributors.id"))
    status: Mapped[str] = mapped_column(sa.String(16))
    reason: Mapped[str | None] = mapped_column(sa.Text)
    assigned_examples: Mapped[int] = mapped_column(sa.BigInteger)
    assigned_tokens: Mapped[int] = mapped_column(sa.BigInteger)
    flops_per_token: Mapped[float] = mapped_column(sa.Double)
    assigned_flops: Mapped[float] = mapped_column(sa.Double)
    credit: Mapped[float] = mapped_column(sa.Double)
    reported_wall_s: Mapped[float | None] = mapped_column(sa.Double)
    declared_peak_flops: Mapped[float | None] = mapped_column(sa.Double)
    flagged: Mapped[bool] = mapped_column(sa.Boolean)
    flag_reason: Mapped[str | None] = mapped_column(sa.Text)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RecordedRoundRow(Base):
    """A round whose outcomes are in the ledger: its claim row, written in the same transaction as its credits."""

    __tablename__ = "recorded_rounds"

    campaign: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    round: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)


# ------------------------------------------------------------------------------------------ value types


@dataclass(frozen=True)
class Contributor:
    """A registered contributor as the ledger knows it."""

    id: str
    name: str
    team: str | None = None
    declared_peak_flops: float | None = None


@dataclass(frozen=True)
class RoundEntry:
    """What the server knows about one cohort member after a round.

    ``assigned_examples``/``assigned_tokens`` are the work the server asked for (they set the credit);
    ``reported_wall_s`` is the contributor's claim (only checked). ``reason`` says why a contributor that is
    not ``included`` got nothing; it defaults to the status. ``flops_per_token`` overrides the round's for this
    contributor (one that trained a smaller LoRA rank).
    """

    contributor_id: str
    status: Status
    assigned_examples: int = 0
    assigned_tokens: int = 0
    reported_wall_s: float | None = None
    reason: str | None = None
    flops_per_token: float | None = None


@dataclass(frozen=True)
class RoundCredit:
    """A ledger row as written: the entry plus what the server computed from it."""

    campaign: str
    round: int
    contributor_id: str
    status: str
    reason: str | None
    assigned_examples: int
    assigned_tokens: int
    flops_per_token: float
    assigned_flops: float
    credit: float
    reported_wall_s: float | None
    declared_peak_flops: float | None
    flagged: bool
    flag_reason: str | None
    recorded_at: datetime


@dataclass(frozen=True)
class LeaderboardRow:
    """One contributor's standing: included rounds, total credit, RAC (credits/day) and flagged claims."""

    rank: int
    contributor_id: str
    name: str
    team: str | None
    rounds: int
    missed_rounds: int
    total_credit: float
    rac: float
    flagged_rounds: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TeamRow:
    """A team's standing: sums over its members."""

    rank: int
    team: str
    members: int
    rounds: int
    total_credit: float
    rac: float
    flagged_rounds: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Tally:
    rounds: int = 0
    missed: int = 0
    total: float = 0.0
    flagged: int = 0
    rac: float = 0.0


# ------------------------------------------------------------------------------------------------ ledger


def default_url(run_dir: str | Path) -> str:
    """SQLAlchemy URL of the embedded ledger of a run: ``sqlite:///RUN_DIR/ledger.sqlite``."""
    return f"sqlite:///{Path(run_dir).resolve() / LEDGER_FILENAME}"


def resolve_url(run_dir: str | Path | None = None, db: str | None = None) -> str:
    """``db`` if given (any SQLAlchemy URL), else the run dir's embedded SQLite file."""
    if db:
        return db
    if run_dir is None:
        raise ValueError("need a ledger URL or a run directory")
    return default_url(run_dir)


def redact(url: str | sa.URL) -> str:
    """A URL fit for messages and logs: the password masked."""
    return sa.make_url(url).render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets `fedtune credits` read while the coordinator writes; foreign keys are off by default.
    cursor = dbapi_connection.cursor()
    for pragma in ("foreign_keys=ON", "journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return config


def upgrade_to_head(connection: Connection) -> None:
    """Run the packaged Alembic migrations on ``connection`` up to head (a no-op when current)."""
    config = _alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


class LedgerError(ValueError):
    """A ledger that cannot be read as asked; ``str()`` is the one line shown to the user."""

    def __init__(self, where: str, expected: str, found: object) -> None:
        super().__init__(f"{where}: expected {expected}, found {found!r}")


def _readonly_engine(url: str) -> Engine:
    """An engine that cannot create, migrate or write the database at ``url`` (see :meth:`Ledger.open_readonly`)."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise LedgerError(
            "--db", "an SQLAlchemy URL (sqlite:///PATH or postgresql+psycopg://USER@HOST/DB)", url
        ) from None
    where = redact(parsed)
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise LedgerError(where, "the path of a ledger file (sqlite:///PATH)", parsed.database or "no path")
        path = Path(parsed.database).expanduser().resolve()
        if not path.is_file():
            raise LedgerError(where, "an existing ledger file (reading never creates one)", f"no ledger at {path}")
        if path.stat().st_size == 0:
            raise LedgerError(where, "a ledger (an SQLite file written by fedtune)", f"{path}: an empty file")
        # mode=ro never writes; immutable=1 also skips the -shm/-wal files, unless a writer keeps a WAL right now
        live = path.with_name(path.name + "-wal").exists()
        return sa.create_engine(f"sqlite:///file:{quote(str(path))}?mode=ro{'' if live else '&immutable=1'}&uri=true")
    try:
        engine = sa.create_engine(parsed)
    except sa.exc.NoSuchModuleError:
        raise LedgerError("--db", "a database SQLAlchemy knows (sqlite, postgresql, …)", where) from None
    except ImportError as exc:
        raise LedgerError(
            "--db", f"a database whose Python driver is installed (missing: {exc.name or exc})", where
        ) from None

    @event.listens_for(engine, "begin")
    def _read_only(connection: Connection) -> None:
        connection.exec_driver_sql("SET TRANSACTION READ ONLY")

    return engine


def check_schema(engine: Engine, where: str) -> None:
    """Refuse (``LedgerError``) a database that is not a fedtune ledger at this version's schema revision."""
    from alembic.script import ScriptDirectory

    with engine.connect() as connection:
        if not sa.inspect(connection).has_table("alembic_version"):
            raise LedgerError(where, "a fedtune credit ledger", "a database without fedtune's tables")
        found = connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    scripts = ScriptDirectory.from_config(_alembic_config())
    head = scripts.get_current_head()
    if found == head:
        return
    known = {rev.revision for rev in scripts.walk_revisions()}
    if found in known:
        raise LedgerError(
            where,
            f"a ledger at schema revision {head} (it is at {found}, older: the next fedtune simulate --resume or "
            f"coordinate on it migrates it)",
            found,
        )
    raise LedgerError(where, f"a ledger at schema revision {head} (a newer fedtune wrote it: upgrade fedtune)", found)


ON_CONFLICT_INSERTS: dict[str, Callable[[sa.Table], sqlite.Insert | postgresql.Insert]] = {
    "sqlite": sqlite.insert,
    "postgresql": postgresql.insert,
}
"""Dialects with ``INSERT ... ON CONFLICT DO NOTHING``; others insert in a savepoint and catch the conflict."""


def _claim_round(session: Session, campaign: str, round: int, recorded_at: datetime) -> bool:
    """Insert the round's ``recorded_rounds`` row; False if the round is recorded already (nothing written).

    Two writers racing on one round both try the insert: the database's primary key lets exactly one win
    (the other waits for its commit, then sees the conflict).
    """
    table = Base.metadata.tables[RecordedRoundRow.__tablename__]
    row = {"campaign": campaign, "round": round, "recorded_at": recorded_at}
    insert = ON_CONFLICT_INSERTS.get(session.get_bind().dialect.name)
    if insert is not None:
        stmt = insert(table).values(**row).on_conflict_do_nothing(index_elements=["campaign", "round"])
        return session.execute(stmt.returning(table.c.round)).first() is not None
    try:
        with session.begin_nested():
            session.execute(sa.insert(table).values(**row))
    except sa.exc.IntegrityError:
        return False
    return True


class Ledger:
    """Credit ledger on one database. Open with :meth:`open`; use as a context manager or call :meth:`close`.

    Parameters
    ----------
    engine : Engine
        Where the ledger lives; its schema must be at head (``open`` sees to that).
    clock : callable, optional
        Returns the current aware datetime; the default for every ``now`` argument (inject one in tests).
    """

    def __init__(self, engine: Engine, clock: Clock = utc_now) -> None:
        self.engine = engine
        self.clock = clock
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str | Path, *, clock: Clock = utc_now, migrate: bool = True) -> Ledger:
        """Open (creating and migrating if needed) the ledger at a SQLAlchemy URL or SQLite file path."""
        if isinstance(url, Path) or "://" not in url:
            path = Path(url).resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{path}"
        engine = sa.create_engine(url)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        if migrate:
            with engine.begin() as connection:
                upgrade_to_head(connection)
        return cls(engine, clock)

    @classmethod
    def open_readonly(cls, url: str, *, clock: Clock = utc_now) -> Ledger:
        """Open an existing ledger for reading only: never creates, migrates or writes it.

        Raises :class:`LedgerError` (one line) for a URL that does not parse, an unknown dialect or missing driver,
        a missing or empty SQLite file, a database without fedtune's tables, and a schema at another revision.
        """
        engine = _readonly_engine(url)
        try:
            check_schema(engine, redact(url))
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, clock)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------- contributors

    def register_contributor(
        self, id: str, name: str, team: str | None = None, declared_peak_flops: float | None = None
    ) -> Contributor:
        """Add a contributor, or update its name and team (and peak, if given) when it is known already."""
        return self.register_contributors([Contributor(id, name, team, declared_peak_flops)])[0]

    def register_contributors(self, contributors: Iterable[Contributor]) -> list[Contributor]:
        """Register many contributors in one transaction (a campaign's whole cohort, say)."""
        wanted = list(contributors)
        for contributor in wanted:
            if not contributor.id or not contributor.name:
                raise ValueError(f"contributor needs an id and a name: {contributor!r}")
            if contributor.declared_peak_flops is not None and contributor.declared_peak_flops <= 0:
                raise ValueError(f"declared peak FLOP/s must be > 0: {contributor!r}")
        now = self.clock()
        with self._sessions.begin() as session:
            known = {
                row.id: row
                for row in session.scalars(
                    sa.select(ContributorRow).where(ContributorRow.id.in_({c.id for c in wanted}))
                )
            }
            for contributor in wanted:
                row = known.get(contributor.id)
                if row is None:
                    row = known[contributor.id] = ContributorRow(id=contributor.id, registered_at=now)
                    session.add(row)
                row.name, row.team = contributor.name, contributor.team
                if contributor.declared_peak_flops is not None:
                    row.declared_peak_flops = contributor.declared_peak_flops
            return [_contributor(known[c.id]) for c in wanted]

    def campaigns(self) -> list[str]:
        """Every campaign with a recorded round, sorted."""
        with self._sessions() as session:
            return sorted(session.scalars(sa.select(RoundCreditRow.campaign).distinct()))

    def contributor(self, id: str) -> Contributor | None:
        with self._sessions() as session:
            row = session.get(ContributorRow, id)
            return None if row is None else _contributor(row)

    # ---------------------------------------------------------------------------------------- rounds

    def record_round(
        self,
        campaign: str,
        round: int,
        entries: Sequence[RoundEntry],
        now: datetime | None = None,
        *,
        flops_per_token: float,
    ) -> list[RoundCredit]:
        """Credit one round, exactly once per contributor, in one transaction.

        Parameters
        ----------
        campaign, round : str, int
            Which round. A round is recorded once: replaying it (after a coordinator crash, or from a second
            run) writes nothing at all, even when the replay's cohort differs; recorded rows never change.
        entries : sequence of RoundEntry
            Every cohort member and its outcome. Only ``included`` ones earn credit; every entry that
            reports a wall time has it checked against its declared peak (a dropped contributor can lie too).
        now : datetime, optional
            Grant time (aware); defaults to the ledger's clock.
        flops_per_token : float
            Nominal training FLOPs per token of the campaign's model
            (:func:`fedtune.credit.formula.train_flops_per_token`).

        Returns
        -------
        list of RoundCredit
            The rows this call wrote, in entry order (empty when the round was recorded already).
        """
        _check_round(campaign, round, entries, flops_per_token)
        if not entries:
            return []
        recorded_at = _as_utc(now or self.clock())
        ids = {entry.contributor_id for entry in entries}
        with self._sessions.begin() as session:
            found = session.execute(
                sa.select(ContributorRow.id, ContributorRow.declared_peak_flops).where(ContributorRow.id.in_(ids))
            )
            peaks = {cid: peak for cid, peak in found}
            unknown = sorted(ids - peaks.keys())
            if unknown:
                raise ValueError(f"unregistered contributors in {campaign} round {round}: {unknown}")
            credits = [
                _credit_row(campaign, round, entry, flops_per_token, peaks[entry.contributor_id], recorded_at)
                for entry in entries
            ]
            if not _claim_round(session, campaign, round, recorded_at):
                return []
            table = Base.metadata.tables[RoundCreditRow.__tablename__]  # Core insert: ORM bulk path costs more
            session.execute(sa.insert(table), [vars(credit).copy() for credit in credits])
        return credits

    def round_recorded(self, campaign: str, round: int) -> bool:
        """Whether this round is in the ledger (then :meth:`record_round` writes nothing more for it)."""
        stmt = sa.select(sa.exists().where(RecordedRoundRow.campaign == campaign, RecordedRoundRow.round == round))
        with self._sessions() as session:
            return bool(session.scalar(stmt))

    def round_entries(self, campaign: str, round: int) -> list[RoundCredit]:
        """Everything recorded for one round, by contributor id."""
        stmt = (
            sa.select(RoundCreditRow)
            .where(RoundCreditRow.campaign == campaign, RoundCreditRow.round == round)
            .order_by(RoundCreditRow.contributor_id)
        )
        with self._sessions() as session:
            return [_round_credit(row) for row in session.scalars(stmt)]

    # -------------------------------------------------------------------------------------- standings

    def leaderboard(
        self, campaign: str | None = None, now: datetime | None = None, limit: int | None = None
    ) -> list[LeaderboardRow]:
        """Contributors ranked by total credit, then RAC (as of ``now``), then name.

        With ``campaign=None`` it spans all campaigns and lists every registered contributor; with a
        campaign, only those that took part in it.
        """
        now = _as_utc(now or self.clock())
        tallies = self._tallies(campaign, now)
        with self._sessions() as session:
            stmt = sa.select(ContributorRow)
            if campaign is not None:
                stmt = stmt.where(ContributorRow.id.in_(tallies.keys()))
            people = list(session.scalars(stmt))
        scored = [(person, tallies.get(person.id, _Tally())) for person in people]
        scored.sort(key=lambda item: (-item[1].total, -item[1].rac, item[0].name, item[0].id))
        rows = [
            LeaderboardRow(
                rank=rank,
                contributor_id=person.id,
                name=person.name,
                team=person.team,
                rounds=tally.rounds,
                missed_rounds=tally.missed,
                total_credit=tally.total,
                rac=tally.rac,
                flagged_rounds=tally.flagged,
            )
            for rank, (person, tally) in enumerate(scored, start=1)
        ]
        return rows if limit is None else rows[:limit]

    def team_totals(self, campaign: str | None = None, now: datetime | None = None) -> list[TeamRow]:
        """Teams ranked by total credit; contributors without a team are left out."""
        members: dict[str, list[LeaderboardRow]] = defaultdict(list)
        for row in self.leaderboard(campaign, now):
            if row.team:
                members[row.team].append(row)
        teams = sorted(
            members.items(),
            key=lambda item: (-sum(r.total_credit for r in item[1]), -sum(r.rac for r in item[1]), item[0]),
        )
        return [
            TeamRow(
                rank=rank,
                team=team,
                members=len(rows),
                rounds=sum(r.rounds for r in rows),
                total_credit=sum(r.total_credit for r in rows),
                rac=sum(r.rac for r in rows),
                flagged_rounds=sum(r.flagged_rounds for r in rows),
            )
            for rank, (team, rows) in enumerate(teams, start=1)
        ]

    def _tallies(self, campaign: str | None, now: datetime) -> dict[str, _Tally]:
        """Per-contributor counts and sums in SQL, plus the recent grants RAC is decayed from."""
        table = RoundCreditRow
        included = table.status == "included"
        where = [] if campaign is None else [table.campaign == campaign]
        counts = (
            sa.select(
                table.contributor_id,
                sa.func.sum(sa.case((included, 1), else_=0)),
                sa.func.sum(sa.case((included, 0), else_=1)),
                sa.func.sum(table.credit),
                sa.func.sum(sa.case((table.flagged, 1), else_=0)),
            )
            .where(*where)
            .group_by(table.contributor_id)
        )
        grants = sa.select(table.contributor_id, table.recorded_at, table.credit).where(
            *where, table.credit > 0, table.recorded_at >= now - RAC_HORIZON
        )
        tallies: dict[str, _Tally] = {}
        with self._sessions() as session:
            for cid, rounds, missed, total, flagged in session.execute(counts):
                tallies[cid] = _Tally(int(rounds), int(missed), float(total), int(flagged))
            weights: dict[datetime, float] = {}  # a round's grants share one time: decay once per round
            for cid, recorded_at, credit in session.execute(grants):
                if recorded_at not in weights:
                    weights[recorded_at] = rac_weight(recorded_at, now)
                tallies[cid].rac += credit * weights[recorded_at]
        return tallies


# ---------------------------------------------------------------------------------------------- helpers


def _check_round(campaign: str, round: int, entries: Sequence[RoundEntry], flops_per_token: float) -> None:
    if not campaign:
        raise ValueError("campaign name is empty")
    if round < 0:
        raise ValueError(f"round must be >= 0, got {round}")
    if not flops_per_token > 0:
        raise ValueError(f"flops_per_token must be > 0, got {flops_per_token}")
    seen: set[str] = set()
    for entry in entries:
        if entry.status not in STATUSES:
            raise ValueError(f"status {entry.status!r} not one of {STATUSES}")
        if entry.assigned_examples < 0 or entry.assigned_tokens < 0:
            raise ValueError(f"negative assigned work: {entry!r}")
        if entry.flops_per_token is not None and not entry.flops_per_token > 0:
            raise ValueError(f"flops_per_token must be > 0, got {entry.flops_per_token} for {entry.contributor_id}")
        if entry.contributor_id in seen:
            raise ValueError(f"contributor {entry.contributor_id} appears twice in round {round}")
        seen.add(entry.contributor_id)


def _credit_row(
    campaign: str,
    round: int,
    entry: RoundEntry,
    flops_per_token: float,
    peak: float | None,
    recorded_at: datetime,
) -> RoundCredit:
    """What the server grants for one entry: credit only if included, a flag if the claim is absurd."""
    flops_per_token = entry.flops_per_token or flops_per_token
    flops = assigned_flops(entry.assigned_tokens, flops_per_token)
    flagged = is_impossible_claim(flops, entry.reported_wall_s, peak)
    flag_reason = None
    if flagged:
        wall = entry.reported_wall_s or 0.0
        speed = f"{flops / wall:.4g} FLOP/s" if wall > 0 else "no time at all"
        flag_reason = (
            f"claimed {wall:g} s for {flops:.4g} assigned FLOPs ({speed}), above "
            f"{DEFAULT_CLAIM_MARGIN:g} x the declared peak of {peak:.4g} FLOP/s"
        )
    included = entry.status == "included"
    return RoundCredit(
        campaign=campaign,
        round=round,
        contributor_id=entry.contributor_id,
        status=entry.status,
        reason=entry.reason if included else (entry.reason or entry.status),
        assigned_examples=entry.assigned_examples,
        assigned_tokens=entry.assigned_tokens,
        flops_per_token=float(flops_per_token),
        assigned_flops=flops,
        credit=round_credit(entry.assigned_tokens, flops_per_token) if included else 0.0,
        reported_wall_s=entry.reported_wall_s,
        declared_peak_flops=peak,
        flagged=flagged,
        flag_reason=flag_reason,
        recorded_at=recorded_at,
    )


def _contributor(row: ContributorRow) -> Contributor:
    return Contributor(row.id, row.name, row.team, row.declared_peak_flops)


def _round_credit(row: RoundCreditRow) -> RoundCredit:
    return RoundCredit(**{name: getattr(row, name) for name in RoundCredit.__dataclass_fields__})


__all__ = [
    "LEDGER_FILENAME",
    "STATUSES",
    "Contributor",
    "LeaderboardRow",
    "Ledger",
    "LedgerError",
    "RoundCredit",
    "RoundEntry",
    "Status",
    "TeamRow",
    "check_schema",
    "default_url",
    "redact",
    "resolve_url",
    "upgrade_to_head",
    "utc_now",
]
