"""What SecAgg+'s malicious-coordinator checks cost: one in-process round before and after, side by side.

* ``before``: the protocol at ``--before`` (git revision; default ``1449ff1``, SecAgg+ that trusted the coordinator
  for k, t, graph seed and key directory), loaded from git into this process, with its defaults
  k = 2⌈1.5·log2 n⌉, t = ⌊k/2⌋ + 1 (five stages);
* ``after``: the current protocol (six stages: signed view, commit-reveal graph, share hashes, survivor quorum)
  with k and t sized for the default policy (σ = 40, γ = δ = 0.2);
* ``after, old k``: the current protocol at the old k and t (policy relaxed to accept them), which separates
  what the extra stage and checks cost from what the larger degree costs.

Every client and the server run in this process, one after the other, on the same inputs; 10% of the cohort
drops after sharing keys. Per side: CPU seconds of the whole round (every client plus the server), the mean per
client and the server's, and bytes per contributor on Flower's wire (the protobuf size of each request to it and
each reply from it, as :mod:`fedtune.wire` builds them), with and without the masked vector itself.

    python bench/bench_secagg_checks.py [--cohorts 10 100] [--params 1e5 1e6] [--out bench_secagg_checks.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from flwr.common.serde import recorddict_to_proto

import fedtune.secagg.protocol as after
from fedtune.secagg import QuantConfig, SecAggPolicy, generate_identity, quantize, size_round
from fedtune.wire import SecAggReply, SecAggRequest

REPO = Path(__file__).resolve().parents[1]
CAMPAIGN = "bench"


def load_before(revision: str) -> ModuleType:
    """``fedtune/secagg/protocol.py`` at ``revision`` as a module (its crypto, Shamir and quantization are today's)."""
    src = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{revision}:fedtune/secagg/protocol.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    name = "fedtune_secagg_protocol_before"
    spec = importlib.util.spec_from_loader(name, loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(src, f"{revision}:fedtune/secagg/protocol.py", "exec"), module.__dict__)
    return module


def wire_bytes(msg: dict[str, Any], reply: bool) -> tuple[int, int]:
    """(total, of which masked vector) protobuf bytes of a protocol message as fedtune.wire sends it."""
    content = (SecAggReply(msg) if reply else SecAggRequest(msg)).content()
    total = recorddict_to_proto(content).ByteSize()
    return total, sum(v.nbytes for v in msg.values() if isinstance(v, np.ndarray))


def run(side: str, proto: ModuleType, n: int, length: int, k: int, t: int, seed: int) -> dict[str, Any]:
    """One round of ``proto`` on n clients; returns times, bytes and whether the sum is exact."""
    ids = list(range(1, n + 1))
    dropped = set(random.Random(seed).sample(ids, round(0.1 * n)))
    identities = {c: generate_identity() for c in ids}
    registry = {c: public for c, (_, public) in identities.items()}
    quant = QuantConfig(clip=1.0, bits=16)
    base = np.random.default_rng(seed).normal(0.0, 0.05, length)
    inputs = {c: base * (1.0 + 0.01 * c) for c in ids}
    if side == "before":
        params = proto.SecAggParams.create(CAMPAIGN, 1, ids, length, quant, neighbours=k, threshold=t)
        server = proto.SecAggServer(params, registry)
        clients = {
            c: proto.SecAggClient(c, key, registry, CAMPAIGN, rng=np.random.default_rng(c))
            for c, (key, _) in identities.items()
        }
    else:
        policy = SecAggPolicy() if side == "after" else SecAggPolicy(corrupt_fraction=0.0)
        params = proto.SecAggParams.create(CAMPAIGN, 1, ids, length, quant, neighbours=k, threshold=t, policy=policy)
        server = proto.SecAggServer(params, registry, policy)
        clients = {
            c: proto.SecAggClient(c, key, CAMPAIGN, policy=policy, rng=np.random.default_rng(c))
            for c, (key, _) in identities.items()
        }
    cpu: dict[int, float] = defaultdict(float)
    down: dict[int, int] = defaultdict(int)
    up: dict[int, int] = defaultdict(int)
    vector_bytes = 0
    server_s = 0.0
    for stage in proto.STAGES:
        start = time.process_time()
        requests = server.requests(stage)
        server_s += time.process_time() - start
        for u, msg in requests.items():
            if u in dropped and stage == "masked_input":  # later stages no longer address it
                continue
            down[u] += wire_bytes(msg, reply=False)[0]
            start = time.process_time()
            reply = clients[u].handle(msg, inputs[u])
            cpu[u] += time.process_time() - start
            size, vec = wire_bytes(reply, reply=True)
            up[u] += size
            vector_bytes = max(vector_bytes, vec)
            start = time.process_time()
            server.receive(reply)
            server_s += time.process_time() - start
    start = time.process_time()
    result = server.result()
    server_s += time.process_time() - start
    exact = sum(quantize(inputs[c], quant, np.random.default_rng(c)) for c in result.survivors)
    survivors = [c for c in ids if c not in dropped]
    return {
        "side": side,
        "n": n,
        "length": length,
        "k": params.neighbours,
        "t": params.threshold,
        "stages": len(proto.STAGES),
        "round_cpu_s": sum(cpu.values()) + server_s,
        "client_cpu_s": float(np.mean([cpu[c] for c in survivors])),
        "server_cpu_s": server_s,
        "down_bytes": float(np.mean([down[c] for c in survivors])),
        "up_bytes": float(np.mean([up[c] for c in survivors])),
        "masked_vector_bytes": vector_bytes,
        "exact": bool(np.array_equal(exact, result.total)),
    }


def old_default(n: int) -> tuple[int, int]:
    """The defaults before: k = 2⌈1.5·log2 n⌉ (at most n − 1), t = ⌊k/2⌋ + 1 on the effective degree."""
    k = min(n - 1, 2 * math.ceil(1.5 * math.log2(n)))
    degree = min(n - 1, k + k % 2)
    return k, degree // 2 + 1


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| n | params | side | k | t | stages | round CPU s | per client s | server s | down B / contributor "
        "| up B / contributor (masked vector excluded) | exact |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['length']:,} | {r['side']} | {r['k']} | {r['t']} | {r['stages']} | "
            f"{r['round_cpu_s']:.2f} | {r['client_cpu_s']:.4f} | {r['server_cpu_s']:.3f} | {r['down_bytes']:,.0f} | "
            f"{r['up_bytes']:,.0f} ({r['up_bytes'] - r['masked_vector_bytes']:,.0f}) | {r['exact']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cohorts", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--params", type=float, nargs="+", default=[1e5])
    ap.add_argument("--before", default="1449ff1", help="git revision of the protocol before the checks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    before = load_before(args.before)
    rows = []
    for length in (int(p) for p in args.params):
        for n in args.cohorts:
            k_old, t_old = old_default(n)
            sized = size_round(n, SecAggPolicy())
            for side, proto, (k, t) in (
                ("before", before, (k_old, t_old)),
                ("after", after, sized),
                ("after, old k", after, (k_old, t_old)),
            ):
                row = run(side, proto, n, length, k, t, args.seed)
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
