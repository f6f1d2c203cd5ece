"""Differential privacy through the real daemon: the ledger equals Opacus' accountant, the
budget stops the run, a restart resumes the ledger exactly, and local DP is reported."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

from client_sdk import FederatedClient, LocalDP, TorchTrainer
from client_sdk.transport import Backoff
from server.control_client import ControlClient, ControlError, status_name
from strategies.factory import PrivacySettings
from tests.conftest import start_daemon

Z, CLIP, DELTA = 1.1, 1.0, 1e-5


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(2, 3)


def trainer(seed: int, privacy: LocalDP | None = None) -> TorchTrainer:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(40, 2, generator=g), torch.randint(0, 3, (40,), generator=g))
    return TorchTrainer(model(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=40), privacy=privacy)


def opacus_epsilon(sample_rates: list[float]) -> float:
    accountant = RDPAccountant()
    for q in sample_rates:
        accountant.step(noise_multiplier=Z, sample_rate=q)
    return accountant.get_epsilon(DELTA)


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def clients_for(address: str, count: int, **kwargs) -> list[FederatedClient]:
    out = [
        FederatedClient(
            address,
            "tiny",
            trainer(i, **kwargs),
            name=f"c{i}",
            exit_when_idle=False,
            backoff=Backoff(initial=0.1, maximum=0.3),
        )
        for i in range(count)
    ]
    for c in out:
        c.start()
    return out


def central(budget: float = 0.0) -> PrivacySettings:
    return PrivacySettings(mode="central", noise_multiplier=Z, clip_norm=CLIP, delta=DELTA, epsilon_budget=budget)


def test_epsilon_equals_opacus_and_the_budget_stops_the_run(daemon) -> None:
    clients = clients_for(daemon.address, 4)
    try:
        # q = K / population = 2 / 4; the budget admits two rounds, not three.
        budget = (opacus_epsilon([0.5] * 2) + opacus_epsilon([0.5] * 3)) / 2
        with ControlClient(daemon.address) as control:
            run = control.create_run(
                app="tiny",
                weights=model().state_dict(),
                num_rounds=5,
                clients_per_round=2,
                min_clients=4,
                round_timeout_s=20,
                privacy=central(budget),
            )
            wait_until(lambda: status_name(control.get_run(run.run_id).run) == "budget_exhausted")
            detail = control.get_run(run.run_id)
    finally:
        for c in clients:
            c.stop()
    assert [r.round for r in detail.rounds] == [1, 2]
    for r in detail.rounds:
        assert r.metrics["sample_rate"].double_value == 0.5
        assert r.epsilon == pytest.approx(opacus_epsilon([0.5] * r.round), abs=1e-6)
        assert r.clip_norm == CLIP
    assert detail.run.epsilon == pytest.approx(opacus_epsilon([0.5, 0.5]), abs=1e-6)
    assert "above the budget" in detail.run.status_reason


def test_a_restart_resumes_the_ledger_exactly(tmp_path: Path, db_url: str) -> None:
    first = start_daemon(tmp_path / "data", db=db_url)
    port = int(first.address.rsplit(":", 1)[1])
    clients = clients_for(first.address, 2)
    try:
        with ControlClient(first.address) as control:
            run = control.create_run(
                app="tiny",
                weights=model().state_dict(),
                num_rounds=4,
                clients_per_round=1,
                min_clients=2,
                round_timeout_s=20,
                privacy=central(),
            )
            wait_until(lambda: control.get_run(run.run_id).run.committed_rounds >= 1)
        first.stop(grace=0.5)
        second = start_daemon(tmp_path / "data", address=f"127.0.0.1:{port}", db=db_url)
        try:
            with ControlClient(second.address) as control:
                wait_until(lambda: status_name(control.get_run(run.run_id).run) == "completed")
                detail = control.get_run(run.run_id)
        finally:
            second.stop(grace=0.5)
    finally:
        for c in clients:
            c.stop()
    rates = [r.metrics["sample_rate"].double_value for r in detail.rounds]
    assert [r.round for r in detail.rounds] == [1, 2, 3, 4] and rates == [0.5] * 4
    # Exactly one accountant step per committed round, before and after the restart.
    assert [r.epsilon for r in detail.rounds] == pytest.approx(
        [opacus_epsilon(rates[:n]) for n in range(1, 5)], abs=1e-6
    )
    assert detail.run.epsilon == pytest.approx(opacus_epsilon(rates), abs=1e-6)


def test_local_dp_epsilon_is_recorded_per_client(daemon) -> None:
    privacy = LocalDP(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    clients = clients_for(daemon.address, 2, privacy=privacy)
    try:
        with ControlClient(daemon.address) as control:
            run = control.create_run(
                app="tiny",
                weights=model().state_dict(),
                num_rounds=2,
                clients_per_round=2,
                min_clients=2,
                round_timeout_s=30,
            )
            wait_until(lambda: status_name(control.get_run(run.run_id).run) == "completed")
            detail = control.get_run(run.run_id)
    finally:
        for c in clients:
            c.stop()
    assert detail.run.local_dp_clients == 2
    # Each client: 2 rounds x 1 epoch x 5 Poisson-sampled steps at q = 1/5, sigma 1.0 (Opacus' own accounting).
    accountant = RDPAccountant()
    accountant.step(noise_multiplier=1.0, sample_rate=0.2)
    accountant.history = [(1.0, 0.2, 10)]
    assert detail.run.max_local_epsilon == pytest.approx(accountant.get_epsilon(1e-5), abs=1e-6)


def test_strategies_by_name_and_refused_configurations(daemon) -> None:
    clients = clients_for(daemon.address, 2)
    try:
        with ControlClient(daemon.address) as control:
            run = control.create_run(
                app="tiny",
                weights=model().state_dict(),
                num_rounds=2,
                clients_per_round=2,
                min_clients=2,
                round_timeout_s=30,
                strategy="fedadam",
                strategy_params={"server_lr": 0.05},
            )
            wait_until(lambda: status_name(control.get_run(run.run_id).run) == "completed")
            assert control.get_run(run.run_id).run.spec.strategy_params["server_lr"].double_value == 0.05
            with pytest.raises(ControlError) as info:
                control.create_run(
                    app="tiny",
                    weights=model().state_dict(),
                    num_rounds=1,
                    clients_per_round=4,
                    min_clients=4,
                    strategy="krum",
                    strategy_params={"num_malicious": 1},
                )
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "n > 2f + 2" in str(info.value)
            with pytest.raises(ControlError) as info:
                control.create_run(
                    app="tiny",
                    weights=model().state_dict(),
                    num_rounds=1,
                    clients_per_round=2,
                    min_clients=2,
                    strategy="median",
                    privacy=central(),
                )
            assert "FedAvg-family" in str(info.value)
    finally:
        for c in clients:
            c.stop()
