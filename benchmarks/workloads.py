"""The simulation benchmark's workloads (W1-W3): what each runs, on which backends, against which target.

Shared by ``sim_bench.py`` (the framework runs and the table) and ``bare_loop.py`` (the
no-framework baseline), so both sides train exactly the same clients, rounds and settings.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/...` from anywhere: the project's packages first
    sys.path.insert(0, str(ROOT))

BARE = "bare"


@dataclass(frozen=True)
class Run:
    """One line of the table: a backend (or the bare loop) with its worker count and target."""

    backend: str  # inprocess | vectorized | bare
    workers: int = 1  # SimulationConfig.workers: 0 = one per core
    target_ratio: float | None = None  # wall time / bare loop's must be <= this
    target_rss_gib: float | None = None  # peak RSS (GiB) must be <= this

    @property
    def label(self) -> str:
        if self.backend == "bare":
            return self.backend
        return f"{self.backend} (all cores)" if self.workers == 0 else f"{self.backend} workers={self.workers}"

    @property
    def key(self) -> str:
        return f"{self.backend}:{self.workers}"

    def target_text(self) -> str:
        parts = []
        if self.target_ratio is not None:
            parts.append(f"<= {self.target_ratio:g}x bare")
        if self.target_rss_gib is not None:
            parts.append(f"RSS <= {self.target_rss_gib:g} GiB")
        return ", ".join(parts) or "-"


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    app: str  # app spec as `leptonfl sim --app` takes it (absolute path)
    clients: int
    rounds: int
    quick_rounds: int
    client_config: dict[str, Any]
    runs: tuple[Run, ...]
    clients_per_round: int | None = None
    partition: str = "iid"
    seed: int = 0
    repeats: int = 1  # default number of timed runs of each line (the table shows the fastest)
    extra: dict[str, Any] = field(default_factory=dict)

    def rounds_for(self, quick: bool) -> int:
        return self.quick_rounds if quick else self.rounds

    @property
    def per_round(self) -> int:
        return self.clients_per_round or self.clients


WORKLOADS: dict[str, Workload] = {
    w.key: w
    for w in (
        Workload(
            key="W1",
            title="orchestration-bound: digits MLP 64-128-10, 100 clients all per round, IID, 1 epoch, batch 10",
            app=str(ROOT / "examples" / "digits"),
            clients=100,
            rounds=5,
            quick_rounds=2,
            client_config={"local_epochs": 1, "batch_size": 10, "lr": 0.05},
            runs=(
                Run(BARE),
                Run("inprocess", workers=0, target_ratio=1.2),
                Run("inprocess", workers=1),  # diagnostic: the per-client overhead alone, no parallelism
                Run("vectorized", workers=0, target_ratio=0.33),
            ),
            repeats=5,  # a 0.1-0.3 s line: the fastest of 5 interleaved runs is stable on a shared 2-core VM
        ),
        Workload(
            key="W2",
            title="compute-bound: McMahan 2017 CNN (1.66M params), 20 clients x 300 images 28x28, 1 epoch, batch 32",
            app=str(ROOT / "examples" / "cnn"),
            clients=20,
            rounds=3,
            quick_rounds=1,
            client_config={"local_epochs": 1, "batch_size": 32, "lr": 0.05},
            runs=(
                Run(BARE),
                Run("inprocess", workers=0, target_ratio=0.6),
                Run("inprocess", workers=1),
            ),
        ),
        Workload(
            key="W3",
            title="scale: 10,000 clients, 1,000 per round, synthetic 100k x 20, MLP 20-32-10, 1 epoch, batch 10",
            app=str(ROOT / "benchmarks" / "apps" / "scale.py"),
            clients=10_000,
            clients_per_round=1_000,
            rounds=3,
            quick_rounds=1,
            client_config={"local_epochs": 1, "batch_size": 10, "lr": 0.05},
            runs=(
                Run(BARE),
                Run("inprocess", workers=0, target_rss_gib=2.0),
                Run("inprocess", workers=1, target_rss_gib=2.0),
                Run("vectorized", target_rss_gib=2.0),
            ),
        ),
    )
}
