"""``fedtune doctor``: check that this machine can coordinate or contribute, with a fix for each failure.

Contributors are community members on home PCs; a failed join should end with a line that says what to
do, not a traceback. Each check prints ``ok`` or ``FAIL`` plus a ``fix:`` line; the exit status is 1 if
any check failed.

``--coordinator ADDR [--root-cert CA]`` does what ``join`` will do: the TCP connection, the TLS handshake
verified against the CA and the address's host name (reporting the certificate's subject, subjectAltName and
issuer either way), then probes that the Control and Runtime APIs do not answer there (only the Fleet API may
face the network). Pitfall: the certificate is fetched without verification only to describe it; nothing
from that unverified connection is trusted.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

FLWR_VERSION = "1.42.0"
MODULES = (
    "fedtune.config",
    "fedtune.clients.app",
    "fedtune.server.app",
    "fedtune.clients.join",
    "fedtune.server.coordinator",
    "flwr",
    "torch",
    "transformers",
    "peft",
    "opacus",
    "cryptography",
)
EXECUTABLES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr", "flwr-clientapp")


@dataclass
class Check:
    """One check's outcome: ``fix`` says what to do when it failed."""

    name: str
    ok: bool
    detail: str = ""
    fix: str = ""


def check_python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check("python", ok, sys.version.split()[0], "" if ok else "install Python 3.11 or newer")


def check_imports() -> list[Check]:
    out = []
    for name in MODULES:
        try:
            importlib.import_module(name)
            out.append(Check(f"import {name}", True))
        except Exception as exc:  # noqa: BLE001 - any import failure is a finding, not a crash
            out.append(
                Check(
                    f"import {name}",
                    False,
                    f"{type(exc).__name__}: {exc}",
                    "pip install -e . (from the fedtune checkout) or pip install fedtune",
                )
            )
    return out


def check_versions() -> list[Check]:
    out = []
    try:
        flwr = importlib.metadata.version("flwr")
        out.append(
            Check(
                "flwr version",
                flwr == FLWR_VERSION,
                flwr,
                ""
                if flwr == FLWR_VERSION
                else f"pip install 'flwr[simulation]=={FLWR_VERSION}' (the contributor's code guard is written for it)",
            )
        )
    except importlib.metadata.PackageNotFoundError:
        out.append(Check("flwr version", False, "not installed", f"pip install 'flwr[simulation]=={FLWR_VERSION}'"))
    try:
        out.append(Check("fedtune version", True, importlib.metadata.version("fedtune")))
    except importlib.metadata.PackageNotFoundError:
        out.append(Check("fedtune version", False, "not installed as a distribution", "pip install -e ."))
    return out


def check_executables() -> list[Check]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return [
        Check(
            f"executable {exe}",
            shutil.which(exe, path=path) is not None,
            shutil.which(exe, path=path) or "",
            f"reinstall flwr in this environment: pip install --force-reinstall 'flwr=={FLWR_VERSION}'",
        )
        for exe in EXECUTABLES
    ]


def check_torch(gpu: int | None) -> list[Check]:
    try:
        import torch
    except ImportError as exc:
        return [Check("torch", False, str(exc), "pip install torch")]
    out = [Check("torch", True, f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")]
    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    if gpu is None:
        out.append(Check("GPU", True, f"{count} CUDA device(s) visible" if cuda else "none visible; join uses the CPU"))
        return out
    if not cuda:
        fix = (
            "install a CUDA build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu124)"
            if not torch.version.cuda
            else "check the NVIDIA driver with nvidia-smi, and CUDA_VISIBLE_DEVICES"
        )
        out.append(Check(f"GPU {gpu}", False, "CUDA not available to torch", fix))
    elif gpu >= count:
        out.append(
            Check(
                f"GPU {gpu}",
                False,
                f"only {count} device(s) visible",
                f"pass --gpu between 0 and {count - 1}, or check CUDA_VISIBLE_DEVICES",
            )
        )
    else:
        props = torch.cuda.get_device_properties(gpu)
        out.append(
            Check(
                f"GPU {gpu}",
                True,
                f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute {props.major}.{props.minor}",
            )
        )
    return out


PROBED_APIS = ("/v1/control/list-runs", "/v1/runtime/acquire-task")
"""Endpoints that must not answer on a coordinator's public port (only the Fleet API may)."""


def _describe_cert(der: bytes) -> tuple[str, list[str], str]:
    """(subject, subjectAltName entries, issuer) of a DER certificate."""
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in san.get_values_for_type(x509.IPAddress)] + list(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = []
    return cert.subject.rfc4514_string(), names, cert.issuer.rfc4514_string()


def _exposed_apis(host: str, port: int, timeout_s: float) -> list[str]:
    """Which of :data:`PROBED_APIS` answer with anything but 404 (TLS, identity not checked: a probe only)."""
    import http.client
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    exposed = []
    for path in PROBED_APIS:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout_s, context=ctx)
        try:
            conn.request("POST", path, body=b"", headers={"content-type": "application/protobuf"})
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException):
            continue
        finally:
            conn.close()
        if status != 404:
            exposed.append(f"{path} ({status})")
    return exposed


def check_coordinator(address: str, root_cert: Path | None = None, timeout_s: float = 5.0) -> list[Check]:
    """Reach ``address``, do the TLS handshake (against ``root_cert`` if given) and report what answered."""
    import ssl

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return [Check("coordinator", False, f"{address!r} is not HOST:PORT", "pass --coordinator HOST:PORT")]
    name = f"coordinator {address}"
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    except OSError as exc:
        what = "nothing listening (connection refused)" if isinstance(exc, ConnectionRefusedError) else str(exc)
        return [
            Check(
                name,
                False,
                what,
                "check the address with the coordinator, that `fedtune coordinate` is running, and that "
                "the port is open in their firewall (and not blocked by yours)",
            )
        ]
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    plain.check_hostname, plain.verify_mode = False, ssl.CERT_NONE
    try:
        with sock, plain.wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True) or b""
    except (ssl.SSLError, OSError) as exc:
        return [
            Check(
                name,
                False,
                f"TCP connection accepted, but no TLS handshake: {getattr(exc, 'reason', None) or exc}",
                "the coordinator runs with --insecure (join with --insecure, trusted networks only), or this "
                "address is not a fedtune coordinator",
            )
        ]
    subject, names, issuer = _describe_cert(der)
    seen = f"certificate {subject}, subjectAltName {', '.join(names) or 'none'}, issued by {issuer}"
    checks = [_verify(name, host, int(port), root_cert, seen, names, issuer, timeout_s)]
    exposed = _exposed_apis(host, int(port), timeout_s)
    checks.append(
        Check(
            f"{name} exposure",
            not exposed,
            "only the Fleet API answers" if not exposed else f"answering beyond the Fleet API: {', '.join(exposed)}",
            "the coordinator must upgrade fedtune: anyone holding ca.pem can steer this coordinator's campaigns",
        )
    )
    return checks


def _verify(
    name: str, host: str, port: int, root_cert: Path | None, seen: str, names: list[str], issuer: str, timeout_s: float
) -> Check:
    """The handshake again, this time verifying the certificate chain against ``root_cert`` and the host name."""
    import ssl

    if root_cert is None:
        return Check(name, True, f"TLS, not verified ({seen})", "")
    fix_ca = (
        f"{root_cert} is not the CA that issued this certificate (issuer {issuer}): fetch the coordinator's "
        "ca.pem again (~/.fedtune/coordinator/tls/ca.pem on their machine)"
    )
    try:
        ctx = ssl.create_default_context(cafile=str(root_cert))
    except (OSError, ssl.SSLError, ValueError) as exc:
        return Check(name, False, f"cannot load --root-cert {root_cert}: {exc}", "pass the coordinator's ca.pem")
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            ctx.wrap_socket(sock, server_hostname=host).close()
    except ssl.SSLCertVerificationError as exc:
        mismatch = "mismatch" in str(exc.verify_message) or "match" in str(exc.verify_message)
        fix = (
            f"the certificate covers {', '.join(names) or 'no name'}, not {host}: dial one of those, or ask the "
            f"coordinator to restart `fedtune coordinate --address {host}:{port}`"
            if mismatch
            else fix_ca
        )
        return Check(name, False, f"CERTIFICATE_VERIFY_FAILED: {exc.verify_message} ({seen})", fix)
    except (ssl.SSLError, OSError) as exc:
        return Check(name, False, f"TLS handshake failed: {exc} ({seen})", fix_ca)
    return Check(name, True, f"TLS verified against {root_cert} ({seen})")


def run_doctor(
    coordinator: str | None = None, gpu: int | None = None, out: TextIO | None = None, root_cert: Path | None = None
) -> int:
    """Run every check, print the results (to ``out``, else this call's stdout), return 1 if any failed."""
    out = out or sys.stdout
    steps: list[Callable[[], Check | list[Check]]] = [
        check_python,
        check_imports,
        check_versions,
        check_executables,
        lambda: check_torch(gpu),
    ]
    if coordinator:
        steps.append(lambda: check_coordinator(coordinator, root_cert))
    failed = 0
    for step in steps:
        result = step()
        for check in result if isinstance(result, list) else [result]:
            mark = "ok  " if check.ok else "FAIL"
            print(f"[{mark}] {check.name}" + (f": {check.detail}" if check.detail else ""), file=out)
            if not check.ok:
                failed += 1
                print(f"       fix: {check.fix}", file=out)
    print("all checks passed" if not failed else f"{failed} check(s) failed", file=out)
    return 1 if failed else 0
