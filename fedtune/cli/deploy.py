"""CLI commands of the deployment path: ``coordinate``, ``join``, ``approve`` and ``doctor``.

:func:`add_deploy_parsers` registers them on ``fedtune``'s sub-command parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HOME_HELP = "(default $FEDTUNE_COORDINATOR_HOME, else ~/.fedtune/coordinator)"


def cmd_coordinate(args: argparse.Namespace) -> int:
    from fedtune.server.coordinator import coordinate

    return coordinate(
        Path(args.config),
        Path(args.run_dir) if args.run_dir else None,
        args.address,
        insecure=args.insecure,
        bind=args.bind,
        home=Path(args.home) if args.home else None,
    )


def cmd_join(args: argparse.Namespace) -> int:
    from fedtune.clients.join import JoinOptions, run_join

    opts = JoinOptions(
        coordinator=args.coordinator,
        state_dir=Path(args.state_dir),
        gpu=args.gpu,
        data=Path(args.data) if args.data else None,
        root_cert=Path(args.root_cert) if args.root_cert else None,
        name=args.name or "",
        team=args.team or "",
        max_epsilon=args.max_epsilon,
        insecure=args.insecure,
        port=args.port,
        partition_id=args.partition_id,
        num_partitions=args.num_partitions,
        benchmark_s=args.benchmark_seconds,
        enrol_wait_s=args.enrol_wait,
        verbose=args.verbose,
    )
    return run_join(opts)


def cmd_approve(args: argparse.Namespace) -> int:
    from fedtune.deploy.home import approve, home_path

    try:
        entry = approve(Path(args.keyfile), args.home, args.name)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"approved {entry.name} in {home_path(args.home) / 'contributors.allow'} "
        f"(a running coordinator registers it within seconds; every campaign of this coordinator accepts it)"
    )
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from fedtune.deploy.doctor import run_doctor

    if args.root_cert and not args.coordinator:
        print("error: --root-cert needs --coordinator HOST:PORT (whose certificate it checks)", file=sys.stderr)
        return 2
    return run_doctor(
        coordinator=args.coordinator, gpu=args.gpu, root_cert=Path(args.root_cert) if args.root_cert else None
    )


def add_deploy_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``coordinate``, ``join``, ``approve`` and ``doctor`` on ``fedtune``'s sub-commands."""
    co = sub.add_parser("coordinate", help="run a campaign across contributors' machines (Flower SuperLink)")
    co.add_argument("config", help="campaign TOML file, e.g. experiments/quickstart.toml")
    co.add_argument(
        "--address",
        default="127.0.0.1:9092",
        help="HOST:PORT contributors dial (the TLS certificate covers HOST; default 127.0.0.1:9092)",
    )
    co.add_argument("--bind", help="interface the public port listens on (default: HOST if loopback, else 0.0.0.0)")
    co.add_argument("--run-dir", help="run dir (default: [campaign] run_dir); an existing one is resumed")
    co.add_argument(
        "--home",
        help=f"coordinator home: CA, server certificate, approved contributors {HOME_HELP}",
    )
    co.add_argument("--insecure", action="store_true", help="no TLS and no contributor authentication (testing only)")
    co.set_defaults(func=cmd_coordinate)

    jo = sub.add_parser("join", help="contribute this machine to a coordinator's campaign (Flower SuperNode)")
    jo.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    jo.add_argument("--gpu", type=int, help="CUDA device index to contribute (default: CPU)")
    jo.add_argument("--data", help="folder or file with this contributor's own training data")
    jo.add_argument(
        "--state-dir",
        default=str(Path("~/.fedtune/contributor").expanduser()),
        help="keys, privacy budget and round log (default ~/.fedtune/contributor)",
    )
    jo.add_argument("--root-cert", help="the coordinator's CA certificate (ca.pem)")
    jo.add_argument("--name", help="display name in the credit ledger")
    jo.add_argument("--team", help="team name in the credit ledger")
    jo.add_argument("--max-epsilon", type=float, help="lifetime privacy budget ε this contributor accepts")
    jo.add_argument("--insecure", action="store_true", help="dial without TLS (only with an --insecure coordinator)")
    jo.add_argument("--port", type=int, default=9094, help="local port of the SuperNode (one per node on a host)")
    jo.add_argument("--partition-id", type=int, default=0, help=argparse.SUPPRESS)
    jo.add_argument("--num-partitions", type=int, default=1, help=argparse.SUPPRESS)
    jo.add_argument("--benchmark-seconds", type=float, default=2.5, help=argparse.SUPPRESS)
    jo.add_argument(
        "--enrol-wait",
        type=float,
        default=600.0,
        help="seconds to keep retrying while the coordinator has not approved the key (default 600)",
    )
    jo.add_argument("--verbose", action="store_true", help="show the SuperNode's log")
    jo.set_defaults(func=cmd_join)

    ap = sub.add_parser("approve", help="allow a contributor's public key to join this coordinator's campaigns")
    ap.add_argument("keyfile", help="the contributor's supernode.pub")
    ap.add_argument("--home", help=f"coordinator home {HOME_HELP}")
    ap.add_argument("--name", help="display name (default: the key's comment)")
    ap.set_defaults(func=cmd_approve)

    do = sub.add_parser("doctor", help="check this installation, torch/CUDA and the coordinator's reachability")
    do.add_argument("--coordinator", help="HOST:PORT of a coordinator: TLS handshake, certificate, exposed APIs")
    do.add_argument("--root-cert", help="the coordinator's CA certificate (ca.pem) to verify its certificate against")
    do.add_argument("--gpu", type=int, help="CUDA device index that join would use")
    do.set_defaults(func=cmd_doctor)
