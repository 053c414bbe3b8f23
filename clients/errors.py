"""What a deployed contributor's failed round tells the coordinator: the exception's type, never its text.

Job
    :func:`private_errors` wraps every ClientApp handler. When a round fails on a deployed contributor (a state
    dir in its node config), the full exception stays in the contributor's own log and ``rounds.jsonl``; what
    Flower sends back as the error reply is :class:`RoundFailed` naming only the exception's type.

Threat
    The coordinator is the adversary of the contributor's data, and an error reply is a message to it. Both of
    Flower's runners (fedtune's resident worker and Flower's own ``flwr-clientapp``) put ``str(exception)`` in
    that reply, and a contributor's exceptions carry its private facts: the path and a decoded fragment of its
    ``--data`` (``datasets``' parse errors quote the bytes), whether a path the campaign named exists on its disk
    (``FileNotFoundError: '/home/alice/…'``), its hardware. A campaign crafted to fail is then a probe.

Pitfalls
    - A malformed request (:class:`~fedtune.wire.WireError`) still answers with its text: it names only fields of
      the coordinator's own message, and that is what lets a coordinator fix its side.
    - A virtual contributor of ``fedtune simulate`` is the researcher's own process: its errors keep their text,
      which is how a campaign stops with the cause in one line (:mod:`fedtune.server.failures`).
    - Only :class:`Exception` is caught: the worker's stop signal (``WorkerStopped``) is a ``BaseException``
      and ends the task as before.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from flwr.app import Context, Message

from fedtune.wire import WireError

log = logging.getLogger("fedtune.client")

Handler = Callable[[Message, Context], Message]


class RoundFailed(RuntimeError):
    """A deployed contributor's round failed; ``str()`` names the exception's type only."""


def private_errors(handler: Handler, record: Callable[[Context, dict], None]) -> Handler:
    """``handler`` with a deployed contributor's exceptions reduced to their type (see the module doc).

    ``record`` writes the whole error into the contributor's own round log (``clients.app.record_round``).
    """

    @functools.wraps(handler)
    def run(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except WireError:
            raise
        except Exception as exc:
            if "state-dir" not in context.node_config:  # a virtual contributor: the researcher's own process
                raise
            log.exception("this round failed; the coordinator is told only the exception's type")
            record(context, {"error": f"{type(exc).__name__}: {exc}"})
            raise RoundFailed(f"{type(exc).__name__} on the contributor (the details stay in its own log)") from None

    return run
