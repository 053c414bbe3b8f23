"""``fedtune credits`` reads and never writes: bad URLs, missing or empty files, old schemas, unknown campaigns
and bad options get one ``error:`` line and exit 2, and the disk stays as it was."""

from __future__ import annotations

import importlib.util
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from fedtune.cli import main
from fedtune.credit.ledger import Contributor, Ledger, RoundEntry, _alembic_config

from .test_bad_input import snapshot
from .test_ledger import db_url  # noqa: F401  (a fresh SQLite file, or a schema on the PostgreSQL test server)

NOW = datetime(2026, 1, 8, tzinfo=UTC)


@pytest.fixture
def ledger_file(tmp_path: Path) -> Path:
    path = tmp_path / "run" / "ledger.sqlite"
    with Ledger.open(path, clock=lambda: NOW) as ledger:
        ledger.register_contributors([Contributor("a" * 32, "alice"), Contributor("b" * 32, "bob")])
        entries = [RoundEntry("a" * 32, "included", 8, 512), RoundEntry("b" * 32, "included", 8, 256)]
        ledger.record_round("quickstart", 1, entries, flops_per_token=1e6)
    return path


def credits(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> tuple[int, str, str]:
    before = snapshot(tmp_path)
    try:
        code = main(["credits", *args])
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert snapshot(tmp_path) == before, "reading credits must not write anything"
    return code, out, err.strip()


def refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> str:
    """Run ``credits``, expect exit 2 with one ``error:`` line (and nothing written); return the line."""
    code, _, err = credits(capsys, tmp_path, *args)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_reading_leaves_the_ledger_untouched(capsys, tmp_path, ledger_file) -> None:
    code, out, _ = credits(capsys, tmp_path, "--run-dir", str(ledger_file.parent), "--json")
    assert code == 0 and '"alice"' in out
    assert sorted(p.name for p in ledger_file.parent.iterdir()) == ["ledger.sqlite"]  # no -wal/-shm either


def test_not_a_url(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    err = refused(capsys, tmp_path, "--db", "not a url")
    assert "--db" in err and "an SQLAlchemy URL" in err and "'not a url'" in err
    assert not (tmp_path / "not a url").exists()


def test_typo_in_a_sqlite_path_creates_nothing(capsys, tmp_path, ledger_file) -> None:
    typo = ledger_file.with_name("ledgr.sqlite")
    err = refused(capsys, tmp_path, "--db", f"sqlite:///{typo}")
    assert f"no ledger at {typo}" in err and not typo.exists()


def test_run_dir_without_ledger(capsys, tmp_path) -> None:
    err = refused(capsys, tmp_path, "--run-dir", str(tmp_path))
    assert "no ledger at" in err and not (tmp_path / "ledger.sqlite").exists()


def test_empty_ledger_file_is_not_migrated(capsys, tmp_path) -> None:
    (tmp_path / "ledger.sqlite").write_bytes(b"")
    err = refused(capsys, tmp_path, "--run-dir", str(tmp_path))
    assert "an empty file" in err and (tmp_path / "ledger.sqlite").stat().st_size == 0


def test_database_that_is_not_a_ledger(capsys, tmp_path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'other.sqlite'}")
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE notes (body TEXT)")
    engine.dispose()
    err = refused(capsys, tmp_path, "--db", f"sqlite:///{tmp_path / 'other.sqlite'}")
    assert "a fedtune credit ledger" in err


def test_older_schema_revision_is_named_not_migrated(capsys, tmp_path) -> None:
    path = tmp_path / "old.sqlite"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        config = _alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    engine.dispose()
    err = refused(capsys, tmp_path, "--db", f"sqlite:///{path}")
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head != "0001" and f"schema revision {head}" in err and "it is at 0001" in err


@pytest.mark.parametrize("top", ["-1", "0"])
def test_top_below_one(capsys, tmp_path, ledger_file, top: str) -> None:
    """``--top -1`` used to drop the last contributor silently."""
    err = refused(capsys, tmp_path, "--run-dir", str(ledger_file.parent), "--top", top)
    assert f"--top: expected an integer >= 1, found {top}" in err


def test_unknown_campaign(capsys, tmp_path, ledger_file) -> None:
    """It used to print an empty table."""
    err = refused(capsys, tmp_path, "--run-dir", str(ledger_file.parent), "--campaign", "quikstart")
    assert "['quickstart']" in err and "'quikstart'" in err


@pytest.mark.skipif(importlib.util.find_spec("MySQLdb") is not None, reason="a MySQL driver is installed")
def test_missing_driver(capsys, tmp_path) -> None:
    err = refused(capsys, tmp_path, "--db", "mysql://user:secret@db.example/ledger")
    assert "driver is installed" in err and "MySQLdb" in err and "secret" not in err


def test_unknown_dialect(capsys, tmp_path) -> None:
    err = refused(capsys, tmp_path, "--db", "nosuchdb://host/ledger")
    assert "a database SQLAlchemy knows" in err


def test_usage_errors_are_one_line(capsys, tmp_path) -> None:
    err = refused(capsys, tmp_path, "--top", "many")
    assert "invalid int value: 'many'" in err
    err = refused(capsys, tmp_path)
    assert "--run-dir DIR or --db URL" in err


def test_readonly_ledger_on_every_backend(db_url: str) -> None:  # noqa: F811
    """SQLite and PostgreSQL: an old schema is named, not migrated; a current one is read; writes are refused."""
    from fedtune.credit.ledger import LedgerError, _readonly_engine

    engine = sa.create_engine(db_url)
    with engine.begin() as connection:
        config = _alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    with pytest.raises(LedgerError, match="it is at 0001"):
        Ledger.open_readonly(db_url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0001"
    engine.dispose()
    Ledger.open(db_url).close()  # a writer migrates
    with Ledger.open_readonly(db_url) as ledger:
        assert ledger.campaigns() == []
    readonly = _readonly_engine(db_url)
    with pytest.raises(sa.exc.DBAPIError), readonly.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE intruder (a INTEGER)")
    readonly.dispose()
