"""SecAgg+ (Bell et al. 2020) as two transport-agnostic state machines.

The server and each client exchange flat ``dict`` messages whose values are ``str``, ``int``,
``float``, ``bytes`` or lists of those (so they map one-to-one onto a Flower ``ConfigRecord``);
the only exception is the masked upload, a 1-D ``uint32`` numpy array under ``"masked"`` (an
``ArrayRecord`` in Flower). Every message carries ``campaign_id``, ``round`` and ``stage``, and
every client reply also ``sender``. The five stages are:

1. ``advertise``     server -> all: round parameters.  client -> server: signed ephemeral keys.
2. ``share_keys``    server -> u: signed keys of u's neighbours.  u -> server: encrypted shares of
                     its self-mask seed b_u and mask secret key s_u^SK, one ciphertext per neighbour.
3. ``masked_input``  server -> u: ciphertexts addressed to u.  u -> server: masked uint32 vector.
4. ``consistency``   server -> u: survivor set U3.  u -> server: Ed25519 signature over U3.
5. ``unmask``        server -> u: U3, dropped set and the signatures.  u -> server: b-shares of
                     survivors and s-shares of dropped clients, never both for one client.

Each client pairs only with its k neighbours in a random k-regular (Harary) graph derived from a
server seed, so its work is O(k) masks instead of O(n). Any failure to authenticate raises a
:class:`SecAggError`; too few participants raises :class:`SecAggAbort`. A server that receives a
bad reply gets an exception from ``receive`` and its state is unchanged: treat the client as
dropped. A client that raises should simply not answer.

Integration: the server calls ``requests(stage)`` / ``receive(reply)`` for each stage in
:data:`STAGES`, then ``result()``; a client calls ``handle(request, update)``, and keeps its
state between messages with ``export_state()`` / ``SecAggClient.restore(...)``.
:func:`run_round` is the in-process reference driver.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune.secagg import crypto, shamir
from fedtune.secagg.crypto import SecAggCryptoError, SecAggError, X25519KeyPair
from fedtune.secagg.quantize import QuantConfig, check_no_overflow, dequantize_mean, quantize

__all__ = [
    "STAGES",
    "Message",
    "SecAggAbort",
    "SecAggClient",
    "SecAggCryptoError",
    "SecAggError",
    "SecAggParams",
    "SecAggProtocolError",
    "SecAggResult",
    "SecAggServer",
    "default_neighbours",
    "default_threshold",
    "effective_degree",
    "run_round",
]

Message = dict[str, Any]
"""A protocol message: flat mapping of str to str/int/float/bytes/list, or a uint32 array."""

ADVERTISE, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK = (
    "advertise",
    "share_keys",
    "masked_input",
    "consistency",
    "unmask",
)
STAGES: tuple[str, ...] = (ADVERTISE, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK)

_SHARE_AD = b"fedtune-secagg/share/v1"
_ENC_INFO = b"fedtune-secagg/share-key/v1"
_MASK_INFO = b"fedtune-secagg/pairwise-mask/v1"
_ADVERTISE_SIG = b"fedtune-secagg/advertise/v1"
_CONSISTENCY_SIG = b"fedtune-secagg/consistency/v1"


class SecAggAbort(SecAggError):
    """Too few participants remain to finish the round safely; no aggregate is produced."""


class SecAggProtocolError(SecAggError):
    """A message is out of order, from another round/campaign, malformed, or asks too much."""


def default_neighbours(cohort_size: int) -> int:
    """SecAgg+ neighbour count k = 2 * ceil(1.5 * log2 n), capped at n - 1 (complete graph)."""
    if cohort_size < 2:
        raise ValueError("a secure aggregation cohort needs at least 2 clients")
    return min(cohort_size - 1, 2 * math.ceil(1.5 * math.log2(cohort_size)))


def effective_degree(cohort_size: int, neighbours: int) -> int:
    """Degree actually used: k rounded up to even (a Harary ring), or n - 1 for a complete graph."""
    return min(cohort_size - 1, neighbours + neighbours % 2)


def default_threshold(degree: int) -> int:
    """Smallest threshold allowed, floor(k/2) + 1: maximises dropout tolerance while t > k/2."""
    return degree // 2 + 1


@dataclass(frozen=True)
class SecAggParams:
    """Everything the server fixes for one round; sent to clients in the ``advertise`` stage.

    Parameters
    ----------
    campaign_id, round_id : str, int
        Bound into every signature and AEAD, so messages cannot be replayed across rounds.
    cohort : tuple of int
        Sorted ids of the sampled clients.
    neighbours : int
        Requested degree k; odd k is rounded up to even (Harary graph), k >= n-1 means complete.
    threshold : int
        Shamir threshold t; must satisfy degree/2 < t <= degree.
    quant : QuantConfig
        Clip range and bits; ``len(cohort) * 2^bits < 2^32`` is enforced.
    vector_len : int
        Number of parameters in each client's flattened update.
    graph_seed : bytes
        32 random bytes from the server that fix the neighbour graph.
    """

    campaign_id: str
    round_id: int
    cohort: tuple[int, ...]
    neighbours: int
    threshold: int
    quant: QuantConfig
    vector_len: int
    graph_seed: bytes
    _graph: dict[int, frozenset[int]] = field(init=False, repr=False, compare=False)
    _points: dict[int, int] = field(init=False, repr=False, compare=False)
    _digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cohort = tuple(int(c) for c in self.cohort)
        if len(cohort) < 2 or len(set(cohort)) != len(cohort) or list(cohort) != sorted(cohort):
            raise ValueError("cohort must be >= 2 distinct client ids in ascending order")
        if cohort[0] < 0 or cohort[-1] >= 1 << 64 or not 0 <= self.round_id < 1 << 63:
            raise ValueError("client ids must be uint64 and the round a non-negative int64")
        if len(self.graph_seed) != 32:
            raise ValueError("graph_seed must be 32 bytes")
        if self.vector_len < 1:
            raise ValueError("vector_len must be positive")
        if self.neighbours < 1:
            raise ValueError("neighbours must be positive")
        k = self.degree
        if not k / 2 < self.threshold <= k:
            raise ValueError(f"threshold {self.threshold} must satisfy {k}/2 < t <= {k} (degree {k})")
        check_no_overflow(len(cohort), self.quant.bits)
        object.__setattr__(self, "cohort", cohort)
        object.__setattr__(self, "_graph", self._build_graph())
        object.__setattr__(self, "_points", {c: i + 1 for i, c in enumerate(cohort)})
        body = self.to_message()
        body["graph_seed"] = self.graph_seed.hex()
        object.__setattr__(self, "_digest", hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest())

    @property
    def degree(self) -> int:
        """Effective number of neighbours of every client."""
        return effective_degree(len(self.cohort), self.neighbours)

    def _build_graph(self) -> dict[int, frozenset[int]]:
        # Order by a hash of the seed rather than a numpy RNG: clients may run other numpy versions.
        order = sorted(self.cohort, key=lambda c: hashlib.sha256(self.graph_seed + _u64(c)).digest())
        n, half = len(order), self.degree // 2
        if self.degree == n - 1:
            return {c: frozenset(order) - {c} for c in order}
        return {c: frozenset(order[(i + d) % n] for d in range(-half, half + 1) if d) for i, c in enumerate(order)}

    def neighbours_of(self, client_id: int) -> frozenset[int]:
        """The clients that ``client_id`` masks with and that hold its shares."""
        return self._graph[client_id]

    def share_point(self, client_id: int) -> int:
        """Shamir evaluation point of a share holder: its 1-based position in the cohort."""
        return self._points[client_id]

    def to_message(self) -> Message:
        """Flat, ConfigRecord-compatible encoding (the body of the ``advertise`` request)."""
        return {
            "campaign_id": self.campaign_id,
            "round": self.round_id,
            "cohort": list(self.cohort),
            "neighbours": self.neighbours,
            "threshold": self.threshold,
            "clip": float(self.quant.clip),
            "bits": self.quant.bits,
            "vector_len": self.vector_len,
            "graph_seed": self.graph_seed,
        }

    @classmethod
    def from_message(cls, msg: Mapping[str, Any]) -> SecAggParams:
        """Parse and validate parameters received from the server."""
        try:
            return cls(
                campaign_id=str(msg["campaign_id"]),
                round_id=int(msg["round"]),
                cohort=tuple(int(c) for c in msg["cohort"]),
                neighbours=int(msg["neighbours"]),
                threshold=int(msg["threshold"]),
                quant=QuantConfig(clip=float(msg["clip"]), bits=int(msg["bits"])),
                vector_len=int(msg["vector_len"]),
                graph_seed=bytes(msg["graph_seed"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggProtocolError(f"invalid secagg parameters: {exc}") from exc

    @classmethod
    def create(
        cls,
        campaign_id: str,
        round_id: int,
        cohort: Iterable[int],
        vector_len: int,
        quant: QuantConfig,
        neighbours: int | None = None,
        threshold: int | None = None,
        graph_seed: bytes | None = None,
    ) -> SecAggParams:
        """Server-side constructor filling SecAgg+ defaults for k, t and a fresh graph seed."""
        ids = tuple(sorted(int(c) for c in cohort))
        k = default_neighbours(len(ids)) if neighbours is None else neighbours
        return cls(
            campaign_id=campaign_id,
            round_id=round_id,
            cohort=ids,
            neighbours=k,
            threshold=default_threshold(effective_degree(len(ids), k)) if threshold is None else threshold,
            quant=quant,
            vector_len=vector_len,
            graph_seed=os.urandom(32) if graph_seed is None else graph_seed,
        )

    def digest(self) -> bytes:
        """SHA-256 of the canonical parameters; signed by clients so all saw the same round."""
        return self._digest


@dataclass(frozen=True)
class SecAggResult:
    """Output of a round: the exact uint32 sum of the survivors' encodings and who they are."""

    total: np.ndarray
    survivors: tuple[int, ...]
    quant: QuantConfig

    def mean(self, total_weight: float | None = None) -> np.ndarray:
        """Decode to the float mean (or weighted mean given the survivors' total weight)."""
        return dequantize_mean(self.total, self.quant, len(self.survivors), total_weight)


def _u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def _ids_bytes(ids: Iterable[int]) -> bytes:
    return b"".join(_u64(i) for i in sorted(ids))


def _advertise_transcript(params: SecAggParams, sender: int, c_pk: bytes, s_pk: bytes) -> bytes:
    return b"".join([_ADVERTISE_SIG, params.digest(), _u64(sender), c_pk, s_pk])


def _consistency_transcript(params: SecAggParams, survivors: Iterable[int]) -> bytes:
    return b"".join([_CONSISTENCY_SIG, params.digest(), _ids_bytes(survivors)])


def _mask_sign(owner: int, peer: int) -> int:
    """Antisymmetric sign so that the pairwise masks of two survivors cancel in the sum."""
    return 1 if owner > peer else -1


def _pairwise_key(params: SecAggParams, private: X25519KeyPair, peer_public: bytes) -> bytes:
    return crypto.agree(private.private, peer_public, _MASK_INFO + params.digest())


def _share_ad(params: SecAggParams, sender: int, receiver: int) -> bytes:
    return crypto.associated_data(params.campaign_id, params.round_id, sender, receiver, _SHARE_AD)


def _header(params: SecAggParams, stage: str, sender: int | None = None) -> Message:
    msg: Message = {"campaign_id": params.campaign_id, "round": params.round_id, "stage": stage}
    if sender is not None:
        msg["sender"] = sender
    return msg


def _check_header(msg: Mapping[str, Any], params: SecAggParams, stage: str) -> None:
    """Reject messages of another campaign, round or stage before looking at their body."""
    got = (msg.get("campaign_id"), msg.get("round"), msg.get("stage"))
    if got != (params.campaign_id, params.round_id, stage):
        raise SecAggProtocolError(f"expected ({params.campaign_id!r}, round {params.round_id}, {stage!r}), got {got!r}")


def _paired(msg: Mapping[str, Any], *keys: str) -> list[tuple[Any, ...]]:
    """Zip equal-length list fields of a message, refusing ragged or missing lists."""
    try:
        cols = [list(msg[k]) for k in keys]
    except (KeyError, TypeError) as exc:
        raise SecAggProtocolError(f"message lacks list field: {exc!r}") from exc
    if len({len(c) for c in cols}) > 1:
        raise SecAggProtocolError(f"fields {keys} differ in length")
    return list(zip(*cols, strict=True))


class SecAggClient:
    """Client side of one SecAgg+ round.

    Parameters
    ----------
    client_id : int
        This client's id (a Flower node id in deployment).
    identity_key : Ed25519PrivateKey
        Long-term key whose public half is in everyone's registry; signs ephemeral keys.
    registry : mapping of int to bytes
        ``{client_id: raw Ed25519 public key}`` for all enrolled contributors.
    campaign_id : str
        Campaign this client works for; parameters of any other campaign are refused.
    round_id : int, optional
        Expected round; when omitted, the round of the ``advertise`` request is adopted.
    quant : QuantConfig, optional
        When given, the server's quantization parameters must match it.
    rng : numpy Generator, optional
        Randomness for stochastic rounding (not secret; masks use OS entropy).
    """

    def __init__(
        self,
        client_id: int,
        identity_key: Ed25519PrivateKey,
        registry: Mapping[int, bytes],
        campaign_id: str,
        round_id: int | None = None,
        quant: QuantConfig | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.client_id = client_id
        self._identity = identity_key
        self._registry = dict(registry)
        self._campaign_id = campaign_id
        self._round_id = round_id
        self._quant = quant
        self._rng = rng if rng is not None else np.random.default_rng()
        self.params: SecAggParams | None = None
        self._done: list[str] = []
        self._c_key: X25519KeyPair | None = None
        self._s_key: X25519KeyPair | None = None
        self._peer_keys: dict[int, tuple[bytes, bytes]] = {}  # v -> (c_pk, s_pk)
        self._b_seed: bytes | None = None
        self._held: dict[int, tuple[bytes, bytes]] = {}  # owner -> (b-share, s-share) held for it
        self._survivors: tuple[int, ...] | None = None
        self._revealed_b: set[int] = set()
        self._revealed_s: set[int] = set()

    # -- persistence ------------------------------------------------------------------------

    def export_state(self) -> Message:
        """Flat, ConfigRecord-compatible snapshot of the round state.

        A Flower ClientApp may run in a fresh process for every message, so the state between
        stages must live in ``context.state``. It holds this round's ephemeral secrets (never the
        identity key); it must stay on the client and be discarded after the round.
        """
        params = self.params.to_message() if self.params is not None else {}
        held = sorted(self._held)
        peers = sorted(self._peer_keys)
        c_sk = self._c_key.private_bytes() if self._c_key is not None else b""
        s_sk = self._s_key.private_bytes() if self._s_key is not None else b""
        return {
            **{f"params.{k}": v for k, v in params.items()},
            "client_id": self.client_id,
            "campaign_id": self._campaign_id,
            "expected_round": -1 if self._round_id is None else self._round_id,
            "quant": [] if self._quant is None else [float(self._quant.clip), float(self._quant.bits)],
            "done": list(self._done),
            "c_sk": c_sk,
            "s_sk": s_sk,
            "peer_ids": peers,
            "peer_c_pk": [self._peer_keys[v][0] for v in peers],
            "peer_s_pk": [self._peer_keys[v][1] for v in peers],
            "b_seed": self._b_seed or b"",
            "held_ids": held,
            "held_b": [self._held[v][0] for v in held],
            "held_s": [self._held[v][1] for v in held],
            "survivors": [] if self._survivors is None else list(self._survivors),
            "revealed_b": sorted(self._revealed_b),
            "revealed_s": sorted(self._revealed_s),
        }

    @classmethod
    def restore(
        cls,
        state: Mapping[str, Any],
        identity_key: Ed25519PrivateKey,
        registry: Mapping[int, bytes],
        rng: np.random.Generator | None = None,
    ) -> SecAggClient:
        """Rebuild a client from :meth:`export_state` plus the long-term secrets kept elsewhere."""
        quant = list(state["quant"])
        client = cls(
            int(state["client_id"]),
            identity_key,
            registry,
            str(state["campaign_id"]),
            None if int(state["expected_round"]) < 0 else int(state["expected_round"]),
            QuantConfig(quant[0], int(quant[1])) if quant else None,
            rng,
        )
        params = {k.removeprefix("params."): v for k, v in state.items() if k.startswith("params.")}
        client.params = SecAggParams.from_message(params) if params else None
        client._done = [str(x) for x in state["done"]]
        if state["c_sk"]:
            client._c_key = X25519KeyPair.from_private_bytes(bytes(state["c_sk"]))
            client._s_key = X25519KeyPair.from_private_bytes(bytes(state["s_sk"]))
        peers = _paired(state, "peer_ids", "peer_c_pk", "peer_s_pk")
        client._peer_keys = {int(v): (bytes(c), bytes(s)) for v, c, s in peers}
        client._b_seed = bytes(state["b_seed"]) or None
        client._held = {int(v): (bytes(b), bytes(s)) for v, b, s in _paired(state, "held_ids", "held_b", "held_s")}
        client._survivors = tuple(int(v) for v in state["survivors"]) or None
        client._revealed_b = {int(v) for v in state["revealed_b"]}
        client._revealed_s = {int(v) for v in state["revealed_s"]}
        return client

    # -- plumbing ---------------------------------------------------------------------------

    def _enter(self, msg: Mapping[str, Any], stage: str) -> SecAggParams:
        """Check ordering and the message header; returns the round parameters."""
        expected = STAGES[len(self._done)] if len(self._done) < len(STAGES) else None
        if stage != expected and not (stage == UNMASK and self._done[-1:] == [UNMASK]):
            raise SecAggProtocolError(f"stage {stage!r} out of order (expected {expected!r})")
        assert self.params is not None
        _check_header(msg, self.params, stage)
        return self.params

    def _reply(self, stage: str, body: Message) -> Message:
        assert self.params is not None
        if stage not in self._done:
            self._done.append(stage)
        return {**_header(self.params, stage, self.client_id), **body}

    def handle(self, msg: Mapping[str, Any], vector: np.ndarray | None = None) -> Message:
        """Answer any server request by its ``stage`` field; ``vector`` is needed for ``masked_input``.

        This is the single entry point a ClientApp needs: it receives a message, calls ``handle``
        and sends back the reply (an exception means: do not answer).
        """
        stage = msg.get("stage")
        if stage == MASKED_INPUT:
            if vector is None:
                raise ValueError("the masked_input stage needs the client's update vector")
            return self.masked_input(msg, vector)
        handlers = {
            ADVERTISE: self.advertise_keys,
            SHARE_KEYS: self.share_keys,
            CONSISTENCY: self.consistency_check,
            UNMASK: self.unmask,
        }
        if stage not in handlers:
            raise SecAggProtocolError(f"unknown stage {stage!r}")
        return handlers[stage](msg)

    # -- stages -----------------------------------------------------------------------------

    def advertise_keys(self, msg: Mapping[str, Any]) -> Message:
        """Stage 1: validate the round parameters and return signed ephemeral public keys."""
        if self._done:
            raise SecAggProtocolError("advertise already answered for this round")
        if msg.get("stage") != ADVERTISE:
            raise SecAggProtocolError(f"expected stage 'advertise', got {msg.get('stage')!r}")
        params = SecAggParams.from_message(msg)
        if params.campaign_id != self._campaign_id:
            raise SecAggProtocolError(f"campaign {params.campaign_id!r} is not {self._campaign_id!r}")
        if self._round_id is not None and params.round_id != self._round_id:
            raise SecAggProtocolError(f"round {params.round_id} is not {self._round_id}")
        if self._quant is not None and params.quant != self._quant:
            raise SecAggProtocolError(f"server quantization {params.quant} differs from {self._quant}")
        if self.client_id not in params.cohort:
            raise SecAggProtocolError("this client is not in the cohort")
        self.params = params
        self._c_key, self._s_key = X25519KeyPair(), X25519KeyPair()
        c_pk, s_pk = self._c_key.public_bytes, self._s_key.public_bytes
        signature = crypto.sign(self._identity, _advertise_transcript(params, self.client_id, c_pk, s_pk))
        return self._reply(ADVERTISE, {"c_pk": c_pk, "s_pk": s_pk, "signature": signature})

    def share_keys(self, msg: Mapping[str, Any]) -> Message:
        """Stage 2: verify neighbours' signed keys, Shamir-share b_u and s_u^SK, encrypt per holder."""
        params = self._enter(msg, SHARE_KEYS)
        assert self._c_key is not None and self._s_key is not None
        mine = params.neighbours_of(self.client_id)
        seen: set[bytes] = {self._c_key.public_bytes, self._s_key.public_bytes}
        for v, c_pk, s_pk, sig in _paired(msg, "ids", "c_pk", "s_pk", "signature"):
            v = int(v)
            if v not in mine or v in self._peer_keys:
                raise SecAggProtocolError(f"client {v} is not a (new) neighbour of {self.client_id}")
            if v not in self._registry:
                raise SecAggCryptoError(f"client {v} has no registered identity")
            crypto.verify(self._registry[v], sig, _advertise_transcript(params, v, c_pk, s_pk))
            if c_pk in seen or s_pk in seen:
                raise SecAggProtocolError("duplicate ephemeral public key")
            seen.update((c_pk, s_pk))
            self._peer_keys[v] = (bytes(c_pk), bytes(s_pk))
        if len(self._peer_keys) < params.threshold:
            raise SecAggAbort(f"{len(self._peer_keys)} neighbours advertised, threshold {params.threshold}")
        self._b_seed = os.urandom(crypto.KEY_BYTES)
        holders = sorted(self._peer_keys)
        points = [params.share_point(v) for v in holders]
        b_shares = shamir.split(self._b_seed, params.threshold, points)
        s_shares = shamir.split(self._s_key.private_bytes(), params.threshold, points)
        ciphertexts = []
        for v, x in zip(holders, points, strict=True):
            key = crypto.agree(self._c_key.private, self._peer_keys[v][0], _ENC_INFO + params.digest())
            ad = _share_ad(params, self.client_id, v)
            ciphertexts.append(crypto.aead_encrypt(key, b_shares[x] + s_shares[x], ad))
        return self._reply(SHARE_KEYS, {"dst": holders, "ciphertext": ciphertexts})

    def masked_input(self, msg: Mapping[str, Any], vector: np.ndarray) -> Message:
        """Stage 3: decrypt shares held for neighbours, then upload y = q(x) + PRG(b_u) +- PRG(s_uv).

        ``vector`` is the flattened (already weighted) float update of length ``vector_len``.
        """
        params = self._enter(msg, MASKED_INPUT)
        assert self._c_key is not None and self._s_key is not None and self._b_seed is not None
        x = np.asarray(vector).reshape(-1)
        if x.size != params.vector_len:
            raise ValueError(f"update has {x.size} parameters, round expects {params.vector_len}")
        for v, ct in _paired(msg, "src", "ciphertext"):
            v = int(v)
            if v not in self._peer_keys or v in self._held:
                raise SecAggProtocolError(f"unexpected or repeated ciphertext from {v}")
            key = crypto.agree(self._c_key.private, self._peer_keys[v][0], _ENC_INFO + params.digest())
            plain = crypto.aead_decrypt(key, bytes(ct), _share_ad(params, v, self.client_id))
            if len(plain) != 2 * shamir.SHARE_BYTES:
                raise SecAggProtocolError(f"malformed share bundle from {v}")
            self._held[v] = (plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :])
        if len(self._held) < params.threshold:
            raise SecAggAbort(f"only {len(self._held)} neighbours shared keys, threshold {params.threshold}")
        masked = quantize(x, params.quant, self._rng)
        crypto.add_mask_into(masked, self._b_seed)
        for v in self._held:
            crypto.add_mask_into(
                masked,
                _pairwise_key(params, self._s_key, self._peer_keys[v][1]),
                _mask_sign(self.client_id, v),
            )
        self._b_seed = None  # from now on only the shares held by neighbours can recover it
        return self._reply(MASKED_INPUT, {"masked": masked})

    def consistency_check(self, msg: Mapping[str, Any]) -> Message:
        """Stage 4: sign the server's survivor set U3, which fixes which shares this client reveals."""
        params = self._enter(msg, CONSISTENCY)
        survivors = tuple(sorted({int(v) for v in msg.get("survivors", ())}))
        if self.client_id not in survivors or not set(survivors) <= set(params.cohort):
            raise SecAggProtocolError("survivor set must contain this client and only cohort members")
        if len(survivors) < params.threshold:
            raise SecAggAbort(f"{len(survivors)} survivors, threshold {params.threshold}")
        self._survivors = survivors
        signature = crypto.sign(self._identity, _consistency_transcript(params, survivors))
        return self._reply(CONSISTENCY, {"signature": signature})

    def unmask(self, msg: Mapping[str, Any]) -> Message:
        """Stage 5: after checking t signatures on U3, reveal b-shares of survivors, s-shares of dropouts.

        Refuses any request that would reveal both shares of one client, including across retries.
        """
        params = self._enter(msg, UNMASK)
        assert self._survivors is not None
        survivors = tuple(sorted({int(v) for v in msg.get("survivors", ())}))
        dropped = {int(v) for v in msg.get("dropped", ())}
        if survivors != self._survivors:
            raise SecAggProtocolError("survivor set differs from the one committed in the consistency check")
        if dropped & set(survivors):
            raise SecAggProtocolError(f"refusing to reveal both shares of clients {sorted(dropped & set(survivors))}")
        valid = set()
        for signer, sig in _paired(msg, "signer_ids", "signatures"):
            signer = int(signer)
            if signer in survivors and signer in self._registry:
                crypto.verify(self._registry[signer], sig, _consistency_transcript(params, survivors))
                valid.add(signer)
        if len(valid) < params.threshold:
            raise SecAggAbort(f"only {len(valid)} valid consistency signatures, threshold {params.threshold}")
        b_ids = sorted(set(survivors) & self._held.keys())
        s_ids = sorted(dropped & self._held.keys())
        if (set(b_ids) & self._revealed_s) or (set(s_ids) & self._revealed_b):
            raise SecAggProtocolError("request would reveal both shares of a client")
        self._revealed_b.update(b_ids)
        self._revealed_s.update(s_ids)
        return self._reply(
            UNMASK,
            {
                "b_ids": b_ids,
                "b_shares": [self._held[v][0] for v in b_ids],
                "s_ids": s_ids,
                "s_shares": [self._held[v][1] for v in s_ids],
            },
        )


class SecAggServer:
    """Server side of one SecAgg+ round: routes keys and shares, sums and unmasks.

    For each stage in :data:`STAGES` call :meth:`requests` (a dict of per-client messages) and
    :meth:`receive` for each reply, and finally :meth:`result`. Asking for the next stage's
    requests closes the previous stage; late replies are then rejected.

    Parameters
    ----------
    params : SecAggParams
        The round parameters (see :meth:`SecAggParams.create`).
    registry : mapping of int to bytes
        ``{client_id: raw Ed25519 public key}``; keys not signed by these identities are refused.
    """

    def __init__(self, params: SecAggParams, registry: Mapping[int, bytes]) -> None:
        self.params = params
        self._registry = dict(registry)
        self._stage = ADVERTISE
        self._keys: dict[int, tuple[bytes, bytes, bytes]] = {}  # U1: id -> (c_pk, s_pk, sig)
        self._inbox: dict[int, dict[int, bytes]] = {}  # receiver -> sender -> ciphertext
        self._shared: set[int] = set()  # U2
        self._total = np.zeros(params.vector_len, dtype=np.uint32)
        self._masked: set[int] = set()  # U3
        self._consistency: dict[int, bytes] = {}  # U4: id -> signature over U3
        self._b_shares: dict[int, dict[int, bytes]] = {}  # owner -> point -> share
        self._s_shares: dict[int, dict[int, bytes]] = {}
        self._unmasked: set[int] = set()  # U5

    # -- plumbing ---------------------------------------------------------------------------

    def _advance(self, stage: str, active: Iterable[int]) -> list[int]:
        """Close the previous stage and abort if fewer than t clients are left."""
        if STAGES.index(stage) != STAGES.index(self._stage) + 1:
            raise SecAggProtocolError(f"cannot move from {self._stage!r} to {stage!r}")
        ids = sorted(active)
        if len(ids) < self.params.threshold:
            raise SecAggAbort(f"{len(ids)} clients left before {stage!r}, threshold {self.params.threshold}")
        self._stage = stage
        return ids

    def _accept(self, msg: Mapping[str, Any], stage: str, allowed: Iterable[int], done: Iterable[int]) -> int:
        """Validate header and sender of a reply; returns the sender id."""
        if self._stage != stage:
            raise SecAggProtocolError(f"reply for {stage!r} while in {self._stage!r}")
        _check_header(msg, self.params, stage)
        sender = msg.get("sender")
        if not isinstance(sender, int) or sender not in set(allowed):
            raise SecAggProtocolError(f"unexpected sender {sender!r} for {stage!r}")
        if sender in set(done):
            raise SecAggProtocolError(f"duplicate {stage!r} reply from {sender}")
        return sender

    def _header(self, stage: str) -> Message:
        return _header(self.params, stage)

    def requests(self, stage: str) -> dict[int, Message]:
        """Per-client requests of ``stage`` (moving the server to it), keyed by client id."""
        makers = {
            ADVERTISE: lambda: {u: self.advertise_request() for u in self.params.cohort},
            SHARE_KEYS: self.share_keys_requests,
            MASKED_INPUT: self.masked_input_requests,
            CONSISTENCY: self.consistency_requests,
            UNMASK: self.unmask_requests,
        }
        if stage not in makers:
            raise SecAggProtocolError(f"unknown stage {stage!r}")
        return makers[stage]()

    def receive(self, msg: Mapping[str, Any]) -> None:
        """Route a client reply to the ``receive_<stage>`` method named by its ``stage`` field."""
        receivers = {
            ADVERTISE: self.receive_advertise,
            SHARE_KEYS: self.receive_share_keys,
            MASKED_INPUT: self.receive_masked_input,
            CONSISTENCY: self.receive_consistency,
            UNMASK: self.receive_unmask,
        }
        stage = msg.get("stage")
        if stage not in receivers:
            raise SecAggProtocolError(f"unknown stage {stage!r}")
        receivers[stage](msg)

    # -- stages -----------------------------------------------------------------------------

    def advertise_request(self) -> Message:
        """Stage 1 request, identical for every client of the cohort."""
        return {**self._header(ADVERTISE), **self.params.to_message()}

    def receive_advertise(self, msg: Mapping[str, Any]) -> None:
        """Record a client's signed ephemeral keys after verifying its identity signature."""
        sender = self._accept(msg, ADVERTISE, self.params.cohort, self._keys)
        c_pk, s_pk, sig = (bytes(msg[k]) for k in ("c_pk", "s_pk", "signature"))
        if sender not in self._registry:
            raise SecAggCryptoError(f"client {sender} has no registered identity")
        crypto.verify(self._registry[sender], sig, _advertise_transcript(self.params, sender, c_pk, s_pk))
        self._keys[sender] = (c_pk, s_pk, sig)

    def share_keys_requests(self) -> dict[int, Message]:
        """Stage 2 requests: each advertiser gets the signed keys of its advertising neighbours."""
        out = {}
        for u in self._advance(SHARE_KEYS, self._keys):
            peers = sorted(self.params.neighbours_of(u) & self._keys.keys())
            out[u] = {
                **self._header(SHARE_KEYS),
                "ids": peers,
                "c_pk": [self._keys[v][0] for v in peers],
                "s_pk": [self._keys[v][1] for v in peers],
                "signature": [self._keys[v][2] for v in peers],
            }
        return out

    def receive_share_keys(self, msg: Mapping[str, Any]) -> None:
        """Queue a client's encrypted shares for delivery to its neighbours."""
        sender = self._accept(msg, SHARE_KEYS, self._keys, self._shared)
        expected = self.params.neighbours_of(sender) & self._keys.keys()
        pairs = [(int(v), bytes(ct)) for v, ct in _paired(msg, "dst", "ciphertext")]
        if {v for v, _ in pairs} != expected or len(pairs) != len(expected):
            raise SecAggProtocolError(f"client {sender} must send one ciphertext to each advertising neighbour")
        for v, ct in pairs:
            self._inbox.setdefault(v, {})[sender] = ct
        self._shared.add(sender)

    def masked_input_requests(self) -> dict[int, Message]:
        """Stage 3 requests: forward to each client the ciphertexts from neighbours that shared."""
        out = {}
        for u in self._advance(MASKED_INPUT, self._shared):
            srcs = sorted(self._inbox.get(u, {}).keys() & self._shared)
            out[u] = {
                **self._header(MASKED_INPUT),
                "src": srcs,
                "ciphertext": [self._inbox[u][v] for v in srcs],
            }
        self._inbox.clear()
        return out

    def receive_masked_input(self, msg: Mapping[str, Any]) -> None:
        """Add a client's masked uint32 vector into the running sum (mod 2^32)."""
        sender = self._accept(msg, MASKED_INPUT, self._shared, self._masked)
        masked = msg.get("masked")
        if not (isinstance(masked, np.ndarray) and masked.dtype == np.uint32):
            raise SecAggProtocolError("masked input must be a uint32 numpy array")
        if masked.shape != (self.params.vector_len,):
            raise SecAggProtocolError(f"masked input has shape {masked.shape}")
        np.add(self._total, masked, out=self._total)
        self._masked.add(sender)

    def consistency_requests(self) -> dict[int, Message]:
        """Stage 4 requests: commit to the survivor set U3 by sending it to every survivor."""
        survivors = self._advance(CONSISTENCY, self._masked)
        return {u: {**self._header(CONSISTENCY), "survivors": survivors} for u in survivors}

    def receive_consistency(self, msg: Mapping[str, Any]) -> None:
        """Record a survivor's signature over U3."""
        sender = self._accept(msg, CONSISTENCY, self._masked, self._consistency)
        sig = bytes(msg["signature"])
        crypto.verify(self._registry[sender], sig, _consistency_transcript(self.params, self._masked))
        self._consistency[sender] = sig

    def unmask_requests(self) -> dict[int, Message]:
        """Stage 5 requests: U3, the dropped set U2 \\ U3 and all U3 signatures, to every signer."""
        signers = self._advance(UNMASK, self._consistency)
        body = {
            **self._header(UNMASK),
            "survivors": sorted(self._masked),
            "dropped": sorted(self._shared - self._masked),
            "signer_ids": signers,
            "signatures": [self._consistency[v] for v in signers],
        }
        return {u: dict(body) for u in signers}

    def receive_unmask(self, msg: Mapping[str, Any]) -> None:
        """Store the revealed shares, checking each is one the sender holds and may reveal."""
        sender = self._accept(msg, UNMASK, self._consistency, self._unmasked)
        point = self.params.share_point(sender)
        staged: list[tuple[dict[int, dict[int, bytes]], int, bytes]] = []
        for ids_key, shares_key, allowed, store in (
            ("b_ids", "b_shares", self._masked, self._b_shares),
            ("s_ids", "s_shares", self._shared - self._masked, self._s_shares),
        ):
            for owner, share in _paired(msg, ids_key, shares_key):
                owner = int(owner)
                if owner not in allowed or sender not in self.params.neighbours_of(owner):
                    raise SecAggProtocolError(f"client {sender} cannot hold a {ids_key[0]}-share of {owner}")
                if len(share) != shamir.SHARE_BYTES:
                    raise SecAggProtocolError("malformed share")
                staged.append((store, owner, bytes(share)))
        for store, owner, share in staged:
            store.setdefault(owner, {})[point] = share
        self._unmasked.add(sender)

    def _reconstruct(self, store: Mapping[int, Mapping[int, bytes]], owner: int, kind: str) -> bytes:
        shares = store.get(owner, {})
        if len(shares) < self.params.threshold:
            raise SecAggAbort(f"{len(shares)} {kind}-shares of client {owner}, threshold {self.params.threshold}")
        try:
            return shamir.combine(shares, self.params.threshold)
        except ValueError as exc:
            raise SecAggAbort(f"cannot reconstruct the {kind}-secret of client {owner}: {exc}") from exc

    def result(self) -> SecAggResult:
        """Remove self-masks of survivors and dropped clients' pairwise masks; return the exact sum."""
        if self._stage != UNMASK:
            raise SecAggProtocolError("result() is only available after the unmask stage")
        if len(self._unmasked) < self.params.threshold:
            raise SecAggAbort(f"{len(self._unmasked)} clients unmasked, threshold {self.params.threshold}")
        total = self._total.copy()
        for u in sorted(self._masked):
            crypto.add_mask_into(total, self._reconstruct(self._b_shares, u, "b"), -1)
        for v in sorted(self._shared - self._masked):
            s_key = X25519KeyPair.from_private_bytes(self._reconstruct(self._s_shares, v, "s"))
            if s_key.public_bytes != self._keys[v][1]:
                raise SecAggAbort(f"reconstructed mask key of client {v} does not match its advertised key")
            for w in sorted(self.params.neighbours_of(v) & self._masked):
                crypto.add_mask_into(total, _pairwise_key(self.params, s_key, self._keys[w][1]), -_mask_sign(w, v))
        return SecAggResult(total=total, survivors=tuple(sorted(self._masked)), quant=self.params.quant)


def run_round(
    server: SecAggServer,
    clients: Mapping[int, SecAggClient],
    inputs: Mapping[int, np.ndarray],
    drop: Mapping[str, Iterable[int]] | None = None,
) -> SecAggResult:
    """Drive one round in process, the reference for a transport integration.

    Parameters
    ----------
    server, clients : SecAggServer, mapping of int to SecAggClient
        State machines of the round.
    inputs : mapping of int to np.ndarray
        Each client's flattened float update.
    drop : mapping of stage name to client ids, optional
        Clients that never answer that stage (and hence any later one), simulating dropouts.
        A client raising :class:`SecAggAbort` is treated the same way; other errors propagate.
    """
    gone: set[int] = set()
    for stage in STAGES:
        gone.update((drop or {}).get(stage, ()))
        for u, request in server.requests(stage).items():
            if u in gone:
                continue
            try:
                reply = clients[u].handle(request, inputs[u])
            except SecAggAbort:  # a client that cannot go on safely simply stops answering
                gone.add(u)
                continue
            server.receive(reply)
    return server.result()
