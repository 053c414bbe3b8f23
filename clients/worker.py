"""The resident contributor worker: one long-lived process serves every ClientApp task of a SuperNode.

Job
    ``fedtune join`` starts the SuperNode with ``--isolation process``: it then starts no ClientApp process of its
    own and waits for one on its Runtime API (``127.0.0.1:PORT``, the SuperNode's ``--port``). This module is that
    process. It loops: claim the next task (``AcquireTask``), pull its message, context, run and app bundle (FAB),
    check the bundle (:func:`fedtune.deploy.bundle.verify_fab`, the same check as the ``flwr-clientapp`` shim), run
    the message through the installed :data:`fedtune.clients.app.app` in this process, push the reply and the task's
    context back (as Flower's own runner does: ``flwr/supernode/runtime/run_clientapp.py``), and repeat. The model,
    tokenizer and shard stay in :data:`fedtune.clients.workspace.CACHE` across rounds and SecAgg+ stages, so a
    campaign pays its imports and model load once (Flower's stock executor starts a fresh process per message and
    pays them for every message). ``STATE_DIR/worker.json`` says which process served what and how often it built
    the model (``model_loads``); the log goes to ``STATE_DIR/worker.log`` (written by ``join``).

Threat
    The coordinator (or anyone who can submit a run to it) shipping code to the contributor. The bundle is checked
    before anything from it is used, for every task, and a refused bundle fails closed: the task is answered with an
    error, nothing is installed or imported from it (this worker never unpacks a bundle: the code it runs is the
    installed fedtune, which an accepted bundle can only carry byte-identical copies of). Other local users who can
    reach the loopback Runtime API could claim tasks: ``join`` gives the SuperNode and this worker a shared secret
    (Flower's SuperExec authentication of ``AcquireTask``), so only this worker gets the tokens.

Pitfalls
    - This is Flower-internal surface (the Runtime API client, ``pull_task_input``, ``push_message``,
      ``push_task_output``; and the SuperNode loop's ``time`` and ``_push_messages``, which :func:`run_supernode`
      replaces so that the SuperNode polls its SuperLink sooner after a message and pushes the reply to the message
      it just pulled (:class:`ReplyForLatest`, which also wraps ``InMemoryNodeState.store_message``), and its
      ``pull_objects`` back-off; ``pull_task_input``'s object pull back-off, :func:`tune_object_pulls`): pyproject
      pins ``flwr`` to the version this was written against (:data:`FLWR_VERSION`), and ``tests/unit/test_worker.py``
      fails loudly if those change shape. Everything Flower-internal that a contributor runs is imported here and
      nowhere else.
    - Flower keeps the current task's identity in a process-global (``TaskIdentity``, which ``Message`` reads);
      ``pull_task_input`` sets it anew for each task, so it must stay the first call of a task.
    - One task at a time: the SuperNode hands out one message per run at a time and waits for its reply.
    - Flower's task heartbeat helper raises SIGINT in its process when a heartbeat is refused; in a resident
      process that would stop the worker, so the heartbeat here is this module's own thread, which only logs.
    - Threads: torch's intra-op threads are pinned (``--threads``) before the first task, and the launching ``join``
      sets ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for the libraries that read them at import.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

FLWR_VERSION = "1.42.0"
"""The flwr version whose internal Runtime API this module uses (pyproject pins it)."""
WORKER_FILE = "worker.json"
WORKER_LOG = "worker.log"
HEARTBEAT_INTERVAL_S = 20.0
"""Flower's task heartbeat interval is 30 s with a patience of 2; 20 s keeps a long training task alive."""

log = logging.getLogger("fedtune.worker")


def default_threads(gpu: bool) -> int:
    """Torch threads when ``--threads`` is not given: 4 feeding a GPU, else half this machine's cores (≥ 1)."""
    return 4 if gpu else max(1, (os.cpu_count() or 2) // 2)


def pin_threads(n: int) -> None:
    """Pin the math libraries' thread pools to ``n`` (env for those that read it at import, torch's own)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)


# -- the Flower-internal surface ---------------------------------------------------------------------------------


def flower_surface() -> dict[str, Any]:
    """The Flower internals this worker uses, by name (imported here only; the unit test checks their shape)."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import RetryInvoker, exponential
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    return {
        "Message": Message,
        "Error": Error,
        "ErrorCode": ErrorCode,
        "SubStatus": SubStatus,
        "AcquireTaskRequest": AcquireTaskRequest,
        "SendTaskHeartbeatRequest": SendTaskHeartbeatRequest,
        "TaskType": TaskType,
        "RuntimeTokenHttpInterceptor": RuntimeTokenHttpInterceptor,
        "RuntimeVersionHttpInterceptor": RuntimeVersionHttpInterceptor,
        "SuperExecAuthHttpInterceptor": SuperExecAuthHttpInterceptor,
        "RetryInvoker": RetryInvoker,
        "exponential": exponential,
        "RuntimeHttpClient": RuntimeHttpClient,
        "pull_task_input": pull_task_input,
        "push_message": push_message,
        "push_task_output": push_task_output,
    }


OBJECT_PULL = {"initial_backoff": 0.02, "backoff_cap": 0.5, "max_time": 90.0}
"""How a task pulls its message's objects from the SuperNode. Flower waits 1 s, then 2, 4 … 10 s, for up to 2 h:
right for a process started after the SuperNode stored the message, but a resident worker claims a task the moment
it exists, while the SuperNode is still fetching the objects (seen: 1–7 s lost per message, six SecAgg+ stages).
And it must give up sooner: when a run stops while the SuperNode fetches one of its messages, Flower 1.42 leaves
that task pending with objects that never arrive (``RunNotRunningException`` is a ``BaseException`` and skips the
SuperNode's clean-up); a process per task just hangs for 2 h, but the one resident worker would block every later
task (seen: a coordinator restart, the next round's message never served). 90 s: a message whose objects take
longer to reach the SuperNode (a very large adapter on a slow link) fails; ``--object-wait`` raises it."""


def tune_object_pulls(max_time_s: float | None = None) -> None:
    """Make Flower's ``pull_task_input`` (in this process) retry unavailable objects every 20 ms … 0.5 s, for at
    most ``max_time_s`` (default :data:`OBJECT_PULL`)."""
    import flwr.supernode.runtime.run_clientapp as runner

    pull = runner.pull_and_inflate_object_from_tree
    if getattr(pull, "fedtune_tuned", False):
        pull = pull.func
    if max_time_s is not None or not getattr(runner.pull_and_inflate_object_from_tree, "fedtune_tuned", False):
        options = {**OBJECT_PULL, **({"max_time": float(max_time_s)} if max_time_s is not None else {})}
        tuned = functools.partial(pull, **options)
        tuned.fedtune_tuned = True  # type: ignore[attr-defined]
        runner.pull_and_inflate_object_from_tree = tuned


RETRYABLE_STATUS = frozenset({502, 503, 504})


def retry_invoker(surface: dict[str, Any], max_tries: int | None, max_time_s: float | None) -> Any:
    """Bounded retries of the Runtime API calls, without Flower's default side effects.

    Flower's ``make_simple_http_retry_invoker`` retries forever and answers an HTTP 401 by sending SIGINT to its own
    process: right for a one-task process, wrong for a resident one (an expired task's token would stop the worker).
    """
    import httpx

    def give_up(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code not in RETRYABLE_STATUS
        return False

    return surface["RetryInvoker"](
        lambda: surface["exponential"](base_delay=0.2, max_delay=5),
        (httpx.TransportError, httpx.HTTPStatusError),
        max_tries=max_tries,
        max_time=max_time_s,
        should_giveup=give_up,
    )


class WorkerStopped(BaseException):
    """SIGTERM/SIGINT arrived while a task ran: the task is reported failed and the worker exits.

    A ``BaseException``, like ``KeyboardInterrupt``: the ``except Exception`` of the code it interrupts (data
    loading, the ClientApp's error handling) must not turn a stop into a failed round and carry on."""


@dataclass
class Poll:
    """Bounded back-off for claiming tasks: ``low`` for ``hold_s`` after a task, then ×``growth`` to ``high``.

    The hold is for SecAgg+: its next stage reaches the SuperNode a fraction of a second after this worker's reply
    (seen, with back-off from the first idle poll: 0.1–0.4 s between the SuperNode holding a stage and this worker
    claiming it, on four stages a round). Not while ``busy()`` (a round's training runs in the background of this
    process): polling would then take CPU from training, whose end the round waits for anyway. Idle, it backs off
    as before.
    """

    low: float = 0.05
    high: float = 0.5
    growth: float = 1.5
    hold_s: float = 1.5
    current: float = 0.05
    held_until: float = 0.0
    busy: Callable[[], bool] = lambda: False

    def reset(self) -> None:
        self.current = self.low
        self.held_until = time.monotonic() + self.hold_s

    def next(self) -> float:
        if time.monotonic() < self.held_until and not self.busy():
            return self.low
        wait = self.current
        self.current = min(self.high, self.current * self.growth)
        return wait


@dataclass
class Stats:
    """What ``worker.json`` holds: who served what, how often the model was built."""

    pid: int = field(default_factory=os.getpid)
    started: float = field(default_factory=time.time)
    threads: int = 0
    tasks: int = 0
    failed: int = 0
    refused_bundles: int = 0
    by_type: Counter = field(default_factory=Counter)
    serving: dict[str, Any] | None = None
    task_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        from .workspace import CACHE

        return {
            "pid": self.pid,
            "started": self.started,
            "flwr_version": FLWR_VERSION,
            "threads": self.threads,
            "tasks": self.tasks,
            "failed": self.failed,
            "refused_bundles": self.refused_bundles,
            "by_type": dict(self.by_type),
            "serving": self.serving,
            "task_s": round(self.task_s, 3),
            "model_loads": int(CACHE.counts["build_model"]),
            "shard_loads": int(CACHE.counts["load_shard"]),
            "build_model_s": round(float(CACHE.counts["build_model_s"]), 3),
        }


class Worker:
    """Claims and serves the tasks of one SuperNode, one at a time, in this process."""

    def __init__(
        self,
        runtime_api_address: str,
        state_dir: Path,
        auth_secret: bytes | None = None,
        poll: Poll | None = None,
        handler: Callable[[Any, Any], Any] | None = None,
    ) -> None:
        self.f = flower_surface()
        tune_object_pulls()
        self.address = runtime_api_address
        self.state_dir = state_dir
        self.auth_secret = auth_secret
        self.poll = poll or Poll()
        self.stats = Stats()
        self._handler = handler
        self._verified: set[str] = set()  # sha256 of bundles verify_fab accepted
        self._busy = False
        self.stop = threading.Event()
        self._claimer = self._client()

    # the ClientApp, imported once
    def handler(self) -> Callable[[Any, Any], Any]:
        if self._handler is None:
            from fedtune.clients.app import app

            self._handler = app
        return self._handler

    def _client(self, token: str | None = None) -> Any:
        """A Runtime API client: the claimer's (no token: one try, the loop backs off) or a task's (its token)."""
        f = self.f
        interceptors: list[Any] = [f["RuntimeVersionHttpInterceptor"](component_name="flwr-clientapp")]
        if token is not None:
            interceptors.append(f["RuntimeTokenHttpInterceptor"](token))
        elif self.auth_secret:
            interceptors.append(
                f["SuperExecAuthHttpInterceptor"](
                    master_secret=self.auth_secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}
                )
            )
        client = f["RuntimeHttpClient"].from_server_address(
            server_address=self.address,
            insecure=True,  # loopback only: join binds the SuperNode's Runtime API to 127.0.0.1
            root_certificates=None,
            interceptors=interceptors,
            retry_invoker=retry_invoker(f, 1, None) if token is None else retry_invoker(f, None, 60.0),
        )
        return client

    def write_stats(self) -> None:
        target = self.state_dir / WORKER_FILE
        partial = target.with_suffix(".partial")
        partial.write_text(json.dumps(self.stats.as_dict(), sort_keys=True) + "\n", encoding="utf-8")
        os.replace(partial, target)

    # -- signals
    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: stopping", signum)
            self.stop.set()
            if self._busy:
                raise WorkerStopped(f"signal {signum}")

        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, on_signal)

    # -- the loop
    def acquire(self) -> tuple[Any, str] | None:
        """Claim the oldest pending ClientApp task, or ``None``."""
        f = self.f
        res = self._claimer.AcquireTask(
            f["AcquireTaskRequest"](supported_task_types=[str(f["TaskType"].CLIENT_APP)], agentapp_fab_hashes=[])
        )
        if res.HasField("task") and res.token:
            return res.task, res.token
        return None

    def serve(self, max_tasks: int | None = None, idle_exit_s: float | None = None) -> int:
        """Serve tasks until stopped (or ``max_tasks`` served, or idle ``idle_exit_s``); the number served."""
        served, idle_since, failures = 0, time.monotonic(), 0
        self.write_stats()
        while not self.stop.is_set():
            try:
                claimed = self.acquire()
                failures = 0
            except Exception as exc:  # the SuperNode is starting or restarting: keep polling, bounded
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("cannot claim tasks from the SuperNode (%d tries): %s", failures, exc)
                claimed = None
                self.stop.wait(self.poll.high)
            if claimed is None:
                if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    break
                self.stop.wait(self.poll.next())
                continue
            task, token = claimed
            try:
                self.run_task(task, token)
            except WorkerStopped:
                break
            served += 1
            self.poll.reset()
            idle_since = time.monotonic()
            if max_tasks is not None and served >= max_tasks:
                break
        self.write_stats()
        return served

    def _heartbeat(self, client: Any, done: threading.Event) -> None:
        req = self.f["SendTaskHeartbeatRequest"]()
        try:
            while not done.wait(HEARTBEAT_INTERVAL_S):
                try:
                    if not client.SendTaskHeartbeat(req).success:
                        log.warning("the SuperNode no longer accepts this task's heartbeat (it expired)")
                        return
                except Exception as exc:
                    log.warning("task heartbeat failed: %s", exc)
        finally:
            client.close()

    def run_task(self, task: Any, token: str) -> None:
        """One task: pull, check the bundle, run the ClientApp, push reply and context (Flower's runner, in-process)."""
        f = self.f
        from fedtune.deploy.bundle import BundleRefused, verify_fab

        log.info("claimed task %d", task.task_id)
        client = self._client(token)
        done = threading.Event()
        beat = threading.Thread(  # its own client: never shares a connection the task is using or closing
            target=self._heartbeat, args=(self._client(token), done), daemon=True, name="task-heartbeat"
        )
        message = context = reply = None
        sub_status, details = f["SubStatus"].FAILED, "ClientApp task failed due to unknown reason"
        start = time.perf_counter()
        self._busy = True
        try:
            beat.start()
            message, context, _run, fab = f["pull_task_input"](client)
            kind = message.metadata.message_type
            self.stats.serving = {"task_id": int(task.task_id), "message_type": kind, "since": time.time()}
            self.write_stats()
            digest = hashlib.sha256(fab.content).hexdigest()
            if digest not in self._verified:
                try:
                    verify_fab(fab.content, "clientapp")
                except BundleRefused as exc:
                    self.stats.refused_bundles += 1
                    log.error("refused the app bundle of run %s: %s", context.run_id, exc)
                    details = f"{type(exc)}:<'{exc}'>"
                    reply = f["Message"](f["Error"](code=f["ErrorCode"].INVALID_FAB, reason=details), reply_to=message)
                    return
                self._verified.add(digest)
            log.info("task %d: %s (run %s)", task.task_id, kind, context.run_id)
            reply = self.handler()(message=message, context=context)
            sub_status, details = f["SubStatus"].COMPLETED, ""
            self.stats.by_type[kind] += 1
        except WorkerStopped:
            details = "the contributor's worker was stopped"
            if (retry := getattr(client, "_retry_invoker", None)) is not None:
                retry.max_tries = 1  # as Flower's runner does on exit: report once, do not hang
            raise
        except Exception as exc:
            log.exception("the ClientApp raised")
            details = f"{type(exc)}:<'{exc}'>"
            if message is not None:
                reply = f["Message"](
                    f["Error"](code=f["ErrorCode"].CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message
                )
        finally:
            self._busy = False
            done.set()
            try:
                if reply is not None and context is not None:
                    f["push_message"](client, reply, context)
            except Exception:
                log.exception("could not push the reply")
                sub_status = f["SubStatus"].FAILED
            f["push_task_output"](client=client, context=context, sub_status=sub_status, details=details)
            client.close()
            self.stats.tasks += 1
            self.stats.failed += sub_status != f["SubStatus"].COMPLETED
            self.stats.task_s += time.perf_counter() - start
            self.stats.serving = None
            self.write_stats()


# -- the SuperNode's own polling ----------------------------------------------------------------------------------


class SuperNodeClock:
    """Stands in for the ``time`` module of ``flwr.supernode.start_client_internal`` (the SuperNode's main loop).

    Flower's SuperNode sleeps 3 s whenever the SuperLink has no message for it and 0.5 s between checks for the
    local reply: with six SecAgg+ stages a round that is seconds of waiting per round. Here an idle SuperNode polls
    every ``low`` s for ``hold`` s after its last message (the next SecAgg+ stage follows within a second; backing
    off from the first idle poll cost 0.1–0.3 s a stage), then backs off ×``growth`` to Flower's 3 s (the
    SuperLink's load stays what Flower planned once a node is idle), and checks for the local reply every
    ``local`` s (a local lookup, cheap).
    """

    def __init__(
        self, low: float = 0.1, high: float = 3.0, growth: float = 1.5, local: float = 0.05, hold: float = 1.5
    ) -> None:
        self.low, self.high, self.growth, self.local, self.hold = low, high, growth, local, hold
        self.idle = low
        self.held_until = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def reset(self) -> None:
        self.idle = self.low
        self.held_until = time.monotonic() + self.hold

    def sleep(self, seconds: float) -> None:
        if seconds >= 1.0:  # Flower's idle wait: nothing from the SuperLink
            if time.monotonic() < self.held_until:
                wait = self.low
            else:
                wait, self.idle = self.idle, min(self.high, self.idle * self.growth)
            time.sleep(min(wait, seconds))
        else:  # waiting for the reply of the task in progress
            self.reset()
            time.sleep(min(seconds, self.local))


SUPERLINK_OBJECT_PULL = {"initial_backoff": 0.1, "backoff_cap": 1.0}
"""How the SuperNode retries a message's objects that the SuperLink does not hold yet (the ServerApp is still
pushing them). Flower waits 1, 2, 4, 8, 10, 10 … s: seen as 22–35 s between a round's message and its training,
for a 728 KB adapter on loopback. Here 0.1 s doubling to 1 s (at most two requests a second per object in flight)."""


class ReplyForLatest:
    """Keeps the SuperNode's push step waiting until the message it just pulled has its reply.

    Flower's SuperNode loop pulls one message, waits for *a* reply in its state, pushes every reply there and pulls
    the next. After a coordinator restart a reply can come from a stale task: the loop pulled a message of the old
    run, the resident worker claimed it at once (before the objects were in) and answered it, but the SuperNode had
    already dropped the run as no longer running, without deleting the message. That late reply satisfied the wait
    for the new run's message, was pushed (and ignored by the SuperLink), and the new run's reply then sat in the
    state with no push step left to send it: the coordinator waited a round timeout for a contributor that had
    answered (seen in ``test_private_secure_campaign_survives_a_coordinator_restart``: a SecAgg+ round aborted).
    Here the push step runs again while the last message pulled (:meth:`stored`) is still in the state (Flower
    deletes a message when its reply is pushed), so it only ever waits where Flower's own loop would have.
    """

    def __init__(self) -> None:
        self.latest: str | None = None

    def stored(self, message: Any) -> None:
        """Note a message the SuperNode stores; only the coordinator's (a reply has ``reply_to_message_id``)."""
        if not message.metadata.reply_to_message_id:
            self.latest = message.metadata.message_id

    def push(self, push: Callable[..., Any], state: Any, **kwargs: Any) -> None:
        """Flower's ``_push_messages(state=state, **kwargs)``, again until the latest message has been answered."""
        messages = getattr(state, "msg_store", None)  # InMemoryNodeState's; another state: Flower's loop as it is
        while True:
            push(state=state, **kwargs)
            if messages is None or self.latest is None or self.latest not in messages:
                return
            log.warning("a reply to an earlier message went first; waiting for the reply to %s", self.latest)


def run_supernode(argv: list[str], clock: SuperNodeClock | None = None) -> None:
    """``flower-supernode ARGV`` with :class:`SuperNodeClock` polling (Flower's polling if its loop changed shape)."""
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    clock = clock or SuperNodeClock()
    if isinstance(getattr(loop, "time", None), type(time)) and callable(getattr(loop, "_push_messages", None)):
        from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

        push, store_message, replies = loop._push_messages, InMemoryNodeState.store_message, ReplyForLatest()

        def store_and_note(self: InMemoryNodeState, message: Any) -> str | None:
            replies.stored(message)
            return store_message(self, message)

        def push_then_poll_soon(**kwargs: Any) -> None:  # Flower calls it with keywords only
            try:
                replies.push(push, **kwargs)
            finally:
                clock.reset()

        InMemoryNodeState.store_message = store_and_note  # type: ignore[method-assign]

        loop.time = clock  # type: ignore[assignment]
        loop._push_messages = push_then_poll_soon
        if callable(getattr(loop, "pull_objects", None)):  # a message's objects, from the SuperLink
            loop.pull_objects = functools.partial(loop.pull_objects, **SUPERLINK_OBJECT_PULL)
    else:
        print("fedtune: this flwr's SuperNode loop changed shape; keeping its own polling", file=sys.stderr)
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


def main(argv: list[str] | None = None) -> int:
    """``python -m fedtune.clients.worker --runtime-api-address 127.0.0.1:PORT --state-dir DIR [--threads N]``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["supernode"]:  # ``python -m fedtune.clients.worker supernode FLOWER-SUPERNODE-ARGS``
        run_supernode(argv[1:])
        return 0
    p = argparse.ArgumentParser(prog="fedtune-worker", description=__doc__.splitlines()[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT (loopback)")
    p.add_argument("--state-dir", required=True, type=Path)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: 4 on a GPU, else cores // 2)")
    p.add_argument("--gpu", action="store_true", help="the contributor trains on a GPU (for the default threads)")
    p.add_argument("--auth-secret-file", type=Path, help="shared secret for the SuperNode's AcquireTask")
    p.add_argument("--poll-min", type=float, default=0.05)
    p.add_argument("--poll-max", type=float, default=0.5)
    p.add_argument(
        "--object-wait", type=float, default=OBJECT_PULL["max_time"], help="seconds a task waits for its message"
    )
    p.add_argument("--idle-exit", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)  # a line per poll
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 PID: every thread's stack to the log
    threads = args.threads if args.threads > 0 else default_threads(args.gpu)
    pin_threads(threads)
    secret = args.auth_secret_file.read_bytes() if args.auth_secret_file else None
    state_dir = args.state_dir.expanduser().resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    from fedtune.clients.secagg_client import train_in_background, training_now

    poll = Poll(args.poll_min, args.poll_max, busy=training_now)
    worker = Worker(args.runtime_api_address, state_dir, secret, poll)
    tune_object_pulls(args.object_wait)
    worker.stats.threads = threads
    worker.install_signal_handlers()
    start = time.perf_counter()
    worker.handler()  # imports fedtune's ClientApp (torch, transformers, peft) once, before the first task
    train_in_background(True)  # this process serves every stage of its node: SecAgg+ keys overlap training
    log.info(
        "worker %d ready in %.1f s (%d threads), serving %s",
        os.getpid(),
        time.perf_counter() - start,
        threads,
        args.runtime_api_address,
    )
    served = worker.serve(idle_exit_s=args.idle_exit)
    log.info("worker %d stopped after %d tasks", os.getpid(), served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
