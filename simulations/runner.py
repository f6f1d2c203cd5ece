"""`run_simulation`: pick a backend, show progress, write metrics, plots, summary and model.

Files in ``config.out``: ``run.json`` (config, seed, versions, start time; written before the
first round, completed at the end), ``metrics.jsonl``, ``metrics.csv``, ``metrics.png``,
``epsilon.png`` (DP only), ``client_time.png`` (when the backend reports client times),
``summary.md`` and ``final.safetensors``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import platform
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import leptonfl
from simulations.apps import load_app
from simulations.config import SimulationConfig
from simulations.report import Progress, RoundRecord, write_metrics, write_plots, write_summary


@dataclass(frozen=True)
class SimulationResult:
    records: list[RoundRecord]
    weights: dict[str, torch.Tensor]
    metrics_path: Path
    plot_path: Path | None  # metrics.png (None with plots turned off)
    model_path: Path
    seconds: float
    plots: list[Path] = field(default_factory=list)  # every PNG written, metrics.png first
    summary_path: Path | None = None
    run_path: Path | None = None

    @property
    def final_accuracy(self) -> float:
        return self.records[-1].eval_accuracy


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _plain(value: Any) -> Any:
    """JSON-ready copy: dataclasses and mappings as dicts, paths as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_dict(config: SimulationConfig) -> dict[str, Any]:
    """Every `SimulationConfig` field, ``privacy`` as a dict, ``out`` as a string."""
    data = _plain(config)
    assert isinstance(data, dict)
    return data


def run_info(config: SimulationConfig, app_name: str, started_at: datetime | None = None) -> dict[str, Any]:
    """What ``run.json`` holds: the config's fields at the top level (as before), the same
    under ``config`` (to rebuild it from), the app's name, versions and the start time."""
    settings = config_dict(config)
    return {
        **settings,
        "app_name": app_name,
        "config": settings,
        "leptonfl_version": leptonfl.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "started_at": (started_at or datetime.now(UTC)).isoformat(timespec="seconds"),
    }


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def _call_backend(backend: Callable[..., Any], *args: Any, **hooks: Any) -> Any:
    """Call ``backend(*args, **hooks)``, passing only the hooks it accepts, so a backend
    gains ``on_client=`` / ``on_round_start=`` support without the runner changing."""
    parameters = inspect.signature(backend).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        hooks = {k: v for k, v in hooks.items() if k in parameters}
    return backend(*args, **hooks)


def run_simulation(
    config: SimulationConfig,
    echo: Callable[[str], None] = _stderr,
    progress: Progress | None = None,
) -> SimulationResult:
    """Run ``config`` and write its files into ``config.out``.

    Messages go to ``echo``; per-round lines and the live line go to ``progress`` (by
    default a `Progress` on stderr, live on a terminal; or, when a custom ``echo`` is given,
    one through ``echo``, one line per round).
    """
    config.validate()
    app = load_app(config.app)
    if progress is None:
        progress = Progress(sys.stderr) if echo is _stderr else Progress(echo=echo)
    shown = progress

    def say(message: str) -> None:
        shown.clear()
        echo(message)
        shown.redraw()

    config.out.mkdir(parents=True, exist_ok=True)
    run_path = config.out / "run.json"
    info = run_info(config, app.name)
    _write_json(run_path, info)
    say(
        f"simulating {config.clients} clients of {app.name!r}, {config.rounds} rounds, "
        f"{config.per_round} per round, backend {config.backend}, seed {config.seed}"
    )

    # Client times of the round under way; a record that arrives without its own gets them.
    lock = threading.Lock()
    client_times: list[float] = []

    def on_client(seconds: float) -> None:
        with lock:
            client_times.append(seconds)
        shown.client_done(seconds)

    def on_round_start(number: int, clients: int) -> None:
        with lock:
            client_times.clear()
        shown.round_started(number, config.rounds, clients)

    def on_round(record: RoundRecord) -> None:
        with lock:
            if not record.client_seconds:
                record.client_seconds = list(client_times)
            client_times.clear()
        shown.round_finished(record)

    started = time.perf_counter()
    progress.begin(config.rounds, config.per_round)
    hooks = {"on_client": on_client, "on_round_start": on_round_start}
    try:
        if config.backend == "grpc":
            from simulations.grpc_backend import run_grpc

            records, weights = _call_backend(run_grpc, app, config, on_round, **hooks)
        elif config.backend == "vectorized":
            from simulations.vectorized import run_vectorized

            records, weights = _call_backend(run_vectorized, app, config, on_round, say, **hooks)
        elif config.backend == "ray":
            from simulations.ray_backend import run_ray

            records, weights = _call_backend(run_ray, app, config, on_round, say, address=config.ray_address, **hooks)
        else:
            from simulations.inprocess import run_inprocess

            records, weights = _call_backend(run_inprocess, app, config, on_round, say, **hooks)
    finally:
        progress.close()
    seconds = time.perf_counter() - started

    metrics_path, _ = write_metrics(records, config.out)
    title = f"{app.name}: {config.strategy}, {config.clients} clients ({config.backend})"
    plots = write_plots(records, config.out, title) if config.plots else []
    model_path = config.out / "final.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(model_path))
    info.update(
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        seconds=round(seconds, 3),
        rounds_completed=len(records),
    )
    _write_json(run_path, info)
    summary_path = write_summary(info, records, config.out, seconds)
    return SimulationResult(
        records,
        weights,
        metrics_path,
        plots[0] if plots else None,
        model_path,
        seconds,
        plots=plots,
        summary_path=summary_path,
        run_path=run_path,
    )
