"""FedAvg (McMahan et al. 2017): w = Σ_k n_k w_k / Σ_k n_k, checked with exact values."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch

from strategies import ClientUpdate, FedAvg, RoundAggregate, WeightedMean, registry
from strategies.base import Strategy
from strategies.registry import create_strategy, register_strategy, strategy_names


def aggregate(updates: list[ClientUpdate], template: dict[str, torch.Tensor] | None = None):
    agg = FedAvg().begin_round(1, template if template is not None else dict(updates[0].weights))
    for u in updates:
        agg.add(u)
    return agg


def exact_fedavg(values: list[list[int]], counts: list[int]) -> list[float]:
    """The paper's definition in exact rational arithmetic, then rounded once to float64."""
    total = sum(counts)
    return [
        float(sum(Fraction(n * v[i]) for v, n in zip(values, counts, strict=True)) / total)
        for i in range(len(values[0]))
    ]


# --------------------------------------------------------------------------- exact values


def test_exact_weighted_mean_float64() -> None:
    # n = 1, 2, 5 (Σ n = 8):
    #   w[0] = (1·1 + 2·4 + 5·7) / 8 = 44/8 = 5.5
    #   w[1] = (1·2 + 2·5 + 5·8) / 8 = 52/8 = 6.5
    #   w[2] = (1·3 + 2·6 + 5·9) / 8 = 60/8 = 7.5
    # bias: (1·10 + 2·(-2) + 5·0) / 8 = 6/8 = 0.75
    updates = [
        ClientUpdate(
            {
                "w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
                "bias": torch.tensor(10.0, dtype=torch.float64),
            },
            1,
        ),
        ClientUpdate(
            {
                "w": torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64),
                "bias": torch.tensor(-2.0, dtype=torch.float64),
            },
            2,
        ),
        ClientUpdate(
            {
                "w": torch.tensor([7.0, 8.0, 9.0], dtype=torch.float64),
                "bias": torch.tensor(0.0, dtype=torch.float64),
            },
            5,
        ),
    ]
    out = aggregate(updates).result()
    assert set(out) == {"w", "bias"}
    assert out["w"].tolist() == [5.5, 6.5, 7.5]
    assert out["bias"].shape == () and out["bias"].item() == 0.75
    assert out["w"].dtype == out["bias"].dtype == torch.float64


def test_exact_weighted_mean_non_dyadic_total() -> None:
    # Σ n = 6, so the quotients are not exact binary fractions: compare with the exact
    # rational mean rounded once (the sums themselves are exact small integers).
    values = [[3, -1, 0, 7], [1, 1, 2, -5], [0, 4, 1, 1]]
    counts = [1, 2, 3]
    # hand-computed: [(3+2+0)/6, (-1+2+12)/6, (0+4+3)/6, (7-10+3)/6] = [5/6, 13/6, 7/6, 0]
    assert exact_fedavg(values, counts) == [5 / 6, 13 / 6, 7 / 6, 0.0]
    updates = [
        ClientUpdate({"p": torch.tensor(v, dtype=torch.float64)}, n) for v, n in zip(values, counts, strict=True)
    ]
    assert aggregate(updates).result()["p"].tolist() == [5 / 6, 13 / 6, 7 / 6, 0.0]


def test_equal_counts_is_plain_mean() -> None:
    updates = [ClientUpdate({"x": torch.tensor([float(v)])}, 10) for v in (1, 2, 3, 6)]
    assert aggregate(updates).result()["x"].tolist() == [3.0]


def test_single_client_returns_its_weights_exactly() -> None:
    w = {"a": torch.randn(4, 3, generator=torch.Generator().manual_seed(0))}
    out = aggregate([ClientUpdate(w, 7)]).result()
    assert out["a"].dtype == torch.float32
    assert torch.equal(out["a"], w["a"])


def test_counts_not_just_number_of_clients() -> None:
    # One client with 3 examples outweighs one with 1: (3·0 + 1·4) / 4 = 1, not the plain mean 2.
    updates = [
        ClientUpdate({"x": torch.tensor([0.0])}, 3),
        ClientUpdate({"x": torch.tensor([4.0])}, 1),
    ]
    assert aggregate(updates).result()["x"].tolist() == [1.0]


def test_num_updates_and_examples_are_counted() -> None:
    agg = aggregate([ClientUpdate({"x": torch.zeros(1)}, n) for n in (3, 4, 10)])
    assert (agg.num_updates, agg.num_examples) == (3, 17)


# --------------------------------------------------------------------------- dtypes


def test_float32_in_float32_out() -> None:
    # (2·0.5 + 1·2) / 3 = 1 and (2·1 + 1·(-1)) / 3 = 1/3, rounded once to float32.
    updates = [
        ClientUpdate({"w": torch.tensor([0.5, 1.0], dtype=torch.float32)}, 2),
        ClientUpdate({"w": torch.tensor([2.0, -1.0], dtype=torch.float32)}, 1),
    ]
    out = aggregate(updates).result()["w"]
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([1.0, 1 / 3], dtype=torch.float64).to(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_preserved(dtype: torch.dtype) -> None:
    updates = [
        ClientUpdate({"w": torch.tensor([1.0, 2.0], dtype=dtype)}, 1),
        ClientUpdate({"w": torch.tensor([3.0, 6.0], dtype=dtype)}, 3),
    ]
    out = aggregate(updates).result()["w"]
    assert out.dtype == dtype
    # (1 + 9)/4 = 2.5, (2 + 18)/4 = 5: exact in every float format
    assert out.tolist() == [2.5, 5.0]


def test_integer_buffers_round_to_nearest() -> None:
    # counts 3 and 1, Σ n = 4:
    #   (3·10 + 1·21) / 4 = 51/4 = 12.75 -> 13
    #   (3·0  + 1·7)  / 4 =  7/4 =  1.75 ->  2
    #   (3·5  + 1·6)  / 4 = 21/4 =  5.25 ->  5
    #   (3·(-10) + 1·(-11)) / 4 = -41/4 = -10.25 -> -10
    #   (3·(-1)  + 1·(-2))  / 4 =  -5/4 =  -1.25 ->  -1
    #   (3·(-2)  + 1·(-3))  / 4 =  -9/4 =  -2.25 ->  -2
    #   (3·(-3)  + 1·(-2))  / 4 = -11/4 =  -2.75 ->  -3
    # (plain truncation would give 12, 1, 5, -10, -1, -2, -2)
    a = [10, 0, 5, -10, -1, -2, -3]
    b = [21, 7, 6, -11, -2, -3, -2]
    updates = [
        ClientUpdate({"n": torch.tensor(a, dtype=torch.int64)}, 3),
        ClientUpdate({"n": torch.tensor(b, dtype=torch.int64)}, 1),
    ]
    out = aggregate(updates).result()["n"]
    assert out.dtype == torch.int64
    assert out.tolist() == [13, 2, 5, -10, -1, -2, -3]


def test_num_batches_tracked_style_scalar_int_buffer() -> None:
    # (1·100 + 2·103) / 3 = 306/3 = 102 exactly; (1·100 + 2·104) / 3 = 308/3 = 102.67 -> 103
    t = {"bn.num_batches_tracked": torch.tensor(100)}
    out1 = aggregate([ClientUpdate(t, 1), ClientUpdate({"bn.num_batches_tracked": torch.tensor(103)}, 2)]).result()[
        "bn.num_batches_tracked"
    ]
    out2 = aggregate([ClientUpdate(t, 1), ClientUpdate({"bn.num_batches_tracked": torch.tensor(104)}, 2)]).result()[
        "bn.num_batches_tracked"
    ]
    assert out1.shape == () and out1.dtype == torch.int64 and out1.item() == 102
    assert out2.item() == 103


def test_large_int64_values_do_not_lose_precision_below_float64_range() -> None:
    # 2**40 + 3 and 2**40 + 5 with equal counts: mean 2**40 + 4, exact in float64.
    updates = [
        ClientUpdate({"n": torch.tensor([2**40 + 3])}, 2),
        ClientUpdate({"n": torch.tensor([2**40 + 5])}, 2),
    ]
    assert aggregate(updates).result()["n"].tolist() == [2**40 + 4]


def test_uint8_and_int32_buffers_keep_dtype() -> None:
    updates = [
        ClientUpdate(
            {
                "u": torch.tensor([0, 255], dtype=torch.uint8),
                "i": torch.tensor([-7], dtype=torch.int32),
            },
            1,
        ),
        ClientUpdate(
            {
                "u": torch.tensor([10, 245], dtype=torch.uint8),
                "i": torch.tensor([1], dtype=torch.int32),
            },
            4,
        ),
    ]
    out = aggregate(updates).result()
    # u: (0 + 40)/5 = 8, (255 + 980)/5 = 247;  i: (-7 + 4)/5 = -0.6 -> -1
    assert out["u"].dtype == torch.uint8 and out["u"].tolist() == [8, 247]
    assert out["i"].dtype == torch.int32 and out["i"].tolist() == [-1]


def test_template_dtype_wins_over_update_dtype() -> None:
    # The global model's dtype is what comes back, even if an update arrives in float64.
    template = {"w": torch.zeros(2, dtype=torch.float32)}
    agg = FedAvg().begin_round(1, template)
    agg.add(ClientUpdate({"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}, 1))
    assert agg.result()["w"].dtype == torch.float32


# --------------------------------------------------------------------------- order, aliasing


def test_order_independence() -> None:
    g = torch.Generator().manual_seed(1234)
    updates = [
        ClientUpdate(
            {
                "w": torch.randn(5, 4, generator=g, dtype=torch.float64) * 10,
                "b": torch.randn(4, generator=g, dtype=torch.float64),
            },
            int(torch.randint(1, 1000, (), generator=g)),
        )
        for _ in range(5)
    ]
    reference = aggregate(updates).result()
    for perm in itertools.permutations(updates):
        out = aggregate(list(perm)).result()
        for name in reference:
            assert float((out[name] - reference[name]).abs().max()) <= 1e-12
    # and it is the paper's formula
    total = sum(u.num_examples for u in updates)
    for name in reference:
        direct = sum(u.weights[name] * u.num_examples for u in updates) / total
        assert float((reference[name] - direct).abs().max()) <= 1e-12


def test_client_tensors_are_not_modified() -> None:
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    b = torch.tensor([3.0, 4.0], dtype=torch.float64)
    agg = aggregate([ClientUpdate({"w": a}, 1), ClientUpdate({"w": b}, 1)])
    out = agg.result()
    assert a.tolist() == [1.0, 2.0] and b.tolist() == [3.0, 4.0]
    out["w"].add_(100)
    assert agg.result()["w"].tolist() == [2.0, 3.0]
    assert a.tolist() == [1.0, 2.0]


def test_requires_grad_inputs_are_detached() -> None:
    w = torch.tensor([2.0, 4.0], requires_grad=True)
    out = aggregate([ClientUpdate({"w": w}, 2)]).result()["w"]
    assert not out.requires_grad and out.tolist() == [2.0, 4.0]


# --------------------------------------------------------------------------- metrics


def test_weighted_metric_means() -> None:
    updates = [
        ClientUpdate({"x": torch.zeros(1)}, 1, {"loss": 1.0, "acc": 0.5, "name": "a", "flag": True}),
        ClientUpdate({"x": torch.zeros(1)}, 3, {"loss": 4.0, "acc": 1.0, "steps": 10}),
        ClientUpdate({"x": torch.zeros(1)}, 4, {"loss": 2.0}),
    ]
    metrics = aggregate(updates).metrics()
    # loss: (1·1 + 3·4 + 4·2) / 8 = 21/8; acc: (1·0.5 + 3·1) / 4 = 3.5/4 (only clients
    # reporting it count); steps: 10 (one client). Strings and bools are not averaged.
    assert metrics == {"loss": 2.625, "acc": 0.875, "steps": 10.0}


def test_no_metrics() -> None:
    assert aggregate([ClientUpdate({"x": torch.zeros(1)}, 5)]).metrics() == {}


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize("n", [0, -1, -100])
def test_rejects_non_positive_num_examples(n: int) -> None:
    agg = FedAvg().begin_round(1, {"x": torch.zeros(1)})
    agg.add(ClientUpdate({"x": torch.tensor([2.0])}, 1, {"loss": 1.0}))
    with pytest.raises(ValueError, match=rf"at least one example, got {n}"):
        agg.add(ClientUpdate({"x": torch.tensor([100.0])}, n, {"loss": 50.0}))
    # the rejected update left no trace
    assert (agg.num_updates, agg.num_examples) == (1, 1)
    assert agg.result()["x"].tolist() == [2.0]
    assert agg.metrics() == {"loss": 1.0}


@pytest.mark.parametrize(
    "weights",
    [
        {"w": torch.zeros(2)},  # missing b
        {"w": torch.zeros(2), "b": torch.zeros(1), "extra": torch.zeros(1)},
        {"w": torch.zeros(2), "c": torch.zeros(1)},  # renamed
    ],
    ids=["missing", "extra", "renamed"],
)
def test_rejects_mismatched_tensor_names(weights: dict[str, torch.Tensor]) -> None:
    agg = FedAvg().begin_round(1, {"w": torch.zeros(2), "b": torch.zeros(1)})
    agg.add(ClientUpdate({"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])}, 2))
    with pytest.raises(ValueError, match=r"update tensors differ from the global model's"):
        agg.add(ClientUpdate(weights, 5))
    assert (agg.num_updates, agg.num_examples) == (1, 2)
    out = agg.result()
    assert out["w"].tolist() == [1.0, 2.0] and out["b"].tolist() == [3.0]


def test_result_without_updates() -> None:
    agg = FedAvg().begin_round(3, {"x": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"no update to aggregate"):
        agg.result()


def test_result_with_only_rejected_updates() -> None:
    agg = FedAvg().begin_round(3, {"x": torch.zeros(1)})
    with pytest.raises(ValueError):
        agg.add(ClientUpdate({"x": torch.ones(1)}, 0))
    with pytest.raises(ValueError, match=r"no update to aggregate"):
        agg.result()


# --------------------------------------------------------------------------- strategy API


def test_fedavg_strategy_surface() -> None:
    s = FedAvg()
    assert s.name == "fedavg"
    assert s.needs_all_updates is False
    assert s.configure_round(1) == {}
    agg = s.begin_round(1, {"x": torch.zeros(1)})
    assert isinstance(agg, WeightedMean) and isinstance(agg, RoundAggregate)
    # each round starts from scratch
    agg.add(ClientUpdate({"x": torch.ones(1)}, 1))
    assert s.begin_round(2, {"x": torch.zeros(1)}).num_updates == 0


def test_fedavg_state() -> None:
    s = FedAvg()
    assert s.state_dict() == {}
    s.load_state_dict({})
    with pytest.raises(ValueError, match=r"fedavg keeps no state, got keys \['x'\]"):
        s.load_state_dict({"x": 1})


# --------------------------------------------------------------------------- registry


def test_registry_knows_fedavg() -> None:
    assert "fedavg" in strategy_names()
    assert strategy_names() == sorted(strategy_names())
    assert isinstance(create_strategy("fedavg"), FedAvg)
    assert isinstance(create_strategy("fedavg", {}), FedAvg)


def test_unknown_strategy_name_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown strategy 'fedsgd'; choose one of .*fedavg"):
        create_strategy("fedsgd")


def test_unknown_parameters_list_accepted_ones() -> None:
    with pytest.raises(ValueError, match=r"strategy 'fedavg' takes no parameters, not \['lr', 'mu'\]"):
        create_strategy("fedavg", {"mu": 0.1, "lr": 1.0})


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register test strategies in a copy so other tests see the real registry."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


@pytest.mark.usefixtures("scratch_registry")
def test_registry_with_a_parameterised_strategy() -> None:
    @register_strategy("test-prox")
    class Prox(Strategy):
        def __init__(self, mu: float = 0.0, server_lr: float = 1.0) -> None:
            self.mu, self.server_lr = mu, server_lr

        def begin_round(self, server_round, global_weights):  # type: ignore[no-untyped-def]
            return WeightedMean(global_weights)

    assert Prox.name == "test-prox"
    assert "test-prox" in strategy_names() and "fedavg" in strategy_names()
    s = create_strategy("test-prox", {"mu": 0.5})
    assert isinstance(s, Prox) and (s.mu, s.server_lr) == (0.5, 1.0)
    with pytest.raises(ValueError, match=r"strategy 'test-prox' takes \['mu', 'server_lr'\], not \['nu'\]"):
        create_strategy("test-prox", {"mu": 0.5, "nu": 1})
    with pytest.raises(ValueError, match=r"choose one of .*\bfedavg\b.*\btest-prox\b"):
        create_strategy("nope")


@pytest.mark.usefixtures("scratch_registry")
def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match=r"strategy 'fedavg' is already registered"):

        @register_strategy("fedavg")
        class Again(FedAvg):
            pass

    assert registry._REGISTRY["fedavg"] is FedAvg


def test_a_stacked_fold_equals_adding_each_update() -> None:
    g = torch.Generator().manual_seed(3)
    stacked = {"w": torch.randn(5, 3, 2, generator=g), "b": torch.randn(5, 3, generator=g)}
    counts = [3, 1, 4, 1, 5]
    metrics = [{"train_loss": float(i)} for i in range(5)]
    one_by_one = WeightedMean({k: t[0] for k, t in stacked.items()})
    for i, n in enumerate(counts):
        one_by_one.add(ClientUpdate({k: t[i] for k, t in stacked.items()}, n, metrics[i]))
    together = WeightedMean({k: t[0] for k, t in stacked.items()})
    together.add_stacked(stacked, counts, metrics)
    assert (together.num_updates, together.num_examples) == (5, 14)
    assert together.metrics() == pytest.approx(one_by_one.metrics())
    for name, tensor in one_by_one.result().items():
        assert float((together.result()[name] - tensor).abs().max()) <= 1e-7
    # the paper's formula, directly
    direct = sum(n * stacked["b"][i].double() for i, n in enumerate(counts)) / 14
    assert float((together.result()["b"].double() - direct).abs().max()) <= 1e-7
    with pytest.raises(ValueError, match="positive example count"):
        together.add_stacked(stacked, [1, 0, 1, 1, 1], metrics)
    with pytest.raises(ValueError, match="shapes"):
        together.add_stacked({"w": stacked["w"][:, :2], "b": stacked["b"]}, counts, metrics)
