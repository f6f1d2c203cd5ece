"""Pure aggregation and privacy math. No gRPC, database or file I/O in here."""

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
