"""Placeholder: the contributor's own policy (the contributor-privacy work replaces this file at merge).

Job: the numbers a contributor decides by itself, never taken from the coordinator. Only the SecAgg+ fields
exist here, with the defaults the real module uses; :func:`load_policy` returns them whatever the context says.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Context


@dataclass(frozen=True)
class ContributorPolicy:
    """What a contributor accepts; the SecAgg+ fields only (placeholder)."""

    require_secagg: bool = False
    secagg_min_cohort: int = 2
    secagg_security_bits: int = 40
    secagg_max_corrupt_fraction: float = 0.2
    secagg_max_dropout_fraction: float = 0.2


def load_policy(context: Context) -> ContributorPolicy:
    """The contributor's policy (placeholder: always the defaults)."""
    del context
    return ContributorPolicy()
