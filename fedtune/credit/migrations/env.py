"""Alembic environment of the credit ledger, driven from code (``fedtune.credit.ledger.upgrade_to_head``).

The ledger hands over its own open connection in ``config.attributes["connection"]``, so migrations run
on exactly the database (and SQLite file, and PostgreSQL search_path) the ledger uses, inside its
transaction. Without one (the alembic command line) it connects to ``sqlalchemy.url``. It never touches
logging configuration: the host application owns that.
"""

from __future__ import annotations

from typing import Any, Literal

import sqlalchemy as sa
from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy.engine import Connection

from fedtune.credit.ledger import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata


def _render_item(kind: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    # Revisions must not import fedtune's models: write the stored type, not the decorator.
    if kind == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime()"
    return False


def _run(connection: Connection) -> None:
    # SQLite cannot ALTER most things in place: batch mode rebuilds tables for later revisions.
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = sa.create_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=sa.NullPool)
    with engine.begin() as own:
        _run(own)
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
