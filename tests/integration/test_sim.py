"""`leptonfl sim` end to end: in-process with 100 clients, over real gRPC with 20, and seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simulations.config import SimulationConfig
from simulations.runner import run_simulation
from tests.conftest import DIGITS_APP, ROOT


def sim(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "leptonfl", "sim", "--app", "examples/digits", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_inprocess_sim_with_100_clients(tmp_path: Path) -> None:
    done = sim(tmp_path, "--clients", "100", "--rounds", "5")
    assert done.returncode == 0, done.stderr
    rows = read_metrics(tmp_path)
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["num_clients"] == 100 and r["num_examples"] == 1437 for r in rows)
    assert rows[-1]["eval_accuracy"] > rows[0]["eval_accuracy"]
    assert "round 5/5" in done.stderr and "final test accuracy" in done.stdout
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 6
    assert json.loads((tmp_path / "run.json").read_text())["clients"] == 100


@pytest.mark.slow
def test_grpc_sim_with_20_clients(tmp_path: Path) -> None:
    done = sim(tmp_path, "--backend", "grpc", "--clients", "20", "--rounds", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(tmp_path)
    assert [(r["round"], r["num_clients"], r["num_examples"]) for r in rows] == [
        (1, 20, 1437),
        (2, 20, 1437),
        (3, 20, 1437),
    ]
    assert rows[-1]["eval_accuracy"] > 0.8
    assert "daemon stopped (exit code 0)" in done.stderr


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path: Path) -> None:
    def final(seed: int, out: str) -> dict[str, torch.Tensor]:
        config = SimulationConfig(
            app=DIGITS_APP,
            clients=10,
            rounds=2,
            clients_per_round=4,
            partition="dirichlet:0.5",
            seed=seed,
            out=tmp_path / out,
        )
        return run_simulation(config, echo=lambda _: None).weights

    a, b, c = final(3, "a"), final(3, "b"), final(4, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_bad_simulation_settings_are_refused_clearly(tmp_path: Path) -> None:
    done = sim(tmp_path, "--clients", "4", "--rounds", "1", "--clients-per-round", "9")
    assert done.returncode == 1 and "clients per round must be between 1 and 4" in done.stderr
    done = sim(tmp_path, "--clients", "4", "--rounds", "1", "--partition", "shards")
    assert done.returncode == 1 and "iid" in done.stderr
