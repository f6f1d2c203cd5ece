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


def test_sim_strategies_and_central_dp_from_the_command_line(tmp_path: Path) -> None:
    done = sim(
        tmp_path / "dp",
        "--clients",
        "10",
        "--rounds",
        "3",
        "--clients-per-round",
        "5",
        "--dp",
        "central",
        "--noise-multiplier",
        "1.2",
        "--clip-norm",
        "1.0",
        "--epsilon-budget",
        "50",
        "--strategy",
        "fedavgm",
        "--param",
        "momentum=0.5",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_metrics(tmp_path / "dp")
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for row in rows:
        accountant.step(noise_multiplier=1.2, sample_rate=0.5)
        assert row["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), abs=1e-6)
    assert "epsilon" in done.stderr and "epsilon" in done.stdout  # progress lines and the table
    run = json.loads((tmp_path / "dp" / "run.json").read_text())
    assert run["privacy"]["noise_multiplier"] == 1.2 and run["strategy_params"] == {"momentum": 0.5}


def test_the_budget_stops_a_simulation_and_robust_strategies_run(tmp_path: Path) -> None:
    from strategies.factory import PrivacySettings

    privacy = PrivacySettings(mode="central", noise_multiplier=1.0, clip_norm=1.0, epsilon_budget=8.0)
    result = run_simulation(
        SimulationConfig(
            app=DIGITS_APP, clients=4, rounds=10, clients_per_round=4, privacy=privacy, out=tmp_path / "b"
        ),
        echo=lambda _: None,
    )
    assert 0 < len(result.records) < 10 and result.records[-1].extra["epsilon"] <= 8.0
    for strategy, params in (("krum", {"num_malicious": 1}), ("trimmed-mean", {"beta": 0.2}), ("median", {})):
        robust = run_simulation(
            SimulationConfig(
                app=DIGITS_APP, clients=6, rounds=2, strategy=strategy, strategy_params=params, out=tmp_path / strategy
            ),
            echo=lambda _: None,
        )
        assert len(robust.records) == 2 and robust.records[-1].num_clients == 6
