"""``fedtune simulate``: the whole campaign on one machine in Flower's simulation engine.

The launcher plays the contributors' side too: it writes each virtual contributor's own policy file and tells the
ClientApps where their state dirs are (``RUN/contributors/sim-NNN``) through the environment of this process,
which the Ray actors inherit. No message from the ServerApp can move a contributor's state or change its policy.

Threat: the network. Ray's GCS, raylet and worker servers listen on every interface of the machine, and by
default answer anyone (ShadowRay, CVE-2023-48022: whoever reaches the ports can run code in the workers, which here
hold every virtual contributor's shard). Ray cannot be kept on loopback (it rewrites ``127.0.0.1`` to the machine's
address), so each simulation turns on Ray's token authentication with a fresh random token that only this process
and the Ray processes it starts hold (:func:`private_ray_cluster`).

Pitfall: Flower runs the ServerApp in a thread the interpreter waits for at exit, and when its simulation engine
fails (Ray does not start, its actors die) nothing tells that thread, which goes on waiting for replies for a round
timeout. Here the ServerApp gets a :class:`StoppableGrid`: once the engine has stopped, the grid raises
:class:`EngineStopped` at the next call, so the thread ends and ``fedtune simulate`` exits with one line.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import sys
import threading
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedtune.clients.policy import SIMULATION_STATE_ROOT_ENV, prepare_simulated_contributors
from fedtune.config import CampaignConfig
from fedtune.rundir import RunDir

from .app import make_server_app
from .campaign import Reporter
from .failures import CampaignStopped

_TOKEN: list[str] = []  # the token this process set, once set


def private_ray_cluster() -> None:
    """Make the Ray cluster this process starts refuse every caller without this run's token.

    A new random token for each process, never one inherited or read from ``~/.ray/auth_token``: the cluster is
    this process's alone. Ray reads its authentication mode once, when ``ray`` is first imported, so this must run
    before that (``fedtune simulate`` calls it first thing); later calls keep the token. With Ray already imported,
    it keeps a token authentication the caller set up itself, and otherwise fails closed: it raises rather than
    start a cluster that answers anyone.
    """
    if _TOKEN and os.environ.get("RAY_AUTH_TOKEN") == _TOKEN[0]:
        return
    if "ray" in sys.modules:
        from ray._raylet import AuthenticationMode, get_authentication_mode

        if get_authentication_mode() != AuthenticationMode.TOKEN or not os.environ.get("RAY_AUTH_TOKEN"):
            raise RuntimeError(
                "ray was imported before fedtune set the simulation's token: its servers would answer anyone on "
                "the network; call fedtune.server.simulation.private_ray_cluster() before importing ray"
            )
        return  # token authentication on, with a token this process was given
    _TOKEN[:] = [secrets.token_hex(32)]
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=_TOKEN[0])


class EngineStopped(RuntimeError):
    """The simulation engine behind a :class:`StoppableGrid` has stopped: no reply will come."""


class StoppableGrid(Grid):
    """``grid`` as it is, except that every call raises :class:`EngineStopped` once ``stop`` is set."""

    def __init__(self, grid: Grid, stop: threading.Event) -> None:
        self._grid, self._stop = grid, stop

    def _live(self) -> Grid:
        if self._stop.is_set():
            raise EngineStopped("the simulation engine has stopped")
        return self._grid

    def set_run(self, run: Run) -> None:
        self._live().set_run(run)

    @property
    def run(self) -> Run:
        return self._live().run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._live().create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._live().get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._live().push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._live().pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._live().send_and_receive(messages, timeout=timeout)


def _engine_failure(exc: BaseException) -> str | None:
    """The innermost error of a failed simulation engine (Flower's "Simulation Runtime crashed"), else None."""
    chain, cause = [], exc
    while cause is not None and len(chain) < 20:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if not any("Simulation Runtime crashed" in str(e) for e in chain):
        return None
    root = chain[-1]
    return f"{type(root).__name__}: {str(root).strip().splitlines()[0] if str(root).strip() else 'no message'}"


def simulate(
    cfg: CampaignConfig,
    run_dir: RunDir,
    reporter: Reporter | None = None,
    verbose: bool = False,
    client_app: ClientApp | None = None,
) -> None:
    """Run every round with ``[simulation] contributors`` virtual SuperNodes (Ray actors).

    Parameters
    ----------
    cfg : CampaignConfig
        The validated campaign.
    run_dir : RunDir
        The created run directory.
    reporter : Reporter, optional
        Receives progress (default: the ``fedtune.server`` log).
    verbose : bool
        Show Flower's and Ray's logs.
    client_app : ClientApp, optional
        What the virtual contributors run; default: fedtune's own (``fedtune.clients.app.app``). Tests pass
        one that wraps it to play crashing contributors; it is sent to the Ray actors, so it must pickle.
    """
    from flwr.simulation import run_simulation

    if client_app is None:
        from fedtune.clients.app import app as client_app

    if not verbose:
        for name in ("flwr", "ray"):
            logging.getLogger(name).setLevel(logging.WARNING)
    contributors = run_dir.root / "contributors"
    prepare_simulated_contributors(cfg, contributors)
    os.environ[SIMULATION_STATE_ROOT_ENV] = str(contributors)  # before Ray starts: its workers inherit it
    private_ray_cluster()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sim = cfg.simulation
    backend_config = {
        "client_resources": {"num_cpus": sim.cpus_per_contributor, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": os.cpu_count() or 1,
            "logging_level": "ERROR" if not verbose else "INFO",
            "log_to_driver": verbose,
            "include_dashboard": False,
        },
    }
    engine_stopped = threading.Event()
    try:
        run_simulation(
            server_app=make_server_app(
                cfg, run_dir, reporter, wrap_grid=functools.partial(StoppableGrid, stop=engine_stopped)
            ),
            client_app=client_app,
            num_supernodes=sim.contributors,
            backend_config=backend_config,
            verbose_logging=verbose,
        )
    except RuntimeError as exc:
        if isinstance(exc, CampaignStopped) or (failure := _engine_failure(exc)) is None:
            raise
        raise CampaignStopped(
            f"the simulation engine (Ray) stopped: {failure} (with --verbose, Flower's and Ray's logs say more)"
        ) from exc
    finally:
        engine_stopped.set()  # ends the ServerApp's thread if it is still waiting for replies
