"""Simulation benchmark: wall time of each backend against a bare PyTorch loop, in one invocation.

    python benchmarks/sim_bench.py [--quick] [--only W1,W3] [--repeat N] [--json PATH] [--profile DIR]

Workloads (see ``workloads.py``): W1 orchestration-bound (digits MLP, 100 clients),
W2 compute-bound (McMahan 2017 CNN, 20 clients), W3 scale (10,000 clients, 1,000 per round).

Every measurement runs in a fresh subprocess (no warm caches or thread pools carried from one
to the next); repeats are interleaved (bare, backend 1, backend 2, ..., bare, ...) so a change
in machine load hits all lines alike, and the table shows each line's fastest run.

What is timed:
- framework: the whole ``run_simulation(config)`` call: partitioning, pool start-up and
  shutdown (also reported on their own), training, the per-round federated evaluation, and
  writing metrics, plots, summary and model (reported on their own as "reports").
- bare loop (``bare_loop.py``): training, FedAvg and the same per-round evaluation.
- neither: interpreter start, imports, and loading the app's dataset (done before the clock
  starts, on both sides). The bare loop also pre-splits and pre-shuffles each client's data
  before its clock starts; the framework does its partitioning inside the timed call.

Exit code is 0 whatever the results: benchmarks report, tests assert.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from workloads import BARE, ROOT, WORKLOADS, Run, Workload

MARKER = "BENCH_RESULT "
# The module `run_simulation` imports (lazily) for each backend.
BACKEND_MODULES = {
    "inprocess": "simulations.inprocess",
    "vectorized": "simulations.vectorized",
    "grpc": "simulations.grpc_backend",
    "ray": "simulations.ray_backend",
}


# ------------------------------------------------------------------------ child processes


def _warm_up() -> None:
    """What neither side's clock should include: one-off imports. `platform.platform()` (which
    `run_simulation` calls) forks `uname -p` once per process; done here, while the process is
    small, that fork does not show up as a 400 MiB "child" in getrusage. The first
    `torch.optim.Optimizer` of a process imports `torch._dynamo` (~1 s): the bare loop builds its
    optimizer before its clock starts, so the framework's first one must not pay it either."""
    platform.platform()
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1).zero_grad()


def _child_bare(workload: Workload, rounds: int) -> dict[str, Any]:
    import bare_loop
    from measure import TreeRssSampler, cpu_seconds, memory_report

    prepared = bare_loop.prepare(workload, rounds)
    with TreeRssSampler() as sampler:
        cpu = cpu_seconds()
        result = bare_loop.run(prepared)
        cpu = cpu_seconds() - cpu
    return {**result, "cpu_s": cpu, **memory_report(sampler), "notes": []}


def _child_framework(workload: Workload, run: Run, rounds: int, profile: str | None) -> dict[str, Any]:
    import tempfile

    from measure import TreeRssSampler, cpu_seconds, memory_report

    from simulations import pool as pool_module
    from simulations import runner as runner_module
    from simulations.apps import load_app
    from simulations.config import SimulationConfig
    from simulations.runner import run_simulation

    load_app(workload.app).load_dataset()  # module-level cache: the data load is not timed (nor in the bare loop)
    importlib.import_module(BACKEND_MODULES[run.backend])  # imports are not timed: run_simulation's lazy one neither
    pool_times = {"pool_start_s": 0.0, "pool_close_s": 0.0}
    original_init, original_close = pool_module.WorkerPool.__init__, pool_module.WorkerPool.close

    def timed_init(self: Any, *args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        original_init(self, *args, **kwargs)
        pool_times["pool_start_s"] += time.perf_counter() - started

    def timed_close(self: Any) -> None:
        started = time.perf_counter()
        original_close(self)
        pool_times["pool_close_s"] += time.perf_counter() - started

    pool_module.WorkerPool.__init__ = timed_init  # type: ignore[method-assign]
    pool_module.WorkerPool.close = timed_close  # type: ignore[method-assign]
    # run_simulation writes its reports right after the backend returns: note the CPU clock there.
    marks: dict[str, float] = {}
    original_write_metrics = runner_module.write_metrics

    def marked_write_metrics(*args: Any, **kwargs: Any) -> Any:
        marks.setdefault("reports_cpu_start", cpu_seconds())
        return original_write_metrics(*args, **kwargs)

    runner_module.write_metrics = marked_write_metrics

    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="leptonfl-bench-") as out:
        config = SimulationConfig(
            app=workload.app,
            clients=workload.clients,
            rounds=rounds,
            clients_per_round=workload.clients_per_round,
            partition=workload.partition,
            backend=run.backend,
            seed=workload.seed,
            out=Path(out),
            client_config=dict(workload.client_config),
            workers=run.workers,
            plots=False,  # the bare loop draws nothing either
        )
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile()
        with TreeRssSampler() as sampler:
            cpu = cpu_start = cpu_seconds()
            started = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            result = run_simulation(config, echo=notes.append)
            if profiler is not None:
                profiler.disable()
            seconds = time.perf_counter() - started
            cpu = cpu_seconds() - cpu
        if profiler is not None and profile:
            Path(profile).mkdir(parents=True, exist_ok=True)
            path = Path(profile) / f"{workload.key}-{run.backend}-w{run.workers}.prof"
            profiler.dump_stats(str(path))
            notes.append(f"profile: {path}")
    notes = [n for n in notes if not n.startswith(("simulating ", "round "))]
    return {
        "seconds": seconds,
        "backend_s": result.seconds,
        "reports_s": seconds - result.seconds,
        "cpu_s": cpu,
        "backend_cpu_s": marks["reports_cpu_start"] - cpu_start if "reports_cpu_start" in marks else None,
        **pool_times,
        "accuracy": result.final_accuracy,
        "eval_loss": result.records[-1].eval_loss,
        **memory_report(sampler),
        "notes": notes,
    }


def child_main(spec: dict[str, Any]) -> None:
    _warm_up()
    workload = WORKLOADS[spec["workload"]]
    run = Run(spec["backend"], spec["workers"])
    rounds = workload.rounds_for(spec["quick"])
    if run.backend == BARE:
        result = _child_bare(workload, rounds)
    else:
        result = _child_framework(workload, run, rounds, spec.get("profile"))
    print(MARKER + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------ the parent


def measure(workload: Workload, run: Run, quick: bool, profile: str | None, timeout: float) -> dict[str, Any]:
    spec = {"workload": workload.key, "backend": run.backend, "workers": run.workers, "quick": quick}
    if profile and run.backend != BARE:
        spec["profile"] = profile
    load = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s", "load1": load}
    process_s = time.perf_counter() - started
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(MARKER):
            return {**json.loads(line[len(MARKER) :]), "load1": load, "process_s": process_s}
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
    return {"error": f"exit code {done.returncode}:\n{tail}", "load1": load}


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def summarise(workload: Workload, samples: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per run: fastest successful sample, its ratio to the fastest bare loop, verdict."""

    def best(run: Run) -> dict[str, Any] | None:
        ok = [s for s in samples[run.key] if "error" not in s]
        return min(ok, key=lambda s: s["seconds"]) if ok else None

    bare = best(Run(BARE))
    rows = []
    for run in workload.runs:
        sample = best(run)
        row: dict[str, Any] = {"workload": workload.key, "run": run, "sample": sample, "ratio": None}
        row["all_seconds"] = [s.get("seconds") for s in samples[run.key]]
        if sample is None:
            row["verdict"] = "ERROR"
            row["error"] = next(s["error"] for s in samples[run.key] if "error" in s)
            rows.append(row)
            continue
        if bare is not None and run.backend != BARE:
            row["ratio"] = sample["seconds"] / bare["seconds"]
            row["backend_ratio"] = sample.get("backend_s", sample["seconds"]) / bare["seconds"]
            if sample.get("backend_cpu_s") is not None and bare.get("cpu_s"):
                row["cpu_ratio"] = sample["backend_cpu_s"] / bare["cpu_s"]
        verdicts = []
        if run.target_ratio is not None:
            verdicts.append(row["ratio"] is not None and row["ratio"] <= run.target_ratio)
        if run.target_rss_gib is not None:
            peak = max(sample.get("rss_tree_mib", 0.0), sample["rss_self_mib"], sample["rss_children_mib"])
            verdicts.append(peak / 1024 <= run.target_rss_gib)
        row["verdict"] = "-" if not verdicts else ("PASS" if all(verdicts) else "FAIL")
        if any("falling back" in n for n in sample.get("notes", [])):
            row["verdict"] += " (fell back to inprocess)"
        rows.append(row)
    return rows


def print_report(rows: list[dict[str, Any]]) -> None:
    main_rows, detail_rows, notes = [], [], []
    for row in rows:
        run, sample = row["run"], row["sample"] or {}
        main_rows.append(
            [
                row["workload"],
                run.label,
                _fmt(sample.get("seconds")),
                "1.00x (baseline)" if run.backend == BARE else _fmt(row["ratio"], ".2f") + "x",
                run.target_text(),
                row["verdict"],
            ]
        )
        detail_rows.append(
            [
                row["workload"],
                run.label,
                " ".join(_fmt(s, ".3f") for s in row["all_seconds"]),
                _fmt(sample.get("backend_s")),
                _fmt(row.get("backend_ratio"), ".2f"),
                _fmt(sample.get("pool_start_s")) + " / " + _fmt(sample.get("pool_close_s")),
                _fmt(sample.get("reports_s")),
                _fmt(sample.get("cpu_s"), ".2f"),
                _fmt(sample.get("backend_cpu_s", sample.get("cpu_s")), ".2f"),
                _fmt(row.get("cpu_ratio"), ".2f"),
                _fmt(sample.get("accuracy"), ".4f"),
                " / ".join(_fmt(sample.get(k), ".0f") for k in ("rss_self_mib", "rss_children_mib", "rss_tree_mib")),
                _fmt(sample.get("load1"), ".2f"),
            ]
        )
        if "error" in row:
            notes.append(f"{row['workload']} {run.label}: {row['error']}")
        notes += [f"{row['workload']} {run.label}: {n}" for n in sample.get("notes", [])]
    print(_table(["workload", "backend", "seconds", "ratio vs bare", "target", "result"], main_rows))
    print()
    print("details: all runs = every repeat's seconds; backend = run_simulation minus reports (wall s, and ratio")
    print("to bare); pool = worker pool start / close; reports = the rest of run_simulation, mostly writing")
    print("metrics, plots, summary and model;")
    print("cpu = user+system CPU seconds of the timed part, workers included; backend cpu = the same up to the")
    print("reports, and its ratio to the bare loop's cpu (work done: machine load changes it far less than wall")
    print("time); RSS peaks in MiB = self / largest waited-for child / sampled tree of live processes")
    print()
    headers = ["workload", "backend", "all runs (s)", "backend s", "ratio", "pool s", "reports s", "cpu s"]
    headers += ["backend cpu", "ratio", "final acc"]
    print(_table([*headers, "RSS MiB", "load1"], detail_rows))
    if notes:
        print()
        print("notes:")
        for note in notes:
            print("  " + note.replace("\n", "\n    "))


def _revision() -> str:
    """The commit measured, and whether the framework's code differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "simulations", "client_sdk", "strategies", "examples"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")


def parent_main(args: argparse.Namespace) -> None:
    keys = [k.strip().upper() for k in args.only.split(",")] if args.only else list(WORKLOADS)
    unknown = [k for k in keys if k not in WORKLOADS]
    if unknown:
        print(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}", file=sys.stderr)
        return
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load_start = os.getloadavg()
    print(f"leptonfl simulation benchmark{' (quick)' if args.quick else ''}: {', '.join(keys)}")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, {cores} usable cores, "
        f"torch default intra-op threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(f"framework revision: {_revision()}")
    print("load average at start (1/5/15 min): " + " ".join(f"{x:.2f}" for x in load_start))
    print()
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for key in keys:
        workload = WORKLOADS[key]
        repeats = args.repeat or (1 if args.quick else workload.repeats)
        rounds = workload.rounds_for(args.quick)
        print(f"{key}: {workload.title}; {rounds} rounds, {repeats} repeat(s)", flush=True)
        samples: dict[str, list[dict[str, Any]]] = {run.key: [] for run in workload.runs}
        for repeat in range(repeats):
            for run in workload.runs:
                sample = measure(workload, run, args.quick, args.profile, args.timeout)
                samples[run.key].append(sample)
                shown = "ERROR" if "error" in sample else f"{sample['seconds']:.3f} s"
                print(f"  [{repeat + 1}/{repeats}] {run.label}: {shown} (load1 {sample['load1']:.2f})", flush=True)
        rows += summarise(workload, samples)
    print()
    print_report(rows)
    load_end = os.getloadavg()
    print()
    print("load average at end (1/5/15 min): " + " ".join(f"{x:.2f}" for x in load_end))
    print(f"total benchmark time: {time.perf_counter() - started:.1f} s")
    if args.profile:
        print(f"cProfile dumps (framework runs; timings above are inflated by profiling): {args.profile}")
    if args.json:
        data = {
            "quick": args.quick,
            "cores": cores,
            "load_start": load_start,
            "load_end": load_end,
            "rows": [
                {
                    "workload": r["workload"],
                    "backend": r["run"].backend,
                    "workers": r["run"].workers,
                    "label": r["run"].label,
                    "target": r["run"].target_text(),
                    "ratio": r["ratio"],
                    "verdict": r["verdict"],
                    "all_seconds": r["all_seconds"],
                    "best": r["sample"],
                    "error": r.get("error"),
                }
                for r in rows
            ],
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"results: {args.json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (W1 2, W2 1, W3 1) and one repeat")
    parser.add_argument("--only", help="comma-separated workloads, e.g. W1 or W1,W3")
    parser.add_argument("--repeat", type=int, default=0, help="timed runs per line (default: W1 5, others 1)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--profile", help="cProfile each framework run into this directory (inflates timings)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child))
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
