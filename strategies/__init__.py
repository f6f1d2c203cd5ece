"""Pure aggregation and privacy math. No gRPC or database in here; the only file I/O is the
robust strategies' spill of large update buffers to a temporary memory map.

Importing the package registers every strategy: fedavg, fedavgm, fedprox, fedadagrad,
fedadam, fedyogi, median, trimmed-mean, krum, multi-krum.
"""

from strategies import fedopt, robust  # noqa: F401 - registers the strategies
from strategies.base import ClientUpdate, RoundAggregate, Scalar, Strategy, StrategyState, Weights
from strategies.fedavg import FedAvg, MeanBasedStrategy, WeightedMean
from strategies.registry import create_strategy, register_strategy, strategy_names

__all__ = [
    "ClientUpdate",
    "FedAvg",
    "MeanBasedStrategy",
    "RoundAggregate",
    "Scalar",
    "Strategy",
    "StrategyState",
    "WeightedMean",
    "Weights",
    "create_strategy",
    "register_strategy",
    "strategy_names",
]
