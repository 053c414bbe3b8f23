"""SecAgg+ (Bell et al. 2020) against a malicious coordinator, as two transport-agnostic state machines.

Threat model
    The server (the coordinator) is the adversary of every client's input. It may send any parameters, any
    cohort and key directory, different messages to different clients, drop or delay any message, abort and
    restart rounds, and it colludes with up to ``C = ⌊γ·n⌋`` members of the signed cohort of n (Sybils it
    enrolled, or identities it substituted in the directory, count among them). A client may also cheat on its
    own: deal bad shares, reveal wrong shares, upload an out-of-range input or weight.

What it guarantees (each one checked by a test that plays that adversary, ``tests/unit/test_secagg_adversary.py``)
    1. A client takes part only in rounds whose parameters its own :class:`~fedtune.secagg.sizing.SecAggPolicy`
       accepts (:func:`check_round_params`): cohort ≥ its minimum and a threshold t such that, per round attempt,
       P[the colluders can recover some honest client's secrets] ≤ 2^-σ for the γ it assumes
       (:mod:`fedtune.secagg.sizing` gives the bound and why). Checked on the claimed cohort before the client
       trains, and again on the signed view before it deals any share.
    2. The neighbour graph is a hash of every member's nonce, each committed (and signed) before any is revealed;
       a missing reveal aborts the round. The server cannot choose neighbourhoods: its only lever is to abort.
    3. Every member signs the same view (cohort, identity keys, ephemeral keys, commitments) and checks every
       other member's signature on it before dealing shares, so a split cohort or key directory aborts the round
       before anything secret leaves a client.
    4. A client reveals shares only after ⌊(n + C)/2⌋ + 1 members signed the same survivor set, and reveals, for
       each other client, the self-mask share (survivor) or the mask-key share (dropped), never both. Honest
       clients sign one survivor set each, so every honest share holder acts on the same set and the colluders get
       one of a client's two secrets from honest holders at most: the other needs t colluding holders (1.).
       A survivor also refuses to sign unless ≥ t of its neighbours survive, so its input is never unmasked alone:
       what the server learns is the sum, or, where it calls live clients dropped, sums over groups in which each
       honest member has ≥ t − c honest neighbours (c: colluders among its neighbours, < t by 1.).
    5. Each dealer commits to its self-mask seed in its signed keys and to a hash of every share it deals in its
       signed share_keys reply. A holder checks what it received against the hashes (and reports the dealer
       otherwise); the server checks every revealed share against them, drops and names a holder that reveals a
       wrong one, reconstructs from the good ones, and names (and aborts on) a dealer whose shares do not rebuild
       its committed secret. :class:`SecAggResult` says who was named.
    What it does not: the identity keys come from the server's registry, so a directory in which the peers are
    the server's own keys is a cohort of Sybils, protected only by the client's minimum cohort and γ; a client's
    input can be out of range and is only caught in the decoded aggregate (``fedtune.secagg.campaign``), which is
    then not applied, without naming its sender; a server that aborts and restarts a round gets a fresh 2^-σ draw.

Messages
    Flat ``dict`` messages whose values are ``str``, ``int``, ``float``, ``bytes`` or lists of those (one-to-one
    onto a Flower ``ConfigRecord``); the only exception is the masked upload, a 1-D ``uint32`` array under
    ``"masked"``. Every message carries ``campaign_id``, ``round`` and ``stage``, every client reply ``sender``.

    1. ``advertise``     server -> all: parameters (:class:`SecAggParams`). client -> server: ephemeral keys
                         ``c_pk``, ``s_pk``, commitments to its graph nonce and its self-mask seed, signed.
    2. ``view``          server -> all: the directory (:class:`RoundView`): every advertiser's identity key,
                         keys and commitments. client -> server: its nonce, its signature on the view.
    3. ``share_keys``    server -> all: every member's nonce and view signature. client -> server: encrypted
                         shares of b_u and s_u^SK for each neighbour, the hash of each share, signed.
    4. ``masked_input``  server -> u: ciphertexts for u and their hashes. u -> server: masked uint32 vector and the
                         dealers whose shares did not match their hashes.
    5. ``consistency``   server -> u: survivor set U3. u -> server: signature over (view, U3).
    6. ``unmask``        server -> u: U3, dropped set, signatures. u -> server: b-shares of survivors and s-shares
                         of dropped clients it holds, never both for one client.

    Clients pair only with their k neighbours, so a client's work is O(k) masks (plus O(n) signature checks).
    Failing to authenticate raises :class:`SecAggCryptoError`, refusing the parameters :class:`SecAggPolicyError`,
    too few participants :class:`SecAggAbort`, a reply that proves its sender cheated :class:`SecAggCheatError`.
    A server whose ``receive`` raises keeps its state: treat that client as dropped. A client that raises should
    simply not answer.

Integration
    The server calls ``requests(stage)`` / ``receive(reply)`` for each stage in :data:`STAGES`, then ``result()``;
    a client calls ``handle(request, update)`` and keeps its state between messages with ``export_state()`` /
    ``SecAggClient.restore(...)``. :func:`run_round` is the in-process reference driver.

Pitfalls
    Dropouts between ``advertise`` and ``share_keys`` (one short exchange) abort the round by design (see 2.):
    train before ``advertise`` replies, or keep answering ``view`` and ``share_keys`` while training. Share
    evaluation points are positions in the signed view, not in the claimed cohort. The view digest binds every
    later signature, AEAD and mask key to this round's members.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune.secagg import crypto, shamir
from fedtune.secagg.crypto import SecAggCryptoError, SecAggError, X25519KeyPair
from fedtune.secagg.quantize import QuantConfig, check_no_overflow, dequantize_mean, quantize
from fedtune.secagg.sizing import (
    SecAggPolicy,
    check_sizing,
    corrupt_count,
    effective_degree,
    quorum,
    size_round,
    smallest_threshold,
)

__all__ = [
    "STAGES",
    "Message",
    "NeighbourGraph",
    "RoundView",
    "SecAggAbort",
    "SecAggCheatError",
    "SecAggClient",
    "SecAggCryptoError",
    "SecAggError",
    "SecAggParams",
    "SecAggPolicyError",
    "SecAggProtocolError",
    "SecAggResult",
    "SecAggServer",
    "check_round_params",
    "run_round",
]

Message = dict[str, Any]
"""A protocol message: flat mapping of str to str/int/float/bytes/list, or a uint32 array."""

ADVERTISE, VIEW, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK = (
    "advertise",
    "view",
    "share_keys",
    "masked_input",
    "consistency",
    "unmask",
)
STAGES: tuple[str, ...] = (ADVERTISE, VIEW, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK)

_SHARE_AD = b"fedtune-secagg/share/v2"
_ENC_INFO = b"fedtune-secagg/share-key/v2"
_MASK_INFO = b"fedtune-secagg/pairwise-mask/v2"
_ADVERTISE_SIG = b"fedtune-secagg/advertise/v2"
_VIEW_SIG = b"fedtune-secagg/view/v1"
_SHARES_SIG = b"fedtune-secagg/share-hashes/v1"
_CONSISTENCY_SIG = b"fedtune-secagg/consistency/v2"
_NONCE_COMMIT = b"fedtune-secagg/graph-nonce/v1"
_SEED_COMMIT = b"fedtune-secagg/self-mask-seed/v1"
_SHARE_HASH = b"fedtune-secagg/share-hash/v1"
_GRAPH_SEED = b"fedtune-secagg/graph-seed/v1"
_VIEW_FIELDS = ("ids", "identity", "c_pk", "s_pk", "nonce_commit", "seed_commit")


class SecAggAbort(SecAggError):
    """Too few participants remain to finish the round safely; no aggregate is produced."""


class SecAggProtocolError(SecAggError):
    """A message is out of order, from another round/campaign, malformed, or asks too much."""


class SecAggPolicyError(SecAggError):
    """The round's parameters or cohort fall short of this client's own policy: it does not take part."""


class SecAggCheatError(SecAggError):
    """A client's message proves it cheated (a wrong share, shares that do not rebuild its secret).

    Parameters
    ----------
    culprit : int
        The client named.
    reason : str
        What it did, on one line.
    """

    def __init__(self, culprit: int, reason: str) -> None:
        super().__init__(f"client {culprit} cheated: {reason}")
        self.culprit = culprit


def _u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def _ids_bytes(ids: Iterable[int]) -> bytes:
    return b"".join(_u64(i) for i in sorted(ids))


def _hash(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


@dataclass(frozen=True)
class SecAggParams:
    """What the server fixes for one round before anyone answers; sent in the ``advertise`` stage.

    Parameters
    ----------
    campaign_id, round_id : str, int
        Bound into every signature and AEAD, so messages cannot be replayed across rounds.
    cohort : tuple of int
        Sorted ids of the sampled clients (a claim: the signed :class:`RoundView` is what counts).
    neighbours : int
        Requested degree k; odd k is rounded up to even (Harary graph), k >= n-1 means complete.
    threshold : int
        Shamir threshold t; must satisfy degree/2 < t <= degree.
    quant : QuantConfig
        Clip range and bits; ``len(cohort) * 2^bits < 2^32`` is enforced.
    vector_len : int
        Number of parameters in each client's flattened update.
    """

    campaign_id: str
    round_id: int
    cohort: tuple[int, ...]
    neighbours: int
    threshold: int
    quant: QuantConfig
    vector_len: int
    _digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cohort = tuple(int(c) for c in self.cohort)
        if len(cohort) < 2 or len(set(cohort)) != len(cohort) or list(cohort) != sorted(cohort):
            raise ValueError("cohort must be >= 2 distinct client ids in ascending order")
        if cohort[0] < 0 or cohort[-1] >= 1 << 64 or not 0 <= self.round_id < 1 << 63:
            raise ValueError("client ids must be uint64 and the round a non-negative int64")
        if self.vector_len < 1:
            raise ValueError("vector_len must be positive")
        if self.neighbours < 1:
            raise ValueError("neighbours must be positive")
        k = effective_degree(len(cohort), self.neighbours)
        if not k / 2 < self.threshold <= k:
            raise ValueError(f"threshold {self.threshold} must satisfy {k}/2 < t <= {k} (degree {k})")
        check_no_overflow(len(cohort), self.quant.bits)
        object.__setattr__(self, "cohort", cohort)
        body = json.dumps(self.to_message(), sort_keys=True).encode()
        object.__setattr__(self, "_digest", hashlib.sha256(body).digest())

    @property
    def degree(self) -> int:
        """Number of neighbours every client would have if the whole claimed cohort joined."""
        return effective_degree(len(self.cohort), self.neighbours)

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
        }

    @classmethod
    def from_message(cls, msg: Mapping[str, Any]) -> SecAggParams:
        """Parse and validate parameters received from the server (fields it has no say in are ignored)."""
        try:
            return cls(
                campaign_id=str(msg["campaign_id"]),
                round_id=int(msg["round"]),
                cohort=tuple(int(c) for c in msg["cohort"]),
                neighbours=int(msg["neighbours"]),
                threshold=int(msg["threshold"]),
                quant=QuantConfig(clip=float(msg["clip"]), bits=int(msg["bits"])),
                vector_len=int(msg["vector_len"]),
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
        policy: SecAggPolicy | None = None,
    ) -> SecAggParams:
        """Server-side constructor: k and t default to :func:`~fedtune.secagg.sizing.size_round` for ``policy``.

        With ``neighbours`` given and ``threshold`` omitted, t is the smallest threshold that ``policy`` accepts
        for that degree, or ⌊k/2⌋ + 1 when none does (clients with that policy will then refuse the round).
        """
        ids, policy = tuple(sorted(int(c) for c in cohort)), policy or SecAggPolicy()
        if neighbours is None:
            k, t = size_round(len(ids), policy)
        else:
            k, degree = neighbours, effective_degree(len(ids), neighbours)
            t = smallest_threshold(len(ids), degree, policy) or degree // 2 + 1
        return cls(campaign_id, round_id, ids, k, t if threshold is None else threshold, quant, vector_len)

    def digest(self) -> bytes:
        """SHA-256 of the canonical parameters; everything signed in the round binds it."""
        return self._digest


def check_round_params(params: SecAggParams, policy: SecAggPolicy, view_size: int | None = None) -> str | None:
    """Why a client with ``policy`` refuses the round (one line), or None; transport-free.

    ``view_size`` None checks the claimed cohort (before training); the signed view's size is checked again
    before any share is dealt, since γ counts members of the view.
    """
    n = len(params.cohort) if view_size is None else view_size
    if n > policy.max_cohort:  # before the sizing, whose cost grows with n
        return f"a cohort of {n} is above this client's maximum {policy.max_cohort}"
    return check_sizing(n, params.neighbours, params.threshold, policy)


class NeighbourGraph:
    """The round's k-regular Harary ring over the view's members, in an order fixed by the graph seed.

    Parameters
    ----------
    members : sequence of int
        The signed view's member ids.
    degree : int
        Even k, or n − 1 for the complete graph.
    seed : bytes
        Hash of every member's nonce (:meth:`RoundView.graph_seed`).
    """

    def __init__(self, members: Sequence[int], degree: int, seed: bytes) -> None:
        ids = sorted(int(m) for m in members)
        # Order by a hash of the seed rather than a numpy RNG: clients may run other numpy versions.
        self._nb = self.ring(sorted(ids, key=lambda c: hashlib.sha256(seed + _u64(c)).digest()), degree)
        self._points = {c: i + 1 for i, c in enumerate(ids)}
        self.seed = seed

    @staticmethod
    def ring(order: Sequence[int], degree: int) -> dict[int, frozenset[int]]:
        """The Harary ring: each member's ``degree / 2`` neighbours on either side in ``order`` (complete if n − 1)."""
        n, half = len(order), degree // 2
        if degree >= n - 1:
            return {c: frozenset(order) - {c} for c in order}
        return {c: frozenset(order[(i + d) % n] for d in range(-half, half + 1) if d) for i, c in enumerate(order)}

    def neighbours_of(self, client_id: int) -> frozenset[int]:
        """The clients that ``client_id`` masks with and that hold its shares."""
        return self._nb[client_id]

    def share_point(self, client_id: int) -> int:
        """Shamir evaluation point of a share holder: its 1-based position in the view."""
        return self._points[client_id]


@dataclass(frozen=True)
class Member:
    """One advertiser as the view lists it: its identity key, ephemeral keys and commitments.

    Each member signs the whole view after checking its own row, so a member's view signature vouches for its
    row: nobody needs its advertise signature but the server, which checked it on receipt.
    """

    identity: bytes
    c_pk: bytes
    s_pk: bytes
    nonce_commit: bytes
    seed_commit: bytes


class RoundView:
    """The cohort that actually takes part, as every member signs it (stage ``view``).

    Parameters
    ----------
    params : SecAggParams
        The round's parameters.
    members : mapping of int to Member
        Every advertiser whose keys the server accepted; a subset of the claimed cohort.
    """

    def __init__(self, params: SecAggParams, members: Mapping[int, Member]) -> None:
        ids = sorted(int(m) for m in members)
        if not set(ids) <= set(params.cohort):
            raise SecAggProtocolError("the view lists clients outside the round's cohort")
        self.params = params
        self.members = {m: members[m] for m in ids}
        self.degree = effective_degree(len(ids), params.neighbours) if len(ids) > 1 else 0
        parts = [_VIEW_SIG, params.digest()]
        for m in ids:
            e = self.members[m]
            parts += [_u64(m), e.identity, e.c_pk, e.s_pk, e.nonce_commit, e.seed_commit]
        self.digest = _hash(*parts)

    @property
    def ids(self) -> list[int]:
        return list(self.members)

    def to_message(self) -> Message:
        """The directory as parallel lists (the body of a ``view`` request)."""
        rows = self.members.values()
        return {
            "ids": self.ids,
            "identity": [e.identity for e in rows],
            "c_pk": [e.c_pk for e in rows],
            "s_pk": [e.s_pk for e in rows],
            "nonce_commit": [e.nonce_commit for e in rows],
            "seed_commit": [e.seed_commit for e in rows],
        }

    @classmethod
    def from_message(cls, params: SecAggParams, msg: Mapping[str, Any]) -> RoundView:
        """Parse a directory; ids must be distinct and ascending, keys and hashes of the right size."""
        rows = _paired(msg, *_VIEW_FIELDS)
        ids = [int(r[0]) for r in rows]
        if ids != sorted(set(ids)):
            raise SecAggProtocolError("view ids must be distinct and ascending")
        members = {}
        for v, *fields in rows:
            entry = Member(*(bytes(f) for f in fields))
            if any(len(b) != 32 for b in fields):
                raise SecAggProtocolError(f"malformed view entry for client {v}")
            members[int(v)] = entry
        return cls(params, members)

    def check_distinct(self) -> None:
        """Refuse a view in which two members share an identity or an ephemeral key."""
        identities = [e.identity for e in self.members.values()]
        ephemeral = [k for e in self.members.values() for k in (e.c_pk, e.s_pk)]
        if len(set(identities)) != len(identities) or len(set(ephemeral)) != len(ephemeral):
            raise SecAggProtocolError("the view repeats an identity or ephemeral key")

    def graph(self, nonces: Mapping[int, bytes]) -> NeighbourGraph:
        """The neighbour graph, from every member's revealed nonce (each checked against its commitment)."""
        missing = sorted(set(self.members) - set(nonces))
        if missing:
            raise SecAggAbort(f"no graph nonce from clients {missing[:5]}: round aborted (a missing reveal aborts)")
        for v, e in self.members.items():
            if _nonce_commitment(self.params, v, nonces[v]) != e.nonce_commit:
                raise SecAggCryptoError(f"client {v}'s graph nonce does not match its commitment")
        return NeighbourGraph(self.ids, self.degree, self.graph_seed(nonces))

    def graph_seed(self, nonces: Mapping[int, bytes]) -> bytes:
        """SHA-256 over the view digest and every member's nonce, in member order."""
        return _hash(_GRAPH_SEED, self.digest, *(bytes(nonces[v]) for v in self.members))


@dataclass(frozen=True)
class SecAggResult:
    """Output of a round: the exact uint32 sum of the survivors' encodings, who they are, and who was named.

    ``blamed`` maps a client to what it was caught doing (its shares were dropped); ``complaints`` lists
    ``(holder, dealer)`` pairs where the holder said the dealer's shares did not match their hashes.
    """

    total: np.ndarray
    survivors: tuple[int, ...]
    quant: QuantConfig
    blamed: dict[int, str] = field(default_factory=dict)
    complaints: tuple[tuple[int, int], ...] = ()

    def mean(self, total_weight: float | None = None) -> np.ndarray:
        """Decode to the float mean (or weighted mean given the survivors' total weight)."""
        return dequantize_mean(self.total, self.quant, len(self.survivors), total_weight)


def _advertise_transcript(params: SecAggParams, sender: int, entry: Member) -> bytes:
    return b"".join(
        [_ADVERTISE_SIG, params.digest(), _u64(sender), entry.c_pk, entry.s_pk, entry.nonce_commit, entry.seed_commit]
    )


def _nonce_commitment(params: SecAggParams, client: int, nonce: bytes) -> bytes:
    return _hash(_NONCE_COMMIT, params.digest(), _u64(client), bytes(nonce))


def _seed_commitment(params: SecAggParams, client: int, seed: bytes) -> bytes:
    return _hash(_SEED_COMMIT, params.digest(), _u64(client), seed)


def _share_hash(view: RoundView, owner: int, holder: int, kind: bytes, share: bytes) -> bytes:
    return _hash(_SHARE_HASH, view.digest, _u64(owner), _u64(holder), kind, share)


def _shares_transcript(view: RoundView, owner: int, rows: Iterable[tuple[int, bytes, bytes]]) -> bytes:
    return b"".join([_SHARES_SIG, view.digest, _u64(owner), *(_u64(v) + hb + hs for v, hb, hs in rows)])


def _consistency_transcript(view: RoundView, survivors: Iterable[int]) -> bytes:
    return b"".join([_CONSISTENCY_SIG, view.digest, _ids_bytes(survivors)])


def _mask_sign(owner: int, peer: int) -> int:
    """Antisymmetric sign so that the pairwise masks of two survivors cancel in the sum."""
    return 1 if owner > peer else -1


def _pairwise_key(view: RoundView, private: X25519KeyPair, peer_public: bytes) -> bytes:
    return crypto.agree(private.private, peer_public, _MASK_INFO + view.digest)


def _share_key(view: RoundView, private: X25519KeyPair, peer_public: bytes) -> bytes:
    return crypto.agree(private.private, peer_public, _ENC_INFO + view.digest)


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


def _sorted_ids(msg: Mapping[str, Any], key: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(v) for v in msg.get(key, ())}))
    except (TypeError, ValueError) as exc:
        raise SecAggProtocolError(f"field {key!r} must list client ids") from exc


class SecAggClient:
    """Client side of one SecAgg+ round.

    Parameters
    ----------
    client_id : int
        This client's id (a Flower node id in deployment).
    identity_key : Ed25519PrivateKey
        Long-term key; signs this client's keys, its view and its survivor set.
    campaign_id : str
        Campaign this client works for; parameters of any other campaign are refused.
    round_id : int, optional
        Expected round; when omitted, the round of the ``advertise`` request is adopted.
    quant : QuantConfig, optional
        When given, the server's quantization parameters must match it.
    policy : SecAggPolicy, optional
        This client's own threat model (σ, γ, minimum cohort); the defaults when omitted.
    pinned : mapping of int to bytes, optional
        Identity keys this client knows out of band; the view must list the same key for those ids.
    rng : numpy Generator, optional
        Randomness for stochastic rounding (not secret; keys, seeds and nonces use OS entropy).
    """

    def __init__(
        self,
        client_id: int,
        identity_key: Ed25519PrivateKey,
        campaign_id: str,
        round_id: int | None = None,
        quant: QuantConfig | None = None,
        policy: SecAggPolicy | None = None,
        pinned: Mapping[int, bytes] | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.client_id = client_id
        self._identity = identity_key
        self._identity_pk = crypto.identity_public_bytes(identity_key)
        self._campaign_id = campaign_id
        self._round_id = round_id
        self._quant = quant
        self.policy = policy or SecAggPolicy()
        self._pinned = dict(pinned or {})
        self._rng = rng if rng is not None else np.random.default_rng()
        self.params: SecAggParams | None = None
        self.view: RoundView | None = None
        self.graph: NeighbourGraph | None = None
        self._done: list[str] = []
        self._c_key: X25519KeyPair | None = None
        self._s_key: X25519KeyPair | None = None
        self._b_seed: bytes | None = None
        self._nonce: bytes | None = None
        self._peers: tuple[int, ...] = ()  # neighbours that dealt shares: the pairwise masks in this upload
        self._held: dict[int, tuple[bytes, bytes]] = {}  # owner -> (b-share, s-share), hashes checked
        self._survivors: tuple[int, ...] | None = None
        self._revealed_b: set[int] = set()
        self._revealed_s: set[int] = set()

    # -- persistence ------------------------------------------------------------------------

    def export_state(self) -> Message:
        """Flat, ConfigRecord-compatible snapshot of the round state.

        A Flower ClientApp may run in a fresh process for every message, so the state between stages must
        live in ``context.state``. It holds this round's ephemeral secrets (never the identity key); it must
        stay on the client and be discarded after the round.
        """
        params = self.params.to_message() if self.params is not None else {}
        view = self.view.to_message() if self.view is not None else {}
        held = sorted(self._held)
        p = self.policy
        return {
            **{f"params.{k}": v for k, v in params.items()},
            **{f"view.{k}": v for k, v in view.items()},
            "client_id": self.client_id,
            "campaign_id": self._campaign_id,
            "expected_round": -1 if self._round_id is None else self._round_id,
            "quant": [] if self._quant is None else [float(self._quant.clip), float(self._quant.bits)],
            "policy": [float(p.security_bits), p.corrupt_fraction, p.dropout_fraction, float(p.min_cohort)],
            "pinned_ids": sorted(self._pinned),
            "pinned_keys": [self._pinned[v] for v in sorted(self._pinned)],
            "done": list(self._done),
            "c_sk": self._c_key.private_bytes() if self._c_key is not None else b"",
            "s_sk": self._s_key.private_bytes() if self._s_key is not None else b"",
            "b_seed": self._b_seed or b"",
            "nonce": self._nonce or b"",
            "graph_seed": self.graph.seed if self.graph is not None else b"",
            "peers": list(self._peers),
            "held_ids": held,
            "held_b": [self._held[v][0] for v in held],
            "held_s": [self._held[v][1] for v in held],
            "survivors": [] if self._survivors is None else list(self._survivors),
            "revealed_b": sorted(self._revealed_b),
            "revealed_s": sorted(self._revealed_s),
        }

    @classmethod
    def restore(
        cls, state: Mapping[str, Any], identity_key: Ed25519PrivateKey, rng: np.random.Generator | None = None
    ) -> SecAggClient:
        """Rebuild a client from :meth:`export_state` plus the identity key kept elsewhere."""
        quant, pol = list(state["quant"]), list(state["policy"])
        client = cls(
            int(state["client_id"]),
            identity_key,
            str(state["campaign_id"]),
            None if int(state["expected_round"]) < 0 else int(state["expected_round"]),
            QuantConfig(quant[0], int(quant[1])) if quant else None,
            SecAggPolicy(int(pol[0]), float(pol[1]), float(pol[2]), int(pol[3])),
            {int(v): bytes(k) for v, k in _paired(state, "pinned_ids", "pinned_keys")},
            rng,
        )
        params = {k.removeprefix("params."): v for k, v in state.items() if k.startswith("params.")}
        client.params = SecAggParams.from_message(params) if params else None
        view = {k.removeprefix("view."): v for k, v in state.items() if k.startswith("view.")}
        if client.params is not None and view:
            client.view = RoundView.from_message(client.params, view)
            if state["graph_seed"]:
                client.graph = NeighbourGraph(client.view.ids, client.view.degree, bytes(state["graph_seed"]))
        client._done = [str(x) for x in state["done"]]
        if state["c_sk"]:
            client._c_key = X25519KeyPair.from_private_bytes(bytes(state["c_sk"]))
            client._s_key = X25519KeyPair.from_private_bytes(bytes(state["s_sk"]))
        client._b_seed = bytes(state["b_seed"]) or None
        client._nonce = bytes(state["nonce"]) or None
        client._peers = tuple(int(v) for v in state["peers"])
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
            VIEW: self.sign_view,
            SHARE_KEYS: self.share_keys,
            CONSISTENCY: self.consistency_check,
            UNMASK: self.unmask,
        }
        if stage not in handlers:
            raise SecAggProtocolError(f"unknown stage {stage!r}")
        return handlers[stage](msg)

    # -- stages -----------------------------------------------------------------------------

    def advertise_keys(self, msg: Mapping[str, Any]) -> Message:
        """Stage 1: check the parameters against this client's policy; commit to fresh keys, nonce and seed."""
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
        if (reason := check_round_params(params, self.policy)) is not None:
            raise SecAggPolicyError(reason)
        self.params = params
        self._c_key, self._s_key = X25519KeyPair(), X25519KeyPair()
        self._b_seed, self._nonce = os.urandom(crypto.KEY_BYTES), os.urandom(crypto.KEY_BYTES)
        entry = Member(
            self._identity_pk,
            self._c_key.public_bytes,
            self._s_key.public_bytes,
            _nonce_commitment(params, self.client_id, self._nonce),
            _seed_commitment(params, self.client_id, self._b_seed),
        )
        signature = crypto.sign(self._identity, _advertise_transcript(params, self.client_id, entry))
        return self._reply(
            ADVERTISE,
            {
                "c_pk": entry.c_pk,
                "s_pk": entry.s_pk,
                "nonce_commit": entry.nonce_commit,
                "seed_commit": entry.seed_commit,
                "signature": signature,
            },
        )

    def sign_view(self, msg: Mapping[str, Any]) -> Message:
        """Stage 2: check the directory (own row, pinned keys, policy on its size); sign it, reveal the nonce.

        The other rows are vouched for by their members' signatures on the same view, checked in ``share_keys``
        before anything secret is dealt; signing and revealing the nonce now give nothing away.
        """
        params = self._enter(msg, VIEW)
        assert self._c_key is not None and self._s_key is not None and self._nonce is not None
        assert self._b_seed is not None
        view = RoundView.from_message(params, msg)
        mine = view.members.get(self.client_id)
        own = (self._identity_pk, self._c_key.public_bytes, self._s_key.public_bytes)
        if mine is None or (mine.identity, mine.c_pk, mine.s_pk) != own:
            raise SecAggProtocolError("the view does not list this client with its own keys")
        if mine.nonce_commit != _nonce_commitment(params, self.client_id, self._nonce) or (
            mine.seed_commit != _seed_commitment(params, self.client_id, self._b_seed)
        ):
            raise SecAggProtocolError("the view does not list this client's own commitments")
        if (reason := check_round_params(params, self.policy, len(view.members))) is not None:
            raise SecAggPolicyError(f"signed view: {reason}")
        for v, key in self._pinned.items():
            if v in view.members and view.members[v].identity != key:
                raise SecAggCryptoError(f"the view's identity key for client {v} is not the one pinned")
        view.check_distinct()
        self.view = view
        signature = crypto.sign(self._identity, view.digest)
        return self._reply(VIEW, {"nonce": self._nonce, "signature": signature})

    def share_keys(self, msg: Mapping[str, Any]) -> Message:
        """Stage 3: check every member's nonce and view signature, derive the graph, deal hashed shares."""
        params = self._enter(msg, SHARE_KEYS)
        view = self.view
        assert view is not None and self._c_key is not None and self._s_key is not None and self._b_seed is not None
        rows = _paired(msg, "ids", "nonce", "signature")
        if [int(v) for v, _, _ in rows] != view.ids:
            raise SecAggAbort("share_keys must carry the nonce and view signature of every view member")
        for v, _, sig in rows:
            crypto.verify(view.members[int(v)].identity, bytes(sig), view.digest)
        graph = view.graph({int(v): bytes(nonce) for v, nonce, _ in rows})
        self.graph = graph
        holders = sorted(graph.neighbours_of(self.client_id))
        points = [graph.share_point(v) for v in holders]
        b_shares = shamir.split(self._b_seed, params.threshold, points)
        s_shares = shamir.split(self._s_key.private_bytes(), params.threshold, points)
        ciphertexts, b_hashes, s_hashes = [], [], []
        for v, x in zip(holders, points, strict=True):
            key = _share_key(view, self._c_key, view.members[v].c_pk)
            ad = _share_ad(params, self.client_id, v)
            ciphertexts.append(crypto.aead_encrypt(key, b_shares[x] + s_shares[x], ad))
            b_hashes.append(_share_hash(view, self.client_id, v, b"b", b_shares[x]))
            s_hashes.append(_share_hash(view, self.client_id, v, b"s", s_shares[x]))
        rows_signed = zip(holders, b_hashes, s_hashes, strict=True)
        signature = crypto.sign(self._identity, _shares_transcript(view, self.client_id, rows_signed))
        return self._reply(
            SHARE_KEYS,
            {"dst": holders, "ciphertext": ciphertexts, "b_hash": b_hashes, "s_hash": s_hashes, "signature": signature},
        )

    def masked_input(self, msg: Mapping[str, Any], vector: np.ndarray) -> Message:
        """Stage 4: keep the shares that match their dealer's hashes, then upload y = q(x) + PRG(b_u) ± PRG(s_uv).

        ``vector`` is the flattened (already weighted) float update of length ``vector_len``. A share that does
        not decrypt or does not match its hashes is not kept, and its dealer is reported (``bad_dealers``).
        """
        params = self._enter(msg, MASKED_INPUT)
        view, graph = self.view, self.graph
        assert view is not None and graph is not None and self._c_key is not None and self._s_key is not None
        assert self._b_seed is not None
        x = np.asarray(vector).reshape(-1)
        if x.size != params.vector_len:
            raise ValueError(f"update has {x.size} parameters, round expects {params.vector_len}")
        mine, peers, bad = graph.neighbours_of(self.client_id), [], []
        for v, ct, b_hash, s_hash in _paired(msg, "src", "ciphertext", "b_hash", "s_hash"):
            v = int(v)
            if v not in mine or v in peers:
                raise SecAggProtocolError(f"unexpected or repeated ciphertext from {v}")
            peers.append(v)
            shares = self._open_shares(v, bytes(ct), bytes(b_hash), bytes(s_hash))
            if shares is None:
                bad.append(v)
            else:
                self._held[v] = shares
        if len(peers) < params.threshold:
            raise SecAggAbort(f"only {len(peers)} neighbours shared keys, threshold {params.threshold}")
        self._peers = tuple(sorted(peers))
        masked = quantize(x, params.quant, self._rng)
        crypto.add_mask_into(masked, self._b_seed)
        for v in self._peers:
            peer_key = _pairwise_key(view, self._s_key, view.members[v].s_pk)
            crypto.add_mask_into(masked, peer_key, _mask_sign(self.client_id, v))
        self._b_seed = None  # from now on only the shares held by neighbours can recover it
        return self._reply(MASKED_INPUT, {"masked": masked, "bad_dealers": sorted(bad)})

    def _open_shares(self, dealer: int, ciphertext: bytes, b_hash: bytes, s_hash: bytes) -> tuple[bytes, bytes] | None:
        """The (b, s) shares ``dealer`` sent this client, or None if they do not decrypt or match their hashes."""
        view, params, me = self.view, self.params, self.client_id
        assert view is not None and params is not None and self._c_key is not None
        key = _share_key(view, self._c_key, view.members[dealer].c_pk)
        try:
            plain = crypto.aead_decrypt(key, ciphertext, _share_ad(params, dealer, me))
        except SecAggCryptoError:
            return None
        b, s = plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]
        if len(plain) != 2 * shamir.SHARE_BYTES:
            return None
        if _share_hash(view, dealer, me, b"b", b) != b_hash or _share_hash(view, dealer, me, b"s", s) != s_hash:
            return None
        return b, s

    def _quorum(self) -> int:
        assert self.view is not None and self.params is not None
        n = len(self.view.members)
        return max(self.params.threshold, quorum(n, corrupt_count(n, self.policy.corrupt_fraction)))

    def consistency_check(self, msg: Mapping[str, Any]) -> Message:
        """Stage 5: sign the survivor set U3 once, if it leaves this client ≥ t surviving neighbours."""
        params = self._enter(msg, CONSISTENCY)
        view, graph = self.view, self.graph
        assert view is not None and graph is not None
        survivors = _sorted_ids(msg, "survivors")
        if self.client_id not in survivors or not set(survivors) <= set(view.members):
            raise SecAggProtocolError("survivor set must contain this client and only view members")
        need = max(self._quorum(), self.policy.min_cohort)
        if len(survivors) < need:
            raise SecAggAbort(f"{len(survivors)} survivors, below the {need} this client needs (threshold, quorum)")
        alive = len(graph.neighbours_of(self.client_id) & set(survivors))
        if alive < params.threshold:
            raise SecAggAbort(f"{alive} of this client's neighbours survive, threshold {params.threshold}")
        self._survivors = survivors
        signature = crypto.sign(self._identity, _consistency_transcript(view, survivors))
        return self._reply(CONSISTENCY, {"signature": signature})

    def unmask(self, msg: Mapping[str, Any]) -> Message:
        """Stage 6: after a quorum of signatures on U3, reveal b-shares of survivors, s-shares of dropouts.

        Refuses any request that would reveal both shares of one client, including across retries.
        """
        self._enter(msg, UNMASK)
        view = self.view
        assert self._survivors is not None and view is not None
        survivors, dropped = _sorted_ids(msg, "survivors"), set(_sorted_ids(msg, "dropped"))
        if survivors != self._survivors:
            raise SecAggProtocolError("survivor set differs from the one committed in the consistency check")
        if dropped & set(survivors):
            raise SecAggProtocolError(f"refusing to reveal both shares of clients {sorted(dropped & set(survivors))}")
        if not dropped <= set(view.members):
            raise SecAggProtocolError("dropped clients must be view members")
        valid = set()
        transcript = _consistency_transcript(view, survivors)
        for signer, sig in _paired(msg, "signer_ids", "signatures"):
            signer = int(signer)
            if signer in survivors and signer not in valid:
                crypto.verify(view.members[signer].identity, bytes(sig), transcript)
                valid.add(signer)
        if len(valid) < self._quorum():
            raise SecAggAbort(f"only {len(valid)} valid consistency signatures, quorum {self._quorum()}")
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
    """Server side of one SecAgg+ round: routes keys and shares, sums, unmasks, names cheaters.

    For each stage in :data:`STAGES` call :meth:`requests` (a dict of per-client messages) and :meth:`receive`
    for each reply, and finally :meth:`result`. Asking for the next stage's requests closes the previous stage;
    late replies are then rejected.

    Parameters
    ----------
    params : SecAggParams
        The round parameters (see :meth:`SecAggParams.create`).
    registry : mapping of int to bytes
        ``{client_id: raw Ed25519 public key}``; keys not signed by these identities are refused.
    policy : SecAggPolicy, optional
        The threat model the server sizes its quorum for (the contributors' defaults when omitted).
    """

    def __init__(self, params: SecAggParams, registry: Mapping[int, bytes], policy: SecAggPolicy | None = None) -> None:
        self.params = params
        self.policy = policy or SecAggPolicy()
        self._registry = dict(registry)
        self._stage = ADVERTISE
        self._members: dict[int, Member] = {}  # U1
        self.view: RoundView | None = None
        self._nonces: dict[int, bytes] = {}
        self._view_sigs: dict[int, bytes] = {}
        self.graph: NeighbourGraph | None = None
        self._inbox: dict[int, dict[int, bytes]] = {}  # receiver -> sender -> ciphertext
        self._hashes: dict[int, dict[int, tuple[bytes, bytes]]] = {}  # owner -> holder -> (b hash, s hash)
        self._shared: set[int] = set()  # U2
        self._total = np.zeros(params.vector_len, dtype=np.uint32)
        self._masked: set[int] = set()  # U3
        self._complaints: set[tuple[int, int]] = set()  # (holder, dealer)
        self._consistency: dict[int, bytes] = {}  # U4: id -> signature over U3
        self._b_shares: dict[int, dict[int, bytes]] = {}  # owner -> point -> share
        self._s_shares: dict[int, dict[int, bytes]] = {}
        self._unmasked: set[int] = set()  # U5
        self.blamed: dict[int, str] = {}

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

    def _quorum(self) -> int:
        assert self.view is not None
        n = len(self.view.members)
        return max(self.params.threshold, quorum(n, corrupt_count(n, self.policy.corrupt_fraction)))

    def _blame(self, culprit: int, reason: str) -> SecAggCheatError:
        self.blamed.setdefault(culprit, reason)
        return SecAggCheatError(culprit, reason)

    def requests(self, stage: str) -> dict[int, Message]:
        """Per-client requests of ``stage`` (moving the server to it), keyed by client id."""
        makers = {
            ADVERTISE: lambda: {u: self.advertise_request() for u in self.params.cohort},
            VIEW: self.view_requests,
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
            VIEW: self.receive_view,
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
        """Record a client's signed keys and commitments after verifying its identity signature."""
        sender = self._accept(msg, ADVERTISE, self.params.cohort, self._members)
        if sender not in self._registry:
            raise SecAggCryptoError(f"client {sender} has no registered identity")
        fields = [bytes(msg[k]) for k in ("c_pk", "s_pk", "nonce_commit", "seed_commit")]
        entry = Member(self._registry[sender], *fields)
        if any(len(b) != 32 for b in fields):
            raise SecAggProtocolError(f"client {sender}: keys and commitments must be 32 bytes")
        crypto.verify(entry.identity, bytes(msg["signature"]), _advertise_transcript(self.params, sender, entry))
        self._members[sender] = entry

    def view_requests(self) -> dict[int, Message]:
        """Stage 2 requests: the same directory of every advertiser, to every advertiser."""
        ids = self._advance(VIEW, self._members)
        self.view = RoundView(self.params, self._members)
        if self.view.degree < self.params.threshold:
            raise SecAggAbort(f"{len(ids)} clients give degree {self.view.degree}, threshold {self.params.threshold}")
        body = {**self._header(VIEW), **self.view.to_message()}
        return {u: body for u in ids}

    def receive_view(self, msg: Mapping[str, Any]) -> None:
        """Record a member's revealed nonce (checked against its commitment) and its signature on the view."""
        assert self.view is not None
        sender = self._accept(msg, VIEW, self.view.members, self._view_sigs)
        nonce, sig = bytes(msg["nonce"]), bytes(msg["signature"])
        if _nonce_commitment(self.params, sender, nonce) != self.view.members[sender].nonce_commit:
            raise SecAggCryptoError(f"client {sender}'s graph nonce does not match its commitment")
        crypto.verify(self.view.members[sender].identity, sig, self.view.digest)
        self._nonces[sender], self._view_sigs[sender] = nonce, sig

    def share_keys_requests(self) -> dict[int, Message]:
        """Stage 3 requests: every member's nonce and view signature; a missing one aborts the round."""
        assert self.view is not None
        self.graph = self.view.graph(self._nonces)  # raises SecAggAbort when a reveal is missing
        ids = self._advance(SHARE_KEYS, self._view_sigs)
        body = {
            **self._header(SHARE_KEYS),
            "ids": ids,
            "nonce": [self._nonces[v] for v in ids],
            "signature": [self._view_sigs[v] for v in ids],
        }
        return {u: body for u in ids}

    def receive_share_keys(self, msg: Mapping[str, Any]) -> None:
        """Queue a client's encrypted shares for its neighbours and keep its signed share hashes."""
        assert self.view is not None and self.graph is not None
        sender = self._accept(msg, SHARE_KEYS, self.view.members, self._shared)
        rows = [
            (int(v), bytes(ct), bytes(hb), bytes(hs))
            for v, ct, hb, hs in _paired(msg, "dst", "ciphertext", "b_hash", "s_hash")
        ]
        if [v for v, *_ in rows] != sorted(self.graph.neighbours_of(sender)):
            raise SecAggProtocolError(f"client {sender} must send one ciphertext to each neighbour, in order")
        if any(len(hb) != 32 or len(hs) != 32 for _, _, hb, hs in rows):
            raise SecAggProtocolError(f"client {sender}: share hashes must be 32 bytes")
        transcript = _shares_transcript(self.view, sender, ((v, hb, hs) for v, _, hb, hs in rows))
        crypto.verify(self.view.members[sender].identity, bytes(msg["signature"]), transcript)
        for v, ct, hb, hs in rows:
            self._inbox.setdefault(v, {})[sender] = ct
            self._hashes.setdefault(sender, {})[v] = (hb, hs)
        self._shared.add(sender)

    def masked_input_requests(self) -> dict[int, Message]:
        """Stage 4 requests: forward to each client the ciphertexts (and hashes) of neighbours that dealt."""
        out = {}
        for u in self._advance(MASKED_INPUT, self._shared):
            srcs = sorted(self._inbox.get(u, {}).keys() & self._shared)
            out[u] = {
                **self._header(MASKED_INPUT),
                "src": srcs,
                "ciphertext": [self._inbox[u][v] for v in srcs],
                "b_hash": [self._hashes[v][u][0] for v in srcs],
                "s_hash": [self._hashes[v][u][1] for v in srcs],
            }
        self._inbox.clear()
        return out

    def receive_masked_input(self, msg: Mapping[str, Any]) -> None:
        """Add a client's masked uint32 vector into the running sum (mod 2^32); note the dealers it reports."""
        assert self.graph is not None
        sender = self._accept(msg, MASKED_INPUT, self._shared, self._masked)
        masked = msg.get("masked")
        if not (isinstance(masked, np.ndarray) and masked.dtype == np.uint32):
            raise SecAggProtocolError("masked input must be a uint32 numpy array")
        if masked.shape != (self.params.vector_len,):
            raise SecAggProtocolError(f"masked input has shape {masked.shape}")
        bad = set(_sorted_ids(msg, "bad_dealers"))
        if not bad <= self.graph.neighbours_of(sender) & self._shared:
            raise SecAggProtocolError(f"client {sender} reports dealers that sent it nothing")
        np.add(self._total, masked, out=self._total)
        self._masked.add(sender)
        self._complaints.update((sender, v) for v in bad)

    def consistency_requests(self) -> dict[int, Message]:
        """Stage 5 requests: U3 to every survivor, if U3 can reach the quorum and leaves each survivor t neighbours."""
        assert self.graph is not None
        survivors = self._advance(CONSISTENCY, self._masked)
        if len(survivors) < self._quorum():
            raise SecAggAbort(f"{len(survivors)} masked inputs, below the quorum {self._quorum()}")
        alone = [u for u in survivors if len(self.graph.neighbours_of(u) & self._masked) < self.params.threshold]
        if alone:
            raise SecAggAbort(f"clients {alone[:5]} have fewer than threshold {self.params.threshold} live neighbours")
        for owner in sorted(self._shared):  # a survivor's b-shares or a dropout's s-shares must be recoverable
            holders = self.graph.neighbours_of(owner) & self._masked
            good = {h for h in holders if (h, owner) not in self._complaints}
            if len(good) < self.params.threshold:
                raise SecAggAbort(
                    f"client {owner}'s shares: {len(holders) - len(good)} of its {len(holders)} live holders report "
                    f"them invalid, {len(good)} left, threshold {self.params.threshold}"
                )
        return {u: {**self._header(CONSISTENCY), "survivors": survivors} for u in survivors}

    def receive_consistency(self, msg: Mapping[str, Any]) -> None:
        """Record a survivor's signature over U3."""
        assert self.view is not None
        sender = self._accept(msg, CONSISTENCY, self._masked, self._consistency)
        sig = bytes(msg["signature"])
        crypto.verify(self.view.members[sender].identity, sig, _consistency_transcript(self.view, self._masked))
        self._consistency[sender] = sig

    def unmask_requests(self) -> dict[int, Message]:
        """Stage 6 requests: U3, the dropped set U2 \\ U3 and all U3 signatures, to every signer."""
        if len(self._consistency) < (need := self._quorum()):
            raise SecAggAbort(f"{len(self._consistency)} consistency signatures, quorum {need}")
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
        """Store the revealed shares, each checked against its dealer's hash; a wrong one names the sender."""
        assert self.view is not None and self.graph is not None
        sender = self._accept(msg, UNMASK, self._consistency, self._unmasked)
        point = self.graph.share_point(sender)
        staged: list[tuple[dict[int, dict[int, bytes]], int, bytes]] = []
        for ids_key, shares_key, allowed, store, kind in (
            ("b_ids", "b_shares", self._masked, self._b_shares, b"b"),
            ("s_ids", "s_shares", self._shared - self._masked, self._s_shares, b"s"),
        ):
            for owner, share in _paired(msg, ids_key, shares_key):
                owner, share = int(owner), bytes(share)
                if owner not in allowed or sender not in self._hashes.get(owner, {}):
                    raise SecAggProtocolError(f"client {sender} cannot hold a {kind.decode()}-share of {owner}")
                committed = self._hashes[owner][sender][0 if kind == b"b" else 1]
                if _share_hash(self.view, owner, sender, kind, share) != committed:
                    raise self._blame(
                        sender, f"revealed a {kind.decode()}-share of client {owner} that does not match its hash"
                    )
                staged.append((store, owner, share))
        for store, owner, share in staged:
            store.setdefault(owner, {})[point] = share
        self._unmasked.add(sender)

    def _reconstruct(self, store: Mapping[int, Mapping[int, bytes]], owner: int, kind: str) -> bytes:
        shares = store.get(owner, {})
        if len(shares) < self.params.threshold:
            raise SecAggAbort(f"{len(shares)} {kind}-shares of client {owner}, threshold {self.params.threshold}")
        try:  # every share matched its dealer's hash: a value that is no secret is the dealer's doing
            return shamir.combine(shares, self.params.threshold)
        except ValueError as exc:
            raise self._blame(owner, f"dealt {kind}-shares that do not rebuild a secret ({exc})") from None

    def result(self) -> SecAggResult:
        """Remove self-masks of survivors and dropped clients' pairwise masks; return the exact sum.

        Raises
        ------
        SecAggCheatError
            When a dealer's shares do not rebuild the secret it committed to (the round cannot be unmasked).
        SecAggAbort
            When too few good shares of some client came back.
        """
        if self._stage != UNMASK:
            raise SecAggProtocolError("result() is only available after the unmask stage")
        assert self.view is not None and self.graph is not None
        if len(self._unmasked) < self.params.threshold:
            raise SecAggAbort(f"{len(self._unmasked)} clients unmasked, threshold {self.params.threshold}")
        total = self._total.copy()
        for u in sorted(self._masked):
            seed = self._reconstruct(self._b_shares, u, "b")
            if _seed_commitment(self.params, u, seed) != self.view.members[u].seed_commit:
                raise self._blame(u, "dealt b-shares that do not rebuild the self-mask seed it committed to")
            crypto.add_mask_into(total, seed, -1)
        for v in sorted(self._shared - self._masked):
            s_key = X25519KeyPair.from_private_bytes(self._reconstruct(self._s_shares, v, "s"))
            if s_key.public_bytes != self.view.members[v].s_pk:
                raise self._blame(v, "dealt s-shares that do not rebuild the mask key it advertised")
            for w in sorted(self.graph.neighbours_of(v) & self._masked):
                crypto.add_mask_into(
                    total, _pairwise_key(self.view, s_key, self.view.members[w].s_pk), -_mask_sign(w, v)
                )
        return SecAggResult(
            total=total,
            survivors=tuple(sorted(self._masked)),
            quant=self.params.quant,
            blamed=dict(self.blamed),
            complaints=tuple(sorted(self._complaints)),
        )


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
        A client raising :class:`SecAggAbort` is treated the same way, and so is a client whose reply the server
        finds cheating (:class:`SecAggCheatError`, recorded in ``result.blamed``); other errors propagate.
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
            try:
                server.receive(reply)
            except SecAggCheatError:
                gone.add(u)
    return server.result()
