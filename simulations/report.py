"""Per-round run records and their outputs: jsonl/csv files, a PNG plot, terminal text.

Kept separate from the backends so every way of running rounds (in-process, vectorised,
gRPC, Ray) reports in the same format, and runs can be compared file-to-file.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BASE_FIELDS: tuple[str, ...] = (
    "round",
    "num_clients",
    "num_examples",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "duration_seconds",
)


@dataclass
class RoundRecord:
    """What one committed round produced; ``extra`` carries strategy-specific metrics
    (e.g. privacy epsilon) without changing this schema."""

    round: int
    num_clients: int
    num_examples: int
    train_loss: float
    eval_loss: float
    eval_accuracy: float
    duration_seconds: float
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Flat mapping (extra keys beside the base ones) so jsonl/csv rows stay flat."""
        data = asdict(self)
        extra = data.pop("extra")
        clash = set(extra) & set(data)
        if clash:
            raise ValueError(f"extra metrics shadow base fields: {sorted(clash)}")
        data.update(extra)
        return data


def _columns(records: Sequence[RoundRecord]) -> list[str]:
    """Base fields, then every extra key in first-seen order (rounds may differ)."""
    columns = list(BASE_FIELDS)
    for record in records:
        for key in record.extra:
            if key not in columns:
                columns.append(key)
    return columns


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON; write null so any strict parser can read the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(records: Sequence[RoundRecord], out_dir: Path) -> tuple[Path, Path]:
    """Write ``metrics.jsonl`` and ``metrics.csv`` into ``out_dir``; return their paths.

    NaN becomes ``null`` in jsonl and an empty cell in csv; a missing extra metric is an
    empty cell too.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl_path = out_dir / "metrics.jsonl"
    csv_path = out_dir / "metrics.csv"
    rows = [record.to_dict() for record in records]
    with jsonl_path.open("w", encoding="utf-8") as f:
        for row in rows:
            safe = {key: _json_safe(value) for key, value in row.items()}
            f.write(json.dumps(safe, allow_nan=False) + "\n")
    with csv_path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(records), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if _json_safe(v) is None else v) for k, v in row.items()})
    return jsonl_path, csv_path


def plot_metrics(records: Sequence[RoundRecord], out_dir: Path, title: str) -> Path:
    """Write ``metrics.png``: test accuracy per round (left), train/eval loss (right).

    matplotlib is imported here, not at module import, so code that only writes files or
    tables never pays for it; Agg renders without a display (servers, CI).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.png"
    rounds = [r.round for r in records]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        acc_ax.plot(rounds, [r.eval_accuracy for r in records], marker="o")
        acc_ax.set_xlabel("round")
        acc_ax.set_ylabel("test accuracy")
        acc_ax.set_ylim(0.0, 1.0)
        acc_ax.grid(True, alpha=0.3)
        loss_ax.plot(rounds, [r.train_loss for r in records], marker="o", label="train")
        loss_ax.plot(rounds, [r.eval_loss for r in records], marker="s", label="eval")
        loss_ax.set_xlabel("round")
        loss_ax.set_ylabel("loss")
        loss_ax.legend()
        loss_ax.grid(True, alpha=0.3)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


_TABLE_HEADERS = ("round", "clients", "examples", "train loss", "eval loss", "accuracy", "seconds")


def _fmt(value: float, digits: int) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def render_round_table(records: Sequence[RoundRecord]) -> str:
    """Right-aligned plain-text table, one row per round, for terminals and logs; extra
    metrics (e.g. epsilon under DP) get a column each."""
    extras = [c for c in _columns(records) if c not in BASE_FIELDS]
    headers = [*_TABLE_HEADERS, *extras]
    rows = [
        (
            str(r.round),
            str(r.num_clients),
            str(r.num_examples),
            _fmt(r.train_loss, 4),
            _fmt(r.eval_loss, 4),
            _fmt(r.eval_accuracy, 4),
            _fmt(r.duration_seconds, 2),
            *(_fmt(r.extra.get(k, math.nan), 4) for k in extras),
        )
        for r in records
    ]
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(lines)


def format_round_line(record: RoundRecord, total_rounds: int) -> str:
    """One progress line per round, e.g.
    ``round 3/10: 20 clients, train_loss 0.4123, accuracy 0.9170 (1.2 s)``."""
    return (
        f"round {record.round}/{total_rounds}: {record.num_clients} clients, "
        f"train_loss {_fmt(record.train_loss, 4)}, "
        f"accuracy {_fmt(record.eval_accuracy, 4)}"
        + (f", epsilon {_fmt(record.extra['epsilon'], 4)}" if "epsilon" in record.extra else "")
        + f" ({record.duration_seconds:.1f} s)"
    )
