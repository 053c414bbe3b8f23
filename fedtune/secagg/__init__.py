"""Secure aggregation (SecAgg+, Bell et al. 2020) for fedtune against a malicious coordinator, transport-free.

See :mod:`fedtune.secagg.protocol` for the threat model, the guarantees and the stage-by-stage messages, and
:mod:`fedtune.secagg.sizing` for how k and t follow from a contributor's policy.
"""

from fedtune.secagg.crypto import SecAggCryptoError, SecAggError, generate_identity
from fedtune.secagg.protocol import (
    STAGES,
    NeighbourGraph,
    RoundView,
    SecAggAbort,
    SecAggCheatError,
    SecAggClient,
    SecAggParams,
    SecAggPolicyError,
    SecAggProtocolError,
    SecAggResult,
    SecAggServer,
    check_round_params,
    run_round,
)
from fedtune.secagg.quantize import QuantConfig, check_no_overflow, dequantize_mean, quantize
from fedtune.secagg.sizing import (
    SecAggPolicy,
    corrupt_count,
    effective_degree,
    exposure_probability,
    failure_probability,
    quorum,
    size_round,
    smallest_threshold,
)

__all__ = [
    "STAGES",
    "NeighbourGraph",
    "QuantConfig",
    "RoundView",
    "SecAggAbort",
    "SecAggCheatError",
    "SecAggClient",
    "SecAggCryptoError",
    "SecAggError",
    "SecAggParams",
    "SecAggPolicy",
    "SecAggPolicyError",
    "SecAggProtocolError",
    "SecAggResult",
    "SecAggServer",
    "check_no_overflow",
    "check_round_params",
    "corrupt_count",
    "dequantize_mean",
    "effective_degree",
    "exposure_probability",
    "failure_probability",
    "generate_identity",
    "quantize",
    "quorum",
    "run_round",
    "size_round",
    "smallest_threshold",
]
