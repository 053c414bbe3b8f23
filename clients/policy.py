"""A contributor's own privacy policy, the campaign parameters it pinned, and where its state lives.

Job
    :class:`ContributorPolicy` is what a contributor will accept, decided on its own machine (PEFT-config style:
    a typed, validated dataclass that saves to and loads from ``STATE_DIR/policy.toml``): DP required or not, the
    most ε it will ever spend, the least noise multiplier, the largest δ, its accountant, the smallest shard, secure
    mode, its secure-aggregation limits, and the most work it takes on per round (local steps, sequence length,
    rank, batch). :func:`load_policy` reads it for a round; ``fedtune join`` writes it from its flags
    (:func:`update_policy_file`); the simulation launcher writes one per virtual contributor
    (:func:`prepare_simulated_contributors`). :class:`CampaignPins` are the privacy and secure-aggregation
    parameters of the first campaign the contributor trained for, kept in ``STATE_DIR/pins.json``; a later round
    that asks for less protection is declined. :func:`campaign_refusal`, :meth:`CampaignPins.refusal` and
    :func:`shard_refusal` say why a round is declined, in words that carry no private number.

Threat
    The coordinator is the adversary of each contributor's data: it sends the campaign, so it may switch DP off,
    raise ε, lower the noise, grow δ, change the accountant, shrink the cohort, or name a folder for the state. None
    of that reaches a decision here except as something to check: the policy comes from the contributor's own
    state dir, the state dir from its own node config (``fedtune join --state-dir``) or, in simulation, from the
    local launcher's environment (:data:`SIMULATION_STATE_ROOT_ENV`), never from a message. Every check runs before
    training, so a refused round costs no ε. What a deployed contributor trains on is its own choice too
    (:func:`apply_own_data`): its ``--data``, or a public hub dataset, never a local path the coordinator names
    (any file this user can read, made training data). The coordinator also decides how much work a round is:
    without the work caps (:func:`work_refusal`), a campaign asking for a million local steps, million-token
    sequences, a rank of 10⁶ or a huge batch would hold the contributor's machine for days or exhaust its memory.

Pitfalls
    - A decline's reason travels to the coordinator: it names campaign and policy values only, never the shard
      size, an exact ε or σ (σ is calibrated from the shard size); the exact figures stay in
      :attr:`Refusal.detail`, which only the contributor's own log and ``rounds.jsonl`` see.
    - The reproducible switch (:data:`SIMULATION_SEED_ENV`) makes batches and noise recomputable by anyone who
      knows it: it is honoured only in simulation (no ``state-dir`` in the node config, a simulation state root
      set), ignored by a deployed contributor, and ``fedtune join`` refuses to start with it set.
    - Pins hold for the state dir's lifetime, across campaigns, like the accountant next to them: a fresh budget
      takes a fresh state dir, which is the contributor's own choice, never the coordinator's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from flwr.app import Context

from fedtune.config import CampaignConfig, SimulationSection, looks_local
from fedtune.files import atomic_write_text
from fedtune.privacy import delta_fits, resolve_delta

log = logging.getLogger("fedtune.client")

POLICY_FILE = "policy.toml"
PINS_FILE = "pins.json"
SIMULATION_STATE_ROOT_ENV = "FEDTUNE_SIMULATION_STATE_ROOT"
"""Set by the simulation launcher (``fedtune simulate``): the folder under which each virtual contributor keeps
its state (``sim-NNN/``). Local to the machine that runs the simulation; no message can set it."""
SIMULATION_SEED_ENV = "FEDTUNE_SIMULATION_SEED"
"""Local-only switch for reproducible simulations: batches and noise derived from this seed, the round and the
partition. Honoured in simulation only; ``fedtune join`` refuses to start while it is set."""


class PolicyError(ValueError):
    """A policy file or a contributor setup that cannot be used; ``str()`` is one actionable line."""


@dataclass(frozen=True)
class ContributorPolicy:
    """What this contributor accepts, whatever the coordinator sends. Defaults are the safe choice.

    Attributes
    ----------
    require_dp
        Decline campaigns that train without DP-SGD (``fedtune join --allow-no-dp`` turns it off).
    max_epsilon
        The most ε this contributor will ever spend, over every round of this state dir.
    min_noise_multiplier
        Decline a campaign whose calibration gives a smaller σ (each step would be close to an un-noised release).
    max_delta
        Decline a campaign whose δ is larger.
    accountant
        The accountant this contributor computes its ε with (``"prv"`` or ``"rdp"``); a campaign asking for
        another is declined.
    min_shard_size
        Decline training on fewer records (one record would weigh too much on what leaves the machine).
    secure_mode
        Opacus' secure mode: noise from a CSPRNG (``torchcsprng``) that resists floating-point attacks.
    require_secagg
        Train only in SecAgg+ rounds.
    secagg_min_cohort
        The smallest SecAgg+ cohort this contributor takes part in.
    secagg_security_bits
        Security parameter κ of the SecAgg+ sizing (failure probability 2^-κ).
    secagg_max_corrupt_fraction
        γ: the fraction of a cohort assumed to collude with the coordinator (Sybils included).
    secagg_max_dropout_fraction
        δ_drop: the fraction of a cohort assumed to drop out during a round.
    secagg_max_cohort
        The largest SecAgg+ cohort this contributor takes part in (each member checks every member's signature).
    max_local_steps
        Decline a round asking for more optimizer steps (the contributor's compute per round).
    max_seq_len
        Decline a campaign whose ``[data] max_seq_len`` is longer (memory grows with it, attention's quadratically).
    max_rank
        Decline a LoRA rank above this unless ``--max-rank`` takes on less (a rank of 10⁶ would exhaust memory).
    max_batch_size
        Decline a batch above this unless ``--batch-size`` takes on less.
    max_download_gb
        Decline a campaign whose hub base model (or hub dataset, without ``--data``) would take more to download.
    report_train_loss
        Send the round's mean train loss (coarse) with the update. Off by default: it is an un-noised function of
        the private shard evaluated on a model the coordinator chose, so a crafted adapter and a tiny batch turn it
        into a reading of single records that no ε covers.
    """

    require_dp: bool = True
    max_epsilon: float = 8.0
    min_noise_multiplier: float = 0.3
    max_delta: float = 1e-5
    accountant: Literal["prv", "rdp"] = "prv"
    min_shard_size: int = 32
    secure_mode: bool = False
    require_secagg: bool = False
    secagg_min_cohort: int = 3
    secagg_security_bits: int = 40
    secagg_max_corrupt_fraction: float = 0.2
    secagg_max_dropout_fraction: float = 0.2
    secagg_max_cohort: int = 10_000
    max_local_steps: int = 1000
    max_seq_len: int = 4096
    max_rank: int = 256
    max_batch_size: int = 1024
    max_download_gb: float = 50.0
    report_train_loss: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), typing.get_type_hints(ContributorPolicy)[f.name])
        checks = {
            "max_epsilon must be > 0": self.max_epsilon > 0,
            "min_noise_multiplier must be >= 0": self.min_noise_multiplier >= 0,
            "max_delta must be in (0, 1)": 0 < self.max_delta < 1,
            "min_shard_size must be >= 1": self.min_shard_size >= 1,
            "secagg_min_cohort must be >= 2": self.secagg_min_cohort >= 2,
            "secagg_max_cohort must be >= secagg_min_cohort": self.secagg_max_cohort >= self.secagg_min_cohort,
            "secagg_security_bits must be in [1, 128]": 1 <= self.secagg_security_bits <= 128,
            "secagg_max_corrupt_fraction must be in [0, 1)": 0 <= self.secagg_max_corrupt_fraction < 1,
            "secagg_max_dropout_fraction must be in [0, 1)": 0 <= self.secagg_max_dropout_fraction < 1,
            "secagg_max_corrupt_fraction + secagg_max_dropout_fraction must be < 1": (
                self.secagg_max_corrupt_fraction + self.secagg_max_dropout_fraction < 1
            ),
            "max_local_steps must be >= 1": self.max_local_steps >= 1,
            "max_seq_len must be >= 1": self.max_seq_len >= 1,
            "max_rank must be >= 1": self.max_rank >= 1,
            "max_batch_size must be >= 1": self.max_batch_size >= 1,
            "max_download_gb must be > 0": self.max_download_gb > 0,
        }
        for message, ok in checks.items():
            if not ok:
                raise PolicyError(f"contributor policy: {message}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """What this contributor accepts, on one line (``fedtune join`` prints it at start)."""
        dp = f"DP-SGD required, ε ≤ {self.max_epsilon:g} for good" if self.require_dp else "DP not required"
        secagg = f"SecAgg+ required (cohort ≥ {self.secagg_min_cohort})" if self.require_secagg else "SecAgg+ optional"
        return (
            f"{dp} (σ ≥ {self.min_noise_multiplier:g}, δ ≤ {self.max_delta:g}, {self.accountant}); {secagg}; per round "
            f"≤ {self.max_local_steps} steps, sequences ≤ {self.max_seq_len} tokens, rank ≤ {self.max_rank}, "
            f"batch ≤ {self.max_batch_size}; downloads ≤ {self.max_download_gb:g} GB; train loss "
            f"{'reported' if self.report_train_loss else 'kept'}"
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ContributorPolicy:
        """Build from a mapping (a parsed policy file); unknown keys are refused, missing ones take the default."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PolicyError(f"contributor policy: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**dict(values))

    def save(self, state_dir: str | os.PathLike[str]) -> Path:
        """Write ``STATE_DIR/policy.toml`` (atomically); returns its path."""
        import tomli_w

        path = Path(state_dir) / POLICY_FILE
        header = "# fedtune contributor policy: what this contributor accepts, whatever the coordinator sends.\n"
        atomic_write_text(path, header + tomli_w.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, state_dir: str | os.PathLike[str]) -> ContributorPolicy:
        """Read ``STATE_DIR/policy.toml``; the defaults when there is none."""
        path = Path(state_dir) / POLICY_FILE
        if not path.is_file():
            return cls()
        try:
            return cls.from_dict(tomllib.loads(path.read_text(encoding="utf-8")))
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{path}: not valid TOML: {exc}") from None
        except PolicyError as exc:
            raise PolicyError(f"{path}: {exc}") from None


def _check_type(name: str, value: Any, tp: Any) -> None:
    if get_origin(tp) is Literal:
        ok = value in get_args(tp)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise PolicyError(f"contributor policy: {name} must be {tp}, got {value!r}")


# -- where the contributor's state lives ---------------------------------------------------------------


def simulated_state_dir(root: str | os.PathLike[str], partition_id: int) -> Path:
    """Virtual contributor ``partition_id``'s state dir under the simulation's state root."""
    return Path(root) / f"sim-{int(partition_id):03d}"


def _partition_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", 0))


def simulating(context: Context) -> bool:
    """Whether this ClientApp is a virtual contributor of a local simulation (not a deployed contributor)."""
    return "state-dir" not in context.node_config and bool(os.environ.get(SIMULATION_STATE_ROOT_ENV))


def contributor_state_dir(context: Context) -> Path:
    """This contributor's own state dir: ``--state-dir`` when deployed, the launcher's folder in simulation.

    Never a path the coordinator sends: the node config is the contributor's, the environment the local launcher's.

    Raises
    ------
    PolicyError
        When neither is set.
    """
    node = context.node_config
    if "state-dir" in node:
        return Path(str(node["state-dir"]))
    root = os.environ.get(SIMULATION_STATE_ROOT_ENV)
    if root:
        return simulated_state_dir(root, _partition_id(context))
    raise PolicyError(
        "no state dir for this contributor: start it with `fedtune join --state-dir DIR` (node config 'state-dir') "
        f"or `fedtune simulate` (which sets {SIMULATION_STATE_ROOT_ENV})"
    )


def names_local_path(source: str) -> bool:
    """Whether a data source or model name would be read from this machine rather than fetched from the hub:
    written as a path, or a hub-id-shaped name (``org/name``) that exists where the contributor runs."""
    return looks_local(source) or Path(source).expanduser().exists()


def own_data(node_config: Mapping[str, Any]) -> str:
    """The contributor's own data (``fedtune join --data``, node config ``data``), or ``""`` when it has none."""
    return str(node_config.get("data", ""))


def apply_own_data(cfg: CampaignConfig, context: Context) -> Refusal | None:
    """Make ``cfg`` the campaign as this contributor runs it, or say why it will not train on the campaign's data.

    A deployed contributor trains on its own data (``fedtune join --data``, node config ``data``) or, without it, on
    a public hub dataset the campaign names; a local path from the coordinator (``~/.ssh/id_rsa``, a diary, a
    folder ``datasets`` would read) is declined before it is opened. ``[simulation]`` is the researcher's local
    launcher's section: a deployed contributor ignores it (its ``extra_data`` named more local files, even next to
    ``--data``). A virtual contributor of ``fedtune simulate`` takes the researcher's campaign as it is.
    """
    if simulating(context):
        return None
    cfg.simulation = SimulationSection()
    own = own_data(context.node_config)
    if own:
        cfg.data.source = own
        return None
    if names_local_path(cfg.data.source):
        return Refusal(
            "the campaign names local data; this contributor trains only on its own (fedtune join --data) or on a "
            "public hub dataset"
        )
    return None


def load_policy(context: Context) -> ContributorPolicy:
    """The contributor's policy for this round: its ``policy.toml``, or the defaults.

    A ``max-epsilon`` in the node config (the contributor's own, set by ``fedtune join --max-epsilon``) can only
    lower the file's ``max_epsilon``.
    """
    policy = ContributorPolicy.load(contributor_state_dir(context))
    cap = context.node_config.get("max-epsilon")
    if cap is not None and float(cap) < policy.max_epsilon:
        policy = dataclasses.replace(policy, max_epsilon=float(cap))
    return policy


def simulation_seed(context: Context) -> int | None:
    """The reproducible-simulation seed (:data:`SIMULATION_SEED_ENV`), or ``None``: always ``None`` when deployed."""
    raw = os.environ.get(SIMULATION_SEED_ENV)
    if raw is None:
        return None
    if not simulating(context):
        log.warning("ignoring %s: only a simulated contributor may draw reproducible batches", SIMULATION_SEED_ENV)
        return None
    try:
        return int(raw)
    except ValueError:
        raise PolicyError(f"{SIMULATION_SEED_ENV} must be an integer, got {raw!r}") from None


def update_policy_file(state_dir: str | os.PathLike[str], changes: Mapping[str, Any]) -> ContributorPolicy:
    """Apply ``changes`` (``None`` values skipped) to ``STATE_DIR/policy.toml`` (or the defaults) and save it.

    What ``fedtune join`` calls with its flags: what a flag does not say stays as the file (or the default) has it.
    """
    current = ContributorPolicy.load(state_dir)
    policy = dataclasses.replace(current, **{k: v for k, v in changes.items() if v is not None})
    policy.save(state_dir)
    return policy


def simulated_policy(cfg: CampaignConfig, partition_id: int) -> ContributorPolicy:
    """A virtual contributor's policy, written by the local launcher: the researcher's campaign is its own.

    It accepts the campaign as configured (its DP mechanism, any noise multiplier, accountant, δ and
    secure-aggregation minimum: an ablation at ε = 10⁵ is the researcher's to run), caps
    ε at the campaign's target or at ``[privacy] personal_max_epsilon``'s entry for the partition, and keeps the
    defaults for everything else (the work caps raised to the campaign's, if it asks for more; the train loss
    reported, since the researcher owns the data). Later rounds cannot change it: it is a file in the
    contributor's state dir.
    """
    priv, sec = cfg.privacy, cfg.secure_aggregation
    cap = priv.personal_max_epsilon.get(str(partition_id))
    return ContributorPolicy(
        max_local_steps=max(ContributorPolicy.max_local_steps, cfg.federation.local_steps),
        max_seq_len=max(ContributorPolicy.max_seq_len, cfg.data.max_seq_len),
        max_rank=max(ContributorPolicy.max_rank, cfg.lora.rank),
        max_batch_size=max(ContributorPolicy.max_batch_size, cfg.federation.batch_size),
        require_dp=priv.mechanism == "dp-sgd",
        min_noise_multiplier=0.0,
        max_epsilon=float(cap if cap is not None else priv.target_epsilon),
        max_delta=max(ContributorPolicy.max_delta, resolve_delta(priv.delta or None)),
        accountant=priv.accountant,
        require_secagg=sec.protocol == "secagg+",
        secagg_min_cohort=sec.min_cohort,
        secagg_max_cohort=max(ContributorPolicy.secagg_max_cohort, cfg.simulation.contributors),
        report_train_loss=True,
    )


def prepare_simulated_contributors(cfg: CampaignConfig, root: str | os.PathLike[str]) -> None:
    """Write each virtual contributor's policy file under ``root``, unless it already has one (a resumed run)."""
    for partition in range(cfg.simulation.contributors):
        folder = simulated_state_dir(root, partition)
        if not (folder / POLICY_FILE).is_file():
            simulated_policy(cfg, partition).save(folder)


# -- why a round is declined ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """Why a contributor declines a round: ``reason`` goes to the coordinator, ``detail`` stays on the machine."""

    reason: str
    detail: str = ""


def campaign_refusal(policy: ContributorPolicy, cfg: CampaignConfig, secure: bool) -> Refusal | None:
    """What the policy says about the campaign as sent (before the shard or the accountant are looked at).

    Parameters
    ----------
    policy
        The contributor's policy.
    cfg
        The campaign of this round's request.
    secure
        Whether the request is a SecAgg+ round (the ``advertise`` stage), not a plain ``train`` message.
    """
    priv, sec = cfg.privacy, cfg.secure_aggregation
    if priv.mechanism == "none":
        if policy.require_dp:
            return Refusal(
                "the campaign trains without differential privacy; this contributor's policy requires DP-SGD"
            )
    else:
        if priv.accountant != policy.accountant:
            return Refusal(
                f"the campaign asks for the {priv.accountant} accountant; this contributor accounts with "
                f"{policy.accountant}"
            )
        delta = resolve_delta(priv.delta or None)
        if delta > policy.max_delta:
            return Refusal(f"the campaign's δ={delta:g} is above this contributor's maximum {policy.max_delta:g}")
    if policy.require_secagg and not (secure and sec.protocol == "secagg+"):
        return Refusal("this contributor's policy requires secure aggregation (SecAgg+); this round is not one")
    if policy.secure_mode:
        from .trainer import secure_mode_missing

        missing = secure_mode_missing()
        if missing is not None:
            return Refusal("this contributor's policy requires Opacus' secure mode, unavailable here", missing)
    return None


def work_refusal(
    policy: ContributorPolicy, cfg: CampaignConfig, rank: int | None = None, batch_size: int | None = None
) -> Refusal | None:
    """Whether the round asks for more work than the policy's caps (checked before anything is loaded for it).

    ``rank`` and ``batch_size`` are what this contributor takes on (``--max-rank``, ``--batch-size``; the
    campaign's when ``None``): taking on less than a cap is how a contributor accepts a bigger campaign.
    """
    fed = cfg.federation
    over = [
        f"{name} {asked} above this contributor's maximum {cap}"
        for name, asked, cap in (
            ("local_steps", fed.local_steps, policy.max_local_steps),
            ("max_seq_len", cfg.data.max_seq_len, policy.max_seq_len),
            ("rank", cfg.lora.rank if rank is None else rank, policy.max_rank),
            ("batch_size", fed.batch_size if batch_size is None else batch_size, policy.max_batch_size),
        )
        if asked > cap
    ]
    if not over:
        return None
    return Refusal(f"the campaign asks for more work than this contributor takes on: {'; '.join(over)}")


def download_refusal(policy: ContributorPolicy, cfg: CampaignConfig) -> Refusal | None:
    """Whether the campaign's hub base (and, without ``--data``, its hub dataset) would pass ``max_download_gb``.

    Asked of the hub's file list before anything is fetched; a base already in the local cache costs nothing. A
    hub the contributor cannot ask says nothing here: the download that follows fails the same way.
    """
    from fnmatch import fnmatch

    from huggingface_hub import HfApi, snapshot_download

    from fedtune.config import is_builtin
    from fedtune.ml.model import HUB_MODEL_FILES

    wanted: list[tuple[str, str, Callable[[], Any], list[str]]] = []  # (what, repo id, its file list, the files)
    model = cfg.model
    if not is_builtin(model.name) and not names_local_path(model.name):
        try:
            snapshot_download(
                model.name, revision=model.revision, allow_patterns=HUB_MODEL_FILES, local_files_only=True
            )
        except Exception:  # not in the local cache: it would be fetched
            info = functools.partial(HfApi().model_info, model.name, revision=model.revision, files_metadata=True)
            wanted.append(("base model", model.name, info, HUB_MODEL_FILES))
    if cfg.data.source and not names_local_path(cfg.data.source):
        info = functools.partial(HfApi().dataset_info, cfg.data.source, files_metadata=True)
        wanted.append(("dataset", cfg.data.source, info, ["*"]))
    for what, repo, info, patterns in wanted:
        try:
            siblings = info().siblings or []
        except Exception:
            continue
        size = sum(s.size or 0 for s in siblings if any(fnmatch(s.rfilename, p) for p in patterns))
        if size > policy.max_download_gb * 2**30:
            return Refusal(
                f"the campaign's {what} {repo} is {size / 2**30:.1f} GB to download, above this contributor's "
                f"maximum {policy.max_download_gb:g} GB"
            )
    return None


def shard_refusal(policy: ContributorPolicy, shard_size: int, delta: float | None) -> Refusal | None:
    """Whether the shard fits the policy (at least ``min_shard_size``) and, under DP, δ (``δ ≤ 1/(10 n)``).

    The reason says which rules, not the size: a decline reveals only that ``n`` is outside these bounds.
    """
    fits_delta = delta is None or delta_fits(delta, shard_size)
    if shard_size < policy.min_shard_size or not fits_delta:
        rule = "" if delta is None else f" and δ={delta:g} at most 1/(10 × records)"
        return Refusal(
            f"this contributor's shard does not fit its policy: at least {policy.min_shard_size} records{rule}",
            f"shard of {shard_size} records",
        )
    return None


@dataclass(frozen=True)
class CampaignPins:
    """The privacy and secure-aggregation parameters of the first campaign round this contributor trained for.

    ``secagg_neighbours`` and ``secagg_threshold`` use the campaign's convention: 0 means chosen from the cohort.
    """

    campaign: str
    mechanism: str
    target_epsilon: float
    delta: float
    secure_aggregation: bool
    secagg_min_cohort: int
    secagg_neighbours: int
    secagg_threshold: int

    @classmethod
    def of(cls, cfg: CampaignConfig) -> CampaignPins:
        priv, sec = cfg.privacy, cfg.secure_aggregation
        return cls(
            campaign=cfg.campaign.name,
            mechanism=priv.mechanism,
            target_epsilon=priv.target_epsilon,
            delta=resolve_delta(priv.delta or None),
            secure_aggregation=sec.protocol == "secagg+",
            secagg_min_cohort=sec.min_cohort,
            secagg_neighbours=sec.neighbours,
            secagg_threshold=sec.threshold,
        )

    @classmethod
    def load(cls, state_dir: str | os.PathLike[str]) -> CampaignPins | None:
        """The pins in ``STATE_DIR/pins.json``, or ``None`` before the first accepted round."""
        path = Path(state_dir) / PINS_FILE
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as exc:
            raise PolicyError(f"{path}: unreadable pins ({exc}); restore it or start from a fresh state dir") from None

    def save(self, state_dir: str | os.PathLike[str]) -> None:
        atomic_write_text(Path(state_dir) / PINS_FILE, json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    def refusal(self, now: CampaignPins) -> Refusal | None:
        """Why ``now`` (this round's campaign) asks for less protection than the pinned first one, if it does."""
        weaker = []
        if self.mechanism == "dp-sgd" and now.mechanism != "dp-sgd":
            weaker.append(f"mechanism {now.mechanism!r} instead of 'dp-sgd'")
        if now.target_epsilon > self.target_epsilon:
            weaker.append(f"target ε {now.target_epsilon:g} above {self.target_epsilon:g}")
        if now.delta > self.delta:
            weaker.append(f"δ {now.delta:g} above {self.delta:g}")
        if self.secure_aggregation:
            if not now.secure_aggregation:
                weaker.append("no secure aggregation")
            else:
                if now.secagg_min_cohort < self.secagg_min_cohort:
                    weaker.append(
                        f"secure-aggregation minimum cohort {now.secagg_min_cohort} below {self.secagg_min_cohort}"
                    )
                for name, old, new in (
                    ("neighbours", self.secagg_neighbours, now.secagg_neighbours),
                    ("threshold", self.secagg_threshold, now.secagg_threshold),
                ):
                    if not (new == old or 0 < old < new):
                        weaker.append(f"secure-aggregation {name} {new or 'auto'} instead of {old or 'auto'}")
        if not weaker:
            return None
        return Refusal(
            f"the campaign asks for weaker settings than the first one this contributor accepted "
            f"({self.campaign!r}): {'; '.join(weaker)}"
        )
