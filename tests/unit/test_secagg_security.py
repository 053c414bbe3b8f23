"""Adversarial checks of the SecAgg+ core: what a malicious server or peer must not get away with."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedtune.secagg import (
    STAGES,
    QuantConfig,
    SecAggAbort,
    SecAggClient,
    SecAggCryptoError,
    SecAggParams,
    SecAggProtocolError,
    SecAggServer,
    check_no_overflow,
    generate_identity,
)
from fedtune.secagg.crypto import mask_stream

CAMPAIGN = "campaign-A"
N = 6
IDS = [11, 22, 33, 44, 55, 66]
IDENTITIES = {cid: generate_identity() for cid in IDS}
REGISTRY = {cid: pub for cid, (_, pub) in IDENTITIES.items()}
QUANT = QuantConfig(clip=1.0, bits=16)


class Round:
    """One in-process round that can be stopped before any stage to inject forged messages."""

    def __init__(self, round_id: int = 1, campaign: str = CAMPAIGN, client_round: int | None = None) -> None:
        self.params = SecAggParams.create(campaign, round_id, IDS, 32, QUANT, neighbours=4, threshold=3)
        self.server = SecAggServer(self.params, REGISTRY)
        self.clients = {
            cid: SecAggClient(cid, key, CAMPAIGN, round_id=client_round) for cid, (key, _) in IDENTITIES.items()
        }
        self.inputs = {cid: np.full(32, 0.01 * cid, dtype=np.float32) for cid in IDS}
        self.stage = "advertise"

    def requests(self) -> dict[int, dict[str, Any]]:
        """Requests of the current stage."""
        return self.server.requests(self.stage)

    def answer(self, requests: dict[int, dict[str, Any]]) -> None:
        """Let every client answer and the server receive; moves to the next stage."""
        for u, msg in requests.items():
            self.server.receive(self.clients[u].handle(msg, self.inputs[u]))
        self.stage = (*STAGES, "done")[STAGES.index(self.stage) + 1]

    def run_until(self, stage: str) -> dict[int, dict[str, Any]]:
        """Complete all stages before ``stage`` and return the requests of ``stage``."""
        while self.stage != stage:
            self.answer(self.requests())
        return self.requests()


def _flip(data: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


@pytest.mark.parametrize("position", [0, 5, 11, 12, 40, -17, -1])  # nonce, body, tag
def test_tampered_share_ciphertext_is_not_kept_and_its_dealer_is_reported(position: int) -> None:
    rnd = Round()
    requests = rnd.run_until("masked_input")
    u = IDS[0]
    msg = dict(requests[u])
    msg["ciphertext"] = list(msg["ciphertext"])
    msg["ciphertext"][0] = _flip(msg["ciphertext"][0], position)
    reply = rnd.clients[u].masked_input(msg, rnd.inputs[u])
    assert reply["bad_dealers"] == [msg["src"][0]] and msg["src"][0] not in rnd.clients[u]._held
    assert set(rnd.clients[u]._held) == set(msg["src"][1:])


def test_share_ciphertext_relabelled_to_another_sender_is_not_kept() -> None:
    rnd = Round()
    requests = rnd.run_until("masked_input")
    u = IDS[0]
    msg = dict(requests[u])
    msg["ciphertext"] = list(reversed(msg["ciphertext"]))  # same ciphertexts, claimed to come from other neighbours
    reply = rnd.clients[u].masked_input(msg, rnd.inputs[u])
    assert reply["bad_dealers"] == sorted(msg["src"]) and not rnd.clients[u]._held


def test_share_that_does_not_match_its_hash_is_not_kept() -> None:
    rnd = Round()
    requests = rnd.run_until("masked_input")
    u = IDS[0]
    msg = {**requests[u], "b_hash": [bytes(32), *requests[u]["b_hash"][1:]]}
    reply = rnd.clients[u].masked_input(msg, rnd.inputs[u])
    assert reply["bad_dealers"] == [msg["src"][0]]


def _share_keys_after_forged_view(rnd: Round, u: int, forge: Any) -> dict[str, Any]:
    """Client ``u`` signs the view as ``forge`` altered it, everyone else the genuine one; the next request to ``u``."""
    requests = rnd.run_until("view")
    replies = {v: rnd.clients[v].sign_view(forge(dict(msg)) if v == u else msg) for v, msg in requests.items()}
    return {
        "campaign_id": CAMPAIGN,
        "round": 1,
        "stage": "share_keys",
        "ids": IDS,
        "nonce": [replies[v]["nonce"] for v in IDS],
        "signature": [replies[v]["signature"] for v in IDS],
    }


def test_server_substituted_ephemeral_key_is_rejected_by_client() -> None:
    rnd = Round()

    def substitute(msg: dict[str, Any]) -> dict[str, Any]:  # another member's key, replaced
        return {**msg, "c_pk": [msg["c_pk"][0], msg["c_pk"][2][::-1], *msg["c_pk"][2:]]}

    request = _share_keys_after_forged_view(rnd, IDS[0], substitute)
    with pytest.raises(SecAggCryptoError):  # that member signed the view with its own key
        rnd.clients[IDS[0]].share_keys(request)
    assert rnd.clients[IDS[0]].graph is None


def test_keys_signed_by_unregistered_identity_are_rejected_by_server() -> None:
    rnd = Round()
    impostor_key, _ = generate_identity()
    impostor = SecAggClient(IDS[1], impostor_key, CAMPAIGN)
    forged = impostor.advertise_keys(rnd.server.advertise_request())
    with pytest.raises(SecAggCryptoError):
        rnd.server.receive_advertise(forged)
    stranger = SecAggClient(999, impostor_key, CAMPAIGN)
    with pytest.raises(SecAggProtocolError):  # not in the cohort at all
        stranger.advertise_keys(rnd.server.advertise_request())


def test_keys_of_an_impostor_are_rejected_by_peer() -> None:
    """Even if the server lists an impostor's keys for a member, that member's view signature does not cover them."""
    rnd = Round()
    impostor_key, _ = generate_identity()
    forged = SecAggClient(IDS[1], impostor_key, CAMPAIGN).advertise_keys(rnd.server.advertise_request())

    def impersonate(msg: dict[str, Any]) -> dict[str, Any]:
        return {**msg, **{k: [msg[k][0], forged[k], *msg[k][2:]] for k in ("c_pk", "s_pk", "nonce_commit")}}

    request = _share_keys_after_forged_view(rnd, IDS[0], impersonate)
    with pytest.raises(SecAggCryptoError):
        rnd.clients[IDS[0]].share_keys(request)


@pytest.mark.parametrize("field,value", [("round", 2), ("campaign_id", "campaign-B")])
def test_client_rejects_message_of_another_round_or_campaign(field: str, value: Any) -> None:
    rnd = Round()
    requests = rnd.run_until("share_keys")
    u = IDS[0]
    with pytest.raises(SecAggProtocolError):
        rnd.clients[u].share_keys({**requests[u], field: value})
    rnd.clients[u].share_keys(requests[u])  # the genuine message still works afterwards


def test_client_refuses_parameters_of_another_round_or_campaign() -> None:
    with pytest.raises(SecAggProtocolError, match="round"):
        Round(round_id=3, client_round=2).run_until("share_keys")
    with pytest.raises(SecAggProtocolError, match="campaign"):
        Round(campaign="campaign-B").run_until("share_keys")


def test_server_rejects_reply_of_another_round_and_replayed_keys() -> None:
    old, new = Round(round_id=1), Round(round_id=2)
    old_reply = old.clients[IDS[0]].advertise_keys(old.server.advertise_request())
    with pytest.raises(SecAggProtocolError):
        new.server.receive_advertise(old_reply)
    with pytest.raises(SecAggCryptoError):  # relabelled replay: the signature binds the round
        new.server.receive_advertise({**old_reply, "round": 2})


def test_out_of_order_stage_is_rejected() -> None:
    rnd = Round()
    requests = rnd.run_until("masked_input")
    u = IDS[0]
    with pytest.raises(SecAggProtocolError, match="out of order"):
        rnd.clients[u].unmask({**requests[u], "stage": "unmask"})


def test_client_refuses_to_reveal_both_shares_of_one_client() -> None:
    rnd = Round()
    requests = rnd.run_until("unmask")
    u = IDS[0]
    held = sorted(rnd.clients[u]._held)
    with pytest.raises(SecAggProtocolError, match="both shares"):
        rnd.clients[u].unmask({**requests[u], "dropped": held[:1]})
    with pytest.raises(SecAggProtocolError, match="committed"):  # shrink U3 after the commitment
        rnd.clients[u].unmask({**requests[u], "survivors": [s for s in IDS if s != held[0]], "dropped": held[:1]})
    reply = rnd.clients[u].unmask(requests[u])
    assert set(reply["b_ids"]) == set(held) and reply["s_ids"] == []


def test_client_refuses_unmask_without_enough_consistency_signatures() -> None:
    rnd = Round()
    requests = rnd.run_until("unmask")
    u = IDS[0]
    msg = {
        **requests[u],
        "signer_ids": requests[u]["signer_ids"][:2],
        "signatures": requests[u]["signatures"][:2],
    }
    with pytest.raises(SecAggAbort):
        rnd.clients[u].unmask(msg)
    forged = list(requests[u]["signatures"])
    forged[0] = _flip(forged[0], 3)
    with pytest.raises(SecAggCryptoError):
        rnd.clients[u].unmask({**requests[u], "signatures": forged})


def test_server_rejects_malformed_masked_input() -> None:
    rnd = Round()
    requests = rnd.run_until("masked_input")
    u = IDS[0]
    reply = rnd.clients[u].masked_input(requests[u], rnd.inputs[u])
    with pytest.raises(SecAggProtocolError, match="uint32"):
        rnd.server.receive_masked_input({**reply, "masked": reply["masked"].astype(np.int64)})
    with pytest.raises(SecAggProtocolError, match="shape"):
        rnd.server.receive_masked_input({**reply, "masked": reply["masked"][:-1]})
    with pytest.raises(SecAggProtocolError, match="sender"):
        rnd.server.receive_masked_input({**reply, "sender": 999})


def test_every_key_bit_changes_the_mask_stream() -> None:
    key = bytes(range(32))
    base = mask_stream(key, 64)
    streams = {base.tobytes()}
    for bit in range(256):
        flipped = _flip(key, bit // 8, bit % 8)
        stream = mask_stream(flipped, 64)
        assert np.count_nonzero(stream != base) > 48, f"bit {bit} barely changes the stream"
        streams.add(stream.tobytes())
    assert len(streams) == 257


def test_mask_stream_is_deterministic_and_chunk_independent() -> None:
    key = bytes(32)
    long = mask_stream(key, 200_000)  # spans several internal chunks
    np.testing.assert_array_equal(long[:1000], mask_stream(key, 1000))
    np.testing.assert_array_equal(long, mask_stream(key, 200_000))
    assert abs(float(long.mean()) / 2**32 - 0.5) < 0.01  # roughly uniform on Z_2^32


def test_overflow_configuration_is_refused() -> None:
    check_no_overflow(2**16 - 1, 16)
    for n, bits in [(2**16, 16), (2, 31), (300, 24), (3, 31)]:
        with pytest.raises(ValueError, match="overflow"):
            check_no_overflow(n, bits)
    with pytest.raises(ValueError, match="overflow"):
        SecAggParams.create(CAMPAIGN, 1, range(300), 8, QuantConfig(clip=1.0, bits=24))


class GarbageDealer(SecAggClient):
    """A client whose every share ciphertext is corrupted: its holders cannot use its shares."""

    def share_keys(self, msg: dict[str, Any]) -> dict[str, Any]:
        reply = super().share_keys(msg)
        return {**reply, "ciphertext": [_flip(ct, 20) for ct in reply["ciphertext"]]}


def test_a_dealer_whose_shares_its_holders_reject_stops_the_round_before_any_share_is_revealed() -> None:
    rnd = Round()
    cheat = IDS[2]
    rnd.clients[cheat] = GarbageDealer(cheat, IDENTITIES[cheat][0], CAMPAIGN)
    with pytest.raises(SecAggAbort, match=rf"client {cheat}'s shares: 4 of its 4 live holders report them invalid"):
        rnd.run_until("consistency")
    assert not rnd.server._b_shares and not rnd.server._s_shares
