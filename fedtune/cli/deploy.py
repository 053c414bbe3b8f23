"""CLI commands of the deployment path: ``coordinate``, ``join``, ``approve`` and ``doctor``.

:func:`add_deploy_parsers` registers them on ``fedtune``'s sub-command parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

HOME_HELP = "(default $FEDTUNE_COORDINATOR_HOME, else ~/.fedtune/coordinator)"


def cmd_coordinate(args: argparse.Namespace) -> int:
    try:
        from fedtune.server.coordinator import coordinate

        return coordinate(
            Path(args.config),
            Path(args.run_dir) if args.run_dir else None,
            args.address,
            insecure=args.insecure,
            bind=args.bind,
            home=Path(args.home) if args.home else None,
        )
    except KeyboardInterrupt:  # Ctrl-C while validating, before the SuperLink started (it handles its own)
        print("interrupted: nothing was started", file=sys.stderr)
        return 130


def policy_changes(args: argparse.Namespace) -> dict[str, object]:
    """What ``join``'s policy flags set in the contributor's ``policy.toml`` (``None``: keep the file's value).

    DP is required unless this start says ``--allow-no-dp``; every other flag, when given, updates the file.
    """
    return {
        "require_dp": not args.allow_no_dp,
        "max_epsilon": args.max_epsilon,
        "min_noise_multiplier": args.min_noise_multiplier,
        "max_delta": args.max_delta,
        "accountant": args.accountant,
        "min_shard_size": args.min_shard_size,
        "secure_mode": args.secure_mode,
        "require_secagg": args.require_secagg,
        "secagg_min_cohort": args.secagg_min_cohort,
        "secagg_security_bits": args.secagg_security_bits,
        "secagg_max_corrupt_fraction": args.secagg_max_corrupt_fraction,
        "secagg_max_dropout_fraction": args.secagg_max_dropout_fraction,
        "secagg_max_cohort": args.secagg_max_cohort,
        "max_local_steps": args.max_local_steps,
        "max_seq_len": args.max_seq_len,
        "report_train_loss": args.report_train_loss,
    }


def join_policy(args: argparse.Namespace) -> tuple[Any, str | None]:
    """The contributor policy ``join``'s flags ask for, checked but not written: ``(policy, None)`` or an error line."""
    import os

    from fedtune.clients.policy import SIMULATION_SEED_ENV, ContributorPolicy, PolicyError

    if SIMULATION_SEED_ENV in os.environ:
        return None, (
            f"{SIMULATION_SEED_ENV} is set: it makes batches and noise reproducible, for simulations only; unset it"
        )
    changes = {k: v for k, v in policy_changes(args).items() if v is not None}
    try:
        policy = dataclasses.replace(ContributorPolicy.load(Path(args.state_dir).expanduser().resolve()), **changes)
    except (PolicyError, OSError) as exc:
        return None, str(exc)
    if policy.secure_mode:
        from fedtune.clients.trainer import secure_mode_missing  # the training stack: only when it matters

        if (missing := secure_mode_missing()) is not None:
            return None, missing
    return policy, None


def write_join_policy(args: argparse.Namespace) -> str | None:
    """Check the local-only switches and write the contributor's policy file; an error line, or ``None``."""
    policy, error = join_policy(args)
    if error is not None:
        return error
    try:
        policy.save(Path(args.state_dir).expanduser().resolve())
    except OSError as exc:
        return str(exc)
    return None


def cmd_join(args: argparse.Namespace) -> int:
    """Every argument is checked before anything is written: the policy flags here, the rest in ``run_join``."""
    from fedtune.clients.join import JoinOptions, run_join

    policy, error = join_policy(args)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    opts = JoinOptions(
        coordinator=args.coordinator,
        state_dir=Path(args.state_dir),
        gpu=args.gpu,
        cpu=args.cpu,
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
        connect_timeout_s=args.connect_timeout,
        max_rank=args.max_rank,
        batch_size=args.batch_size,
        micro_batch=args.micro_batch,
        verbose=args.verbose,
        threads=args.threads,
        resident=args.resident_worker,
    )
    from fedtune.cli.interrupt import become_subreaper, stop_descendants

    become_subreaper()  # the SuperNode's own children (flwr-clientapp) are found and stopped on Ctrl-C too
    try:
        code = run_join(opts, policy=policy)
    except KeyboardInterrupt:  # Ctrl-C before the SuperNode started (probe, benchmark, keys)
        print("interrupted: nothing was started; run the same fedtune join again", file=sys.stderr)
        code = 130
    if code == 130:
        stop_descendants()
    return code


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
    jo.add_argument("--gpu", type=int, help="CUDA device index to contribute (an error if torch cannot use it)")
    jo.add_argument("--cpu", action="store_true", help="contribute on the CPU (the default without --gpu)")
    jo.add_argument("--data", help="folder or file with this contributor's own training data")
    jo.add_argument(
        "--state-dir",
        default=str(Path("~/.fedtune/contributor").expanduser()),
        help="keys, privacy budget and round log (default ~/.fedtune/contributor)",
    )
    jo.add_argument("--root-cert", help="the coordinator's CA certificate (ca.pem)")
    jo.add_argument("--name", help="display name in the credit ledger")
    jo.add_argument("--team", help="team name in the credit ledger")
    policy = jo.add_argument_group(
        "privacy policy", "what this contributor accepts, kept in STATE_DIR/policy.toml (a flag given updates it)"
    )
    policy.add_argument("--max-epsilon", type=float, help="the most ε this contributor will ever spend (default 8)")
    policy.add_argument(
        "--allow-no-dp", action="store_true", help="also train for campaigns without DP-SGD (default: decline them)"
    )
    policy.add_argument("--min-noise-multiplier", type=float, help="decline a smaller DP-SGD noise σ (default 0.3)")
    policy.add_argument("--max-delta", type=float, help="decline a larger δ (default 1e-5)")
    policy.add_argument("--accountant", choices=["prv", "rdp"], help="the accountant ε is computed with (default prv)")
    policy.add_argument("--min-shard-size", type=int, help="decline training on fewer records (default 32)")
    policy.add_argument(
        "--secure-mode",
        action=argparse.BooleanOptionalAction,
        help="Opacus' secure mode (needs torchcsprng; default off)",
    )
    policy.add_argument(
        "--require-secagg",
        action=argparse.BooleanOptionalAction,
        help="train only in secure-aggregation rounds (default off)",
    )
    policy.add_argument("--secagg-min-cohort", type=int, help="smallest secure-aggregation cohort (default 3)")
    policy.add_argument("--secagg-max-cohort", type=int, help="largest secure-aggregation cohort (default 10000)")
    policy.add_argument("--secagg-security-bits", type=int, help="SecAgg+ security parameter κ (default 40)")
    policy.add_argument(
        "--secagg-max-corrupt-fraction", type=float, help="γ: cohort fraction assumed to collude (default 0.2)"
    )
    policy.add_argument(
        "--secagg-max-dropout-fraction", type=float, help="cohort fraction assumed to drop out (default 0.2)"
    )
    policy.add_argument(
        "--report-train-loss",
        action=argparse.BooleanOptionalAction,
        help="send each round's mean train loss, rounded, with the update (default off: no ε covers it)",
    )
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
    jo.add_argument(
        "--connect-timeout",
        type=float,
        default=120.0,
        help="seconds to keep trying to reach the coordinator before giving up (default 120)",
    )
    work = jo.add_argument_group(
        "work", "take on less than the campaign assigns, to fit this machine (never more; the campaign caps them)"
    )
    work.add_argument("--max-rank", type=int, help="largest LoRA rank to train (FFA campaigns aggregate it exactly)")
    work.add_argument("--batch-size", type=int, help="largest batch to train with")
    work.add_argument(
        "--max-local-steps", type=int, help="decline rounds of more local steps (default 1000; kept in policy.toml)"
    )
    work.add_argument(
        "--max-seq-len", type=int, help="decline campaigns with longer sequences (default 4096; kept in policy.toml)"
    )
    work.add_argument("--micro-batch", type=int, help="split each batch into micro-batches of this size (less memory)")
    work.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for training (default: 4 on a GPU, else half the CPU cores; one per contributor on a "
        "shared host)",
    )
    jo.add_argument(  # --no-resident-worker: Flower's process per message, each guarded by the shim (benchmarks)
        "--resident-worker", action=argparse.BooleanOptionalAction, default=True, help=argparse.SUPPRESS
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
