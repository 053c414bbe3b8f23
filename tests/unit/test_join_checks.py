"""``fedtune join``: bad input is one ``error:`` line, exit 2, and no state dir; the device plan, the node config
and the connection watch as pure functions (no GPU, no SuperNode)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from fedtune.cli import EXIT_BAD_INPUT, main
from fedtune.clients import join_checks
from fedtune.clients.join import JoinOptions, node_config, supernode_env
from fedtune.clients.join_checks import ConnectWatch, DevicePlan, check_data, plan_device, visible_devices
from fedtune.clients.workspace import NODE_BATCH_SIZE, NODE_MAX_RANK, NODE_MICRO_BATCH, local_choice
from fedtune.config import load_config
from fedtune.deploy.keys import ensure_keys

from ..conftest import DATA, run_python

# -- bad input: one line, exit 2, nothing on disk ----------------------------------------------------------


def refuse_join(capsys: pytest.CaptureFixture[str], tmp_path: Path, *flags: str, tls: bool = False) -> str:
    """Run ``join`` with ``flags``; check exit 2, one ``error:`` line, and that the state dir was never created."""
    state = tmp_path / "state"
    security = [] if tls or "--root-cert" in flags or "--insecure" in flags else ["--insecure"]
    code = main(["join", "--coordinator", "127.0.0.1:1", "--state-dir", str(state), *security, *flags])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not state.exists(), "a refused join must not create its state dir"
    return lines[0]


def test_gpu_without_that_gpu_is_an_error_unless_cpu(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    line = refuse_join(capsys, tmp_path, "--gpu", "7")
    assert "--gpu 7" in line and "--cpu" in line
    assert "--cpu and --gpu" in refuse_join(capsys, tmp_path, "--gpu", "0", "--cpu")
    assert "--gpu" in refuse_join(capsys, tmp_path, "--gpu", "-1")


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-rank", "0"),
        ("--batch-size", "-4"),
        ("--micro-batch", "0"),
        ("--connect-timeout", "0"),
        ("--threads", "-2"),
    ],
)
def test_work_options_and_timeout_must_be_positive(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flag: str, value: str
) -> None:
    line = refuse_join(capsys, tmp_path, flag, value)
    assert flag in line and value in line


def test_bad_coordinator_address(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    state = tmp_path / "state"
    code = main(["join", "--coordinator", "localhost", "--state-dir", str(state), "--insecure"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT and err.startswith("error: --coordinator") and "HOST:PORT" in err
    assert not state.exists()


def test_root_cert_garbage_missing_or_absent(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    assert "PEM certificate" in refuse_join(capsys, tmp_path, "--root-cert", str(garbage))
    garbage.write_bytes(bytes(range(256)))
    assert "PEM certificate" in refuse_join(capsys, tmp_path, "--root-cert", str(garbage))
    assert "nothing there" in refuse_join(capsys, tmp_path, "--root-cert", str(tmp_path / "missing.pem"))
    assert "--root-cert" in refuse_join(capsys, tmp_path, tls=True)  # neither --root-cert nor --insecure


@pytest.mark.parametrize(
    "make",
    [
        lambda d: d / "missing.jsonl",
        lambda d: (d / "empty").mkdir() or d / "empty",
        lambda d: (d / "junk.jsonl").write_bytes(bytes(range(256)) * 4) and d / "junk.jsonl",
        lambda d: (d / "empty.jsonl").write_text("") or d / "empty.jsonl",
        lambda d: (d / "notes.docx").write_text("hello") and d / "notes.docx",
    ],
    ids=["missing", "empty-folder", "random-bytes", "empty-file", "unknown-suffix"],
)
def test_garbage_data_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, make: object
) -> None:
    data_root = tmp_path / "data"
    data_root.mkdir()
    path = make(data_root)  # type: ignore[operator]
    line = refuse_join(capsys, tmp_path, "--data", str(path))
    assert line.startswith(f"error: --data {path}"), line


def test_readable_data_passes(tmp_path: Path) -> None:
    assert check_data(DATA) is None
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "train.jsonl").write_text(DATA.read_text(encoding="utf-8"), encoding="utf-8")
    assert check_data(folder) is None


def test_unusable_state_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = main(["join", "--coordinator", "127.0.0.1:1", "--insecure", "--state-dir", str(blocker / "state")])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT and err.startswith("error: --state-dir") and "a file" in err, err
    code = main(["join", "--coordinator", "127.0.0.1:1", "--insecure", "--state-dir", str(blocker)])
    assert code == EXIT_BAD_INPUT and "expected a folder" in capsys.readouterr().err


def test_bad_policy_flag_writes_no_policy(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The policy used to be written before the other arguments were checked."""
    line = refuse_join(capsys, tmp_path, "--max-delta", "2")
    assert "max_delta" in line
    line = refuse_join(capsys, tmp_path, "--max-epsilon", "3", "--gpu", "9")  # a valid flag, then a bad one
    assert "--gpu 9" in line


# -- the device: what join probes, what the SuperNode sees, what the ClientApp is told -----------------------


def test_device_plan_pins_the_chosen_gpu_as_cuda_0() -> None:
    assert plan_device(None, False, 0) == DevicePlan(None, "cpu", "")
    assert plan_device(None, True, 2) == DevicePlan(None, "cpu", "")
    assert plan_device(1, False, 2) == DevicePlan(1, "cuda:0", "1")
    assert plan_device(1, False, 2, "4,6") == DevicePlan(1, "cuda:0", "6")  # torch's 1 is the user's 6
    assert plan_device(0, False, 1, "GPU-abc") == DevicePlan(0, "cuda:0", "GPU-abc")
    assert "found no CUDA GPU" in str(plan_device(0, False, 0))
    assert "indices 0-1" in str(plan_device(2, False, 2))
    assert "exclude" in str(plan_device(0, True, 2))
    assert visible_devices(3, None) == "3" and visible_devices(3, "") == "3"


def test_supernode_env_agrees_with_the_plan(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    opts = JoinOptions(coordinator="127.0.0.1:1", state_dir=tmp_path, gpu=1, insecure=True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    plan = plan_device(opts.gpu, False, 2, "4,6")
    assert isinstance(plan, DevicePlan)
    env = supernode_env(opts, tmp_path / "bin", plan.node_device)
    assert env["CUDA_VISIBLE_DEVICES"] == plan.visible_devices == "6"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert supernode_env(opts, tmp_path / "bin", "cuda:0")["CUDA_VISIBLE_DEVICES"] == "1"
    cpu = dataclasses.replace(opts, gpu=None, cpu=True)
    assert supernode_env(cpu, tmp_path / "bin", "cpu")["CUDA_VISIBLE_DEVICES"] == ""


def test_node_config_carries_the_work_options(tmp_path: Path, write_campaign: object) -> None:
    keys = ensure_keys(tmp_path / "keys", "alice")
    opts = JoinOptions(
        coordinator="127.0.0.1:1",
        state_dir=tmp_path / "state",
        gpu=3,
        insecure=True,
        max_rank=2,
        batch_size=3,
        micro_batch=1,
        max_epsilon=4.0,
    )
    node = parse_config_args([node_config(opts, keys, 1e12, "cuda:0")])
    assert node[NODE_MAX_RANK] == 2 and node[NODE_BATCH_SIZE] == 3 and node[NODE_MICRO_BATCH] == 1
    assert node["device"] == "cuda:0" and node["max-epsilon"] == 4.0 and node["state-dir"] == str(opts.state_dir)
    cfg = load_config(write_campaign())  # type: ignore[operator]
    choice = local_choice(cfg, node, 0)  # what the ClientApp does with them (campaign: rank 4, batch 4)
    assert not isinstance(choice, str)
    assert (choice.rank, choice.batch_size, choice.micro_batch_size) == (2, 3, 1)
    plain = parse_config_args([node_config(dataclasses.replace(opts, max_rank=None), keys, 1e12, "cpu")])
    assert NODE_MAX_RANK not in plain and plain["device"] == "cpu"


# -- the connection watch ------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_watch_announces_unreachable_then_gives_up_after_the_timeout() -> None:
    clock = Clock()
    watch = ConnectWatch("coord:9092", 120, None, clock, reason=lambda _a: "connection refused")
    watch.feed("INFO :      Starting Flower SuperNode")
    watch.feed("WARNING :   Connection attempt failed, retrying in 0.58 seconds")
    assert watch.news() is None  # the SuperNode's SuperExec logs the same while the local API starts
    clock.now = 5.0
    news = watch.news()
    assert news is not None and "coord:9092" in news and "connection refused" in news and "120 s" in news
    assert watch.news() is None  # once
    assert watch.verdict() is None
    clock.now = 121.0
    verdict = watch.verdict()
    assert verdict is not None and "within 120 s" in verdict and "fedtune doctor --coordinator coord:9092" in verdict


def test_watch_tls_failure_is_final_and_a_connection_ends_the_watch(tmp_path: Path) -> None:
    watch = ConnectWatch("coord:9092", 120, tmp_path / "ca.pem", Clock(), reason=lambda _a: "unused")
    watch.feed("ERROR :     SSL/TLS handshake error detected.")
    verdict = watch.verdict()
    assert verdict is not None and "TLS handshake failed" in verdict and f"--root-cert {tmp_path / 'ca.pem'}" in verdict
    ok = ConnectWatch("coord:9092", 1, None, Clock(), reason=lambda _a: "unused")
    ok.feed("WARNING :   Connection attempt failed, retrying in 0.58 seconds")
    ok.feed("INFO :      SuperNode ID: 123")
    ok.clock.now = 100.0  # type: ignore[attr-defined]
    assert ok.news() is None and ok.verdict() is None
    refused = ConnectWatch("coord:9092", 1, None, Clock(), reason=lambda _a: "unused")
    refused.feed("[code: 3] Failed to activate SuperNode.")  # a refused key got through TLS: reachable
    assert refused.connected
    answered = ConnectWatch("coord:9092", 1, None, Clock(), reason=lambda _a: "unused")
    answered.feed("ERROR :     Exit Code: 305")  # an HTTP error answer: the SuperLink was reached
    assert answered.connected
    watch.feed("ERROR :     Exit Code: 305")  # after a TLS failure it is that failure, not an answer
    assert not watch.connected


def test_watched_strings_are_flowers() -> None:
    """The markers are Flower 1.42's log lines: an upgrade that changes them must fail here, not in the field."""
    import flwr.supercore.retry.http_retry as http_retry
    import flwr.supernode.start_client_internal as start

    retry_src, start_src = inspect.getsource(http_retry), inspect.getsource(start)
    assert join_checks.RETRY_MARKER in retry_src and join_checks.TLS_MARKER in retry_src
    from flwr.supercore.exit.exit_code import ExitCode

    assert f"Exit Code: {int(ExitCode.SUPERNODE_CONNECTION_ERROR)}" == join_checks.GAVE_UP_MARKER
    assert '"SuperNode ID: %s"' in start_src
    from flwr.supercore.error import catalog

    assert join_checks.REFUSED_KEY_MARKER in inspect.getsource(catalog)


JOIN_AGENT_IMPORTS = """
import sys
from pathlib import Path
from fedtune.cli import build_parser
from fedtune.cli.deploy import write_join_policy
from fedtune.clients.join import JoinOptions, node_config
from fedtune.clients.join_checks import check_join
from fedtune.clients.policy import ContributorPolicy
from fedtune.deploy.keys import ensure_keys
state = Path(sys.argv[1])
flags = ["--insecure", "--state-dir", str(state), "--batch-size", "4", "--max-local-steps", "50"]
assert write_join_policy(build_parser().parse_args(["join", "--coordinator", "127.0.0.1:1", *flags])) is None
opts = JoinOptions(coordinator="127.0.0.1:1", state_dir=state, insecure=True, batch_size=4)
assert not isinstance(check_join(opts), str)
node_config(opts, ensure_keys(state), 1.0, "cpu")
print(ContributorPolicy.load(state).summary())
print("heavy:", sorted(m for m in ("transformers", "peft", "opacus", "datasets") if m in sys.modules))
"""


@pytest.mark.slow  # a fresh interpreter
def test_the_join_agent_checks_and_configures_without_the_training_stack(tmp_path: Path) -> None:
    """``join`` itself only checks, writes its policy and starts processes: importing transformers, PEFT,
    Opacus and datasets there cost each start seconds of CPU (the worker loads them, once)."""
    proc = run_python(JOIN_AGENT_IMPORTS, str(tmp_path / "state"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "≤ 50 steps" in proc.stdout and "heavy: []" in proc.stdout, proc.stdout
