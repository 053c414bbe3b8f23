"""Compute credit: the formula (:mod:`.formula`), the ledger that records every round exactly once
(:mod:`.ledger`, Alembic migrations in ``migrations/``), the recorder that turns a round's outcomes into
ledger entries (:mod:`.recorder`) and the leaderboard people read (:mod:`.leaderboard`).

Coordinator side only: a contributor process never imports this package (nor SQLAlchemy).
"""
