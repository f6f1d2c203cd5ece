"""The in-process backend on worker processes: same math as one process, deterministic."""

from __future__ import annotations

from pathlib import Path

import torch

from simulations.config import SimulationConfig
from simulations.runner import run_simulation
from strategies.factory import PrivacySettings
from tests.conftest import DIGITS_APP


def final(tmp_path: Path, name: str, **kwargs: object) -> tuple[dict[str, torch.Tensor], list]:
    config = SimulationConfig(
        app=DIGITS_APP,
        clients=12,
        rounds=2,
        clients_per_round=8,
        partition="dirichlet:0.5",
        seed=5,
        out=tmp_path / name,
        **kwargs,
    )  # type: ignore[arg-type]
    result = run_simulation(config, echo=lambda _: None)
    return result.weights, result.records


def test_workers_match_one_process_and_repeat_exactly(tmp_path: Path) -> None:
    one, one_records = final(tmp_path, "one", workers=1)
    two, two_records = final(tmp_path, "two", workers=2)
    again, _ = final(tmp_path, "again", workers=2)
    assert all(torch.equal(two[k], again[k]) for k in two)
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-6
    for a, b in zip(one_records, two_records, strict=True):
        assert (a.num_clients, a.num_examples) == (b.num_clients, b.num_examples)
        assert abs(a.eval_accuracy - b.eval_accuracy) < 1e-6 and abs(a.train_loss - b.train_loss) < 1e-6


def test_workers_with_central_dp_and_a_non_mergeable_strategy(tmp_path: Path) -> None:
    privacy = PrivacySettings(mode="central", noise_multiplier=1.0, clip_norm=0.5)
    one, _ = final(tmp_path, "dp1", workers=1, privacy=privacy)
    two, _ = final(tmp_path, "dp2", workers=2, privacy=privacy)
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-6  # same seeded noise, same clipping
    med1, _ = final(tmp_path, "m1", workers=1, strategy="median")
    med2, _ = final(tmp_path, "m2", workers=2, strategy="median")  # needs every update: runs in one process
    assert all(torch.equal(med1[k], med2[k]) for k in med1)


def test_the_pool_leaves_the_garbage_collector_as_it_found_it(tmp_path: Path) -> None:
    """Workers fork with the parent's objects frozen (no copy-on-write from full collections);
    the freeze ends with the pool, but one the host made itself is left alone."""
    import gc

    assert gc.get_freeze_count() == 0
    final(tmp_path, "a", workers=2)
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        final(tmp_path, "b", workers=2)
        assert gc.get_freeze_count() >= frozen  # the host's freeze stands
    finally:
        gc.unfreeze()
