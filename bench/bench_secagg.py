"""Benchmark fedtune's SecAgg+ core against Flower 1.42's own SecAgg+ (in process, no networking).

For each cohort size n and vector size L, 10% of the cohort drops after sharing keys (the costly
case: the server must rebuild those clients' pairwise masks). Measured per side:

* client masking: everything a client does when it uploads (decrypt shares, quantize, add masks);
* server unmasking: reconstruct secrets, remove self-masks and dropped pairwise masks, dequantize;
* upload bytes per parameter.

fedtune runs every client for real and checks the unmasked sum against the plain sum. Flower's side
calls the SecAgg+ client mod's own stage functions (``secaggplus_mod._setup`` ... ``_unmask``) and
replays the workflow's unmask loop with its own utilities (``combine_shares``, ``pseudo_rand_gen``,
``generate_shared_key``, ndarray arithmetic); only ``--flower-samples`` clients mask a full vector,
the rest upload a placeholder of the same size, which leaves the server's work unchanged.

Usage::

    python bench/bench_secagg.py --quick --out bench_secagg.json
    python bench/bench_secagg.py --out bench_secagg.json            # 10..200 clients, 1M and 10M
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedtune.secagg import (
    QuantConfig,
    SecAggClient,
    SecAggParams,
    SecAggPolicy,
    SecAggServer,
    effective_degree,
    generate_identity,
    quantize,
    size_round,
)
from fedtune.secagg.quantize import max_bits

CAMPAIGN = "bench"


@dataclass(frozen=True)
class Case:
    """One benchmark configuration, shared by both implementations."""

    cohort: int
    length: int
    neighbours: int  # effective degree k (Flower: num_shares = k + 1, itself included)
    threshold: int
    bits: int
    clip: float
    dropped: int

    @classmethod
    def make(cls, cohort: int, length: int, dropout: float, bits: int, clip: float) -> Case:
        """k and t sized for the contributors' default policy (σ = 40, γ = δ = 0.2), the same for Flower."""
        k, t = size_round(cohort, SecAggPolicy())
        return cls(
            cohort,
            length,
            effective_degree(cohort, k),
            t,
            min(bits, max_bits(cohort)),
            clip,
            round(dropout * cohort),
        )


@contextmanager
def _timer(sink: list[float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    sink.append(time.perf_counter() - start)


def _split_ids(case: Case, seed: int) -> tuple[list[int], set[int]]:
    """Client ids 1..n and the ones that drop after sharing keys."""
    ids = list(range(1, case.cohort + 1))
    return ids, set(random.Random(seed).sample(ids, case.dropped))


def _input_factory(length: int, seed: int) -> Callable[[int], np.ndarray]:
    """Cheap distinct float32 updates: one random base scaled per client."""
    base = np.random.default_rng(seed).normal(0.0, 0.01, length).astype(np.float32)
    return lambda cid: base * np.float32(1.0 + 0.01 * (cid % 50))


def bench_fedtune(case: Case, seed: int, verify: bool) -> dict[str, Any]:
    """Run one full fedtune round; every surviving client masks its real vector."""
    ids, dropped = _split_ids(case, seed)
    identities = {cid: generate_identity() for cid in ids}
    registry = {cid: pub for cid, (_, pub) in identities.items()}
    quant = QuantConfig(clip=case.clip, bits=case.bits)
    params = SecAggParams.create(
        CAMPAIGN, 1, ids, case.length, quant, neighbours=case.neighbours, threshold=case.threshold
    )
    server = SecAggServer(params, registry)
    clients = {
        cid: SecAggClient(cid, key, CAMPAIGN, rng=np.random.default_rng(seed + cid))
        for cid, (key, _) in identities.items()
    }
    make_input = _input_factory(case.length, seed)
    setup: list[float] = []
    with _timer(setup):  # advertise, view, share_keys
        for stage in ("advertise", "view", "share_keys"):
            for cid, msg in server.requests(stage).items():
                server.receive(clients[cid].handle(msg))
    mask_times: list[float] = []
    collect: list[float] = []
    upload_bytes = 0
    expected = np.zeros(case.length, dtype=np.uint32) if verify else None
    for cid, msg in server.masked_input_requests().items():
        if cid in dropped:
            continue
        x = make_input(cid)
        with _timer(mask_times):
            reply = clients[cid].masked_input(msg, x)
        upload_bytes = reply["masked"].nbytes
        with _timer(collect):
            server.receive_masked_input(reply)
        if expected is not None:
            expected += quantize(x, quant, np.random.default_rng(seed + cid))
    for cid, msg in server.consistency_requests().items():
        server.receive_consistency(clients[cid].consistency_check(msg))
    for cid, msg in server.unmask_requests().items():
        server.receive_unmask(clients[cid].unmask(msg))
    unmask: list[float] = []
    with _timer(unmask):
        result = server.result()
        result.mean()
    exact = None if expected is None else bool(np.array_equal(expected, result.total))
    if exact is False:
        raise AssertionError(f"fedtune unmasked sum differs from the plain sum for {case}")
    return {
        "setup_s": setup[0],
        "client_mask_s": float(np.mean(mask_times)),
        "clients_masked": len(mask_times),
        "server_collect_s_per_client": float(np.mean(collect)),
        "server_unmask_s": unmask[0],
        "upload_bytes_per_param": upload_bytes / case.length,
        "verified_exact": exact,
    }


def bench_flower(case: Case, seed: int, samples: int) -> dict[str, Any]:
    """Flower 1.42 SecAgg+ with its own client-mod stage functions and workflow unmask steps."""
    from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_extract,
        get_parameters_shape,
        parameters_addition,
        parameters_mod,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize
    from flwr.common.secure_aggregation.secaggplus_constants import Key
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    # the package re-exports the mod function under the module's name, so import the module itself
    fmod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    samples = max(1, samples)
    ids, dropped = _split_ids(case, seed)
    mod_range, target_range = 1 << 32, 1 << case.bits
    num_shares = case.neighbours + 1
    setup_cfg = {
        Key.SAMPLE_NUMBER: case.cohort,
        Key.SHARE_NUMBER: num_shares,
        Key.THRESHOLD: case.threshold,
        Key.CLIPPING_RANGE: case.clip,
        Key.TARGET_RANGE: target_range,
        Key.MOD_RANGE: mod_range,
        Key.MAX_WEIGHT: 1.0,
    }
    setup: list[float] = []
    with _timer(setup):
        states: dict[int, Any] = {}
        pks: dict[int, list[bytes]] = {}
        for cid in ids:  # stage 0 (workflow.setup_stage + mod._setup)
            states[cid] = fmod.SecAggPlusState(nid=cid)
            res = fmod._setup(states[cid], setup_cfg)
            pks[cid] = [res[Key.PUBLIC_KEY_1], res[Key.PUBLIC_KEY_2]]
        order = ids[:]
        random.Random(seed + 1).shuffle(order)  # independent of the dropout draw
        half = num_shares >> 1
        neighbours = {
            nid: {order[(i + off) % case.cohort] for off in range(-half, half + 1)} for i, nid in enumerate(order)
        }
        fwd: dict[int, tuple[list[int], list[bytes]]] = {cid: ([], []) for cid in ids}
        for cid in ids:  # stage 1 (workflow.share_keys_stage + mod._share_keys)
            res = fmod._share_keys(states[cid], {str(v): pks[v] for v in neighbours[cid]})
            for dst, ct in zip(res[Key.DESTINATION_LIST], res[Key.CIPHERTEXT_LIST], strict=True):
                fwd[dst][0].append(cid)
                fwd[dst][1].append(ct)
    make_input = _input_factory(case.length, seed)
    survivors = [cid for cid in ids if cid not in dropped]
    mask_times: list[float] = []
    aggregate = None
    placeholder = None
    for cid in survivors:  # stage 2 (mod._collect_masked_vectors), full vectors for `samples` clients
        cfg = {Key.CIPHERTEXT_LIST: fwd[cid][1], Key.SOURCE_LIST: fwd[cid][0]}
        full = len(mask_times) < samples
        params = ndarrays_to_parameters([make_input(cid) if full else np.zeros(1, np.float32)])
        with _timer(mask_times if full else []):
            res = fmod._collect_masked_vectors(states[cid], cfg, 1, params)
        masked = [bytes_to_ndarray(b) for b in res[Key.MASKED_PARAMETERS]]
        if full:
            upload = sum(len(b) for b in res[Key.MASKED_PARAMETERS])
            placeholder = masked
        vec = masked if full else placeholder
        aggregate = vec if aggregate is None else parameters_addition(aggregate, vec)
    assert aggregate is not None
    masked_vector = parameters_mod(aggregate, mod_range)
    active, dead = set(survivors), set(dropped)
    collected: dict[int, list[bytes]] = {cid: [] for cid in ids}
    for cid in survivors:  # stage 3 (mod._unmask)
        res = fmod._unmask(
            states[cid],
            {
                Key.ACTIVE_NODE_ID_LIST: list(neighbours[cid] & active),
                Key.DEAD_NODE_ID_LIST: list(neighbours[cid] & dead),
            },
        )
        for owner, share in zip(res[Key.NODE_ID_LIST], res[Key.SHARE_LIST], strict=True):
            collected[owner].append(share)
    unmask: list[float] = []
    with _timer(unmask):  # workflow.unmask_stage, same steps
        for nid, share_list in collected.items():
            secret = combine_shares(share_list)
            if nid in active:
                mask = pseudo_rand_gen(secret, mod_range, get_parameters_shape(masked_vector))
                masked_vector = parameters_subtraction(masked_vector, mask)
                continue
            for other in neighbours[nid] - {nid}:
                key = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(pks[other][0]))
                mask = pseudo_rand_gen(key, mod_range, get_parameters_shape(masked_vector))
                op = parameters_addition if nid > other else parameters_subtraction
                masked_vector = op(masked_vector, mask)
        recon = parameters_mod(masked_vector, mod_range)
        q_total, recon = factor_extract(recon)
        out = dequantize(recon, case.clip, target_range)
        for vec in out:
            vec += -(len(active) - 1) * case.clip
            vec *= target_range / q_total
    verified = None
    if len(mask_times) == len(survivors):  # every client masked its real vector: check the mean
        true = np.mean([np.clip(make_input(c), -case.clip, case.clip) for c in survivors], axis=0)
        verified = bool(np.max(np.abs(out[0] - true)) <= 2 * case.clip / (target_range - 1))
    return {
        "setup_s": setup[0],
        "client_mask_s": float(np.mean(mask_times)),
        "clients_masked": len(mask_times),
        "server_unmask_s": unmask[0],
        "upload_bytes_per_param": upload / case.length,
        "verified_mean": verified,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| n | params | k | t | dropped | fedtune mask s | Flower mask s | ratio | fedtune unmask s | "
        "Flower unmask s | ratio | bytes/param (fedtune / Flower) | exact |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        c, f, fl = r["case"], r["fedtune"], r.get("flower")
        fmt = "{:.3f}".format
        fl_mask = fmt(fl["client_mask_s"]) if fl else "-"
        fl_unmask = fmt(fl["server_unmask_s"]) if fl else "-"
        r_mask = f"{fl['client_mask_s'] / f['client_mask_s']:.1f}x" if fl else "-"
        r_unmask = f"{fl['server_unmask_s'] / f['server_unmask_s']:.1f}x" if fl else "-"
        fl_bytes = f"{fl['upload_bytes_per_param']:.2f}" if fl else "-"
        lines.append(
            f"| {c['cohort']} | {c['length']:,} | {c['neighbours']} | {c['threshold']} | {c['dropped']} | "
            f"{fmt(f['client_mask_s'])} | {fl_mask} | {r_mask} | {fmt(f['server_unmask_s'])} | {fl_unmask} | "
            f"{r_unmask} | {f['upload_bytes_per_param']:.2f} / {fl_bytes} | {f['verified_exact']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every case, print a Markdown table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="cohorts 10, 50 at 1M parameters")
    ap.add_argument("--cohorts", type=int, nargs="+", default=None)
    ap.add_argument("--params", type=float, nargs="+", default=None, help="vector sizes, e.g. 1e6 1e7")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--clip", type=float, default=8.0)
    ap.add_argument("--flower-samples", type=int, default=2, help="Flower clients that mask a full vector")
    ap.add_argument("--no-flower", action="store_true")
    ap.add_argument("--verify-max", type=float, default=5e8, help="verify exact sums when n*L <= this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_secagg.json")
    args = ap.parse_args(argv)
    cohorts = args.cohorts or ([10, 50] if args.quick else [10, 50, 100, 200])
    sizes = [int(p) for p in (args.params or ([1e6] if args.quick else [1e6, 1e7]))]
    rows = []
    for length in sizes:
        for n in cohorts:
            case = Case.make(n, length, args.dropout, args.bits, args.clip)
            row: dict[str, Any] = {"case": asdict(case)}
            print(f"# n={n} L={length:,} k={case.neighbours} t={case.threshold}", file=sys.stderr, flush=True)
            row["fedtune"] = bench_fedtune(case, args.seed, verify=n * length <= args.verify_max)
            if not args.no_flower:
                row["flower"] = bench_flower(case, args.seed, args.flower_samples)
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    table = _table(rows)
    print(table)
    meta = {"python": sys.version.split()[0], "machine": platform.machine(), "numpy": np.__version__}
    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "args": vars(args), "rows": rows, "table": table}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
