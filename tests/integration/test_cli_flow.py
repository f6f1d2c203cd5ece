"""The operator's path in separate processes: daemon → run create → four clients → run show →
run model → SIGTERM → restart → run show again. Everything through the `leptonfl` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from simulations.apps import load_app
from simulations.grpc_backend import DaemonProcess
from tests.conftest import DIGITS_APP, ROOT

pytestmark = pytest.mark.slow
LEPTONFL = [sys.executable, "-m", "leptonfl"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LEPTONFL, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_operator_flow_survives_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    daemon = DaemonProcess(data, tmp_path / "daemon1.log")
    address = daemon.start()
    try:
        created = cli(
            "run",
            "create",
            "--server",
            address,
            "--app",
            "examples/digits",
            "--rounds",
            "5",
            "--clients-per-round",
            "4",
            "--min-clients",
            "4",
            "--set",
            "local_epochs=2",
        )
        assert created.returncode == 0, created.stderr
        run_id = created.stdout.strip()
        assert run_id.startswith("run-") and "\n" not in run_id  # the id alone on stdout
        assert "created run" in created.stderr

        clients = [
            subprocess.Popen(
                [*LEPTONFL, "client", "--server", address, "--app", "examples/digits", "--partition", f"{i}/4"],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(4)
        ]
        for proc in clients:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-3000:]
            assert "trained 5 rounds" in err

        shown = cli("run", "show", run_id, "--server", address, "--json")
        assert shown.returncode == 0, shown.stderr
        before = json.loads(shown.stdout)
        assert before["status"] == "completed" and before["committed_rounds"] == 5
        assert [r["round"] for r in before["rounds"]] == [1, 2, 3, 4, 5]
        assert all(r["num_clients"] == 4 and r["eval_clients"] == 4 for r in before["rounds"])
        assert before["rounds"][-1]["eval_accuracy"] > 0.8
        assert before["rounds"][-1]["train_loss"] < before["rounds"][0]["train_loss"]
        table = cli("run", "show", run_id, "--server", address)
        assert "completed" in table.stdout and "accuracy" in table.stdout

        model_path = tmp_path / "final.safetensors"
        assert cli("run", "model", run_id, "--server", address, "-o", str(model_path)).returncode == 0
        model = load_app(DIGITS_APP).build_model()
        model.load_state_dict(load_file(model_path))  # strict: every tensor name and shape fits

        started = time.monotonic()
        assert daemon.stop(timeout=10) == 0
        assert time.monotonic() - started < 10
    finally:
        daemon.stop()

    restarted = DaemonProcess(data, tmp_path / "daemon2.log")
    address = restarted.start()
    try:
        after = json.loads(cli("run", "show", run_id, "--server", address, "--json").stdout)
        assert after == before
        listed = json.loads(cli("run", "list", "--server", address, "--json").stdout)
        assert [r["run_id"] for r in listed] == [run_id]
        missing = cli("run", "show", "run-nope", "--server", address)
        assert missing.returncode == 1 and "unknown run" in missing.stderr
    finally:
        assert restarted.stop() == 0


def test_server_address_comes_from_the_environment(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "data", tmp_path / "daemon.log")
    address = daemon.start()
    try:
        env = {**os.environ, "LEPTONFL_SERVER": address}
        listed = subprocess.run(
            [*LEPTONFL, "run", "list", "--json"], capture_output=True, text=True, env=env, timeout=60, cwd=ROOT
        )
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == []
    finally:
        daemon.stop()
    unreachable = subprocess.run(
        [*LEPTONFL, "run", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LEPTONFL_SERVER": address},
        cwd=ROOT,
    )
    assert unreachable.returncode == 1 and "no Lepton FL server reachable" in unreachable.stderr


def test_sigint_stops_the_daemon_cleanly(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "data", tmp_path / "daemon.log")
    daemon.start()
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGINT)
    assert daemon.process.wait(10) == 0
    assert "stopped" in (tmp_path / "daemon.log").read_text()
