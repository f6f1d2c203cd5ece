"""The vectorised backend agrees with the in-process one, and falls back where it cannot."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from simulations.apps import load_app
from simulations.batching import EpochOrders, loader_orders, shuffled_orders
from simulations.config import SimulationConfig
from simulations.inprocess import run_inprocess
from simulations.report import RoundRecord
from simulations.vectorized import pack_groups, run_vectorized, stacked_forward, unsupported_reason
from strategies.factory import PrivacySettings

DIGITS = str(Path(__file__).parents[2] / "examples" / "digits")
ATOL = 1e-4


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: both backends are compared, not timed, and shared CI boxes thrash with more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(tmp_path: Path, app: str = DIGITS, **client: float) -> SimulationConfig:
    return SimulationConfig(
        app=app,
        clients=12,
        rounds=3,
        clients_per_round=8,
        partition="dirichlet:0.5",
        seed=1,
        out=tmp_path,
        client_config={"local_epochs": 2, "batch_size": 10, "lr": 0.1, **client},
    )


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _assert_records_close(expected: list[RoundRecord], actual: list[RoundRecord]) -> None:
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual, strict=True):
        assert (a.round, a.num_clients, a.num_examples) == (e.round, e.num_clients, e.num_examples)
        assert a.train_loss == pytest.approx(e.train_loss, abs=ATOL)
        assert a.eval_loss == pytest.approx(e.eval_loss, abs=ATOL)
        assert a.eval_accuracy == pytest.approx(e.eval_accuracy, abs=ATOL)
        assert a.extra.keys() == e.extra.keys()
        for key in e.extra:
            assert a.extra[key] == pytest.approx(e.extra[key], abs=ATOL, nan_ok=True)


@pytest.mark.parametrize(
    ("count", "batch_size", "seed", "epochs"),
    [(1, 10, 0, 1), (14, 10, 3, 2), (20, 10, 5, 3), (37, 4, 123_456_789, 2), (64, 32, 7, 1), (5, 1, 2, 4)],
)
def test_shuffled_orders_reproduce_the_dataloader(count: int, batch_size: int, seed: int, epochs: int) -> None:
    assert torch.equal(shuffled_orders(count, batch_size, seed, epochs), loader_orders(count, batch_size, seed, epochs))


def test_one_reseeded_generator_draws_what_a_fresh_loader_would_for_every_client() -> None:
    draw = EpochOrders()
    for count, seed, epochs in [(14, 3, 2), (1, 0, 1), (37, 123_456_789, 3), (14, 3, 2), (20, 5, 1)]:
        assert torch.equal(torch.stack(draw(count, seed, epochs)), loader_orders(count, 10, seed, epochs))


def test_the_workload_has_unequal_steps_and_partial_batches(tmp_path: Path) -> None:
    """Guards the comparison below: it must exercise padded steps and padded samples."""
    app, config = load_app(DIGITS), _config(tmp_path)
    sizes = [len(app.partition(c, config.clients, config.partition, config.seed)[0]) for c in range(config.clients)]
    assert len({-(-n // 10) for n in sizes}) > 3
    assert any(n % 10 for n in sizes)


@pytest.mark.parametrize(
    "client", [{"momentum": 0.0}, {"momentum": 0.9}, {"momentum": 0.5, "proximal_mu": 0.1}], ids=str
)
def test_matches_inprocess(tmp_path: Path, client: dict[str, float]) -> None:
    app, config = load_app(DIGITS), _config(tmp_path, **client)
    messages: list[str] = []
    expected, expected_weights = run_inprocess(app, config, lambda _: None)
    seen: list[RoundRecord] = []
    actual, weights = run_vectorized(app, config, seen.append, messages.append)
    assert not messages  # no fallback
    assert seen == actual
    diff = _max_diff(expected_weights, weights)
    assert diff < ATOL, diff  # measured: ~1e-7 (float32 rounding only)
    assert _max_diff(app.initial_weights(config.seed), weights) > 0.01  # it did train
    _assert_records_close(expected, actual)


def test_matches_inprocess_under_central_dp(tmp_path: Path) -> None:
    app = load_app(DIGITS)
    privacy = PrivacySettings(mode="central", noise_multiplier=0.5, clip_norm=1.0)
    config = SimulationConfig(
        app=DIGITS, clients=12, rounds=2, clients_per_round=6, partition="iid", seed=2, out=tmp_path,
        client_config={"local_epochs": 1, "batch_size": 16, "lr": 0.1}, privacy=privacy,
    )  # fmt: skip
    expected, expected_weights = run_inprocess(app, config, lambda _: None)
    actual, weights = run_vectorized(app, config, lambda _: None)
    assert _max_diff(expected_weights, weights) < ATOL
    _assert_records_close(expected, actual)
    assert "epsilon" in actual[-1].extra


def test_is_deterministic(tmp_path: Path) -> None:
    app, config = load_app(DIGITS), _config(tmp_path, momentum=0.9)
    first = run_vectorized(app, config, lambda _: None)[1]
    second = run_vectorized(app, config, lambda _: None)[1]
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_small_memory_budget_splits_groups_without_changing_results(tmp_path: Path) -> None:
    app, config = load_app(DIGITS), _config(tmp_path, momentum=0.9)
    one_group = run_vectorized(app, config, lambda _: None)[1]
    tiny = run_vectorized(app, config, lambda _: None, memory_budget_bytes=1)[1]  # one client per group
    assert _max_diff(one_group, tiny) < 1e-5


def test_pack_groups() -> None:
    steps = [3, 0, 12, 12, 5, 4, 12, 1, 3, 3]
    for cap in (1, 2, 3, 100):
        groups = pack_groups(steps, cap)
        flat = sorted(i for g in groups for i in g)
        assert flat == [i for i, s in enumerate(steps) if s > 0]  # each trained client exactly once
        assert all(1 <= len(g) <= cap for g in groups)
        assert all(steps[g[0]] == max(steps[i] for i in g) for g in groups)  # sorted, longest first
    # equal step counts go together; very different ones do not share padding
    assert pack_groups([100, 100, 1, 1], cap=10) == [[0, 1], [2, 3]]
    assert pack_groups([2, 2, 2], cap=10) == [[0, 1, 2]]
    assert pack_groups([0, 0], cap=10) == []


APP_TEMPLATE = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

NAME = "tiny"
DEFAULT_CLIENT_CONFIG = {{"local_epochs": 1, "batch_size": 8, "lr": 0.1}}


def build_model():
    return {model}


def load_dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return TensorDataset(x[:120], y[:120]), TensorDataset(x[120:], y[120:])
"""
MLP = "nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))"


def _tiny_app(tmp_path: Path, model: str = MLP, extra: str = "") -> str:
    folder = tmp_path / "tiny_app"
    folder.mkdir()
    (folder / "app.py").write_text(APP_TEMPLATE.format(model=model) + textwrap.dedent(extra))
    return str(folder)


def test_falls_back_for_a_custom_optimizer(tmp_path: Path) -> None:
    extra = """
    def make_optimizer(params, config):
        return torch.optim.Adam(params, lr=float(config["lr"]) / 10)
    """
    spec = _tiny_app(tmp_path, extra=extra)
    app = load_app(spec)
    config = SimulationConfig(app=spec, clients=6, rounds=2, clients_per_round=4, seed=3, out=tmp_path)
    messages: list[str] = []
    actual, weights = run_vectorized(app, config, lambda _: None, messages.append)
    assert messages == ["vectorized: falling back to inprocess: the app defines its own make_optimizer"]
    expected, expected_weights = run_inprocess(app, config, lambda _: None)
    assert all(torch.equal(expected_weights[k], weights[k]) for k in weights)
    assert [r.train_loss for r in actual] == [r.train_loss for r in expected]
    assert [r.eval_accuracy for r in actual] == [r.eval_accuracy for r in expected]


@pytest.mark.parametrize(
    ("model", "extra", "reason"),
    [
        (MLP, "def loss_fn(outputs, targets):\n    return nn.functional.nll_loss(outputs, targets)\n", "loss_fn"),
        ("nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))", "", "buffers"),
        ("nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 3))", "", "vmap"),
    ],
    ids=["custom-loss", "batchnorm", "dropout"],
)
def test_unsupported_models_and_losses(tmp_path: Path, model: str, extra: str, reason: str) -> None:
    spec = _tiny_app(tmp_path, model, extra)
    config = SimulationConfig(app=spec, clients=4, rounds=1, out=tmp_path)
    found = unsupported_reason(load_app(spec), config)
    assert found is not None and reason in found


def test_the_digits_app_is_supported(tmp_path: Path) -> None:
    assert unsupported_reason(load_app(DIGITS), _config(tmp_path)) is None


def _per_client_outputs(model: torch.nn.Module, params: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """The reference: each client's own forward, one after another, under its own parameters."""
    return torch.stack(
        [
            torch.func.functional_call(model, {n: t[j] for n, t in params.items()}, (inputs[j],))
            for j in range(len(inputs))
        ]
    )


def test_stacked_forward_of_a_plain_mlp_equals_each_clients_forward() -> None:
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 7, bias=False), nn.Tanh(), nn.Linear(7, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)
    )
    params = {n: p.detach() + 0.1 * torch.randn(4, *p.shape) for n, p in model.named_parameters()}  # 4 clients
    inputs = torch.randn(4, 6, 3, 4)  # 6 samples each, of shape 3 x 4 (flattened by the model)
    forward = stacked_forward(model)
    assert forward is not None
    expected = _per_client_outputs(model, params, inputs)
    assert expected.shape == (4, 6, 3)
    assert torch.allclose(forward(params, inputs), expected, atol=1e-6)
    # clients really differ: client 0's parameters give other outputs on client 1's data
    assert not torch.allclose(
        expected[1], _per_client_outputs(model, {n: t[:1] for n, t in params.items()}, inputs[1:2])[0]
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda nn: nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.1), nn.Linear(4, 3)),  # random
        lambda nn: nn.Sequential(nn.Sequential(nn.Linear(6, 4)), nn.Linear(4, 3)),  # nested
        lambda nn: nn.Sequential(nn.Linear(6, 4), nn.PReLU(), nn.Linear(4, 3)),  # a parameter outside Linear
        lambda nn: type("MySequential", (nn.Sequential,), {})(nn.Linear(6, 3)),  # a subclass may override forward
        lambda nn: nn.Linear(6, 3),
    ],
    ids=["dropout", "nested", "prelu", "subclass", "bare-linear"],
)
def test_stacked_forward_is_only_for_plain_mlps(build: object) -> None:
    assert stacked_forward(build(torch.nn)) is None  # type: ignore[operator]


def test_stacked_forward_steps_aside_for_hooks() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(6, 3))
    handle = model[0].register_forward_hook(lambda module, args, output: output * 2)
    assert stacked_forward(model) is None
    handle.remove()
    assert stacked_forward(model) is not None
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: None)
    try:
        assert stacked_forward(model) is None
    finally:
        handle.remove()


CUSTOM_MLP = """Net()


class Net(nn.Module):  # not an nn.Sequential: trained through vmap(functional_call(...))
    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))
"""


def test_the_vmap_path_matches_inprocess(tmp_path: Path) -> None:
    spec = _tiny_app(tmp_path, CUSTOM_MLP)
    app = load_app(spec)
    assert stacked_forward(app.build_model()) is None
    config = SimulationConfig(
        app=spec, clients=6, rounds=2, clients_per_round=4, partition="dirichlet:0.5", seed=3, out=tmp_path,
        client_config={"local_epochs": 2, "batch_size": 8, "lr": 0.1, "momentum": 0.9},
    )  # fmt: skip
    messages: list[str] = []
    expected, expected_weights = run_inprocess(app, config, lambda _: None)
    actual, weights = run_vectorized(app, config, lambda _: None, messages.append)
    assert not messages  # no fallback
    assert _max_diff(expected_weights, weights) < ATOL
    assert _max_diff(app.initial_weights(config.seed), weights) > 0.01
    _assert_records_close(expected, actual)
