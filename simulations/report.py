"""Per-round run records and their outputs: jsonl/csv files, PNG plots, a one-page
``summary.md``, terminal text and a live progress line.

Kept separate from the backends so every way of running rounds (in-process, vectorised,
gRPC, Ray) reports in the same format, and runs can be compared file-to-file.

Backends report progress through two optional callbacks (both may be called from any
thread): ``on_round_start(number, clients)`` when a round's clients are chosen, and
``on_client(seconds)`` when one client's local training is done.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

ClientCallback = Callable[[float], None]
"""``on_client(seconds)``: one client of the current round finished local training in ``seconds``."""
RoundStartCallback = Callable[[int, int], None]
"""``on_round_start(number, clients)``: round ``number`` starts with ``clients`` selected clients."""

CLIENT_STATS: tuple[str, ...] = ("client_seconds_mean", "client_seconds_max")

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
    client_seconds: list[float] = field(default_factory=list)  # local training time of each client

    def to_dict(self) -> dict[str, Any]:
        """Flat mapping (extra keys beside the base ones) so jsonl/csv rows stay flat.

        Per-client times are not written one by one: a round with any gets
        ``client_seconds_mean`` and ``client_seconds_max`` instead.
        """
        data = asdict(self)
        extra = data.pop("extra")
        data.pop("client_seconds")
        clash = set(extra) & {*data, *CLIENT_STATS}
        if clash:
            raise ValueError(f"extra metrics shadow base fields: {sorted(clash)}")
        data.update(extra)
        if self.client_seconds:
            data["client_seconds_mean"] = statistics.fmean(self.client_seconds)
            data["client_seconds_max"] = max(self.client_seconds)
        return data


def _columns(records: Sequence[RoundRecord]) -> list[str]:
    """Base fields, then every extra key in first-seen order (rounds may differ)."""
    columns = list(BASE_FIELDS)
    for record in records:
        for key in record.extra:
            if key not in columns:
                columns.append(key)
    if any(record.client_seconds for record in records):
        columns.extend(CLIENT_STATS)
    return columns


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON; write null so any strict parser can read the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(records: Sequence[RoundRecord], out_dir: Path) -> tuple[Path, Path]:
    """Write ``metrics.jsonl`` and ``metrics.csv`` into ``out_dir``; return their paths.

    NaN becomes ``null`` in jsonl and an empty cell in csv; a missing extra metric is an
    empty cell too (and absent from that round's jsonl line). Client-time statistics are
    written only for rounds that have client times.
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


def _pyplot() -> Any:
    """matplotlib is imported on first plot, not at module import, so code that only writes
    files or tables never pays for it; Agg renders without a display (servers, CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    finally:
        _pyplot().close(fig)
    return path


def plot_metrics(records: Sequence[RoundRecord], out_dir: Path, title: str) -> Path:
    """Write ``metrics.png``: test accuracy per round (left), train/eval loss (right)."""
    plt = _pyplot()
    rounds = [r.round for r in records]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
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
    return _save(fig, Path(out_dir) / "metrics.png")


def has_epsilon(records: Sequence[RoundRecord]) -> bool:
    return any("epsilon" in r.extra for r in records)


def has_client_times(records: Sequence[RoundRecord]) -> bool:
    return any(r.client_seconds for r in records)


def plot_epsilon(records: Sequence[RoundRecord], out_dir: Path, title: str) -> Path:
    """Write ``epsilon.png``: the privacy loss ε spent up to each round (rounds without one
    are left out)."""
    plt = _pyplot()
    points = [(r.round, r.extra["epsilon"]) for r in records if "epsilon" in r.extra]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("ε (cumulative)")
    ax.set_ylim(bottom=0.0)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    return _save(fig, Path(out_dir) / "epsilon.png")


def plot_client_times(records: Sequence[RoundRecord], out_dir: Path, title: str) -> Path:
    """Write ``client_time.png``: a histogram of every client's local training time."""
    plt = _pyplot()
    times = [t for r in records for t in r.client_seconds]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(times, bins=min(30, max(1, len(times))))
    ax.set_xlabel("client training time (s)")
    ax.set_ylabel("clients")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{title}\n{len(times)} client updates, mean {statistics.fmean(times):.3f} s, max {max(times):.3f} s")
    return _save(fig, Path(out_dir) / "client_time.png")


def write_plots(records: Sequence[RoundRecord], out_dir: Path, title: str) -> list[Path]:
    """Every plot that applies, in order: ``metrics.png`` always, ``epsilon.png`` when a
    round has an ``epsilon`` metric (DP), ``client_time.png`` when a round has client times.
    A plot that does not apply is removed, so a re-used directory holds no stale one."""
    out_dir = Path(out_dir)
    paths = [plot_metrics(records, out_dir, title)]
    for applies, plot, name in (
        (has_epsilon(records), plot_epsilon, "epsilon.png"),
        (has_client_times(records), plot_client_times, "client_time.png"),
    ):
        if applies:
            paths.append(plot(records, out_dir, title))
        else:
            (out_dir / name).unlink(missing_ok=True)
    return paths


_TABLE_HEADERS = ("round", "clients", "examples", "train loss", "eval loss", "accuracy", "seconds")


def _fmt(value: float, digits: int) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def _table(records: Sequence[RoundRecord]) -> tuple[list[str], list[tuple[str, ...]]]:
    """Headers and formatted cells shared by the terminal and the markdown table; extra
    metrics (e.g. epsilon under DP) get a column each, client-time statistics none."""
    extras = [c for c in _columns(records) if c not in BASE_FIELDS and c not in CLIENT_STATS]
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
    return headers, rows


def render_round_table(records: Sequence[RoundRecord]) -> str:
    """Right-aligned plain-text table, one row per round, for terminals and logs; extra
    metrics (e.g. epsilon under DP) get a column each."""
    headers, rows = _table(records)
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(lines)


def render_markdown_table(records: Sequence[RoundRecord], max_rows: int = 0) -> str:
    """The round table as GitHub markdown (numbers right-aligned). With ``max_rows`` and
    more rounds than that, the first and last rounds are shown around a ``…`` row."""
    headers, rows = _table(records)
    if max_rows and len(rows) > max_rows:
        head = max_rows // 3
        tail = max_rows - head - 1
        rows = [*rows[:head], tuple("…" for _ in headers), *rows[len(rows) - tail :]]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
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


def format_eta(seconds: float | None) -> str:
    """``m:ss`` (``h:mm:ss`` from an hour on); ``--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    hours, rest = divmod(max(0, round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ------------------------------------------------------------------------------ summary.md

SUMMARY_MAX_ROUNDS = 30
SUMMARY_FILES = ("metrics.jsonl", "metrics.csv", "run.json", "final.safetensors")
_PLOT_CAPTIONS = (
    ("metrics.png", "accuracy and loss per round"),
    ("epsilon.png", "ε per round"),
    ("client_time.png", "client training times"),
)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _settings(value: Any) -> str:
    if not value:
        return "none"
    return "`" + json.dumps(dict(value), sort_keys=True, default=str) + "`"


def _privacy_text(privacy: Mapping[str, Any]) -> str:
    if privacy.get("mode") != "central":
        return "off"
    if privacy.get("adaptive_clipping"):
        clip = (
            f"adaptive clipping (initial {privacy.get('initial_clip_norm')}, "
            f"quantile {privacy.get('target_quantile')}, lr {privacy.get('clip_lr')})"
        )
    else:
        clip = f"clip norm {privacy.get('clip_norm')}"
    budget = privacy.get("epsilon_budget") or 0
    return (
        f"central, noise multiplier {privacy.get('noise_multiplier')}, {clip}, "
        f"δ {privacy.get('delta')}, accountant {privacy.get('accountant')}"
        + (f", ε budget {budget:g}" if budget else "")
    )


def _kv_table(rows: Sequence[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {_cell(k)} | {_cell(v)} |" for k, v in rows)]


def write_summary(
    config_dict: Mapping[str, Any], records: Sequence[RoundRecord], out_dir: Path, seconds: float
) -> Path:
    """Write ``summary.md``: the run's settings, its results, the round table and links to
    the plots and metrics files (those present in ``out_dir``).

    ``config_dict`` is what the runner writes to ``run.json``: the `SimulationConfig`
    fields (``privacy`` as a dict) plus ``app_name``, ``leptonfl_version``,
    ``torch_version``, ``python_version`` and ``started_at``; missing keys are skipped.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = config_dict
    privacy: Mapping[str, Any] = c.get("privacy") or {}
    dp = privacy.get("mode") == "central"
    name = c.get("app_name") or c.get("app", "?")
    clients = c.get("clients", "?")
    per_round = c.get("clients_per_round") or clients
    rounds = c.get("rounds", "?")
    version = c.get("leptonfl_version", "?")
    versions = ", ".join(
        f"{label} {c[key]}" for label, key in (("torch", "torch_version"), ("Python", "python_version")) if key in c
    )

    settings: list[tuple[str, Any]] = [
        ("app", f"{name} ({c['app']})" if c.get("app") and c.get("app") != name else name),
        ("backend", c.get("backend", "?")),
        ("clients", clients),
        ("clients per round", f"{per_round} (expected; Poisson sampling)" if dp else per_round),
        ("rounds", rounds),
        ("partition", c.get("partition", "?")),
        ("strategy", c.get("strategy", "?")),
        ("strategy parameters", _settings(c.get("strategy_params"))),
        ("client settings", _settings(c.get("client_config"))),
        ("differential privacy", _privacy_text(privacy)),
        ("seed", c.get("seed", "?")),
        ("leptonfl", f"{version} ({versions})" if versions else version),
    ]
    if "started_at" in c:
        settings.append(("started", c["started_at"]))

    results: list[tuple[str, Any]] = [("rounds completed", f"{len(records)} of {rounds}")]
    if records:
        last = records[-1]
        results += [
            ("final accuracy", _fmt(last.eval_accuracy, 4)),
            ("final eval loss", _fmt(last.eval_loss, 4)),
            ("final train loss", _fmt(last.train_loss, 4)),
        ]
        scored = [r for r in records if not math.isnan(r.eval_accuracy)]
        if scored:
            best = max(scored, key=lambda r: r.eval_accuracy)  # first round reaching the best
            results.append(("best accuracy", f"{_fmt(best.eval_accuracy, 4)} (round {best.round})"))
    results.append(("total time", f"{seconds:.1f} s"))
    if records:
        results.append(("mean round time", f"{statistics.fmean(r.duration_seconds for r in records):.2f} s"))
    times = [t for r in records for t in r.client_seconds]
    if times:
        results.append(
            (
                "client training time",
                f"mean {statistics.fmean(times):.3f} s, max {max(times):.3f} s ({len(times)} updates)",
            )
        )
    epsilons = [r.extra["epsilon"] for r in records if "epsilon" in r.extra]
    if epsilons:
        results.append(("final ε", f"{_fmt(epsilons[-1], 4)} (δ {privacy.get('delta', '?')})"))

    lines = [
        f"# Simulation: {name}",
        "",
        f"{c.get('strategy', '?')} over {clients} clients ({per_round} per round), {rounds} rounds, "
        f"backend {c.get('backend', '?')}, seed {c.get('seed', '?')}; leptonfl {version}.",
        "",
        "## Configuration",
        "",
        *_kv_table(settings),
        "",
        "## Results",
        "",
        *_kv_table(results),
        "",
        "## Rounds",
        "",
        render_markdown_table(records, SUMMARY_MAX_ROUNDS),
    ]
    if len(records) > SUMMARY_MAX_ROUNDS:
        lines += ["", f"{len(records)} rounds; every one is in [metrics.csv](metrics.csv)."]
    files = [f for f in SUMMARY_FILES if (out_dir / f).exists()]
    plots = [
        (f, caption)
        for f, caption in _PLOT_CAPTIONS
        if (out_dir / f).exists()
        and (f != "epsilon.png" or has_epsilon(records))
        and (f != "client_time.png" or has_client_times(records))
    ]
    if files or plots:
        lines += ["", "## Files", ""]
        lines += [f"- [{f}]({f})" for f in files]
        lines += [f"- [{f}]({f}): {caption}" for f, caption in plots]
        for f, caption in plots:
            lines += ["", f"![{caption}]({f})"]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -------------------------------------------------------------------------------- progress


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class Progress:
    """Live progress of a simulation: rounds, clients done in the current round, ETA.

    On a terminal (``live``) one line is redrawn in place with ``\\r``, e.g.
    ``round 3/10 [############--------] 12/20 clients, ETA 0:42``, and each finished round
    leaves its `format_round_line` behind. Otherwise (CI logs, pipes, ``echo``) only one
    line per finished round is written: `format_round_line`, then ``, ETA m:ss`` while
    rounds remain. The ETA is the mean round time (wall clock; round 1, with its warm-up,
    left out once a later round has finished) times the rounds left, less the time the
    current round has run; before any round has finished it is extrapolated from the
    clients done so far, and unknown (``--:--``) before the first client is done.

    Backends need not call `round_started`: after `begin`, a round starts implicitly when the
    previous one finishes (with ``clients_per_round`` clients). All methods are thread-safe.
    """

    BAR_WIDTH = 20

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        echo: Callable[[str], None] | None = None,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        min_interval: float = 0.1,
    ) -> None:
        self._stream: TextIO = sys.stderr if stream is None else stream
        self._echo = echo
        self.live = False if echo is not None else (_isatty(self._stream) if live is None else live)
        self._clock = clock
        self._min_interval = min_interval
        self._lock = threading.RLock()
        self._total = 0
        self._default_clients = 0
        self._number = 0  # the round under way; 0 when none
        self._clients = 0
        self._done = 0
        self._started_at = 0.0
        self._last_finished = 0
        self._last_end: float | None = None
        self._durations: list[float] = []
        self._shown = 0  # width of the live line on screen; 0 when none is
        self._drawn_at = -math.inf

    # -- the backend-facing API

    def begin(self, total_rounds: int, clients_per_round: int) -> None:
        """The run starts now; round 1 is under way until a backend says otherwise."""
        with self._lock:
            self._total = total_rounds
            self._default_clients = clients_per_round
            self._last_end = self._clock()
            self._start(1, self._last_end)
            self._draw(force=True)

    def round_started(self, number: int, total_rounds: int, clients: int) -> None:
        with self._lock:
            self._total = total_rounds
            if number == self._number and self._done == 0:
                self._clients = clients  # the implicit start was this round: keep its start time
            else:
                self._start(number, self._clock())
                self._clients = clients
            self._draw(force=True)

    def client_done(self, seconds: float) -> None:
        """One client of the current round is done (its time is kept by the runner, not here)."""
        with self._lock:
            if not self._number:
                self._start(self._last_finished + 1, self._clock() if self._last_end is None else self._last_end)
            self._done += 1
            self._clients = max(self._clients, self._done)
            self._draw(force=self._done == self._clients)

    def round_finished(self, record: RoundRecord) -> None:
        with self._lock:
            now = self._clock()
            if self._number == record.round:
                self._durations.append(now - self._started_at)
            elif self._last_end is not None:
                self._durations.append(now - self._last_end)
            else:
                self._durations.append(record.duration_seconds)
            self._last_finished = record.round
            self._last_end = now
            self._number = 0
            total = self._total or record.round
            line = format_round_line(record, total)
            if record.round < total:
                line += f", ETA {format_eta(self.eta())}"
            self._emit(line)
            if record.round < total:
                self._start(record.round + 1, now)
                self._draw(force=True)

    # -- for whoever else writes to the same terminal

    def clear(self) -> None:
        """Erase the live line (no-op when none is shown)."""
        with self._lock:
            if self._shown:
                self._stream.write("\r" + " " * self._shown + "\r")
                self._stream.flush()
                self._shown = 0

    def redraw(self) -> None:
        with self._lock:
            if self._number:
                self._draw(force=True)

    def message(self, text: str) -> None:
        """Write a line of text without mangling the live line."""
        with self._lock:
            self.clear()
            self._emit(text)
            self.redraw()

    def close(self) -> None:
        self.clear()

    # -- state

    def eta(self) -> float | None:
        """Seconds left, or None when unknown."""
        with self._lock:
            if not self._total:
                return None
            now = self._clock()
            if self._number:
                elapsed = now - self._started_at
                rounds_left = self._total - self._number + 1
            else:
                elapsed = 0.0
                rounds_left = self._total - self._last_finished
            if self._durations:
                # The first round carries the warm-up (data loading, first kernels): once
                # others have finished, it is left out of the mean.
                per_round = statistics.fmean(self._durations[1:] or self._durations)
            elif self._number and self._done and self._clients:
                per_round = elapsed / self._done * self._clients
            else:
                return None
            return max(0.0, per_round * rounds_left - elapsed)

    def live_line(self) -> str:
        with self._lock:
            rounds = f"round {self._number}/{self._total}" if self._total else f"round {self._number}"
            filled = min(self.BAR_WIDTH, round(self.BAR_WIDTH * self._done / self._clients)) if self._clients else 0
            bar = "#" * filled + "-" * (self.BAR_WIDTH - filled)
            return f"{rounds} [{bar}] {self._done}/{self._clients} clients, ETA {format_eta(self.eta())}"

    def _start(self, number: int, at: float) -> None:
        self._number = number
        self._started_at = at
        self._done = 0
        self._clients = self._default_clients

    def _draw(self, force: bool) -> None:
        if not self.live or not self._number:
            return
        now = self._clock()
        if not force and now - self._drawn_at < self._min_interval:
            return
        text = self.live_line()
        self._stream.write("\r" + text + " " * max(0, self._shown - len(text)))
        self._stream.flush()
        self._shown = len(text)
        self._drawn_at = now

    def _emit(self, line: str) -> None:
        if self._echo is not None:
            self._echo(line)
            return
        if self._shown:  # over the live line
            self._stream.write("\r" + line + " " * max(0, self._shown - len(line)) + "\n")
            self._shown = 0
        else:
            self._stream.write(line + "\n")
        self._stream.flush()
