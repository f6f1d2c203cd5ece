"""Reports: files read back exactly, NaN handling, PNG output, terminal text."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from simulations.report import (
    RoundRecord,
    format_round_line,
    plot_metrics,
    render_round_table,
    write_metrics,
)


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
