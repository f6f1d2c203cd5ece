"""Reports: files read back exactly, NaN handling, PNG output, summary.md, terminal text,
the live progress line."""

from __future__ import annotations

import csv
import io
import json
import math
import threading
from pathlib import Path

import pytest

from simulations.report import (
    Progress,
    RoundRecord,
    format_eta,
    format_round_line,
    plot_metrics,
    render_markdown_table,
    render_round_table,
    write_metrics,
    write_plots,
    write_summary,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _records() -> list[RoundRecord]:
    return [
        RoundRecord(1, 20, 1437, 1.8123, 1.5, 0.6111, 0.25, extra={"epsilon": 0.5}),
        RoundRecord(2, 19, 1370, 0.4123, float("nan"), 0.917, 1.234),
        RoundRecord(10, 20, 1437, 0.1, 0.2, 0.95, 12.5, extra={"epsilon": 1.25}),
    ]


def test_to_dict_flattens_extra() -> None:
    record = _records()[0]
    assert record.to_dict() == {
        "round": 1,
        "num_clients": 20,
        "num_examples": 1437,
        "train_loss": 1.8123,
        "eval_loss": 1.5,
        "eval_accuracy": 0.6111,
        "duration_seconds": 0.25,
        "epsilon": 0.5,
    }


def test_extra_may_not_shadow_base_fields() -> None:
    with pytest.raises(ValueError, match="round"):
        RoundRecord(1, 1, 1, 0.0, 0.0, 0.0, 0.0, extra={"round": 2.0}).to_dict()


def test_jsonl_reads_back_exactly_with_nan_as_null(tmp_path: Path) -> None:
    jsonl_path, _ = write_metrics(_records(), tmp_path / "out")
    assert jsonl_path == tmp_path / "out" / "metrics.jsonl"
    text = jsonl_path.read_text(encoding="utf-8")
    assert "NaN" not in text
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == 3
    assert rows[0] == _records()[0].to_dict()
    assert rows[1]["eval_loss"] is None
    assert rows[1]["duration_seconds"] == 1.234
    assert "epsilon" not in rows[1]
    assert rows[2]["epsilon"] == 1.25


def test_csv_reads_back_exactly(tmp_path: Path) -> None:
    _, csv_path = write_metrics(_records(), tmp_path)
    assert csv_path == tmp_path / "metrics.csv"
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == [
            "round",
            "num_clients",
            "num_examples",
            "train_loss",
            "eval_loss",
            "eval_accuracy",
            "duration_seconds",
            "epsilon",
        ]
        rows = list(reader)
    assert len(rows) == 3
    for row, record in zip(rows, _records(), strict=True):
        assert int(row["round"]) == record.round
        assert int(row["num_clients"]) == record.num_clients
        assert int(row["num_examples"]) == record.num_examples
        assert float(row["train_loss"]) == record.train_loss
        assert float(row["eval_accuracy"]) == record.eval_accuracy
        assert float(row["duration_seconds"]) == record.duration_seconds
    assert rows[1]["eval_loss"] == ""
    assert rows[1]["epsilon"] == ""
    assert float(rows[2]["epsilon"]) == 1.25


def test_write_overwrites_previous_files(tmp_path: Path) -> None:
    write_metrics(_records(), tmp_path)
    jsonl_path, _ = write_metrics(_records()[:1], tmp_path)
    assert len(jsonl_path.read_text(encoding="utf-8").splitlines()) == 1


def test_plot_writes_png(tmp_path: Path) -> None:
    path = plot_metrics(_records(), tmp_path / "plots", title="digits / iid")
    assert path == tmp_path / "plots" / "metrics.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000


def test_table_contains_headers_and_values() -> None:
    table = render_round_table(_records())
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    for header in (
        "round",
        "clients",
        "examples",
        "train loss",
        "eval loss",
        "accuracy",
        "seconds",
        "epsilon",
    ):
        assert header in lines[0]
    # Extra metrics get a column each; a round without one shows nan.
    assert lines[2].split() == ["1", "20", "1437", "1.8123", "1.5000", "0.6111", "0.25", "0.5000"]
    assert lines[3].split() == ["2", "19", "1370", "0.4123", "nan", "0.9170", "1.23", "nan"]
    assert lines[4].split() == ["10", "20", "1437", "0.1000", "0.2000", "0.9500", "12.50", "1.2500"]
    # Right-aligned columns: every line is the same width.
    assert len({len(line) for line in lines}) == 1


def test_table_with_no_rounds_is_just_the_header() -> None:
    assert len(render_round_table([]).splitlines()) == 2


def test_format_round_line() -> None:
    record = RoundRecord(3, 20, 1437, 0.41234, 0.3, 0.917, 1.23)
    assert format_round_line(record, 10) == ("round 3/10: 20 clients, train_loss 0.4123, accuracy 0.9170 (1.2 s)")
    nan_record = RoundRecord(1, 5, 50, math.nan, 0.3, 0.5, 0.04)
    assert "train_loss nan" in format_round_line(nan_record, 2)


# ---------------------------------------------------------------------------- client times


def _timed_records() -> list[RoundRecord]:
    return [
        RoundRecord(1, 2, 100, 1.0, 0.9, 0.5, 2.0, client_seconds=[0.5, 1.5]),
        RoundRecord(2, 2, 100, 0.8, 0.7, 0.6, 1.0),
        RoundRecord(3, 2, 100, 0.6, 0.5, 0.7, 1.0, client_seconds=[0.25, 0.75]),
    ]


def test_client_times_become_mean_and_max_not_a_list() -> None:
    data = _timed_records()[0].to_dict()
    assert "client_seconds" not in data
    assert data["client_seconds_mean"] == 1.0
    assert data["client_seconds_max"] == 1.5
    assert set(_timed_records()[1].to_dict()) == {
        "round",
        "num_clients",
        "num_examples",
        "train_loss",
        "eval_loss",
        "eval_accuracy",
        "duration_seconds",
    }


def test_extra_may_not_shadow_client_statistics() -> None:
    with pytest.raises(ValueError, match="client_seconds_mean"):
        RoundRecord(1, 1, 1, 0.0, 0.0, 0.0, 0.0, extra={"client_seconds_mean": 2.0}).to_dict()


def test_client_statistics_in_jsonl_only_where_present_and_csv_columns(tmp_path: Path) -> None:
    jsonl_path, csv_path = write_metrics(_timed_records(), tmp_path)
    rows = [json.loads(line) for line in jsonl_path.read_text(encoding="utf-8").splitlines()]
    assert [(r.get("client_seconds_mean"), r.get("client_seconds_max")) for r in rows] == [
        (1.0, 1.5),
        (None, None),
        (0.5, 0.75),
    ]
    assert "client_seconds_mean" in rows[0] and "client_seconds_mean" not in rows[1]
    assert all("client_seconds" not in r for r in rows)
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames is not None
        assert reader.fieldnames[-2:] == ["client_seconds_mean", "client_seconds_max"]
        assert "client_seconds" not in reader.fieldnames
        csv_rows = list(reader)
    assert [r["client_seconds_max"] for r in csv_rows] == ["1.5", "", "0.75"]
    # Without any client times there are no such columns.
    _, csv_path = write_metrics(_records(), tmp_path / "plain")
    assert "client_seconds" not in csv_path.read_text(encoding="utf-8")


def test_terminal_table_has_no_client_time_columns() -> None:
    header = render_round_table(_timed_records()).splitlines()[0]
    assert header.split() == ["round", "clients", "examples", "train", "loss", "eval", "loss", "accuracy", "seconds"]


# ---------------------------------------------------------------------------------- plots


def test_plots_without_dp_or_client_times_is_metrics_png_only(tmp_path: Path) -> None:
    records = [RoundRecord(1, 2, 10, 1.0, 1.0, 0.5, 1.0), RoundRecord(2, 2, 10, 0.5, 0.5, 0.7, 1.0)]
    paths = write_plots(records, tmp_path, "t")
    assert paths == [tmp_path / "metrics.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.png"]
    assert paths[0].read_bytes()[:8] == PNG


def test_epsilon_plot_only_with_dp(tmp_path: Path) -> None:
    paths = write_plots(_records(), tmp_path, "dp")
    assert paths == [tmp_path / "metrics.png", tmp_path / "epsilon.png"]
    data = (tmp_path / "epsilon.png").read_bytes()
    assert data[:8] == PNG and len(data) > 1000
    # The same directory re-used by a run without DP loses the stale epsilon plot.
    write_plots([RoundRecord(1, 2, 10, 1.0, 1.0, 0.5, 1.0)], tmp_path, "no dp")
    assert not (tmp_path / "epsilon.png").exists()


def test_client_time_histogram_only_with_client_times(tmp_path: Path) -> None:
    paths = write_plots(_timed_records(), tmp_path, "timed")
    assert paths == [tmp_path / "metrics.png", tmp_path / "client_time.png"]
    assert (tmp_path / "client_time.png").read_bytes()[:8] == PNG
    both = [RoundRecord(1, 1, 1, 0.0, 0.0, 0.1, 0.1, extra={"epsilon": 0.3}, client_seconds=[0.1])]
    assert [p.name for p in write_plots(both, tmp_path / "both", "b")] == [
        "metrics.png",
        "epsilon.png",
        "client_time.png",
    ]
    write_plots(_records(), tmp_path, "untimed")
    assert not (tmp_path / "client_time.png").exists()


# -------------------------------------------------------------------------------- summary


def _run_info(**overrides: object) -> dict[str, object]:
    info: dict[str, object] = {
        "app": "examples/digits",
        "app_name": "digits",
        "clients": 20,
        "rounds": 10,
        "clients_per_round": 5,
        "partition": "dirichlet:0.5",
        "backend": "inprocess",
        "seed": 7,
        "strategy": "fedprox",
        "strategy_params": {"proximal_mu": 0.01},
        "client_config": {},
        "privacy": {"mode": ""},
        "leptonfl_version": "0.1.0",
        "torch_version": "2.13.0",
        "python_version": "3.11.7",
        "started_at": "2026-01-02T03:04:05+00:00",
    }
    info.update(overrides)
    return info


def test_summary_holds_config_results_and_table(tmp_path: Path) -> None:
    records = [
        RoundRecord(1, 5, 400, 1.2, 1.1, 0.61116, 2.0),
        RoundRecord(2, 5, 400, 0.5, 0.4, 0.9170, 1.0),
        RoundRecord(3, 5, 400, 0.4, 0.45, 0.9050, 1.5),
    ]
    (tmp_path / "metrics.csv").write_text("x")
    (tmp_path / "metrics.png").write_bytes(PNG)
    (tmp_path / "epsilon.png").write_bytes(PNG)  # stale: no epsilon in the records, so not linked
    path = write_summary(_run_info(), records, tmp_path, 12.345)
    assert path == tmp_path / "summary.md"
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0] == "# Simulation: digits"
    for row in (
        "| app | digits (examples/digits) |",
        "| backend | inprocess |",
        "| clients | 20 |",
        "| clients per round | 5 |",
        "| rounds | 10 |",
        "| partition | dirichlet:0.5 |",
        "| strategy | fedprox |",
        '| strategy parameters | `{"proximal_mu": 0.01}` |',
        "| client settings | none |",
        "| differential privacy | off |",
        "| seed | 7 |",
        "| leptonfl | 0.1.0 (torch 2.13.0, Python 3.11.7) |",
        "| started | 2026-01-02T03:04:05+00:00 |",
        "| rounds completed | 3 of 10 |",
        "| final accuracy | 0.9050 |",
        "| final eval loss | 0.4500 |",
        "| final train loss | 0.4000 |",
        "| best accuracy | 0.9170 (round 2) |",
        "| total time | 12.3 s |",
        "| mean round time | 1.50 s |",
        "| round | clients | examples | train loss | eval loss | accuracy | seconds |",
        "| 1 | 5 | 400 | 1.2000 | 1.1000 | 0.6112 | 2.00 |",
        "| 3 | 5 | 400 | 0.4000 | 0.4500 | 0.9050 | 1.50 |",
        "- [metrics.csv](metrics.csv)",
        "- [metrics.png](metrics.png): accuracy and loss per round",
        "![accuracy and loss per round](metrics.png)",
    ):
        assert row in lines, row
    assert "ε" not in text and "epsilon.png" not in text and "client" + "_time" not in text
    assert "metrics.jsonl" not in text  # not in the directory, so not linked


def test_summary_with_dp_and_client_times(tmp_path: Path) -> None:
    privacy = {
        "mode": "central",
        "noise_multiplier": 1.1,
        "clip_norm": 1.0,
        "adaptive_clipping": False,
        "delta": 1e-5,
        "epsilon_budget": 8.0,
        "accountant": "rdp",
    }
    records = [
        RoundRecord(1, 4, 300, 1.0, 1.0, 0.5, 1.0, extra={"epsilon": 0.5, "clip_norm": 1.0}, client_seconds=[0.5]),
        RoundRecord(2, 6, 450, 0.9, 0.9, 0.6, 1.0, extra={"epsilon": 0.75, "clip_norm": 1.0}, client_seconds=[1.0]),
    ]
    write_plots(records, tmp_path, "dp")
    lines = write_summary(_run_info(privacy=privacy), records, tmp_path, 3.0).read_text(encoding="utf-8").splitlines()
    for row in (
        "| clients per round | 5 (expected; Poisson sampling) |",
        "| differential privacy | central, noise multiplier 1.1, clip norm 1.0, δ 1e-05, accountant rdp, ε budget 8 |",
        "| final ε | 0.7500 (δ 1e-05) |",
        "| client training time | mean 0.750 s, max 1.000 s (2 updates) |",
        "| round | clients | examples | train loss | eval loss | accuracy | seconds | epsilon | clip_norm |",
        "| 2 | 6 | 450 | 0.9000 | 0.9000 | 0.6000 | 1.00 | 0.7500 | 1.0000 |",
        "![ε per round](epsilon.png)",
        "![client training times](client_time.png)",
    ):
        assert row in lines, row


def test_summary_of_a_run_without_rounds(tmp_path: Path) -> None:
    text = write_summary(_run_info(), [], tmp_path, 0.5).read_text(encoding="utf-8")
    assert "| rounds completed | 0 of 10 |" in text
    assert "final accuracy" not in text and "| total time | 0.5 s |" in text


def test_markdown_table_elides_the_middle_of_long_runs() -> None:
    records = [RoundRecord(n, 1, 1, 0.0, 0.0, 0.5, 1.0) for n in range(1, 101)]
    lines = render_markdown_table(records, max_rows=10).splitlines()
    rounds = [line.split("|")[1].strip() for line in lines[2:]]
    assert rounds == ["1", "2", "3", "…", "95", "96", "97", "98", "99", "100"]
    assert len(render_markdown_table(records).splitlines()) == 102


# ------------------------------------------------------------------------------- progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _rec(number: int, clients: int = 2) -> RoundRecord:
    return RoundRecord(number, clients, 100, 0.5, 0.4, 0.8, 3.94)


def test_format_eta() -> None:
    assert [format_eta(s) for s in (None, math.inf, 0.0, 0.4, 42.0, 61.6, 3600.0, 3725.0, -3.0)] == [
        "--:--",
        "--:--",
        "0:00",
        "0:00",
        "0:42",
        "1:02",
        "1:00:00",
        "1:02:05",
        "0:00",
    ]


def test_progress_off_a_terminal_writes_one_line_per_round() -> None:
    out, clock = io.StringIO(), Clock()
    progress = Progress(out, clock=clock)
    assert not progress.live
    progress.begin(3, 2)
    clock.now = 1.0
    progress.client_done(0.5)
    clock.now = 2.0
    progress.client_done(0.5)
    clock.now = 4.0
    progress.round_finished(_rec(1))  # took 4 s: 2 rounds left
    clock.now = 6.0
    progress.round_finished(_rec(2))  # took 2 s; round 1 (warm-up) now left out of the mean
    clock.now = 9.0
    progress.round_finished(_rec(3))
    progress.close()
    assert out.getvalue().splitlines() == [
        "round 1/3: 2 clients, train_loss 0.5000, accuracy 0.8000 (3.9 s), ETA 0:08",
        "round 2/3: 2 clients, train_loss 0.5000, accuracy 0.8000 (3.9 s), ETA 0:02",
        "round 3/3: 2 clients, train_loss 0.5000, accuracy 0.8000 (3.9 s)",
    ]
    assert "\r" not in out.getvalue()


def test_progress_through_echo() -> None:
    lines: list[str] = []
    progress = Progress(Terminal(), echo=lines.append, clock=Clock())
    assert not progress.live  # echo is line-based, even when a terminal is around
    progress.begin(1, 1)
    progress.client_done(0.1)
    progress.message("hello")
    progress.round_finished(_rec(1, 1))
    assert lines == ["hello", "round 1/1: 1 clients, train_loss 0.5000, accuracy 0.8000 (3.9 s)"]


def test_progress_on_a_terminal_redraws_one_line() -> None:
    out, clock = Terminal(), Clock()
    progress = Progress(out, clock=clock, min_interval=0.0)
    assert progress.live
    progress.begin(2, 4)
    clock.now = 1.0
    progress.client_done(1.0)  # 1 of 4 in 1 s: a round takes ~4 s, 8 s for both, 1 s gone
    assert progress.live_line() == "round 1/2 [#####---------------] 1/4 clients, ETA 0:07"
    for now in (2.0, 3.0, 4.0):
        clock.now = now
        progress.client_done(1.0)
    progress.round_finished(_rec(1, 4))
    progress.close()
    round_line = "round 1/2: 4 clients, train_loss 0.5000, accuracy 0.8000 (3.9 s), ETA 0:04"
    assert out.getvalue() == (
        "\rround 1/2 [--------------------] 0/4 clients, ETA --:--"
        "\rround 1/2 [#####---------------] 1/4 clients, ETA 0:07 "  # padded over the longer "--:--"
        "\rround 1/2 [##########----------] 2/4 clients, ETA 0:06"
        "\rround 1/2 [###############-----] 3/4 clients, ETA 0:05"
        "\rround 1/2 [####################] 4/4 clients, ETA 0:04"
        f"\r{round_line}\n"
        "\rround 2/2 [--------------------] 0/4 clients, ETA 0:04"
        "\r" + " " * 54 + "\r"
    )


def test_progress_on_a_terminal_throttles_but_always_shows_the_last_client() -> None:
    out, clock = Terminal(), Clock()
    progress = Progress(out, clock=clock, min_interval=1.0)
    progress.begin(1, 3)
    progress.client_done(0.1)  # same instant as begin's draw: skipped
    progress.client_done(0.1)  # skipped
    progress.client_done(0.1)  # the last one: drawn
    assert out.getvalue().count("\r") == 2
    assert out.getvalue().endswith("3/3 clients, ETA 0:00 ")  # padded over the longer "--:--"


def test_progress_explicit_round_start_and_longer_line_padding() -> None:
    out, clock = Terminal(), Clock()
    progress = Progress(out, clock=clock, min_interval=0.0)
    progress.begin(10, 100)  # implicit round 1 with 100 clients expected...
    progress.round_started(1, 10, 7)  # ...but the backend sampled 7 (same round: start time kept)
    assert progress.live_line() == "round 1/10 [--------------------] 0/7 clients, ETA --:--"
    progress.message("budget exhausted")
    assert out.getvalue().endswith(
        "\r" + " " * 56 + "\rbudget exhausted\n\rround 1/10 [--------------------] 0/7 clients, ETA --:--"
    )


def test_progress_counts_clients_from_many_threads() -> None:
    progress = Progress(io.StringIO(), clock=Clock())
    progress.begin(1, 400)

    def work() -> None:
        for _ in range(100):
            progress.client_done(0.01)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert progress.live_line().startswith("round 1/1 [####################] 400/400 clients")
