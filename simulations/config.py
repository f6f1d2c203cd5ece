"""What a simulation is asked to do; shared by every backend."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strategies.factory import PrivacySettings

BACKENDS = ("inprocess", "vectorized", "grpc", "ray")


@dataclass(frozen=True)
class SimulationConfig:
    app: str
    clients: int
    rounds: int
    clients_per_round: int | None = None  # None: every client, every round
    partition: str = "iid"
    backend: str = "inprocess"
    seed: int = 0
    out: Path = Path("sim-out")
    strategy: str = "fedavg"
    strategy_params: Mapping[str, Any] = field(default_factory=dict)
    client_config: Mapping[str, Any] = field(default_factory=dict)  # overrides the app's defaults
    round_timeout_s: float = 300.0
    privacy: PrivacySettings = PrivacySettings()  # with central DP, clients_per_round is the expected K
    # inprocess: worker processes (0 = one per available core; 1 = this process only);
    # vectorized: torch intra-op threads for its batched steps (0 = one per core);
    # ray: actors (0 = one per CPU of the cluster)
    workers: int = 1
    # ray: an existing cluster (auto, HOST:PORT, ray://HOST:10001); None: $RAY_ADDRESS or a local instance
    ray_address: str | None = None
    plots: bool = True  # PNG plots (benchmarks turn them off: matplotlib costs ~1 s)

    def worker_count(self) -> int:
        if self.workers > 0:
            return self.workers
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))

    @property
    def per_round(self) -> int:
        return self.clients_per_round or self.clients

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.clients < 1 or self.rounds < 1:
            raise ValueError("clients and rounds must be at least 1")
        self.privacy.validate()
        if not 1 <= self.per_round <= self.clients:
            raise ValueError(f"clients per round must be between 1 and {self.clients}, got {self.per_round}")
