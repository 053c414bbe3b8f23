"""The coordinator's public face, piece by piece, each against the adversary it is for.

- the Fleet front passes exactly Flower's Fleet routes and answers 404 to everything else (an outsider with
  ``ca.pem``), over a real TLS server;
- ``doctor --coordinator --root-cert`` does the real handshake: right CA, wrong CA, wrong host name, nothing
  listening, plain TCP, and an exposed Control API;
- the ServerApp refuses a run the coordinator did not sign, before it creates anything;
- the coordinator home: one CA for every run dir, ``approve`` errors in one line, nothing written on bad input;
- the warden takes down a detached grandchild when its supervisor dies;
- the contributor's benchmark reports its spread and declares its fastest trial.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtune.cli import main as cli_main
from fedtune.deploy.doctor import check_coordinator
from fedtune.deploy.front import FLEET_ROUTES, FrontServer
from fedtune.deploy.home import ensure_home
from fedtune.deploy.keys import ensure_keys, read_allow_list
from fedtune.deploy.runkey import TOKEN, RunRefused, new_run_key, sign_run_config, verify_run_config
from fedtune.deploy.tls import TlsFiles, ensure_tls

from ..conftest import small_campaign


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A backend that answers 200 to any POST and records the path (stands for the SuperLink)."""

    seen: list[tuple[str, bytes, str]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        self.seen.append((self.path, body, self.headers.get("x-flwr-test", "")))
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *_args: object) -> None:
        pass


def serve_tls(tls: TlsFiles, host: str = "127.0.0.1") -> tuple[http.server.ThreadingHTTPServer, int]:
    """A TLS server with ``tls``'s server certificate on a free loopback port, answering like the SuperLink."""
    server = http.server.ThreadingHTTPServer((host, 0), _Recorder)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls.cert, tls.key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1])


@pytest.fixture
def home(tmp_path: Path) -> Path:
    ensure_home(tmp_path / "home", ["127.0.0.1"])
    return tmp_path / "home"


@pytest.fixture
def backend(home: Path) -> Iterator[int]:
    _Recorder.seen = []
    server, port = serve_tls(ensure_tls(home / "tls", ["127.0.0.1"]))
    yield port
    server.shutdown()


@pytest.fixture
def front(home: Path, backend: int) -> Iterator[int]:
    tls = ensure_tls(home / "tls", ["127.0.0.1"])
    port = free_port()
    server = FrontServer("127.0.0.1", port, f"https://127.0.0.1:{backend}", tls.ca, tls.cert, tls.key)
    server.start()
    yield port
    server.stop()


def _post(port: int, path: str, ca: Path, method: str = "POST") -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ssl.create_default_context(cafile=ca))
    try:
        conn.request(method, path, body=b"payload", headers={"x-flwr-test": "signed-headers-pass"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------ the front


def test_fleet_routes_are_flowers_fleet_api() -> None:
    from flwr.superlink.routers.fleet.router import router

    assert {route.path for route in router.routes} == FLEET_ROUTES
    assert all(route.methods == {"POST"} for route in router.routes)


def test_front_passes_the_fleet_api_and_nothing_else(home: Path, front: int) -> None:
    """The outsider, holding ca.pem: every Control and Runtime path, other methods, path tricks: 404."""
    ca = home / "tls" / "ca.pem"
    assert _post(front, "/v1/fleet/pull-messages", ca) == (200, b"ok")
    attacks = [
        "/v1/runtime/acquire-task",
        "/v1/control/list-runs",
        "/v1/control/start-run",
        "/v1/control/stop-run",
        "/v1/control/stream-logs",
        "/v1/control/register-node",
        "/v1/control/unregister-node",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/pull-messages/../../control/list-runs",
        "/v1/fleet/",
        "/v1/fleetx/pull-messages",
        "//v1/fleet/pull-messages",
        "/health",
        "/docs",
    ]
    for path in attacks:
        status, _ = _post(front, path, ca)
        assert status == 404, path
    assert _post(front, "/v1/fleet/pull-messages", ca, method="GET")[0] == 404
    assert _post(front, "/v1/fleet/pull-messages", ca, method="PUT")[0] == 404
    assert [(p, b, h) for p, b, h in _Recorder.seen] == [("/v1/fleet/pull-messages", b"payload", "signed-headers-pass")]


def test_doctor_reports_the_front_as_fleet_only_and_a_bare_superlink_as_exposed(
    home: Path, front: int, backend: int
) -> None:
    ca = home / "tls" / "ca.pem"
    ok = check_coordinator(f"127.0.0.1:{front}", ca)
    assert [c.ok for c in ok] == [True, True], ok
    assert "only the Fleet API" in ok[1].detail
    exposed = check_coordinator(f"127.0.0.1:{backend}", ca)
    assert exposed[0].ok and not exposed[1].ok
    assert "/v1/control/list-runs" in exposed[1].detail and "/v1/runtime/acquire-task" in exposed[1].detail


# ------------------------------------------------------------------------------------------ doctor TLS


def test_doctor_tls_right_ca(home: Path, backend: int) -> None:
    [tls, _exposure] = check_coordinator(f"127.0.0.1:{backend}", home / "tls" / "ca.pem")
    assert tls.ok, tls
    assert "TLS verified" in tls.detail and "CN=127.0.0.1" in tls.detail and "127.0.0.1, localhost" in tls.detail


def test_doctor_tls_wrong_ca(tmp_path: Path, backend: int) -> None:
    other = ensure_tls(tmp_path / "other", ["127.0.0.1"], name="someone else")
    [tls, _exposure] = check_coordinator(f"127.0.0.1:{backend}", other.ca)
    assert not tls.ok
    assert "CERTIFICATE_VERIFY_FAILED" in tls.detail and "fedtune coordinator CA" in tls.detail
    assert "fetch the coordinator's ca.pem again" in tls.fix


def test_doctor_tls_host_not_covered(home: Path) -> None:
    server, port = serve_tls(ensure_tls(home / "tls", ["127.0.0.1"]), host="127.0.0.2")
    try:
        [tls, _exposure] = check_coordinator(f"127.0.0.2:{port}", home / "tls" / "ca.pem")
    finally:
        server.shutdown()
    assert not tls.ok and "CERTIFICATE_VERIFY_FAILED" in tls.detail
    assert "covers 127.0.0.1, localhost, not 127.0.0.2" in tls.fix


def test_doctor_closed_port_and_plain_tcp(home: Path) -> None:
    [closed] = check_coordinator(f"127.0.0.1:{free_port()}", home / "tls" / "ca.pem", timeout_s=2)
    assert not closed.ok and "nothing listening" in closed.detail and "fedtune coordinate" in closed.fix
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        port = plain.getsockname()[1]

        def answer() -> None:
            conn, _ = plain.accept()
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()

        threading.Thread(target=answer, daemon=True).start()
        [insecure] = check_coordinator(f"127.0.0.1:{port}", home / "tls" / "ca.pem", timeout_s=5)
    assert not insecure.ok and "no TLS handshake" in insecure.detail and "--insecure" in insecure.fix


def test_doctor_cli_needs_coordinator_with_root_cert(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["doctor", "--root-cert", "ca.pem"]) == 2
    assert capsys.readouterr().err.startswith("error: --root-cert needs --coordinator")


# ------------------------------------------------------------------------------------ the run binding


def _run_config(tmp_path: Path) -> tuple[str, dict[str, str]]:
    campaign = tmp_path / "config.toml"
    campaign.write_text('[campaign]\nname = "c"\n')
    key = new_run_key()
    config = {"campaign": str(campaign), "run-dir": str(tmp_path / "run")}
    config[TOKEN] = sign_run_config(key, config)
    return key, config


def test_only_the_signed_run_passes(tmp_path: Path) -> None:
    key, config = _run_config(tmp_path)
    verify_run_config(key, config)
    evil = tmp_path / "evil.toml"
    evil.write_text("[federation]\nlearning_rate = 5.0\n")
    forgeries = [
        {**config, "campaign": str(evil)},
        {**config, "run-dir": str(tmp_path / "elsewhere")},
        {**config, "extra": "1"},
        {k: v for k, v in config.items() if k != TOKEN},
        {**config, TOKEN: "0" * 64},
    ]
    for forged in forgeries:
        with pytest.raises(RunRefused):
            verify_run_config(key, forged)
    with pytest.raises(RunRefused):
        verify_run_config(new_run_key(), config)  # another coordinator session's run
    Path(config["campaign"]).write_text('[campaign]\nname = "changed after submission"\n')
    with pytest.raises(RunRefused):
        verify_run_config(key, config)


def test_serverapp_refuses_an_unsigned_run_before_creating_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run submitted through the Control API with a run config of the attacker's choosing."""
    import tomli_w
    from flwr.app import Context, RecordDict

    from fedtune.deploy.runkey import RUN_KEY_ENV
    from fedtune.server.app import main

    evil = tmp_path / "evil.toml"
    evil.write_text(tomli_w.dumps(small_campaign(federation={"learning_rate": 5.0})))
    monkeypatch.setenv(RUN_KEY_ENV, new_run_key())
    run_dir = tmp_path / "evil-run"
    context = Context(1, 0, {}, RecordDict(), {"campaign": str(evil), "run-dir": str(run_dir), TOKEN: "forged"})
    with pytest.raises(RunRefused, match="did not submit"):
        main(None, context)  # type: ignore[arg-type] # refused before the grid is touched
    assert not run_dir.exists()


def test_guarded_serverapp_refuses_to_start_without_a_run_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "FEDTUNE_RUN_KEY"}
    code = "from fedtune.deploy.bundle import guarded_serverapp; guarded_serverapp()"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "FEDTUNE_RUN_KEY" in res.stderr


# ------------------------------------------------------------------------------------ coordinator home


def _coordinator(tmp_path: Path, run: str, address: str = "127.0.0.1:9092") -> object:
    import tomli_w

    from fedtune.server.coordinator import Coordinator

    config = tmp_path / "campaign.toml"
    config.write_text(tomli_w.dumps(small_campaign(campaign={"name": "c", "seed": 0, "run_dir": str(tmp_path)})))
    return Coordinator(config, tmp_path / run, address, home_dir=tmp_path / "home")


def test_one_ca_for_every_run_dir(tmp_path: Path) -> None:
    first = _coordinator(tmp_path, "run-1")
    first.prepare(first.validate())  # type: ignore[attr-defined]
    ca = (tmp_path / "home" / "tls" / "ca.pem").read_bytes()
    second = _coordinator(tmp_path, "run-2", "coord.example.org:9092")
    second.prepare(second.validate())  # type: ignore[attr-defined]
    assert (tmp_path / "home" / "tls" / "ca.pem").read_bytes() == ca
    assert oct((tmp_path / "home").stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / "home" / "tls" / "ca.key").stat().st_mode & 0o777) == "0o600"
    for co in (first, second):
        assert not (co.root / "tls").exists()  # type: ignore[attr-defined]
        command = co.superlink_command()  # type: ignore[attr-defined]
        assert command[command.index("--ssl-ca-certfile") + 1] == str(tmp_path / "home" / "tls" / "ca.pem")
        assert command[command.index("--host") + 1] == "127.0.0.1"
        assert "--superexec-auth-secret-file" in command and command[command.index("--isolation") + 1] == "process"
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "home" / "tls" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))
    assert {"127.0.0.1", "localhost", "coord.example.org"} <= names  # both campaigns' addresses stay served


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--address", "nohost"], "--address must be HOST:PORT"),
        (["--address", "127.0.0.1:99999"], "--address must be HOST:PORT"),
        (["--address", ":9092"], "--address must be HOST:PORT"),
    ],
)
def test_coordinate_validates_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    import tomli_w

    config = tmp_path / "campaign.toml"
    config.write_text(tomli_w.dumps(small_campaign()))
    home, run = tmp_path / "home", tmp_path / "run"
    assert cli_main(["coordinate", str(config), "--run-dir", str(run), "--home", str(home), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not home.exists() and not run.exists()


def test_coordinate_refuses_a_bad_campaign_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import tomli_w

    config = tmp_path / "campaign.toml"
    config.write_text(tomli_w.dumps(small_campaign(lora={"rank": "eight"})))
    home, run = tmp_path / "home", tmp_path / "run"
    assert cli_main(["coordinate", str(config), "--run-dir", str(run), "--home", str(home)]) == 2
    assert "[lora] rank" in capsys.readouterr().err
    assert not home.exists() and not run.exists()


def test_approve_writes_to_the_home(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = ensure_keys(tmp_path / "alice", "alice")
    assert cli_main(["approve", str(keys.auth_public), "--home", str(home), "--name", "alice"]) == 0
    assert cli_main(["approve", str(keys.auth_public), "--home", str(home)]) == 0  # idempotent
    assert [e.name for e in read_allow_list(home / "contributors.allow")] == ["alice"]
    assert "contributors.allow" in capsys.readouterr().out


def test_approve_errors_are_one_line(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = ensure_keys(tmp_path / "alice", "alice")
    binary = tmp_path / "key.bin"
    binary.write_bytes(bytes(range(256)))
    other = tmp_path / "ed25519.pub"
    other.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl bob\n")
    unknown = tmp_path / "unknown.pub"
    unknown.write_text("ssh-foo AAAAB3NzaC1 bob\n")
    typo = tmp_path / "hme"
    cases = [
        ([str(keys.auth_private), "--home", str(home)], "is a private key"),
        ([str(tmp_path / "alice" / "identity.key"), "--home", str(home)], "is a private key"),
        ([str(tmp_path / "nope.pub"), "--home", str(home)], "no such file"),
        ([str(binary), "--home", str(home)], "not a text file"),
        ([str(other), "--home", str(home)], "ECDSA P-384"),
        ([str(unknown), "--home", str(home)], "not an OpenSSH public key"),
        ([str(keys.auth_public), "--home", str(typo)], "no coordinator home at"),
    ]
    for args, message in cases:
        assert cli_main(["approve", *args]) == 2, args
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, captured.err)
        assert "Traceback" not in captured.err
    assert not typo.exists()
    assert read_allow_list(home / "contributors.allow") == []


# -------------------------------------------------------------------------------------------- warden


def test_warden_takes_a_detached_grandchild_down_when_its_supervisor_dies(tmp_path: Path) -> None:
    """The supervisor is SIGKILLed; the command had started a grandchild in a session of its own."""
    pidfile = tmp_path / "grandchild.pid"
    child = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(300)\n"
    )
    supervisor = (
        "import subprocess, sys, time\n"
        "from pathlib import Path\n"
        "from fedtune.deploy.processes import start_warded\n"
        f"w = start_warded([sys.executable, '-c', {child!r}], dict(__import__('os').environ), "
        f"Path({str(tmp_path / 'log')!r}), Path({str(tmp_path)!r}), grace_s=2.0)\n"
        "print(w.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    sup = subprocess.Popen([sys.executable, "-c", supervisor], stdout=subprocess.PIPE, text=True)
    try:
        assert sup.stdout is not None
        warden = int(sup.stdout.readline())
        deadline = time.monotonic() + 60
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline, "the grandchild never started"
            time.sleep(0.1)
        grandchild = int(pidfile.read_text())
        assert _alive(grandchild) and _alive(warden)
        sup.send_signal(signal.SIGKILL)
        sup.wait(10)
        deadline = time.monotonic() + 10
        while (_alive(grandchild) or _alive(warden)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(grandchild) and not _alive(warden)
    finally:
        sup.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# ----------------------------------------------------------------------------------------- benchmark


def test_benchmark_reports_its_spread_and_declares_the_fastest_trial() -> None:
    from fedtune.clients.hardware import benchmark

    bench = benchmark("cpu", seconds=0.15, trials=3, size=64)
    assert len(bench.trials) == 3 and all(t > 0 for t in bench.trials)
    assert min(bench.trials) <= bench.median <= bench.declared == max(bench.trials)
    record = bench.as_dict()
    assert record["declared_flops"] == bench.declared and record["min_flops"] <= record["median_flops"]
    assert "over 3 64x64 float32 matmul trials on cpu" in bench.summary()
