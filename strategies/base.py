"""The `Strategy` interface every aggregation algorithm implements.

A strategy is pure math on tensors and plain data: it never learns whether its updates
came from the daemon (gRPC), an in-process simulation or any other backend. One round:

1. `configure_round(r)` returns the extra config sent to each selected client (e.g. a
   FedProx μ); the server or simulator merges it into the run's client config.
2. `begin_round(r, global_weights)` returns a `RoundAggregate` for that round.
3. Each validated client update is folded in with `RoundAggregate.add` as it arrives.
   FedAvg-family aggregates keep a running weighted sum, so memory is O(model), not
   O(clients × model). Strategies that need every update at once (median, Krum) set
   `needs_all_updates = True` so hosts can plan memory (spill to disk) accordingly.
4. `finish_round(r, global_weights, aggregate)` gives the new global weights; it is the
   one place a strategy may change its own state (server momentum, adaptive moments,
   a clipping norm), and hosts call it exactly once per committed round.
5. `state_dict()` / `load_state_dict()` carry whatever the strategy must remember across
   rounds; the server persists it with every committed round so a restart resumes the
   strategy exactly. Values are JSON scalars/lists/dicts, or tensors (flat keys; the
   server stores tensors in the round's checkpoint file, the rest in the database).

Hosts: the daemon (`server/engine.py`) and the in-process simulator
(`simulations/inprocess.py`) drive this lifecycle identically.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

Weights = dict[str, torch.Tensor]
Scalar = bool | int | float | str
StrategyState = dict[str, object]


@dataclass(frozen=True)
class ClientUpdate:
    """A client's locally trained model, the number of examples it trained on, and its metrics."""

    weights: Mapping[str, torch.Tensor]
    num_examples: int
    metrics: Mapping[str, Scalar] = field(default_factory=dict)


class RoundAggregate(ABC):
    """Folds the updates of one round together; tracks counts and weighted metric means."""

    def __init__(self) -> None:
        self.num_updates = 0
        self.num_examples = 0
        # Running example-weighted means (not sums: n × a large finite value would overflow).
        self._metric_means: dict[str, float] = {}
        self._metric_weights: dict[str, int] = {}

    def _fold_metric(self, key: str, mean: float, weight: int) -> None:
        """Combine a (mean, weight) pair into the running mean as a convex combination."""
        total = self._metric_weights.get(key, 0) + weight
        share = weight / total
        self._metric_means[key] = self._metric_means.get(key, 0.0) * (1 - share) + mean * share
        self._metric_weights[key] = total

    def add(self, update: ClientUpdate) -> None:
        if update.num_examples <= 0:
            raise ValueError(f"an update must cover at least one example, got {update.num_examples}")
        self._fold(update)
        self.num_updates += 1
        self.num_examples += update.num_examples
        for key, value in update.metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._fold_metric(key, float(value), update.num_examples)

    def add_stacked(
        self, stacked: Mapping[str, torch.Tensor], num_examples: Sequence[int], metrics: Sequence[Mapping[str, Scalar]]
    ) -> None:
        """Fold many updates at once, given as tensors stacked along a leading client axis
        (clients trained together by the vectorized simulation arrive that way). The same as
        `add` for each in turn, up to float summation order; aggregates without a stacked
        fold of their own get exactly that."""
        if len(num_examples) != len(metrics) or any(n <= 0 for n in num_examples):
            raise ValueError("every stacked update needs a positive example count and its metrics")
        self._fold_stacked(stacked, num_examples)
        self.num_updates += len(num_examples)
        self.num_examples += sum(num_examples)
        for n, update_metrics in zip(num_examples, metrics, strict=True):
            for key, value in update_metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._fold_metric(key, float(value), n)

    def _fold_stacked(self, stacked: Mapping[str, torch.Tensor], num_examples: Sequence[int]) -> None:
        for i, n in enumerate(num_examples):
            self._fold(ClientUpdate({name: t[i] for name, t in stacked.items()}, n))

    def merge(self, other: RoundAggregate) -> None:
        """Fold in another partial aggregate of the same round — e.g. one a simulation worker
        process built from its share of the clients — so results are reduced once per round."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")
        self._merge_state(other)
        self.num_updates += other.num_updates
        self.num_examples += other.num_examples
        for key, mean in other._metric_means.items():
            self._fold_metric(key, mean, other._metric_weights[key])

    @property
    def mergeable(self) -> bool:
        return type(self)._merge_state is not RoundAggregate._merge_state

    def _merge_state(self, other: RoundAggregate) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot merge partial aggregates")

    def metrics(self) -> dict[str, float]:
        """Example-weighted mean of every numeric client metric (e.g. train_loss)."""
        return dict(self._metric_means)

    @abstractmethod
    def _fold(self, update: ClientUpdate) -> None:
        """Fold one update's weights into the running state."""

    @abstractmethod
    def result(self) -> Weights:
        """The aggregated global weights; raises if no update arrived."""

    def take_result(self) -> Weights:
        """`result()` for the last time: the aggregate may free its buffers while computing it
        (strategies call this from `finish_round`; the aggregate is spent afterwards)."""
        return self.result()


class Strategy(ABC):
    """Base class of aggregation strategies; see the module docstring for the lifecycle."""

    name: ClassVar[str]
    needs_all_updates: ClassVar[bool] = False

    def configure_round(self, server_round: int) -> dict[str, Scalar]:
        """Extra config for the clients of `server_round` (none by default)."""
        return {}

    @abstractmethod
    def begin_round(self, server_round: int, global_weights: Mapping[str, torch.Tensor]) -> RoundAggregate:
        """Start collecting round `server_round`, whose clients start from `global_weights`."""

    def finish_round(
        self, server_round: int, global_weights: Mapping[str, torch.Tensor], aggregate: RoundAggregate
    ) -> Weights:
        """The new global weights after `server_round` (default: what the aggregate computed)."""
        return aggregate.take_result()

    def state_dict(self) -> StrategyState:
        """State to persist after every committed round (stateless strategies: empty)."""
        return {}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore what `state_dict` returned; stateless strategies accept only empty state."""
        if state:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(state)}")
