"""FedAvg (McMahan et al. 2017): the new global model is the example-weighted mean of
the client models, w ← Σ_k n_k w_k / Σ_k n_k.

Kept as a running weighted sum in float64, so memory is one model-sized buffer whatever
the number of clients, and summation error stays far below float32 resolution.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from strategies.base import ClientUpdate, RoundAggregate, Strategy, Weights
from strategies.registry import register_strategy


class WeightedMean(RoundAggregate):
    """Running Σ n_k w_k and Σ n_k over the updates of one round."""

    def __init__(self, template: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self._dtypes = {name: t.dtype for name, t in template.items()}
        self._shapes = {name: t.shape for name, t in template.items()}
        self._sums: dict[str, torch.Tensor] = {}

    def _fold(self, update: ClientUpdate) -> None:
        # Checked in full before anything is added, so a bad update leaves the sum untouched.
        if update.weights.keys() != self._shapes.keys():
            raise ValueError("update tensors differ from the global model's")
        wrong = [n for n, t in update.weights.items() if t.shape != self._shapes[n]]
        if wrong:
            raise ValueError(f"update tensors {wrong} differ in shape from the global model's")
        for name, tensor in update.weights.items():
            if name not in self._sums:
                self._sums[name] = torch.zeros(tensor.shape, dtype=torch.float64)
            # in place, promoted to float64: no model-sized temporaries per update
            self._sums[name].add_(tensor.detach(), alpha=update.num_examples)

    def _fold_stacked(self, stacked: Mapping[str, torch.Tensor], num_examples: Sequence[int]) -> None:
        """Σ_k n_k w_k for a whole stack in one float64 contraction per tensor."""
        if stacked.keys() != self._shapes.keys():
            raise ValueError("update tensors differ from the global model's")
        wrong = [n for n, t in stacked.items() if t.shape[1:] != self._shapes[n] or len(t) != len(num_examples)]
        if wrong:
            raise ValueError(f"stacked tensors {wrong} do not match the global model's shapes and the update count")
        counts = torch.tensor(num_examples, dtype=torch.float64)
        for name, tensor in stacked.items():
            folded = torch.tensordot(counts, tensor.detach().to(torch.float64), dims=1)
            if name in self._sums:
                self._sums[name].add_(folded)
            else:
                self._sums[name] = folded

    def _merge_state(self, other: RoundAggregate) -> None:
        assert isinstance(other, WeightedMean)
        for name, total in other._sums.items():
            if name in self._sums:
                self._sums[name].add_(total)
            else:
                self._sums[name] = total.clone()

    def result(self) -> Weights:
        if self.num_updates == 0:
            raise ValueError("no update to aggregate")
        return {name: self._mean(name, total / self.num_examples) for name, total in self._sums.items()}

    def take_result(self) -> Weights:
        """`result()`, freeing each float64 sum as soon as its mean exists: the peak is the sums
        plus one tensor rather than the sums plus a second model (a 2 GiB model's sums are 4 GiB)."""
        if self.num_updates == 0:
            raise ValueError("no update to aggregate")
        return {name: self._mean(name, self._sums.pop(name).div_(self.num_examples)) for name in list(self._sums)}

    def _mean(self, name: str, mean: torch.Tensor) -> torch.Tensor:
        dtype = self._dtypes[name]
        # Integer buffers (e.g. BatchNorm's num_batches_tracked) round to the nearest value.
        return (mean if dtype.is_floating_point else mean.round()).to(dtype)


class MeanBasedStrategy(Strategy):
    """The FedAvg family: aggregate the example-weighted mean of client models, then apply a
    server update to it. FedAvg's server update is the identity; server-optimizer strategies
    (FedAvgM, FedAdam, ...) override `server_update` and treat mean − global as a
    pseudo-gradient. Central DP wraps any of them by replacing how the mean is formed.
    """

    def begin_round(self, server_round: int, global_weights: Mapping[str, torch.Tensor]) -> RoundAggregate:
        return WeightedMean(global_weights)

    def server_update(self, server_round: int, global_weights: Mapping[str, torch.Tensor], mean: Weights) -> Weights:
        """New global weights from the round's mean client model (default: the mean itself)."""
        return mean

    def finish_round(
        self, server_round: int, global_weights: Mapping[str, torch.Tensor], aggregate: RoundAggregate
    ) -> Weights:
        return self.server_update(server_round, global_weights, aggregate.take_result())


@register_strategy("fedavg")
class FedAvg(MeanBasedStrategy):
    """Federated Averaging weighted by each client's example count. No parameters, no state."""
