"""Record-level local DP in `TorchTrainer` (`client_sdk.privacy`): accounting, noise, model checks, budget."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client_sdk.errors import LeptonError
from client_sdk.privacy import LocalDP, PrivacyBudgetExhausted, UnsupportedModelError, check_model
from client_sdk.trainer import TorchTrainer

pytestmark = pytest.mark.filterwarnings(
    "ignore:Secure RNG turned off",
    "ignore:Full backward hook is firing",
    "ignore:Optimal order is the",
)

DELTA = 1e-5


def dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return TensorDataset(x, (x[:, 0] + 0.5 * x[:, 1] > 0).long())


def linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(5, 2)


def initial(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def dp(**overrides: object) -> LocalDP:
    kwargs: dict[str, object] = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": DELTA, **overrides}
    return LocalDP(**kwargs)  # type: ignore[arg-type]


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.bn1 = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn1(self.fc1(x))))


def reference_epsilon(sigma: float, q: float, steps: int) -> float:
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(DELTA)


def test_epsilon_accumulates_over_fits_and_matches_opacus_accountant():
    model = linear()
    trainer = TorchTrainer(model, DataLoader(dataset(), batch_size=8), epochs=2, privacy=dp())
    weights = initial(model)
    keys = list(weights)
    hooks_after_first = None
    epsilons = []
    torch.manual_seed(1)
    for fit in range(1, 4):
        result = trainer.fit(weights, {})
        epsilons.append(result.metrics["epsilon"])
        assert result.metrics["dp_noise_multiplier"] == 1.0
        assert result.num_examples == 64
        assert math.isfinite(result.metrics["train_loss"])
        # q = 1 / len(loader) = 1/8, 8 Poisson batches per epoch, 2 epochs per fit
        assert result.metrics["epsilon"] == pytest.approx(reference_epsilon(1.0, 1 / 8, fit * 2 * 8), abs=1e-6)
        assert list(result.weights) == keys  # no "_module." prefix
        fresh = nn.Linear(5, 2)
        fresh.load_state_dict(result.weights)  # strict
        assert not torch.equal(result.weights["weight"], weights["weight"])
        weights = result.weights
        # the model is wrapped for per-example gradients once, not once per round
        hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in trainer.model.modules())
        hooks_after_first = hooks_after_first or hooks
        assert hooks == hooks_after_first
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert list(trainer.model.state_dict()) == keys


def test_evaluate_works_on_a_private_trainer():
    model = linear()
    data = DataLoader(dataset(), batch_size=8)
    trainer = TorchTrainer(model, data, DataLoader(dataset(32, seed=1), batch_size=16), privacy=dp())
    weights = trainer.fit(initial(model), {}).weights
    result = trainer.evaluate(weights, {})
    assert result.num_examples == 32 and math.isfinite(result.loss)


def _update(privacy: LocalDP | None) -> torch.Tensor:
    model = linear()
    start = initial(model)
    trainer = TorchTrainer(model, DataLoader(dataset(), batch_size=8), privacy=privacy)
    torch.manual_seed(7)
    return trainer.fit(start, {"lr": 0.05}).weights["weight"] - start["weight"]


def test_noise_is_actually_added():
    plain = _update(None)
    noisy = _update(dp(noise_multiplier=1e4))
    little = _update(dp(noise_multiplier=1e-3))
    assert plain.norm() > 0
    assert (noisy - plain).norm() > 100 * plain.norm()
    # the same seed with little noise stays in the scale of a normal update
    assert (little - plain).norm() < 10 * plain.norm()


def test_fedprox_proximal_term_still_pulls_towards_the_global_weights():
    def drift(mu: float) -> float:
        model = linear()
        start = initial(model)
        trainer = TorchTrainer(model, DataLoader(dataset(), batch_size=8), epochs=3, privacy=dp())
        torch.manual_seed(3)
        trained = trainer.fit(start, {"lr": 0.1, "proximal_mu": mu}).weights
        return float(sum((trained[k] - start[k]).norm() ** 2 for k in start))

    assert drift(5.0) < 0.5 * drift(0.0)


def test_batchnorm_is_refused_naming_the_layer():
    with pytest.raises(UnsupportedModelError) as info:
        TorchTrainer(BNNet(), DataLoader(dataset(), batch_size=8), privacy=dp())
    message = str(info.value)
    assert "bn1 (BatchNorm1d)" in message
    assert "fix_model=True" in message
    assert "fc1" not in message and "fc2" not in message
    assert isinstance(info.value, LeptonError)


def test_check_model_returns_supported_models_unchanged():
    model = linear()
    assert check_model(model) is model
    assert check_model(model, fix=True) is model


def test_fix_model_trains_the_fixed_architecture():
    torch.manual_seed(0)
    global_model = check_model(BNNet(), fix=True)  # what the app builds everywhere, the server included
    assert isinstance(global_model.bn1, nn.GroupNorm)
    trainer = TorchTrainer(BNNet(), DataLoader(dataset(), batch_size=8), privacy=dp(fix_model=True))
    assert isinstance(trainer.model.bn1, nn.GroupNorm)
    start = initial(global_model)
    result = trainer.fit(start, {})
    assert list(result.weights) == list(start)
    assert "bn1.running_mean" not in result.weights
    assert math.isfinite(result.metrics["epsilon"]) and result.metrics["epsilon"] > 0
    global_model.load_state_dict(result.weights)
    # the unfixed architecture's weights do not fit, and the error says why
    with pytest.raises(ValueError, match="fix_model=True"):
        trainer.fit(initial(BNNet()), {})


def test_target_epsilon_is_reached_after_the_planned_rounds_then_training_stops():
    target = 3.0
    model = linear()
    trainer = TorchTrainer(
        model, DataLoader(dataset(), batch_size=8), privacy=dp(noise_multiplier=None, target_epsilon=target, rounds=3)
    )
    weights = initial(model)
    sigmas, epsilons = set(), []
    torch.manual_seed(0)
    for _ in range(3):
        result = trainer.fit(weights, {"local_epochs": 2})  # the server's epochs set the plan
        sigmas.add(result.metrics["dp_noise_multiplier"])
        epsilons.append(result.metrics["epsilon"])
        weights = result.weights
    assert len(sigmas) == 1  # calibrated once
    sigma = sigmas.pop()
    assert epsilons[-1] == pytest.approx(reference_epsilon(sigma, 1 / 8, 3 * 2 * 8), abs=1e-6)
    assert 0.9 * target <= epsilons[-1] <= target
    before = initial(trainer.model)
    with pytest.raises(PrivacyBudgetExhausted, match="target_epsilon"):
        trainer.fit(weights, {"local_epochs": 1})
    # refused before any step: nothing trained, nothing accounted
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer._private is not None and trainer._private.epsilon == epsilons[-1]


def test_target_epsilon_budget_holds_when_rounds_get_longer():
    target = 2.0
    model = linear()
    trainer = TorchTrainer(
        model, DataLoader(dataset(), batch_size=8), privacy=dp(noise_multiplier=None, target_epsilon=target, rounds=4)
    )
    weights = initial(model)
    trained = 0
    torch.manual_seed(0)
    with pytest.raises(PrivacyBudgetExhausted):
        for epochs in (1, 3, 3, 3):  # planned 4 × 1 epoch; the server then asks for more
            result = trainer.fit(weights, {"local_epochs": epochs})
            assert result.metrics["epsilon"] <= target
            trained += 1
    assert trained == 2


def test_empty_poisson_batches_are_trained_through():
    # q = 1/6 over 6 records: a Poisson batch is empty with probability (5/6)^6 ≈ 1/3
    data = dataset(6)
    model = linear()
    trainer = TorchTrainer(model, DataLoader(data, batch_size=1), epochs=4, privacy=dp())
    torch.manual_seed(0)
    result = trainer.fit(initial(model), {})
    assert math.isfinite(result.metrics["train_loss"])
    assert result.num_examples == 6
    assert result.metrics["epsilon"] == pytest.approx(reference_epsilon(1.0, 1 / 6, 4 * 6), abs=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_grad_norm": 1.0, "delta": DELTA},  # neither noise_multiplier nor target_epsilon
        {"max_grad_norm": 1.0, "delta": DELTA, "noise_multiplier": 1.0, "target_epsilon": 1.0, "rounds": 3},
        {"max_grad_norm": 0.0, "delta": DELTA, "noise_multiplier": 1.0},
        {"max_grad_norm": -1.0, "delta": DELTA, "noise_multiplier": 1.0},
        {"max_grad_norm": math.inf, "delta": DELTA, "noise_multiplier": 1.0},
        {"max_grad_norm": 1.0, "delta": 0.0, "noise_multiplier": 1.0},
        {"max_grad_norm": 1.0, "delta": 1.0, "noise_multiplier": 1.0},
        {"max_grad_norm": 1.0, "delta": DELTA, "noise_multiplier": 0.0},
        {"max_grad_norm": 1.0, "delta": DELTA, "noise_multiplier": math.nan},
        {"max_grad_norm": 1.0, "delta": DELTA, "noise_multiplier": "1.0"},
        {"max_grad_norm": 1.0, "delta": DELTA, "noise_multiplier": 1.0, "rounds": 3},
        {"max_grad_norm": 1.0, "delta": DELTA, "target_epsilon": 1.0},  # no rounds
        {"max_grad_norm": 1.0, "delta": DELTA, "target_epsilon": -1.0, "rounds": 3},
        {"max_grad_norm": 1.0, "delta": DELTA, "target_epsilon": 1.0, "rounds": 0},
        {"max_grad_norm": 1.0, "delta": DELTA, "target_epsilon": 1.0, "rounds": 2.5},
        {"max_grad_norm": 1.0, "delta": DELTA, "noise_multiplier": 1.0, "accountant": "gdp"},
        {"max_grad_norm": 1.0, "delta": DELTA, "noise_multiplier": 1.0, "fix_model": "yes"},
    ],
)
def test_invalid_configs_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        LocalDP(**kwargs)


def test_private_training_needs_a_sized_dataloader():
    batches = [next(iter(DataLoader(dataset(), batch_size=8)))]
    with pytest.raises(ValueError, match="DataLoader"):
        TorchTrainer(linear(), batches, privacy=dp())
    with pytest.raises(ValueError, match="empty"):
        TorchTrainer(linear(), DataLoader(dataset(0), batch_size=8), privacy=dp())


def test_unreachable_target_epsilon_is_a_clear_error():
    model = linear()
    trainer = TorchTrainer(
        model, DataLoader(dataset(), batch_size=8), privacy=dp(noise_multiplier=None, target_epsilon=1e-9, rounds=3)
    )
    with pytest.raises(ValueError, match="cannot reach target_epsilon"):
        trainer.fit(initial(model), {})
