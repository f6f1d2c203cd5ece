"""A virtual client's batches, exactly as `loader(train, batch_size, shuffle=True, seed)` would
yield them, but cut from the client's rows of the base tensors instead of fetching and
collating one example at a time. Same order, same tensors, so results are bit-identical to
the DataLoader path, at a fraction of its per-example overhead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Subset, TensorDataset

from simulations.apps import loader

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]
_fast_orders_agree: bool | None = None


def shuffled_orders(count: int, batch_size: int, seed: int, epochs: int) -> torch.Tensor:
    """[epochs, count] positions, each row the order `loader(data, batch_size, True, seed)`
    yields an epoch in when iterated `epochs` times (as `train_epochs` does).

    Per epoch the DataLoader's iterator draws one int64 base seed from the generator, then
    `RandomSampler` draws `randperm(count)` for the epoch and, when it is exhausted, one more
    `randperm(count)` (for a zero-length remainder) — reproduced here draw for draw.
    `loader_orders` is the slow, literal reference this is checked against.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(epochs):
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        rows.append(torch.randperm(count, generator=generator))
        torch.randperm(count, generator=generator)
    return torch.stack(rows)


def loader_orders(count: int, batch_size: int, seed: int, epochs: int) -> torch.Tensor:
    """What `shuffled_orders` computes, obtained by iterating the very DataLoader `inprocess` uses."""
    data = loader(TensorDataset(torch.arange(count)), batch_size, True, seed)
    return torch.stack([torch.cat([batch for (batch,) in data]) for _ in range(epochs)])


def _fast_path_valid() -> bool:
    """Checked once per process: a torch release that changes DataLoader's draws turns it off."""
    global _fast_orders_agree
    if _fast_orders_agree is None:
        _fast_orders_agree = torch.equal(shuffled_orders(37, 5, 11, 2), loader_orders(37, 5, 11, 2))
    return _fast_orders_agree


def epoch_batches(train: Subset, batch_size: int, seed: int, epochs: int) -> Callable[[], Batches]:
    """A callable that yields epoch 1's batches on its first call, epoch 2's on the next, ..."""
    base = train.dataset
    if not (isinstance(base, TensorDataset) and len(base.tensors) == 2 and len(train) and _fast_path_valid()):
        data = loader(train, batch_size, True, seed)
        return lambda: iter(data)
    rows = torch.as_tensor(list(train.indices), dtype=torch.long)
    inputs, targets = base.tensors[0][rows], base.tensors[1][rows]
    orders = shuffled_orders(len(rows), batch_size, seed, epochs)
    epoch = iter(range(epochs))

    def batches() -> Batches:
        order = orders[next(epoch)]
        for start in range(0, len(order), batch_size):
            positions = order[start : start + batch_size]
            yield inputs[positions], targets[positions]

    return batches
