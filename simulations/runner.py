"""`run_simulation`: pick a backend, print progress, write metrics, table and plot."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from simulations.apps import load_app
from simulations.config import SimulationConfig
from simulations.report import RoundRecord, format_round_line, plot_metrics, write_metrics


@dataclass(frozen=True)
class SimulationResult:
    records: list[RoundRecord]
    weights: dict[str, torch.Tensor]
    metrics_path: Path
    plot_path: Path
    model_path: Path
    seconds: float

    @property
    def final_accuracy(self) -> float:
        return self.records[-1].eval_accuracy


def run_simulation(
    config: SimulationConfig, echo: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
) -> SimulationResult:
    config.validate()
    app = load_app(config.app)
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "run.json").write_text(
        json.dumps({**asdict(config), "out": str(config.out), "app_name": app.name}, indent=2, default=str)
    )
    echo(
        f"simulating {config.clients} clients of {app.name!r}, {config.rounds} rounds, "
        f"{config.per_round} per round, backend {config.backend}, seed {config.seed}"
    )
    started = time.perf_counter()
    on_round = lambda record: echo(format_round_line(record, config.rounds))  # noqa: E731
    if config.backend == "grpc":
        from simulations.grpc_backend import run_grpc

        records, weights = run_grpc(app, config, on_round)
    elif config.backend == "vectorized":
        from simulations.vectorized import run_vectorized

        records, weights = run_vectorized(app, config, on_round, echo)
    else:
        from simulations.inprocess import run_inprocess

        records, weights = run_inprocess(app, config, on_round, echo)
    seconds = time.perf_counter() - started
    metrics_path, _ = write_metrics(records, config.out)
    plot_path = plot_metrics(
        records, config.out, f"{app.name}: {config.strategy}, {config.clients} clients ({config.backend})"
    )
    model_path = config.out / "final.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(model_path))
    return SimulationResult(records, weights, metrics_path, plot_path, model_path, seconds)
