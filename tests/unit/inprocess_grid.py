"""A Flower ``Grid`` that delivers each message to a ``ClientApp`` in this process: round drivers in unit tests.

What a SuperLink plus SuperNodes do, minus the network and the processes: every pushed message is handed to the
ClientApp with that node's own ``Context`` (kept across messages, as Flower keeps it across a run), its reply
is stored for ``pull_messages``. A node in ``silent`` never answers (a contributor that vanished); an exception
in the ClientApp becomes an error reply, as Flower's engines send it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


def as_server() -> None:
    """Messages built from here on are the ServerApp's (Flower reads the sender from the task identity)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


class InProcessGrid(Grid):
    """Runs ``app`` for every node of ``node_configs`` (node id -> node config) in this process.

    Parameters
    ----------
    app : ClientApp
        What every node runs.
    node_configs : mapping
        Node id -> node config (e.g. ``{"partition-id": 0}``).
    silent : iterable of int
        Nodes that never reply.
    """

    def __init__(self, app: ClientApp, node_configs: Mapping[int, dict[str, Any]], silent: Iterable[int] = ()):
        as_server()
        self.app, self.silent = app, set(silent)
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config=dict(cfg), state=RecordDict(), run_config={})
            for node, cfg in node_configs.items()
        }
        self._replies: dict[str, Message] = {}
        self._run = Run.create_empty(run_id=1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # what the SuperLink does on push
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            if node in self.silent:
                continue
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - a crashing ClientApp is an error reply, as in Flower
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}")
                reply = Message(error, reply_to=msg)
            self._replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
