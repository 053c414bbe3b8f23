"""Research tooling on top of finished or running campaigns: run summaries, sweeps, reports and domain templates.

Everything here reads run directories (``metrics.jsonl``, ``config.toml``, the ledger) or starts ``fedtune simulate``
processes; nothing here is needed by a coordinator or a contributor.
"""
