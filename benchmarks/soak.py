"""Soak benchmark: does the daemon's memory stay flat over a long run?

    python benchmarks/soak.py [--rounds 500] [--clients 20] [--every 50] [--watch] [--json PATH]

Requirement: 500 rounds of the digits app with 20 clients; the daemon's RSS after round 500
within 10% of its RSS after round 50 (round 50, not round 1: by then every lazy import, pool,
cache and arena the daemon will ever need exists, so what grows after it is a leak).

What runs (nothing mocked): the real daemon, `leptonfl server start --insecure` on a free
loopback port with a fresh data dir (SQLite + checkpoint files), as a child process; one
digits run created through the Control API (N rounds, `--clients` per round, min clients the
same, FedAvg); `--clients` real SDK clients (`FederatedClient` + `TorchTrainer`, each with
its own gRPC channel and IID share of the data) in threads of this process. Local training
is deliberately tiny (1 epoch, batch 32: ~3 SGD steps per client) because the daemon's
memory, not the clients' compute, is what is measured; more rounds per minute means more
daemon work per minute.

How rounds are observed: by tailing the daemon's own log for "round N/M committed", which
the engine writes the moment a round commits. Not through the Control API: every WatchRun
event and every GetRun/ListRuns call reads *all* of the run's rounds and participations
from the database, so an observer that polls would add daemon work (and transient memory)
that grows with the run: the thing being measured. `--watch` adds that load on purpose: a
WatchRun stream held open for the whole run, as `leptonfl run watch` or the gRPC
simulation backend does.

RSS is VmRSS of the daemon's process from /proc/<pid>/status, read as soon as each commit
line appears (within ~50 ms). Its thread count and open file descriptors are read with it:
a daemon that leaks threads or sockets shows it there before it shows it in RSS.

Exit code is 0 whatever the results: benchmarks report, tests assert.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/soak.py` from anywhere: the project's packages first
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from client_sdk import FederatedClient, TorchTrainer  # noqa: E402
from server.control_client import ControlClient, ControlError, status_name  # noqa: E402
from simulations.apps import App, load_app, loader  # noqa: E402
from simulations.grpc_backend import DaemonProcess  # noqa: E402

DIGITS = ROOT / "examples" / "digits"
COMMITTED = re.compile(r"round (\d+)/(\d+) committed")
RUN_ENDED = re.compile(r"run (\S+) (completed|failed|cancelled|budget_exhausted)")
TARGET_RATIO = 1.10
MIB = 2**20


@dataclass(frozen=True)
class Sample:
    """The daemon's state the moment round `round` committed."""

    round: int
    elapsed_s: float  # since the run was created
    rss_bytes: int
    threads: int
    fds: int


def proc_status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a dict (VmRSS, VmHWM, Threads, ...); empty once the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def kib_field(status: dict[str, str], key: str) -> int:
    """A "1234 kB" field of /proc/<pid>/status in bytes (0 when absent)."""
    value = status.get(key, "0 kB").split()
    return int(value[0]) * 1024 if value else 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def sample(pid: int, number: int, started: float) -> Sample:
    status = proc_status(pid)
    return Sample(
        number, time.monotonic() - started, kib_field(status, "VmRSS"), int(status.get("Threads", -1)), open_fds(pid)
    )


class LogTail:
    """Reads the lines a file gains since the last call (the daemon appends; we never rewind)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = ""

    def new_lines(self) -> list[str]:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        text, self.partial = self.partial + text, ""
        lines = text.split("\n")
        self.partial = lines.pop()  # an incomplete last line waits for its end
        return lines


def start_clients(app: App, address: str, run_id: str, count: int, batch_size: int) -> list[FederatedClient]:
    """`count` SDK clients in background threads, client i on IID share i of the digits data."""
    clients = []
    for index in range(count):
        train, test = app.partition(index, count, "iid", seed=0)
        torch.manual_seed(0)  # every client's model starts identical (the run's weights replace it anyway)
        trainer = TorchTrainer(
            app.build_model(),
            loader(train, batch_size, True, index),
            loader(test, 256, False, 0),
            optimizer=app.make_optimizer,
            loss_fn=app.loss_fn,
        )
        client = FederatedClient(address, app.name, trainer, name=f"soak-{index}", run_id=run_id)
        client.start()
        clients.append(client)
        time.sleep(0.02)  # 50 joins/s from one address: under the daemon's join limit, no retry noise
    return clients


def drain_watch(address: str, run_id: str, events: list[int]) -> None:
    """Hold a WatchRun stream open until the run ends (the `--watch` operator load)."""
    with ControlClient(address) as control:
        try:
            for _ in control.watch(run_id):
                events[0] += 1
        except ControlError:
            pass  # the daemon went away; the main loop reports why


def checkpoints(rounds: int, every: int) -> list[int]:
    """The rounds the table shows: every `every`th, and always the last."""
    marks = list(range(every, rounds + 1, every))
    return marks if marks and marks[-1] == rounds else [*marks, rounds]


def rss_slope_mib_per_100(samples: list[Sample]) -> float | None:
    """Least-squares slope of RSS over round number, in MiB per 100 rounds (None: too few points)."""
    if len(samples) < 2:
        return None
    xs = [float(s.round) for s in samples]
    ys = [s.rss_bytes / MIB for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    return 100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


@dataclass
class SoakResult:
    """Everything `report` prints (and `--json` writes)."""

    rounds: int
    clients: int
    ended: str = ""  # the run's end as the daemon logged it, or why the soak gave up
    status: str = "unknown"
    status_reason: str = ""
    final_accuracy: float | None = None
    total_s: float = 0.0  # run creation to the run's end
    boot_rss_mib: float = 0.0  # daemon before any run
    peak_rss_mib: float = 0.0  # daemon VmHWM at the run's end
    client_process_rss_mib: float = 0.0
    data_dir_mib: float = 0.0
    db_mib: float = 0.0
    watch_events: int | None = None
    client_errors: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)


def observe(
    daemon: DaemonProcess, pid: int, run_id: str, address: str, marks: set[int], stall_timeout: float
) -> tuple[str, list[Sample]]:
    """Sample the daemon at each commit until the run ends; returns (how it ended, samples)."""
    assert daemon.process is not None
    started = time.monotonic()
    samples: list[Sample] = []
    tail = LogTail(daemon.log_path)
    ended, last_progress = "", started
    print(f"{'round':>6} {'RSS MiB':>9} {'elapsed s':>10} {'threads':>8} {'fds':>5}", flush=True)
    while not ended:
        for line in tail.new_lines():
            if match := COMMITTED.search(line):
                s = sample(pid, int(match.group(1)), started)
                samples.append(s)
                last_progress = time.monotonic()
                if s.round in marks:
                    row = f"{s.round:>6} {s.rss_bytes / MIB:>9.1f} {s.elapsed_s:>10.1f} {s.threads:>8} {s.fds:>5}"
                    print(row, flush=True)
            elif (match_end := RUN_ENDED.search(line)) and match_end.group(1) == run_id:
                ended = match_end.group(2)
        if daemon.process.poll() is not None:
            ended = ended or f"daemon exited with code {daemon.process.returncode}"
        elif not ended and time.monotonic() - last_progress > stall_timeout:
            ended = f"stalled: no round committed for {stall_timeout:g} s"
            with ControlClient(address) as control:
                try:
                    control.cancel_run(run_id, ended)
                except ControlError:
                    pass  # already over
        elif not ended:
            time.sleep(0.05)
    return ended, samples


def run(args: argparse.Namespace) -> SoakResult:
    """Start the daemon, create the run, start the clients, observe to the end, clean up."""
    torch.set_num_threads(1)  # 20 client threads and the daemon share 2 cores: no intra-op oversubscription
    app = load_app(str(DIGITS))
    app.load_dataset()  # sklearn import and dataset load before any clock starts
    work = Path(tempfile.mkdtemp(prefix="leptonfl-soak-"))
    # All clients share one peer address here (20 hosts in production): the per-peer join limit
    # (2/s, bursts of 10) would only stagger start-up. Upload limits (per client) stay as shipped.
    daemon = DaemonProcess(work / "daemon", work / "daemon.log", ["--liveness-timeout", "60", "--join-rate", "100"])
    clients: list[FederatedClient] = []
    result = SoakResult(args.rounds, args.clients)
    try:
        address = daemon.start()
        assert daemon.process is not None
        pid = daemon.process.pid
        result.boot_rss_mib = kib_field(proc_status(pid), "VmRSS") / MIB
        print(f"daemon pid {pid} on {address}, data dir {work / 'daemon'}; RSS at start {result.boot_rss_mib:.1f} MiB")
        client_config = {**app.default_config, "local_epochs": args.local_epochs, "batch_size": args.batch_size}
        with ControlClient(address) as control:
            run_id = control.create_run(
                app=app.name,
                weights=app.initial_weights(0),
                num_rounds=args.rounds,
                clients_per_round=args.clients,
                min_clients=args.clients,
                round_timeout_s=args.round_timeout,
                client_config=client_config,
                name="soak",
            ).run_id
        print(f"run {run_id}: {args.rounds} rounds x {args.clients} clients, client config {client_config}")
        watch_events = [0]
        if args.watch:
            threading.Thread(target=drain_watch, args=(address, run_id, watch_events), daemon=True).start()
        started = time.monotonic()
        clients = start_clients(app, address, run_id, args.clients, args.batch_size)
        marks = set(checkpoints(args.rounds, args.every)) | {baseline_round(args)}
        result.ended, result.samples = observe(daemon, pid, run_id, address, marks, args.stall_timeout)
        result.total_s = time.monotonic() - started
        result.peak_rss_mib = kib_field(proc_status(pid), "VmHWM") / MIB
        if daemon.process.poll() is None:
            with ControlClient(address) as control:
                try:
                    detail = control.get_run(run_id)
                    result.status, result.status_reason = status_name(detail.run), detail.run.status_reason
                    accuracies = [r.eval_accuracy for r in detail.rounds if r.eval_clients]
                    result.final_accuracy = accuracies[-1] if accuracies else None
                except ControlError as exc:
                    result.status_reason = str(exc)
        result.client_errors = [str(c.error) for c in clients if c.error is not None][:3]
        result.watch_events = watch_events[0] if args.watch else None
        result.client_process_rss_mib = kib_field(proc_status(os.getpid()), "VmRSS") / MIB
        files = [p for p in (work / "daemon").rglob("*") if p.is_file()]
        result.data_dir_mib = sum(p.stat().st_size for p in files) / MIB
        result.db_mib = sum(p.stat().st_size for p in files if ".db" in p.name) / MIB
        return result
    finally:
        for client in clients:
            client.stop()
        daemon.stop()
        if args.keep:
            print(f"kept {work} (daemon log: {daemon.log_path})")
        else:
            shutil.rmtree(work, ignore_errors=True)


def baseline_round(args: argparse.Namespace) -> int:
    return min(args.baseline, args.rounds)


def report(result: SoakResult, args: argparse.Namespace) -> None:
    """The summary table, throughput, memory figures and the verdict line."""
    samples = result.samples
    by_round = {s.round: s for s in samples}
    base = by_round.get(baseline_round(args))
    reason = f": {result.status_reason}" if result.status_reason else ""
    print(f"\nrun ended: {result.ended} (status {result.status}{reason}); final accuracy {result.final_accuracy}")
    if result.client_errors:
        print(f"client errors: {result.client_errors}")
    print(f"\n| round | daemon RSS MiB | vs round {baseline_round(args)} | elapsed s | threads | fds |")
    print("|---|---|---|---|---|---|")
    for number in sorted(set(checkpoints(args.rounds, args.every)) | {baseline_round(args)}):
        s = by_round.get(number)
        if s is None:
            print(f"| {number} | (not reached) | | | | |")
            continue
        versus = f"{s.rss_bytes / base.rss_bytes:.3f}" if base else "-"
        print(f"| {number} | {s.rss_bytes / MIB:.1f} | {versus} | {s.elapsed_s:.1f} | {s.threads} | {s.fds} |")
    print()
    if result.total_s:
        print(
            f"rounds committed: {len(samples)}/{args.rounds} in {result.total_s:.1f} s "
            f"= {len(samples) / result.total_s:.2f} rounds/s (clients' start-up included)"
        )
    if base and samples and samples[-1].round > base.round:
        last = samples[-1]
        rate = (last.round - base.round) / (last.elapsed_s - base.elapsed_s)
        print(f"rounds {base.round}..{last.round}: {rate:.2f} rounds/s")
        after = [s for s in samples if s.round >= base.round]
        rss = [s.rss_bytes / MIB for s in after]
        slope = rss_slope_mib_per_100(after)
        trend = f"; least-squares slope {slope:+.2f} MiB per 100 rounds" if slope is not None else ""
        print(f"daemon RSS over rounds {base.round}..{last.round}: min {min(rss):.1f}, max {max(rss):.1f} MiB{trend}")
    print(
        f"daemon RSS at start {result.boot_rss_mib:.1f} MiB, peak (VmHWM) {result.peak_rss_mib:.1f} MiB; "
        f"this process (clients) {result.client_process_rss_mib:.1f} MiB; "
        f"data dir {result.data_dir_mib:.1f} MiB (database {result.db_mib:.1f} MiB)"
    )
    if result.watch_events is not None:
        print(f"WatchRun events received: {result.watch_events}")
    final = by_round.get(args.rounds)
    if base is None or final is None:
        print(f"VERDICT: FAIL (the run did not reach round {args.rounds}: {result.ended})")
        return
    ratio = final.rss_bytes / base.rss_bytes
    print(
        f"VERDICT: {'PASS' if ratio <= TARGET_RATIO else 'FAIL'} RSS(round {final.round}) / RSS(round {base.round})"
        f" = {final.rss_bytes / MIB:.1f} / {base.rss_bytes / MIB:.1f} MiB = {ratio:.3f} (target <= {TARGET_RATIO:.2f})"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=500, help="rounds of the run (default 500)")
    parser.add_argument("--clients", type=int, default=20, help="clients, all selected every round (default 20)")
    parser.add_argument("--every", type=int, default=50, help="table interval in rounds (default 50)")
    parser.add_argument("--baseline", type=int, default=50, help="the round the last is compared with (default 50)")
    parser.add_argument("--local-epochs", type=int, default=1, help="local epochs per round (default 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="local batch size (default 32)")
    parser.add_argument("--round-timeout", type=float, default=60.0, help="the run's round deadline, s (default 60)")
    parser.add_argument("--stall-timeout", type=float, default=180.0, help="give up after this long without a commit")
    parser.add_argument("--watch", action="store_true", help="hold a WatchRun stream open (operator load)")
    parser.add_argument("--json", type=Path, help="write every round's sample and the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the daemon's data dir and log")
    args = parser.parse_args(argv)
    if min(args.rounds, args.clients, args.every, args.baseline) < 1:
        parser.error("--rounds, --clients, --every and --baseline must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()
    print(f"soak: {args.rounds} rounds, {args.clients} clients, {os.cpu_count()} cores, load average {load[0]:.2f}")
    try:
        result = run(args)
    except Exception as exc:  # a benchmark reports; it does not fail the build
        print(f"VERDICT: FAIL (the soak could not run: {type(exc).__name__}: {exc})")
        return 0
    report(result, args)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
