"""The coordinator's own SuperLink, asked in-process through its Control API: run statuses, and stopping a run.

Why: ``fedtune coordinate`` asks for its run's status every 10 s to notice a ServerApp that ended early. Through the
``flwr`` CLI (``flwr ls``) every question was a fresh Python process of about 1.5 CPU-seconds, about 15% of a core
for as long as a campaign ran, on a host whose cores the coordinator may share with contributors. The CLI itself
asks the SuperLink through Flower's ``ControlHttpClient``; holding one here answers the same question for a few
milliseconds of CPU over one kept-alive connection.

Threat: none new. The client talks only to the coordinator's own SuperLink on its private loopback port and, as the
CLI does with the same ``config.toml``, verifies the SuperLink's certificate against the coordinator's CA (plain
HTTP only when the coordinator runs ``--insecure``).

Pitfalls:
- ``flwr.supercore.control`` is an internal Flower surface; ``pyproject.toml`` pins ``flwr==1.42.0`` and
  ``tests/unit/test_control.py`` asks a real SuperLink through it.
- A status reads as the CLI prints it: ``status`` or ``status:sub_status`` (``finished:completed``).
- A SuperLink that cannot be reached answers ``None``, not an exception: the caller's loop decides what an unknown
  status means, as it did when ``flwr ls`` failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr.supercore.control import ControlHttpClient


@dataclass(frozen=True)
class RunInfo:
    """One run as the SuperLink lists it."""

    run_id: int
    fab_id: str
    status: str


class ControlClient:
    """One kept-alive Control API connection to a SuperLink at ``address`` (``host:port``)."""

    def __init__(self, address: str, ca: Path | None) -> None:
        from flwr.supercore.control import ControlHttpClient

        self._client: ControlHttpClient = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=ca is None,
            root_certificates=None if ca is None else ca.read_bytes(),
            interceptors=[],
        )

    def runs(self, run_id: int | None = None) -> list[RunInfo] | None:
        """Every run the SuperLink knows, or only ``run_id``; ``None`` when the SuperLink did not answer."""
        import httpx
        from flwr.proto.control_pb2 import ListRunsRequest

        try:
            res = self._client.ListRuns(ListRunsRequest(run_id=run_id) if run_id else ListRunsRequest())
        except (httpx.HTTPError, ValueError):
            return None
        return [
            RunInfo(
                int(run.run_id),
                run.fab_id,
                run.status.status + (f":{run.status.sub_status}" if run.status.sub_status else ""),
            )
            for run in res.run_dict.values()
        ]

    def status(self, run_id: int) -> str | None:
        """``run_id``'s status (``pending``, ``running``, ``finished:completed``…); ``None`` when unknown."""
        runs = self.runs(run_id)
        return runs[0].status if runs else None

    def stop(self, run_id: int) -> bool:
        """Ask the SuperLink to stop ``run_id``; whether it says it did."""
        import httpx
        from flwr.proto.control_pb2 import StopRunRequest

        try:
            return bool(self._client.StopRun(StopRunRequest(run_id=run_id)).success)
        except (httpx.HTTPError, ValueError):
            return False

    def close(self) -> None:
        self._client.close()
