"""A virtual client's batches, exactly as `loader(train, batch_size, shuffle=True, seed)` would
yield them, but gathered from the base tensors one epoch at a time instead of fetched and
collated one example at a time. Same order, same values, so results match the DataLoader path,
at a fraction of its per-example overhead.
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
    `randperm(count)` (for a zero-length remainder) — reproduced here draw for draw, except
    that last epoch's trailing draw, which only moves a generator nobody reads again.
    `loader_orders` is the slow, literal reference this is checked against.
    """
    orders = _epoch_orders(count, seed, epochs)
    return torch.stack(orders) if orders else torch.empty(0, count, dtype=torch.long)


def _epoch_orders(count: int, seed: int, epochs: int) -> list[torch.Tensor]:
    """`shuffled_orders`' rows, unstacked (one op fewer per client where rows are used one by one)."""
    return EpochOrders()(count, seed, epochs)


class EpochOrders:
    """`_epoch_orders` for client after client, with one generator re-seeded for each.

    A simulation round draws a few tiny permutations per client; a fresh `torch.Generator` and
    scratch tensor per client cost as much as the draws themselves. Re-seeding resets the
    generator's whole state, so every client's orders are what a fresh generator would give.
    Not thread-safe: one per thread (each backend worker owns its own).
    """

    def __init__(self) -> None:
        self._generator = torch.Generator()
        self._base_seed = torch.empty((), dtype=torch.int64)

    def __call__(self, count: int, seed: int, epochs: int) -> list[torch.Tensor]:
        generator = self._generator.manual_seed(seed)
        orders = []
        for epoch in range(epochs):
            self._base_seed.random_(generator=generator)  # the DataLoader iterator's base seed draw
            orders.append(torch.randperm(count, generator=generator))
            if epoch + 1 < epochs:
                torch.randperm(count, generator=generator)
        return orders


def loader_orders(count: int, batch_size: int, seed: int, epochs: int) -> torch.Tensor:
    """What `shuffled_orders` computes, obtained by iterating the very DataLoader `inprocess` uses."""
    data = loader(TensorDataset(torch.arange(count)), batch_size, True, seed)
    return torch.stack([torch.cat([batch for (batch,) in data]) for _ in range(epochs)])


def fast_orders_valid() -> bool:
    """Checked once per process: a torch release that changes DataLoader's draws turns it off."""
    global _fast_orders_agree
    if _fast_orders_agree is None:
        _fast_orders_agree = torch.equal(shuffled_orders(37, 5, 11, 2), loader_orders(37, 5, 11, 2))
    return _fast_orders_agree


def epoch_batches(
    train: Subset,
    batch_size: int,
    seed: int,
    epochs: int,
    rows: torch.Tensor | None = None,
    draw: EpochOrders | None = None,
) -> Callable[[], Batches]:
    """A callable that yields epoch 1's batches on its first call, epoch 2's on the next, ...

    `rows` are `train.indices` as an int64 tensor when the caller has them already (e.g.
    `App.partition_rows`); `draw` a caller's reusable `EpochOrders`. Each epoch is one gather
    of the client's rows in shuffled order, cut into batches that are views of it: a handful
    of tensor ops per epoch rather than two per batch (this runs once per client and round:
    its fixed cost is the simulation's). Epoch 1 is gathered here, at once, so a caller can
    prepare several clients' data before training them (see `LocalTrainer.fold`).
    """
    base = train.dataset
    if not (isinstance(base, TensorDataset) and len(base.tensors) == 2 and len(train) and fast_orders_valid()):
        data = loader(train, batch_size, True, seed)
        return lambda: iter(data)
    if rows is None:
        rows = torch.as_tensor(train.indices, dtype=torch.long)
    inputs, targets = base.tensors
    count = rows.shape[0]
    sizes = [batch_size] * (count // batch_size) + ([count % batch_size] if count % batch_size else [])

    def gather(order: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        picked = rows.index_select(0, order)
        cut = (
            inputs.index_select(0, picked).split_with_sizes(sizes),
            targets.index_select(0, picked).split_with_sizes(sizes),
        )
        return list(zip(*cut, strict=True))

    orders = iter((draw or EpochOrders())(count, seed, epochs))
    first = [gather(next(orders))] if epochs > 0 else []

    def batches() -> Batches:
        return iter(first.pop() if first else gather(next(orders)))

    return batches
