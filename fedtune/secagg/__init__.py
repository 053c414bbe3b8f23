"""Secure aggregation (SecAgg+, Bell et al. 2020) for fedtune, independent of any transport.

See :mod:`fedtune.secagg.protocol` for the stage-by-stage message formats.
"""

from fedtune.secagg.crypto import SecAggCryptoError, SecAggError, generate_identity
from fedtune.secagg.protocol import (
    STAGES,
    SecAggAbort,
    SecAggClient,
    SecAggParams,
    SecAggProtocolError,
    SecAggResult,
    SecAggServer,
    default_neighbours,
    default_threshold,
    effective_degree,
    run_round,
)
from fedtune.secagg.quantize import QuantConfig, check_no_overflow, dequantize_mean, quantize

__all__ = [
    "STAGES",
    "QuantConfig",
    "SecAggAbort",
    "SecAggClient",
    "SecAggCryptoError",
    "SecAggError",
    "SecAggParams",
    "SecAggProtocolError",
    "SecAggResult",
    "SecAggServer",
    "check_no_overflow",
    "default_neighbours",
    "default_threshold",
    "dequantize_mean",
    "effective_degree",
    "generate_identity",
    "quantize",
    "run_round",
]
