"""The compute-credit ledger: formula, exactly-once writes, RAC decay, claim checks, teams, CLI.

Every ledger test runs on SQLite (a temporary file) and on a real PostgreSQL server named by
``FEDTUNE_TEST_POSTGRES_URL`` (``.ci/postgres.sh`` starts one), each test in a fresh schema. Without the
variable the PostgreSQL variants are skipped, unless ``CI`` is set: then they fail, so CI cannot go green
without having tested PostgreSQL.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedtune.cli import credits as credits_cli
from fedtune.credit import ledger as ledger_module
from fedtune.credit.formula import (
    FLOPS_PER_CREDIT,
    is_impossible_claim,
    rac_decay,
    round_credit,
    train_flops_per_token,
)
from fedtune.credit.ledger import Base, Contributor, LeaderboardRow, Ledger, RoundEntry
from fedtune.identity import contributor_id, public_key_bytes, simulated_contributor_id, simulated_identity

PG_ENV = "FEDTUNE_TEST_POSTGRES_URL"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
N_BASE, N_ADAPTER = 1_000_000_000, 4_000_000
FPT = train_flops_per_token(N_BASE, N_ADAPTER)  # 4.024e9 FLOPs/token
ALICE, BOB, CAROL, DAVE = (simulated_identity("test", i) for i in range(4))


class FakeClock:
    """Injected time: tests move it by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _postgres_url() -> str:
    url = os.environ.get(PG_ENV)
    if url:
        return url
    if os.environ.get("CI"):
        pytest.fail(f'{PG_ENV} is not set but CI is: run `eval "$(bash .ci/postgres.sh)"` first', pytrace=False)
    pytest.skip(f"{PG_ENV} not set (run .ci/postgres.sh to test PostgreSQL)")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database: a fresh SQLite file, or a fresh schema on the PostgreSQL test server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.sqlite'}"
        return
    admin = sa.create_engine(_postgres_url(), poolclass=sa.NullPool)
    schema = f"test_{uuid.uuid4().hex[:16]}"
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = admin.url.update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def ledger(db_url: str, clock: FakeClock) -> Iterator[Ledger]:
    with Ledger.open(db_url, clock=clock) as opened:
        opened.register_contributors(
            [
                Contributor(ALICE.id, "alice", "lab", declared_peak_flops=100e12),
                Contributor(BOB.id, "bob", "lab", declared_peak_flops=100e12),
                Contributor(CAROL.id, "carol", "home", declared_peak_flops=20e12),
                Contributor(DAVE.id, "dave"),
            ]
        )
        yield opened


def _included(who: str, tokens: int = 32_768, wall: float | None = None) -> RoundEntry:
    return RoundEntry(who, "included", assigned_examples=tokens // 512, assigned_tokens=tokens, reported_wall_s=wall)


# ------------------------------------------------------------------------------------ formula and ids


def test_formula_matches_documented_numbers() -> None:
    # 4·N_base + 6·N_adapter for plain LoRA; FFA-LoRA trains only B (half the adapter).
    assert FPT == 4 * N_BASE + 6 * N_ADAPTER == 4.024e9
    assert train_flops_per_token(N_BASE, N_ADAPTER, N_ADAPTER // 2) == 4 * N_BASE + 5 * N_ADAPTER
    assert FLOPS_PER_CREDIT == 1e12
    assert round_credit(32_768, FPT) == pytest.approx(131.858432)
    with pytest.raises(ValueError):
        train_flops_per_token(N_BASE, 10, 11)


def test_claim_check_and_decay_edges() -> None:
    assert is_impossible_claim(1e14, 10.0, 1e12)  # 1e13 FLOP/s on a 1e12 FLOP/s card
    assert not is_impossible_claim(1e14, 100.0, 1e12)  # exactly peak: possible
    assert not is_impossible_claim(1e14, 10.0, None)  # unknown hardware cannot be judged
    assert is_impossible_claim(1e14, 0.0, 1e12)
    assert rac_decay(timedelta(days=7)) == pytest.approx(0.5)
    assert rac_decay(-5.0) == 1.0


def test_identity_is_key_fingerprint_and_simulated_ids_are_stable() -> None:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key()
    fingerprint = contributor_id(key)
    assert fingerprint == contributor_id(public_key_bytes(key)) and len(fingerprint) == 32
    int(fingerprint, 16)
    assert simulated_contributor_id("c", 3) == simulated_contributor_id("c", 3)
    assert len({simulated_contributor_id(c, p) for c in ("c", "d") for p in range(50)}) == 100
    assert simulated_identity("c", 7).name == "sim-007"


# ------------------------------------------------------------------------------------------- ledger


def test_migrations_match_models_and_reopen(db_url: str) -> None:
    Ledger.open(db_url).close()
    with Ledger.open(db_url) as reopened, reopened.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_credit_for_known_round(ledger: Ledger) -> None:
    written = ledger.record_round("c", 0, [_included(ALICE.id), _included(BOB.id, 1000)], flops_per_token=FPT)
    by_id = {row.contributor_id: row for row in written}
    assert by_id[ALICE.id].credit == pytest.approx(32_768 * 4.024e9 / 1e12)
    assert by_id[BOB.id].credit == pytest.approx(1000 * FPT / 1e12)
    assert by_id[ALICE.id].recorded_at == T0
    stored = {row.contributor_id: row for row in ledger.round_entries("c", 0)}
    assert stored[ALICE.id] == by_id[ALICE.id]
    assert ledger.round_recorded("c", 0) and not ledger.round_recorded("c", 1)
    assert not ledger.round_recorded("other", 0)


def test_not_included_get_nothing_and_reason_is_kept(ledger: Ledger) -> None:
    entries = [
        _included(ALICE.id),
        RoundEntry(BOB.id, "declined", reason="epsilon budget exhausted"),
        RoundEntry(CAROL.id, "dropped", 64, 32_768, reason="lost connection before unmasking"),
        RoundEntry(DAVE.id, "failed", 64, 32_768),
    ]
    ledger.record_round("c", 0, entries, flops_per_token=FPT)
    stored = {row.contributor_id: row for row in ledger.round_entries("c", 0)}
    assert [stored[p.id].credit for p in (BOB, CAROL, DAVE)] == [0.0, 0.0, 0.0]
    assert stored[BOB.id].reason == "epsilon budget exhausted"
    assert stored[CAROL.id].reason == "lost connection before unmasking"
    assert stored[DAVE.id].reason == "failed"
    board = {row.name: row for row in ledger.leaderboard()}
    assert board["carol"].rounds == 0 and board["carol"].missed_rounds == 1
    assert board["alice"].rank == 1 and board["alice"].rounds == 1


def test_replaying_a_round_never_credits_twice(ledger: Ledger, db_url: str, clock: FakeClock) -> None:
    entries = [_included(ALICE.id), _included(BOB.id)]
    assert len(ledger.record_round("c", 5, entries, flops_per_token=FPT)) == 2
    total = sum(row.total_credit for row in ledger.leaderboard())
    ledger.close()  # the coordinator crashes and restarts on the same database
    clock.now = T0 + timedelta(hours=1)
    with Ledger.open(db_url, clock=clock) as restarted:
        doubled = [_included(ALICE.id, 10**9), _included(BOB.id, 10**9)]
        assert restarted.record_round("c", 5, doubled, flops_per_token=FPT) == []
        assert sum(row.total_credit for row in restarted.leaderboard()) == pytest.approx(total)
        assert {r.recorded_at for r in restarted.round_entries("c", 5)} == {T0}


@pytest.mark.parametrize("on_conflict", [True, False], ids=["on-conflict", "savepoint"])
def test_a_replay_with_another_cohort_credits_nobody(
    ledger: Ledger, db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, on_conflict: bool
) -> None:
    """The adversary: a round replayed after a crash (or by a second, stale run) with a different cohort."""
    if not on_conflict:  # dialects without ON CONFLICT (MySQL, ...) take the savepoint path
        monkeypatch.setattr(ledger_module, "ON_CONFLICT_INSERTS", {})
    first = ledger.record_round("c", 3, [_included(ALICE.id), _included(BOB.id)], flops_per_token=FPT)
    assert {row.contributor_id for row in first} == {ALICE.id, BOB.id}
    ledger.close()
    clock.now = T0 + timedelta(minutes=10)
    with Ledger.open(db_url, clock=clock) as restarted:
        other_cohort = [_included(CAROL.id), _included(DAVE.id)]
        assert restarted.record_round("c", 3, other_cohort, flops_per_token=FPT) == []
        overlapping = [_included(ALICE.id), _included(CAROL.id), RoundEntry(DAVE.id, "dropped", 64, 32_768)]
        assert restarted.record_round("c", 3, overlapping, flops_per_token=FPT) == []
        assert {r.contributor_id for r in restarted.round_entries("c", 3)} == {ALICE.id, BOB.id}
        board = {row.name: row for row in restarted.leaderboard("c")}
        assert set(board) == {"alice", "bob"}
        assert board["alice"].total_credit == pytest.approx(round_credit(32_768, FPT))
        assert restarted.round_recorded("c", 3) and not restarted.round_recorded("c", 4)
        # another round, and the same round of another campaign, are still recorded normally
        assert len(restarted.record_round("c", 4, other_cohort, flops_per_token=FPT)) == 2
        assert len(restarted.record_round("other", 3, other_cohort, flops_per_token=FPT)) == 2


def test_rounds_recorded_before_the_claim_table_stay_recorded(db_url: str, clock: FakeClock) -> None:
    """A ledger written by an older fedtune (no ``recorded_rounds``) is backfilled by the migration."""
    with Ledger.open(db_url, clock=clock) as ledger:
        ledger.register_contributors([Contributor(p.id, p.name) for p in (ALICE, BOB, CAROL)])
        ledger.record_round("c", 1, [_included(ALICE.id), _included(BOB.id)], flops_per_token=FPT)
        config = Config()
        config.set_main_option("script_location", str(ledger_module.MIGRATIONS_DIR))
        with ledger.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0002")
    with Ledger.open(db_url, clock=clock) as upgraded:
        assert upgraded.round_recorded("c", 1)
        assert upgraded.record_round("c", 1, [_included(CAROL.id)], flops_per_token=FPT) == []


def test_bad_round_writes_nothing(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="unregistered"):
        ledger.record_round("c", 0, [_included(ALICE.id), _included("f" * 32)], flops_per_token=FPT)
    with pytest.raises(ValueError, match="twice"):
        ledger.record_round("c", 0, [_included(ALICE.id), _included(ALICE.id)], flops_per_token=FPT)
    assert not ledger.round_recorded("c", 0)


def test_rac_halves_every_seven_days(ledger: Ledger, clock: FakeClock) -> None:
    ledger.record_round("c", 0, [_included(ALICE.id)], flops_per_token=FPT)
    credit = round_credit(32_768, FPT)
    at_grant = ledger.leaderboard()[0].rac
    assert at_grant == pytest.approx(credit * math.log(2) / 7)
    clock.now = T0 + timedelta(days=7)
    assert ledger.leaderboard()[0].rac == pytest.approx(at_grant / 2)
    assert ledger.leaderboard(now=T0 + timedelta(days=14))[0].rac == pytest.approx(at_grant / 4)
    assert ledger.leaderboard()[0].total_credit == pytest.approx(credit)  # totals never decay


def test_impossible_wall_time_is_flagged_not_rewarded(ledger: Ledger) -> None:
    # carol's card peaks at 20 TFLOP/s; 32,768 tokens at 4.024 GFLOP/token is 1.32e14 FLOPs.
    entries = [_included(ALICE.id, wall=60.0), _included(CAROL.id, wall=1.0), _included(DAVE.id, wall=1.0)]
    ledger.record_round("c", 0, entries, flops_per_token=FPT)
    stored = {row.contributor_id: row for row in ledger.round_entries("c", 0)}
    assert stored[CAROL.id].flagged and "declared peak" in (stored[CAROL.id].flag_reason or "")
    assert stored[CAROL.id].reported_wall_s == 1.0
    assert stored[CAROL.id].credit == stored[ALICE.id].credit  # same work, same credit
    assert not stored[ALICE.id].flagged
    assert not stored[DAVE.id].flagged  # no declared hardware: nothing to compare with
    board = {row.name: row for row in ledger.leaderboard()}
    assert board["carol"].flagged_rounds == 1 and board["alice"].flagged_rounds == 0


def test_team_totals_and_campaign_filter(ledger: Ledger) -> None:
    ledger.record_round(
        "c", 0, [_included(ALICE.id), _included(BOB.id), _included(CAROL.id, 1000)], flops_per_token=FPT
    )
    ledger.record_round("c", 1, [_included(ALICE.id), _included(DAVE.id)], flops_per_token=FPT)
    ledger.record_round("other", 0, [_included(CAROL.id, 10**6)], flops_per_token=FPT)
    unit = round_credit(32_768, FPT)
    teams = {team.team: team for team in ledger.team_totals("c")}
    assert set(teams) == {"lab", "home"}  # dave has no team
    assert teams["lab"].rank == 1 and teams["lab"].members == 2 and teams["lab"].rounds == 3
    assert teams["lab"].total_credit == pytest.approx(3 * unit)
    assert teams["home"].total_credit == pytest.approx(round_credit(1000, FPT))
    assert ledger.team_totals()[0].team == "home"  # the other campaign puts carol's team ahead overall
    assert [row.name for row in ledger.leaderboard("c", limit=2)] == ["alice", "bob"]
    assert {row.name for row in ledger.leaderboard("other")} == {"carol"}


def test_reregistering_updates_name_team_and_keeps_peak(ledger: Ledger) -> None:
    ledger.register_contributor(ALICE.id, "alice2", None)
    assert ledger.contributor(ALICE.id) == Contributor(ALICE.id, "alice2", None, 100e12)


def test_credits_cli_table_and_json(ledger: Ledger, db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    ledger.record_round("c", 0, [_included(ALICE.id), _included(CAROL.id, wall=1.0)], flops_per_token=FPT)
    as_of = (T0 + timedelta(days=1)).isoformat()
    assert credits_cli.main(["--db", db_url, "--as-of", as_of]) == 0
    table = capsys.readouterr().out
    assert "alice" in table and "carol" in table and "impossible" in table and "Teams" in table

    assert credits_cli.main(["--db", db_url, "--json", "--as-of", as_of, "--campaign", "c"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["schema"] == "fedtune.credits/1" and payload["campaign"] == "c"
    assert payload["rac_half_life_days"] == 7.0
    first = payload["contributors"][0]
    assert set(first) == set(LeaderboardRow.__dataclass_fields__)
    assert {"rank", "name", "team", "rounds", "total_credit", "rac", "flagged_rounds"} <= set(first)
    assert [row["name"] for row in payload["contributors"]] == ["alice", "carol"]
    assert first["total_credit"] == pytest.approx(round_credit(32_768, FPT))
    assert {team["team"] for team in payload["teams"]} == {"lab", "home"}


def test_credits_cli_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert credits_cli.main(["--run-dir", str(tmp_path)]) == 2
    assert "no ledger" in capsys.readouterr().err
    with Ledger.open(tmp_path / "ledger.sqlite") as fresh:
        fresh.register_contributor(ALICE.id, "alice")
    assert credits_cli.main(["--run-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["contributors"][0]["name"] == "alice"
