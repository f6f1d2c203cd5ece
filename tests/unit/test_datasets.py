"""Synthetic datasets and the two apps built on them: determinism, shapes, the generator's
statistical properties, heterogeneity, the CNN's parameter count, and the app contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from simulations.apps import load_app
from simulations.datasets import (
    fedprox_client_sizes,
    fedprox_covariance_diagonal,
    synthetic_fedprox,
    synthetic_images,
)

ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC_APP = str(ROOT / "examples" / "synthetic")
CNN_APP = str(ROOT / "examples" / "cnn")


# --- Synthetic(alpha, beta) ------------------------------------------------------


def test_fedprox_is_deterministic_per_seed() -> None:
    first = synthetic_fedprox(1.0, 1.0, 5, seed=3)
    again = synthetic_fedprox(1.0, 1.0, 5, seed=3)
    other = synthetic_fedprox(1.0, 1.0, 5, seed=4)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert any(x1.shape != x2.shape or not torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, other, strict=True))


def test_fedprox_shapes_dtypes_and_sizes() -> None:
    clients = synthetic_fedprox(0.5, 0.5, 30, seed=0, dim=60, num_classes=10, min_samples=50)
    assert len(clients) == 30
    for x, y in clients:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.ndim == 2 and x.shape[1] == 60 and y.shape == (x.shape[0],)
        assert x.shape[0] >= 50
        assert 0 <= int(y.min()) and int(y.max()) < 10
    sizes = [len(y) for _, y in clients]
    assert max(sizes) > 3 * min(sizes)  # lognormal sizes: unbalanced clients


def test_fedprox_client_sizes_follow_reference_rule() -> None:
    rng = np.random.default_rng(0)
    expected = np.random.default_rng(0).lognormal(4, 2, 1000).astype(np.int64) + 50
    np.testing.assert_array_equal(fedprox_client_sizes(1000, rng), expected)
    capped = fedprox_client_sizes(1000, np.random.default_rng(0), max_samples=200)
    assert capped.max() == 200 and capped.min() >= 50
    with pytest.raises(ValueError):
        fedprox_client_sizes(10, rng, min_samples=10, max_samples=5)


def test_fedprox_feature_noise_has_the_power_law_diagonal_covariance() -> None:
    # One big client: x - v has per-dimension variance j ** -1.2. The client mean estimates v.
    dim = 60
    ((x, _),) = synthetic_fedprox(1.0, 1.0, 1, seed=5, dim=dim, min_samples=40_000, size_mean=0.0, size_sigma=0.0)
    centred = x.double() - x.double().mean(dim=0)
    variance = centred.var(dim=0).numpy()
    expected = fedprox_covariance_diagonal(dim)
    np.testing.assert_allclose(expected[:3], [1.0, 2**-1.2, 3**-1.2])
    np.testing.assert_allclose(variance, expected, rtol=0.05)
    # Log-log slope of variance against j is -1.2.
    slope = np.polyfit(np.log(np.arange(1, dim + 1)), np.log(variance), 1)[0]
    assert slope == pytest.approx(-1.2, abs=0.03)
    # Dimensions are uncorrelated (Sigma is diagonal).
    correlation = np.corrcoef(centred.numpy().T)
    off_diagonal = correlation[~np.eye(dim, dtype=bool)]
    assert np.abs(off_diagonal).max() < 0.05


def test_fedprox_clients_are_heterogeneous() -> None:
    clients = synthetic_fedprox(1.0, 1.0, 10, seed=0, min_samples=300, max_samples=300)
    histograms = np.stack([np.bincount(y.numpy(), minlength=10) / len(y) for _, y in clients])
    # Each client concentrates on few labels, and different clients on different ones.
    dominant_share = histograms.max(axis=1)
    assert np.median(dominant_share) > 0.4
    assert len({int(h.argmax()) for h in histograms}) >= 4
    pairwise_tv = [0.5 * np.abs(a - b).sum() for i, a in enumerate(histograms) for b in histograms[i + 1 :]]
    assert np.mean(pairwise_tv) > 0.5
    # Feature means differ too (v_k ~ N(B_k, 1)).
    means = torch.stack([x.mean(dim=0) for x, _ in clients])
    assert torch.cdist(means, means).max() > 5


def test_fedprox_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        synthetic_fedprox(-1.0, 1.0, 3, seed=0)
    with pytest.raises(ValueError):
        synthetic_fedprox(1.0, 1.0, 0, seed=0)
    with pytest.raises(ValueError):
        synthetic_fedprox(1.0, 1.0, 3, seed=0, num_classes=1)


# --- synthetic images ------------------------------------------------------------


def test_synthetic_images_deterministic_shapes_balanced() -> None:
    x, y = synthetic_images(200, seed=1)
    x2, y2 = synthetic_images(200, seed=1)
    x3, _ = synthetic_images(200, seed=2)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, x3)
    assert x.shape == (200, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (200,) and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == [20] * 10
    xc, yc = synthetic_images(12, seed=0, shape=(3, 32, 30), num_classes=4)
    assert xc.shape == (12, 3, 32, 30) and int(yc.max()) < 4
    assert synthetic_images(0, seed=0)[0].shape == (0, 1, 28, 28)


def test_synthetic_images_classes_share_patterns_across_seeds() -> None:
    # Noise- and shift-free: every example of a class is its pattern, whatever the seed.
    a, ya = synthetic_images(50, seed=0, noise=0.0, max_shift=0)
    b, yb = synthetic_images(50, seed=9, noise=0.0, max_shift=0)
    for label in range(10):
        assert torch.equal(a[ya == label][0], b[yb == label][0])
    assert not torch.equal(a[ya == 0][0], a[ya == 1][0])
    other, yo = synthetic_images(50, seed=0, noise=0.0, max_shift=0, pattern_seed=1)
    assert not torch.equal(a[ya == 0][0], other[yo == 0][0])


def test_synthetic_images_are_learnable_by_a_nearest_pattern_rule() -> None:
    # Class means from a training draw classify a fresh test draw far above chance (0.1).
    x, y = synthetic_images(2000, seed=0)
    xt, yt = synthetic_images(500, seed=1)
    means = torch.stack([x[y == c].mean(dim=0).flatten() for c in range(10)])
    predicted = (xt.flatten(1) @ means.T).argmax(dim=1)
    assert (predicted == yt).float().mean() > 0.5


# --- apps ------------------------------------------------------------------------


def test_cnn_has_mcmahan_parameter_count() -> None:
    app = load_app(CNN_APP)
    model = app.build_model()
    count = sum(p.numel() for p in model.parameters())
    assert count == 1_663_370 == app.module.NUM_PARAMETERS
    logits = model(torch.zeros(4, 1, 28, 28))
    assert logits.shape == (4, 10)


def test_cnn_app_contract() -> None:
    app = load_app(CNN_APP)
    assert app.name == "cnn"
    assert dict(app.default_config) == {"local_epochs": 1, "batch_size": 32, "lr": 0.05}
    train, test = app.load_dataset()
    assert isinstance(train, TensorDataset) and isinstance(test, TensorDataset)
    assert len(train) == 6_000 and len(test) == 1_000
    x, y = train.tensors
    assert x.shape == (6_000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert app.load_dataset() is app.load_dataset()  # cached
    torch.manual_seed(0)
    assert app.build_model()(test.tensors[0][:16]).shape == (16, 10)
    part_train, part_test = app.partition(3, 10, "shards:2", seed=0)
    assert len(part_train) == 600 and len(part_test) == 100


def test_synthetic_app_contract_and_natural_partition() -> None:
    app = load_app(SYNTHETIC_APP)
    module = app.module
    assert app.name == "synthetic"
    assert dict(app.default_config) == {"local_epochs": 1, "batch_size": 10, "lr": 0.01}
    train, test = app.load_dataset()
    (x, y), (xt, yt) = train.tensors, test.tensors
    assert x.shape[1] == 60 and x.dtype == torch.float32 and y.dtype == torch.int64
    assert app.build_model()(xt).shape == (len(xt), 10)

    generated = synthetic_fedprox(1.0, 1.0, 30, seed=module.DATA_SEED)
    assert len(x) + len(xt) == sum(len(gy) for _, gy in generated)
    covered_train, covered_test = [], []
    for k, (gx, gy) in enumerate(generated):
        train_idx, test_idx = module.natural_partition(k, 30, 123)
        assert train_idx.dtype == np.int64 and test_idx.dtype == np.int64
        assert len(train_idx) == int(0.8 * len(gy)) and len(train_idx) + len(test_idx) == len(gy)
        # Client k gets exactly its own generated examples, train then test.
        assert torch.equal(torch.cat([x[train_idx], xt[test_idx]]), gx)
        assert torch.equal(torch.cat([y[train_idx], yt[test_idx]]), gy)
        covered_train.append(train_idx)
        covered_test.append(test_idx)
    np.testing.assert_array_equal(np.concatenate(covered_train), np.arange(len(x)))
    np.testing.assert_array_equal(np.concatenate(covered_test), np.arange(len(xt)))
    with pytest.raises(ValueError, match="exactly 30"):
        module.natural_partition(0, 10, 0)
    with pytest.raises(ValueError):
        module.natural_partition(30, 30, 0)


def test_synthetic_app_is_learnable_by_logistic_regression() -> None:
    # Centralised multinomial logistic regression (the app's own model, full-batch Adam)
    # clears 0.6 test accuracy on the pooled data (sklearn's lbfgs reaches ~0.85).
    app = load_app(SYNTHETIC_APP)
    train, test = app.load_dataset()
    (x, y), (xt, yt) = train.tensors, test.tensors
    torch.manual_seed(0)
    model = app.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only add contention
    try:
        for _ in range(100):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        accuracy = (model(xt).argmax(dim=1) == yt).float().mean().item()
    assert accuracy > 0.6
