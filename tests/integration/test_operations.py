"""Operations: Prometheus metrics move during a run, gRPC health answers SERVING, JSON logs,
and `leptonfl server status`."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.control_client import ControlClient
from tests.conftest import ROOT, start_daemon, tiny_weights
from tests.integration.rawclient import RawClient


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_move_and_health_is_serving(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path / "data", metrics_address="127.0.0.1:0")
    try:
        assert daemon.metrics_port
        channel = grpc.insecure_channel(daemon.address)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="leptonfl.v1.Fleet"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        before = scrape(daemon.metrics_port)
        assert before["leptonfl_updates_accepted_total"] == 0
        with ControlClient(daemon.address) as control:
            control.create_run(app="tiny", weights=tiny_weights(), num_rounds=1, clients_per_round=1, min_clients=1)
            client = RawClient(daemon.address)
            task = client.wait_task()
            with_nan = {"w": tiny_weights()["w"] * float("nan"), "b": tiny_weights()["b"]}
            try:
                client.upload(task, with_nan, 3)
            except grpc.RpcError:
                pass
            assert client.upload(task, tiny_weights(), 3).accepted
            client.wait_task()  # the evaluation task: the round has committed
            after = scrape(daemon.metrics_port)
            client.close()
        assert after["leptonfl_updates_accepted_total"] == 1
        assert after['leptonfl_updates_rejected_total{code="INVALID_ARGUMENT"}'] == 1
        assert after['leptonfl_rpc_rejections_total{code="INVALID_ARGUMENT",method="UploadUpdate"}'] == 1
        assert after["leptonfl_rounds_committed_total"] == 1
        assert after["leptonfl_bytes_received_total"] == 36  # 3x2 + 3 float32 values
        assert after["leptonfl_clients_online"] == 1 and after["leptonfl_runs_active"] == 1
        channel.close()
    finally:
        daemon.stop(grace=0.5)


def test_json_logs_and_server_status(tmp_path: Path) -> None:
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "leptonfl",
                "server",
                "start",
                "--address",
                "127.0.0.1:0",
                "--data-dir",
                str(tmp_path / "d"),
                "--insecure",
                "--log-format",
                "json",
            ],
            stderr=log_file,
            cwd=ROOT,
        )
    try:
        import time

        deadline = time.monotonic() + 60
        address = ""
        while not address and time.monotonic() < deadline:
            for line in log_path.read_text().splitlines():
                entry = json.loads(line)  # every line is one JSON object
                if "listening on" in entry["message"]:
                    address = entry["message"].split("listening on ")[1].split()[0]
            time.sleep(0.1)
        assert address
        status = subprocess.run(
            [sys.executable, "-m", "leptonfl", "server", "status", "--server", address],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert status.returncode == 0, status.stderr
        assert f"{address}: SERVING" in status.stdout and "runs: none" in status.stdout
    finally:
        process.terminate()
        assert process.wait(10) == 0
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert any(e["level"] == "WARNING" and "PLAINTEXT" in e["message"] for e in entries)


def test_a_second_daemon_on_a_taken_port_refuses_to_start(tmp_path: Path) -> None:
    """gRPC would otherwise share the port (SO_REUSEPORT) and split the clients between two
    daemons with different state."""
    first = start_daemon(tmp_path / "one")
    try:
        with pytest.raises(OSError, match="cannot listen on"):
            start_daemon(tmp_path / "two", address=first.address)
    finally:
        first.stop(grace=0.5)
