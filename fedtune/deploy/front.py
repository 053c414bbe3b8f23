"""The coordinator's public port: a TLS front that passes the Fleet API and nothing else.

Flower 1.42 serves Fleet (``/v1/fleet/*``, what SuperNodes use), Control (``/v1/control/*``: submit, list,
stop runs, read logs, register and unregister nodes) and Runtime (``/v1/runtime/*``: ``acquire-task`` hands
out the ServerApp's task) on one HTTP port, with no credentials on Control and Runtime in subprocess
isolation, and has no option to split them. So ``fedtune coordinate`` binds the SuperLink to a loopback port
and puts this front on the public address: it terminates TLS with the coordinator's server certificate and
forwards exactly the Fleet API's routes (:data:`FLEET_ROUTES`, POST only) to the SuperLink, over TLS checked
against the coordinator's CA. Every other method or path gets ``404`` from the front itself and never reaches
the SuperLink.

Threat: the network, holding the public ``ca.pem``. SuperNode authentication stays the SuperLink's: its
signed headers pass through untouched (they sign a timestamp, not the TLS channel), so terminating TLS here
changes nothing for contributors. Pitfalls: the allow-list is exact paths (no prefix match, no path
normalisation tricks: ``/v1/fleet/../control/list-runs`` is not in it); query strings are dropped; bodies
above Flower's own message limit are refused before they are buffered in full; the front runs in a thread
of the ``coordinate`` process, so it cannot outlive it.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLEET_ROUTES = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
"""Flower 1.42's Fleet API (``flwr.superlink.routers.fleet.router``), all POST; a unit test keeps them equal."""

MAX_BODY = 2**31 - 1
"""Largest request body forwarded: Flower's own message limit (``GRPC_MAX_MESSAGE_LENGTH``)."""

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
REFUSED_BODY = b"not found: this port serves only the Fleet API\n"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Refusals:
    """What the front turned away (for the coordinator's console), thread-safe enough for counting."""

    count: int = 0
    first: str = ""
    seen: list[str] = field(default_factory=list)

    def add(self, what: str) -> None:
        self.count += 1
        if len(self.seen) < 50:
            self.seen.append(what)
        self.first = self.first or what


class FleetFront:
    """An ASGI app forwarding the Fleet API to ``backend`` (``https://127.0.0.1:PORT``), refusing the rest."""

    def __init__(self, backend: str, ca: Path | None) -> None:
        self.backend = backend.rstrip("/")
        self.ca = ca
        self.refusals = Refusals()
        self._client: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        import httpx

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(self.ca)) if self.ca else False
                self._client = httpx.AsyncClient(
                    verify=verify,
                    timeout=httpx.Timeout(connect=10.0, read=600.0, write=600.0, pool=60.0),
                    limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if method != "POST" or path not in FLEET_ROUTES:
            client = scope.get("client") or ("?", 0)
            self.refusals.add(f"{method} {path} from {client[0]}")
            await _reply(send, 404, REFUSED_BODY)
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > MAX_BODY:
            await _reply(send, 413, b"request body too large\n")
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > MAX_BODY:
                await _reply(send, 413, b"request body too large\n")
                return
            if not message.get("more_body", False):
                break
        await self._forward(path, headers, bytes(body), send)

    async def _forward(self, path: str, headers: list[tuple[bytes, bytes]], body: bytes, send: Send) -> None:
        import httpx

        try:
            request = self._client.build_request("POST", self.backend + path, headers=headers, content=body)
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError:
            await _reply(send, 502, b"the coordinator's SuperLink is not answering\n")
            return
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


async def _reply(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class FrontServer:
    """:class:`FleetFront` served by uvicorn on ``host:port`` in a daemon thread of this process."""

    def __init__(
        self,
        host: str,
        port: int,
        backend: str,
        ca: Path | None,
        cert: Path | None = None,
        key: Path | None = None,
    ) -> None:
        import uvicorn

        self.app = FleetFront(backend, ca)
        config = uvicorn.Config(
            self.app,
            host=host,
            port=port,
            ssl_certfile=str(cert) if cert else None,
            ssl_keyfile=str(key) if key else None,
            lifespan="on",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._serve, name="fedtune-front", daemon=True)
        self.error: BaseException | None = None

    def _serve(self) -> None:
        try:
            asyncio.run(self.server.serve())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self.error = exc

    def start(self, timeout_s: float = 30.0) -> None:
        """Serve in the background; return once listening, raise ``OSError`` if it cannot bind."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the public front did not start: {self.error or 'could not bind its address'}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout_s)

    @property
    def refusals(self) -> Refusals:
        return self.app.refusals
