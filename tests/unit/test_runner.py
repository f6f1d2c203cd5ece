"""`run_simulation`: run.json, every report file, progress hooks passed to backends."""

from __future__ import annotations

import dataclasses
import io
import json
import platform
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch

import leptonfl
import simulations.inprocess
from simulations.apps import App
from simulations.config import SimulationConfig
from simulations.report import Progress, RoundRecord
from simulations.runner import _call_backend, run_info, run_simulation
from strategies.factory import PrivacySettings
from tests.conftest import DIGITS_APP

BASE_FILES = {"run.json", "metrics.jsonl", "metrics.csv", "metrics.png", "summary.md", "final.safetensors"}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """As `leptonfl sim` does: tiny models, and a busy machine makes extra threads slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_run_info_holds_config_seed_and_versions(tmp_path: Path) -> None:
    privacy = PrivacySettings(mode="central", noise_multiplier=1.1, clip_norm=0.5)
    config = SimulationConfig(
        app=DIGITS_APP,
        clients=8,
        rounds=3,
        clients_per_round=2,
        seed=11,
        out=tmp_path,
        strategy="fedavgm",
        strategy_params={"server_momentum": 0.9},
        privacy=privacy,
    )
    info = run_info(config, "digits", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert info["leptonfl_version"] == leptonfl.__version__ == "0.1.0"
    assert info["torch_version"] == torch.__version__
    assert info["python_version"] == platform.python_version()
    assert info["platform"] == platform.platform()
    assert info["started_at"] == "2026-01-02T03:04:05+00:00"
    assert info["app_name"] == "digits"
    expected_config = {
        "app": DIGITS_APP,
        "clients": 8,
        "rounds": 3,
        "clients_per_round": 2,
        "partition": "iid",
        "backend": "inprocess",
        "seed": 11,
        "out": str(tmp_path),
        "strategy": "fedavgm",
        "strategy_params": {"server_momentum": 0.9},
        "client_config": {},
        "round_timeout_s": 300.0,
        "privacy": privacy.to_dict(),
    }
    # Every field of the config, whatever fields it gains later.
    assert set(info["config"]) == {f.name for f in dataclasses.fields(SimulationConfig)} >= set(expected_config)
    assert {k: info["config"][k] for k in expected_config} == expected_config
    # The fields stay at the top level too, as run.json always had them.
    assert {k: info[k] for k in info["config"]} == info["config"]
    # Rebuilds the config it came from.
    rebuilt = SimulationConfig(
        **{**info["config"], "out": Path(info["config"]["out"]), "privacy": PrivacySettings(**info["privacy"])}
    )
    assert rebuilt == config
    json.dumps(info, allow_nan=False)


def test_backend_gets_only_the_hooks_it_accepts() -> None:
    seen: dict[str, Any] = {}

    def old(a: int, b: int) -> int:
        return a + b

    def new(a: int, *, on_client: Any = None) -> int:
        seen["on_client"] = on_client
        return a

    def anything(a: int, **kwargs: Any) -> int:
        seen.update(kwargs)
        return a

    assert _call_backend(old, 1, 2, on_client=print, on_round_start=len) == 3
    assert _call_backend(new, 5, on_client=print, on_round_start=len) == 5
    assert seen == {"on_client": print}
    assert _call_backend(anything, 5, on_client=print, on_round_start=len) == 5
    assert seen == {"on_client": print, "on_round_start": len}


def test_digits_run_writes_every_file(tmp_path: Path) -> None:
    lines: list[str] = []
    config = SimulationConfig(app=DIGITS_APP, clients=4, rounds=2, out=tmp_path)
    result = run_simulation(config, echo=lines.append)

    assert [r.round for r in result.records] == [1, 2]
    assert all(r.num_clients == 4 and r.num_examples == 1437 for r in result.records)
    timed = any(r.client_seconds for r in result.records)  # once the backend reports client times
    assert {p.name for p in tmp_path.iterdir()} == BASE_FILES | ({"client_time.png"} if timed else set())
    assert result.plots == [tmp_path / "metrics.png"] + ([tmp_path / "client_time.png"] if timed else [])
    assert result.plot_path == tmp_path / "metrics.png"
    assert result.summary_path == tmp_path / "summary.md"
    assert result.metrics_path == tmp_path / "metrics.jsonl"
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in result.plots)

    assert lines[0] == "simulating 4 clients of 'digits', 2 rounds, 4 per round, backend inprocess, seed 0"
    assert lines[1].startswith("round 1/2: 4 clients, train_loss ") and ", ETA " in lines[1]
    assert lines[2].startswith("round 2/2: 4 clients, train_loss ") and "ETA" not in lines[2]
    assert len(lines) == 3

    info = json.loads((tmp_path / "run.json").read_text())
    assert info["clients"] == 4 and info["seed"] == 0 and info["config"]["rounds"] == 2
    assert info["privacy"]["mode"] == "" and info["config"]["privacy"]["mode"] == ""
    assert info["leptonfl_version"] == leptonfl.__version__
    assert info["torch_version"] == torch.__version__
    assert info["rounds_completed"] == 2
    assert info["seconds"] == pytest.approx(result.seconds, abs=1e-3)
    assert datetime.fromisoformat(info["started_at"]) <= datetime.fromisoformat(info["finished_at"])

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["eval_accuracy"] for row in rows] == [r.eval_accuracy for r in result.records]

    summary = (tmp_path / "summary.md").read_text(encoding="utf-8").splitlines()
    final = result.records[-1]
    best = max(result.records, key=lambda r: r.eval_accuracy)
    for row in (
        "# Simulation: digits",
        f"| app | digits ({DIGITS_APP}) |",
        "| clients | 4 |",
        "| rounds | 2 |",
        "| seed | 0 |",
        "| differential privacy | off |",
        "| rounds completed | 2 of 2 |",
        f"| final accuracy | {final.eval_accuracy:.4f} |",
        f"| best accuracy | {best.eval_accuracy:.4f} (round {best.round}) |",
        f"| total time | {result.seconds:.1f} s |",
        f"| 2 | 4 | 1437 | {final.train_loss:.4f} | {final.eval_loss:.4f} | {final.eval_accuracy:.4f} "
        f"| {final.duration_seconds:.2f} |",
        "- [metrics.jsonl](metrics.jsonl)",
        "- [final.safetensors](final.safetensors)",
        "![accuracy and loss per round](metrics.png)",
    ):
        assert row in summary, row
    assert final.eval_accuracy > 0.85


def test_dp_run_plots_epsilon(tmp_path: Path) -> None:
    privacy = PrivacySettings(mode="central", noise_multiplier=1.0, clip_norm=1.0)
    config = SimulationConfig(app=DIGITS_APP, clients=4, rounds=2, clients_per_round=2, out=tmp_path, privacy=privacy)
    result = run_simulation(config, echo=lambda _: None)
    assert tmp_path / "epsilon.png" in result.plots
    assert (tmp_path / "epsilon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["config"]["privacy"] == privacy.to_dict()
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    epsilon = [r.extra["epsilon"] for r in result.records if "epsilon" in r.extra][-1]
    assert f"| final ε | {epsilon:.4f} (δ 1e-05) |" in summary
    assert "| differential privacy | central, noise multiplier 1.0, clip norm 1.0," in summary


def _fake_backend(
    with_hooks: bool,
) -> Callable[..., tuple[list[RoundRecord], dict[str, torch.Tensor]]]:
    def run(
        app: App,
        config: SimulationConfig,
        on_round: Callable[[RoundRecord], None],
        echo: Callable[[str], None] = lambda _: None,
        *,
        on_client: Callable[[float], None] | None = None,
        on_round_start: Callable[[int, int], None] | None = None,
    ) -> tuple[list[RoundRecord], dict[str, torch.Tensor]]:
        records = []
        for number in range(1, config.rounds + 1):
            if on_round_start is not None:
                on_round_start(number, 3)
            if on_client is not None:
                for seconds in (0.25 * number, 0.5 * number, 0.75 * number):
                    on_client(seconds)
            echo(f"fake round {number}")
            record = RoundRecord(number, 3, 30, 1.0 / number, 1.0 / number, 0.5 + 0.1 * number, 1.0)
            records.append(record)
            on_round(record)
        return records, {"w": torch.zeros(2)}

    if with_hooks:
        return run

    def legacy(
        app: App, config: SimulationConfig, on_round: Callable[[RoundRecord], None], echo: Callable[[str], None]
    ) -> tuple[list[RoundRecord], dict[str, torch.Tensor]]:
        return run(app, config, on_round, echo)

    return legacy


def test_client_times_from_the_backend_reach_records_files_and_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(simulations.inprocess, "run_inprocess", _fake_backend(with_hooks=True))
    out = io.StringIO()
    config = SimulationConfig(app=DIGITS_APP, clients=10, rounds=2, clients_per_round=5, out=tmp_path)
    result = run_simulation(config, echo=lambda _: None, progress=Progress(out))
    assert [r.client_seconds for r in result.records] == [[0.25, 0.5, 0.75], [0.5, 1.0, 1.5]]
    assert {p.name for p in tmp_path.iterdir()} == BASE_FILES | {"client_time.png"}
    assert result.plots == [tmp_path / "metrics.png", tmp_path / "client_time.png"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["client_seconds_mean"], r["client_seconds_max"]) for r in rows] == [(0.5, 0.75), (1.0, 1.5)]
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "| client training time | mean 0.750 s, max 1.500 s (6 updates) |" in summary
    assert "![client training times](client_time.png)" in summary
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("round 1/2: 3 clients, train_loss 1.0000, accuracy 0.6000 (1.0 s), ETA ")
    assert lines[1] == "round 2/2: 3 clients, train_loss 0.5000, accuracy 0.7000 (1.0 s)"


def test_a_backend_without_hooks_still_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulations.inprocess, "run_inprocess", _fake_backend(with_hooks=False))
    lines: list[str] = []
    config = SimulationConfig(app=DIGITS_APP, clients=10, rounds=2, out=tmp_path)
    result = run_simulation(config, echo=lines.append)
    assert all(r.client_seconds == [] for r in result.records)
    assert {p.name for p in tmp_path.iterdir()} == BASE_FILES
    # Backend messages and round lines interleave in order through echo.
    assert [line.split(":")[0].split(",")[0] for line in lines] == [
        "simulating 10 clients of 'digits'",
        "fake round 1",
        "round 1/2",
        "fake round 2",
        "round 2/2",
    ]
