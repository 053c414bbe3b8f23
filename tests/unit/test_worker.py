"""The resident worker (:mod:`fedtune.clients.worker`): the Flower internals it uses still have the shape it was
written against (fails loudly on a flwr upgrade), and its task loop checks every bundle before running anything."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fedtune.clients.worker import FLWR_VERSION, ReplyForLatest, Worker, flower_surface

from ..bundles import fab, pyproject_text

ROOT = Path(__file__).resolve().parents[2]


def params(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_flower_internals_have_the_expected_shape() -> None:
    """If this fails after a flwr upgrade, re-read flwr/supernode/runtime/run_clientapp.py and adapt worker.py."""
    assert importlib.metadata.version("flwr") == FLWR_VERSION
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("flwr") and d.endswith(f"=={FLWR_VERSION}") for d in deps), deps
    f = flower_surface()
    assert params(f["pull_task_input"]) == ["client"]
    assert params(f["push_message"]) == ["client", "message", "context"]
    assert params(f["push_task_output"]) == ["client", "context", "sub_status", "details"]
    client = f["RuntimeHttpClient"]
    for method in ("AcquireTask", "PullTaskInput", "PullMessages", "PushMessages", "PushTaskOutput",
                   "SendTaskHeartbeat", "PullObject", "PushObject", "ConfirmMessageReceived"):  # fmt: skip
        assert callable(getattr(client, method)), method
    assert {"server_address", "insecure", "root_certificates", "interceptors", "retry_invoker"} <= set(
        params(client.from_server_address)
    )
    req = f["AcquireTaskRequest"](supported_task_types=["flwr-clientapp"], agentapp_fab_hashes=[])
    assert list(req.supported_task_types) == ["flwr-clientapp"]
    assert str(f["TaskType"].CLIENT_APP) == "flwr-clientapp"
    from flwr.proto.runtime_pb2 import AcquireTaskResponse

    assert {"task", "token"} <= {fd.name for fd in AcquireTaskResponse.DESCRIPTOR.fields}
    assert {"should_giveup", "max_tries", "max_time"} <= set(params(f["RetryInvoker"]))
    assert "max_delay" in params(f["exponential"])
    assert "master_secret" in params(f["SuperExecAuthHttpInterceptor"])
    assert f["ErrorCode"].INVALID_FAB and f["ErrorCode"].CLIENT_APP_RAISED_EXCEPTION
    assert f["SubStatus"].COMPLETED == "completed" and f["SubStatus"].FAILED == "failed"


def test_object_pulls_of_a_task_are_tuned_in_process() -> None:
    import flwr.supernode.runtime.run_clientapp as runner

    from fedtune.clients.worker import OBJECT_PULL, tune_object_pulls

    assert "pull_and_inflate_object_from_tree(" in inspect.getsource(runner.pull_task_input)
    tune_object_pulls()
    tune_object_pulls()  # idempotent
    pull = runner.pull_and_inflate_object_from_tree
    assert pull.keywords == OBJECT_PULL and not hasattr(pull.func, "keywords")
    tune_object_pulls(30.0)
    pull = runner.pull_and_inflate_object_from_tree
    assert pull.keywords == {**OBJECT_PULL, "max_time": 30.0} and not hasattr(pull.func, "keywords")
    tune_object_pulls()  # what the worker's __init__ does after main() set it: keeps main()'s
    assert runner.pull_and_inflate_object_from_tree.keywords["max_time"] == 30.0
    assert set(OBJECT_PULL) <= set(params(pull.func))


def test_supernode_has_process_isolation_and_superexec_auth() -> None:
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    args = _parse_args_run_supernode().parse_args(
        ["--insecure", "--isolation", "process", "--superexec-auth-secret-file", "x", "--port", "9999"]
    )
    assert args.isolation == "process" and args.superexec_auth_secret_file == "x" and args.port == 9999


class FakeClient:
    def close(self) -> None:
        pass

    def SendTaskHeartbeat(self, _req: Any) -> Any:  # noqa: N802 (Flower's name)
        return SimpleNamespace(success=True)


def fake_worker(tmp_path: Path, bundle: bytes, handler: Any) -> tuple[Worker, list[tuple[str, Any]]]:
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 7, 1, 1  # what pull_task_input sets
    worker = Worker("127.0.0.1:1", tmp_path, handler=handler)
    worker._client = lambda token=None: FakeClient()  # type: ignore[method-assign]
    calls: list[tuple[str, Any]] = []
    message = Message(RecordDict(), dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    worker.f = {
        **worker.f,
        "pull_task_input": lambda _c: (message, context, None, SimpleNamespace(content=bundle)),
        "push_message": lambda _c, reply, _ctx: calls.append(("reply", reply)),
        "push_task_output": lambda client, context, sub_status, details: calls.append(("output", sub_status)),
    }
    return worker, calls


def test_worker_refuses_a_foreign_bundle_before_running_anything(tmp_path: Path) -> None:
    ran: list[int] = []
    evil = fab({"pyproject.toml": pyproject_text("x:app").encode(), "fedtune/clients/app.py": b"print('evil')\n"})
    worker, calls = fake_worker(tmp_path, evil, lambda message, context: ran.append(1))
    worker.run_task(SimpleNamespace(task_id=7), "token")
    assert not ran
    (_, reply), (_, status) = calls
    assert reply.has_error() and "differs from the installed fedtune" in reply.error.reason
    assert status == "failed"
    stats = json.loads((tmp_path / "worker.json").read_text())
    assert stats["refused_bundles"] == 1 and stats["tasks"] == 1 and stats["failed"] == 1


def test_worker_serves_tasks_in_process_and_checks_each_bundle_once(tmp_path: Path) -> None:
    from flwr.app import Message, RecordDict

    ran: list[int] = []

    def handler(message: Message, context: Any) -> Message:
        ran.append(1)
        return Message(RecordDict(), reply_to=message)

    ok = fab({"pyproject.toml": pyproject_text("x:app").encode()})
    worker, calls = fake_worker(tmp_path, ok, handler)
    for task_id in (1, 2):
        worker.run_task(SimpleNamespace(task_id=task_id), "token")
    assert len(ran) == 2 and len(worker._verified) == 1
    assert [kind for kind, _ in calls] == ["reply", "output"] * 2
    assert [v for kind, v in calls if kind == "output"] == ["completed", "completed"]
    stats = json.loads((tmp_path / "worker.json").read_text())
    assert stats["by_type"] == {"train": 2} and stats["serving"] is None


def test_worker_reports_a_raising_clientapp(tmp_path: Path) -> None:
    def handler(message: Any, context: Any) -> Any:
        raise RuntimeError("boom")

    worker, calls = fake_worker(tmp_path, fab({"pyproject.toml": pyproject_text("x:app").encode()}), handler)
    worker.run_task(SimpleNamespace(task_id=1), "token")
    (_, reply), (_, status) = calls
    assert reply.has_error() and "boom" in reply.error.reason and status == "failed"


@pytest.mark.parametrize("gpu,expected_min", [(True, 4), (False, 1)])
def test_default_threads(gpu: bool, expected_min: int) -> None:
    from fedtune.clients.worker import default_threads

    assert default_threads(gpu) >= expected_min


def test_supernode_loop_still_has_what_the_polling_clock_replaces() -> None:
    import time as time_module

    import flwr.supernode.start_client_internal as loop

    assert loop.time is time_module and callable(loop._push_messages)
    from fedtune.clients.worker import SUPERLINK_OBJECT_PULL

    assert set(SUPERLINK_OBJECT_PULL) <= set(params(loop.pull_objects))
    assert "pull_objects(" in inspect.getsource(loop._pull_and_store_message)
    source = inspect.getsource(loop.start_client_internal)
    assert "time.sleep(3)" in source and "_push_messages(" in source  # the idle wait the clock shortens
    # what ReplyForLatest relies on: messages stored through store_message into msg_store, deleted once answered
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    assert "state.store_message(message)" in inspect.getsource(loop._pull_and_store_message)
    assert isinstance(InMemoryNodeState(ObjectStoreFactory().store()).msg_store, dict)
    assert "reply_to_message_id" in inspect.getsource(loop._push_messages)


def test_supernode_clock_polls_soon_after_a_message_and_backs_off_to_flowers_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedtune.clients import worker

    slept: list[float] = []
    monkeypatch.setattr(worker.time, "sleep", slept.append)
    clock = worker.SuperNodeClock(low=0.1, high=3.0, growth=2.0, local=0.05, hold=0.0)
    for _ in range(7):
        clock.sleep(3)
    clock.sleep(0.5)  # waiting for a reply: a message came
    clock.sleep(3)
    assert slept == [0.1, 0.2, 0.4, 0.8, 1.6, 3.0, 3.0, 0.05, 0.1]
    assert clock.monotonic  # everything else is the time module's


class FakeTime:
    """``time`` for the pollers: ``sleep`` advances ``monotonic`` and is recorded."""

    def __init__(self) -> None:
        self.now, self.slept = 1000.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 4))
        self.now += seconds


def test_pollers_hold_their_shortest_interval_after_a_message_then_back_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a message the next SecAgg+ stage comes within a second: both pollers keep their shortest interval
    for ``hold`` s, then back off; the worker's does not hold while a round's training runs in its background."""
    from fedtune.clients import worker

    fake = FakeTime()
    monkeypatch.setattr(worker, "time", fake)
    clock = worker.SuperNodeClock(low=0.1, high=3.0, growth=2.0, local=0.05, hold=0.33)
    clock.sleep(0.5)  # a message: waiting for its reply
    for _ in range(7):
        clock.sleep(3)
    assert fake.slept == [0.05, 0.1, 0.1, 0.1, 0.1, 0.2, 0.4, 0.8]  # held to 0.33 s, then back-off

    training = [False]
    poll = worker.Poll(low=0.05, high=0.5, growth=2.0, hold_s=0.175, busy=lambda: training[0])
    poll.reset()  # a task served
    waits = []
    for _ in range(7):
        waits.append(poll.next())
        fake.sleep(waits[-1])
    assert waits == [0.05, 0.05, 0.05, 0.05, 0.05, 0.1, 0.2]
    poll.reset()
    training[0] = True  # advertise started the round's training in the background: no hold
    assert [poll.next() for _ in range(3)] == [0.05, 0.1, 0.2]


def test_join_runs_the_supernode_for_the_resident_worker(tmp_path: Path) -> None:
    import sys

    from fedtune.clients.join import JoinOptions, supernode_command, supernode_env, worker_command
    from fedtune.deploy.keys import ensure_keys

    keys = ensure_keys(tmp_path, "c")
    opts = JoinOptions(coordinator="127.0.0.1:9092", state_dir=tmp_path, port=9555, threads=2, insecure=True)
    cmd = supernode_command(opts, keys, "x=1")
    assert cmd[:4] == [sys.executable, "-m", "fedtune.clients.worker", "supernode"]
    assert cmd[cmd.index("--isolation") + 1] == "process" and cmd[cmd.index("--port") + 1] == "9555"
    assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == str(tmp_path / "worker.secret")
    wcmd = worker_command(opts)
    assert wcmd[wcmd.index("--runtime-api-address") + 1] == "127.0.0.1:9555"
    assert wcmd[wcmd.index("--threads") + 1] == "2"
    env = supernode_env(opts, tmp_path / "bin", "cpu")
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2"
    opts.resident = False  # Flower's process per message, each the guarded shim: as before
    plain = supernode_command(opts, keys, "x=1")
    assert plain[0].endswith("flower-supernode") and "--isolation" not in plain


def test_resident_worker_is_restarted_when_it_dies(tmp_path: Path) -> None:
    import io
    import sys
    import time

    from fedtune.clients.join import ResidentWorker

    out = io.StringIO()
    worker = ResidentWorker(
        [sys.executable, "-c", "raise SystemExit(3)"], {}, tmp_path / "w.log", False, out, cwd=tmp_path
    )
    worker.start()
    assert worker.proc is not None and worker.proc.wait(30) == 3
    worker.check()  # schedules the restart (1 s after the first exit)
    assert "exited with status 3" in out.getvalue() and worker.starts == 1
    time.sleep(1.1)
    worker.check()
    assert worker.starts == 2
    worker.stop()


def _message(message_id: str, reply_to: str = "") -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(message_id=message_id, reply_to_message_id=reply_to))


def test_supernode_push_waits_for_the_reply_to_the_message_it_just_pulled() -> None:
    """After a coordinator restart: the old run's message (dropped by the SuperNode, not deleted), its late reply
    from the resident worker, and the new run's message. Flower's push step takes whatever reply is there, so the
    stale one used it up and the new run's reply was never sent; the push step must run until ``new`` is answered.
    """
    state = SimpleNamespace(msg_store={})
    replies, pushed = ReplyForLatest(), []

    def store(message: SimpleNamespace) -> None:
        state.msg_store[message.metadata.message_id] = message
        replies.stored(message)

    def flower_push(state: SimpleNamespace) -> None:
        """``_push_messages``: every reply in the state, each deleted with the message it answers."""
        answers = [m for m in state.msg_store.values() if m.metadata.reply_to_message_id]
        assert answers, "Flower's push step would wait here for a reply"
        for reply in answers:
            pushed.append(reply.metadata.message_id)
            for mid in (reply.metadata.message_id, reply.metadata.reply_to_message_id):
                state.msg_store.pop(mid, None)
        if "new" in state.msg_store and "new-reply" not in pushed:
            store(_message("new-reply", "new"))  # the worker answers the new run's message meanwhile

    for message in (_message("old"), _message("new"), _message("old-reply", "old")):
        store(message)
    replies.push(flower_push, state=state)
    assert pushed == ["old-reply", "new-reply"] and state.msg_store == {}

    pushed.clear()  # the usual round: one message, its reply, one push step
    store(_message("next"))
    store(_message("next-reply", "next"))
    replies.push(flower_push, state=state)
    assert pushed == ["next-reply"] and state.msg_store == {}
