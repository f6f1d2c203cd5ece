"""Synthetic datasets for simulations: generated in memory, deterministic per seed, no downloads.

- ``synthetic_fedprox``: the Synthetic(alpha, beta) federated benchmark of Li et al. 2020
  ("Federated Optimization in Heterogeneous Networks", FedProx, MLSys; Sec. 5.1 and the
  appendix on datasets), itself adapted from Shamir et al. 2014 ("Communication-Efficient
  Distributed Optimization using an Approximate Newton-type Method", ICML). Each client
  has its own linear-softmax labelling rule and its own feature mean, so it is non-IID in
  both labels and features; ``alpha`` controls how much the local models differ and
  ``beta`` how much the local feature distributions differ.
- ``synthetic_images``: labelled images (class-dependent coarse patterns plus noise) for
  compute-bound CNN benchmarks, where what matters is realistic tensor shapes and a task a
  CNN can learn, not the data itself.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

DEFAULT_DIM = 60
DEFAULT_NUM_CLASSES = 10


def fedprox_covariance_diagonal(dim: int = DEFAULT_DIM) -> npt.NDArray[np.float64]:
    """The diagonal of Sigma in Synthetic(alpha, beta): ``Sigma_jj = j ** -1.2`` for ``j = 1..dim``."""
    return np.arange(1, dim + 1, dtype=np.float64) ** -1.2


def fedprox_client_sizes(
    num_clients: int,
    rng: np.random.Generator,
    *,
    size_mean: float = 4.0,
    size_sigma: float = 2.0,
    min_samples: int = 50,
    max_samples: int | None = None,
) -> npt.NDArray[np.int64]:
    """Examples per client: ``int(Lognormal(size_mean, size_sigma)) + min_samples``, capped at ``max_samples``.

    This is what the FedProx reference generator does
    (``np.random.lognormal(4, 2, NUM_USER).astype(int) + 50`` in
    ``data/synthetic_1_1/generate_synthetic.py`` of github.com/litian96/FedProx); the paper's text
    only says the sizes follow a power law. Lognormal(4, 2) is heavy-tailed (median ~55 +
    50, mean ~400 + 50, the largest of 30 clients often several thousand), hence the optional
    cap for memory-bounded runs.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1, got {min_samples}")
    if max_samples is not None and max_samples < min_samples:
        raise ValueError(f"max_samples ({max_samples}) must be >= min_samples ({min_samples})")
    drawn = rng.lognormal(size_mean, size_sigma, num_clients)
    sizes = np.floor(np.minimum(drawn, np.iinfo(np.int32).max)).astype(np.int64) + min_samples
    if max_samples is not None:
        sizes = np.minimum(sizes, max_samples)
    return sizes


def synthetic_fedprox(
    alpha: float,
    beta: float,
    num_clients: int,
    seed: int,
    dim: int = DEFAULT_DIM,
    num_classes: int = DEFAULT_NUM_CLASSES,
    min_samples: int = 50,
    *,
    size_mean: float = 4.0,
    size_sigma: float = 2.0,
    max_samples: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Synthetic(alpha, beta) of Li et al. 2020: one ``(x, y)`` pair per client.

    ``x`` is float32 ``[n_k, dim]`` and ``y`` int64 ``[n_k]`` in ``0..num_classes-1``. For
    client ``k``:

    - ``u_k ~ N(0, alpha)``; ``W_k ~ N(u_k, 1)`` (``[num_classes, dim]``); ``b_k ~ N(u_k, 1)``
    - ``B_k ~ N(0, beta)``; ``v_k ~ N(B_k, 1)`` (``[dim]``)
    - ``x ~ N(v_k, Sigma)`` with Sigma diagonal, ``Sigma_jj = j ** -1.2``
    - ``y = argmax(softmax(W_k x + b_k))``
    - ``n_k`` from :func:`fedprox_client_sizes` (lognormal, as the reference code).

    As in the reference code, ``alpha`` and ``beta`` are used as standard deviations
    (``np.random.normal(0, alpha)``); the paper writes N(0, alpha), which is the same for the
    usual Synthetic(0,0), (0.5,0.5) and (1,1). Note the shared offset ``u_k`` shifts every
    logit equally, so labels depend on ``W_k - u_k`` and ``v_k``: client heterogeneity comes
    from each client drawing its own ``W_k``, ``b_k`` and ``v_k``.

    Deterministic per ``seed``: sizes come from the root generator, and client ``k``'s
    parameters and examples from the ``k``-th child of ``SeedSequence(seed)``, so a client's
    data do not depend on how many examples the other clients have.
    """
    if dim < 1 or num_classes < 2:
        raise ValueError(f"need dim >= 1 and num_classes >= 2, got dim={dim}, num_classes={num_classes}")
    if not (np.isfinite(alpha) and alpha >= 0 and np.isfinite(beta) and beta >= 0):
        raise ValueError(f"alpha and beta must be non-negative finite floats, got alpha={alpha}, beta={beta}")
    root = np.random.SeedSequence(seed)
    size_seed, *client_seeds = root.spawn(num_clients + 1)
    sizes = fedprox_client_sizes(
        num_clients,
        np.random.default_rng(size_seed),
        size_mean=size_mean,
        size_sigma=size_sigma,
        min_samples=min_samples,
        max_samples=max_samples,
    )
    std = np.sqrt(fedprox_covariance_diagonal(dim))
    clients: list[tuple[torch.Tensor, torch.Tensor]] = []
    for size, client_seed in zip(sizes.tolist(), client_seeds, strict=True):
        rng = np.random.default_rng(client_seed)
        u = rng.normal(0.0, alpha)
        weights = rng.normal(u, 1.0, (num_classes, dim))
        bias = rng.normal(u, 1.0, num_classes)
        b_mean = rng.normal(0.0, beta)
        v = rng.normal(b_mean, 1.0, dim)
        x = v + std * rng.standard_normal((size, dim))
        # softmax is monotone: argmax of the logits is argmax of the probabilities.
        y = np.argmax(x @ weights.T + bias, axis=1)
        clients.append((torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))))
    return clients


def synthetic_images(
    num_examples: int,
    seed: int,
    shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = DEFAULT_NUM_CLASSES,
    *,
    pattern_seed: int = 0,
    noise: float = 3.0,
    max_shift: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``: float32 images of ``shape`` and int64 labels, deterministic per ``seed``.

    Each class has a fixed pattern: Gaussian noise on a grid 4x coarser than the image,
    upsampled by repetition to blocky, spatially correlated blobs, scaled to unit variance.
    An example is its class's pattern, shifted by up to ``max_shift`` pixels in each
    direction (circularly, so translation matters and convolutions help), plus i.i.d.
    ``N(0, noise**2)`` pixel noise. Labels are balanced (``i % num_classes``, shuffled).

    The patterns depend only on ``pattern_seed`` (and shape, class count), never on
    ``seed``: generate train and test sets with different ``seed`` and the same
    ``pattern_seed`` and they describe the same classes.

    The defaults (``noise=3``, ``max_shift=4``) make the task easy for a CNN but not for a
    linear model: measured on 6,000 / 1,000 examples, multinomial logistic regression
    reaches ~0.64 test accuracy, McMahan et al.'s CNN (SGD, lr 0.05, batch 32) ~0.82
    after one epoch and ~0.91 after two.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (channels, height, width), got {shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if noise < 0 or max_shift < 0:
        raise ValueError(f"noise and max_shift must be >= 0, got noise={noise}, max_shift={max_shift}")
    channels, height, width = shape
    patterns = _class_patterns(shape, num_classes, pattern_seed)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_examples) % num_classes).astype(np.int64)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(num_examples, 2))
    images = rng.standard_normal((num_examples, channels, height, width), dtype=np.float32)
    images *= np.float32(noise)
    for i in range(num_examples):
        images[i] += np.roll(patterns[labels[i]], shift=(int(shifts[i, 0]), int(shifts[i, 1])), axis=(1, 2))
    return torch.from_numpy(images), torch.from_numpy(labels)


def _class_patterns(shape: tuple[int, ...], num_classes: int, pattern_seed: int) -> npt.NDArray[np.float32]:
    channels, height, width = shape
    rng = np.random.default_rng([pattern_seed, 0x1A6E5])
    coarse = rng.standard_normal((num_classes, channels, -(-height // 4), -(-width // 4)))
    fine = coarse.repeat(4, axis=2).repeat(4, axis=3)[:, :, :height, :width]
    fine -= fine.mean(axis=(1, 2, 3), keepdims=True)
    fine /= fine.std(axis=(1, 2, 3), keepdims=True) + 1e-12
    return fine.astype(np.float32)
