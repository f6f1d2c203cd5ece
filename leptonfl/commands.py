"""Handlers of the `leptonfl` subcommands; each returns the process exit code."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from leptonfl.cli import ENROLLMENT_TOKEN_ENV, CommandError

if TYPE_CHECKING:  # the heavy imports stay lazy so `leptonfl --help` is instant
    from protos.channels import TLSFiles
    from protos.v1 import control_pb2
    from server.control_client import ControlClient
    from simulations.apps import App
    from strategies.factory import PrivacySettings


def parse_settings(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs; values become int, float or bool when they look like one."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--set expects KEY=VALUE, got {item!r}")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    pass
        out[key] = value
    return out


def privacy_from_args(args: argparse.Namespace) -> PrivacySettings:
    from strategies.factory import PrivacySettings

    if not args.dp:
        return PrivacySettings()
    adaptive = args.clip_norm == "adaptive"
    try:
        clip = 0.0 if adaptive else float(args.clip_norm)
    except ValueError as exc:
        raise CommandError(f"--clip-norm takes a number or 'adaptive', not {args.clip_norm!r}") from exc
    settings = PrivacySettings(
        mode=args.dp,
        noise_multiplier=args.noise_multiplier,
        clip_norm=clip,
        adaptive_clipping=adaptive,
        target_quantile=args.clip_quantile,
        clip_lr=args.clip_lr,
        initial_clip_norm=args.initial_clip_norm,
        delta=args.delta,
        epsilon_budget=args.epsilon_budget,
        accountant=args.accountant,
        clipped_count_stddev=args.clipped_count_stddev,
    )
    try:
        settings.validate()
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    return settings


def tls_from_args(args: argparse.Namespace, credential: str) -> TLSFiles | None:
    """TLS files from --ca/--cert/--key, else from --certs DIR (or $LEPTONFL_CERTS); None means plaintext."""
    from protos.channels import TLSFiles

    if args.ca:
        return TLSFiles(Path(args.ca), Path(args.cert) if args.cert else None, Path(args.key) if args.key else None)
    directory = args.certs or os.environ.get("LEPTONFL_CERTS")
    if directory:
        return TLSFiles.from_dir(Path(directory), credential)
    print("warning: connecting without TLS (pass --certs DIR or --ca/--cert/--key to use it)", file=sys.stderr)
    return None


def _server_address(args: argparse.Namespace) -> str:
    from server.config import default_server

    return args.server or default_server()


def _load_app(spec: str) -> App:
    from simulations.apps import AppError, load_app

    try:
        return load_app(spec)
    except AppError as exc:
        raise CommandError(str(exc)) from exc


# server ------------------------------------------------------------------------------------
def server(args: argparse.Namespace) -> int:
    from server.config import ServerConfig, load_config
    from server.store import SchemaError

    if args.server_command == "status":
        return _server_status(args)
    if args.server_command == "migrate":
        from server.store import migrate
        from server.store.db import open_engine

        config = ServerConfig().with_overrides({"data_dir": args.data_dir, "db": args.db})
        config.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            before, after = migrate(open_engine(config.db_url))
        except SchemaError as exc:
            raise CommandError(str(exc)) from exc
        print(f"schema {before or 'empty'} -> {after}", file=sys.stderr)
        return 0

    flags = {
        key: getattr(args, key)
        for key in (
            "address",
            "data_dir",
            "db",
            "max_workers",
            "chunk_bytes",
            "max_update_bytes",
            "upload_concurrency",
            "max_round_attempts",
            "deadline_extension",
            "heartbeat_interval_s",
            "liveness_timeout_s",
            "selection_grace_s",
            "log_level",
            "tls_dir",
            "tls_cert",
            "tls_key",
            "tls_ca",
            "crl",
            "insecure",
            "join_rate",
            "upload_rate",
            "call_rate",
            "metrics_address",
            "enroll_address",
            "enroll_rate",
            "log_format",
        )
    }
    try:
        config = load_config(Path(args.config) if args.config else None, flags)
    except (OSError, ValueError) as exc:
        raise CommandError(f"bad configuration: {exc}") from exc
    from server.logs import configure_logging

    try:
        configure_logging(config.log_level, config.log_format)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    from server.daemon import run_daemon

    try:
        return run_daemon(config)
    except (SchemaError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    except OSError as exc:
        raise CommandError(f"cannot start the daemon: {exc}") from exc


def _server_status(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from protos.channels import open_channel
    from server.control_client import ControlClient, ControlError, status_name

    address, tls = _server_address(args), tls_from_args(args, "operator")
    channel = open_channel(address, tls)
    try:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        serving = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    except grpc.RpcError as exc:
        raise CommandError(f"no Lepton FL server reachable at {address}: {exc.code().name}") from exc
    finally:
        channel.close()
    print(f"{address}: {serving}")
    try:
        with ControlClient(address, tls=tls) as control:
            runs = control.list_runs()
    except ControlError as exc:
        print(f"runs: not visible ({exc})", file=sys.stderr)
        return 0 if serving == "SERVING" else 1
    counts: dict[str, int] = {}
    for run in runs:
        counts[status_name(run)] = counts.get(status_name(run), 0) + 1
    print("runs: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"))
    return 0 if serving == "SERVING" else 1


# run ---------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from server.control_client import ControlClient, ControlError

    try:
        with ControlClient(_server_address(args), tls=tls_from_args(args, "operator")) as control:
            return _RUN_COMMANDS[args.run_command](control, args)
    except ControlError as exc:
        raise CommandError(str(exc)) from exc


def _create(control: ControlClient, args: argparse.Namespace) -> int:
    app = _load_app(args.app)
    if args.weights:
        from safetensors.torch import load_file

        try:
            weights = load_file(args.weights)
        except Exception as exc:  # safetensors raises its own error types
            raise CommandError(f"cannot read initial weights {args.weights}: {exc}") from exc
    else:
        weights = app.initial_weights(args.seed)
    client_config = {**app.default_config, **parse_settings(args.settings)}
    run = control.create_run(
        app=app.name,
        weights=weights,
        num_rounds=args.rounds,
        clients_per_round=args.clients_per_round,
        min_clients=args.min_clients or args.clients_per_round,
        round_timeout_s=args.round_timeout,
        strategy=args.strategy,
        strategy_params=parse_settings(args.strategy_params),
        client_config=client_config,
        name=args.name,
        privacy=privacy_from_args(args),
        over_selection=args.over_selection,
    )
    print(f"created run {run.run_id} ({app.name}, {args.strategy}, {args.rounds} rounds)", file=sys.stderr)
    print(run.run_id)
    return 0


def _run_dict(run: control_pb2.Run) -> dict[str, Any]:
    from protos.scalars import scalar_map_to_dict
    from server.control_client import status_name

    return {
        "run_id": run.run_id,
        "name": run.spec.name,
        "app": run.spec.app,
        "strategy": run.spec.strategy,
        "status": status_name(run),
        "status_reason": run.status_reason,
        "committed_rounds": run.committed_rounds,
        "num_rounds": run.spec.num_rounds,
        "clients_per_round": run.spec.clients_per_round,
        "min_clients": run.spec.min_clients,
        "over_selection": run.spec.over_selection,
        "created_at": run.created_at,
        "updated_at": run.updated_at,
        "strategy_params": scalar_map_to_dict(run.spec.strategy_params),
        "privacy": _privacy_summary(run.spec.privacy),
        "epsilon": run.epsilon,
        "local_dp_clients": run.local_dp_clients,
        "max_local_epsilon": run.max_local_epsilon,
    }


def _privacy_summary(spec: control_pb2.PrivacySpec) -> str:
    if spec.mode != "central":
        return ""
    clip = "adaptive" if spec.adaptive_clipping else f"{spec.clip_norm:g}"
    budget = f", budget {spec.epsilon_budget:g}" if spec.epsilon_budget else ""
    return f"z {spec.noise_multiplier:g}, clip {clip}, delta {spec.delta:g}, {spec.accountant}{budget}"


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _list(control: ControlClient, args: argparse.Namespace) -> int:
    runs = [_run_dict(r) for r in control.list_runs()]
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    print(f"{'RUN':<14} {'APP':<12} {'STRATEGY':<10} {'STATUS':<10} {'ROUNDS':>7}  CREATED")
    for r in runs:
        print(
            f"{r['run_id']:<14} {r['app']:<12} {r['strategy']:<10} {r['status']:<10} "
            f"{r['committed_rounds']:>3}/{r['num_rounds']:<3}  {r['created_at'][:19]}"
        )
    return 0


def _show(control: ControlClient, args: argparse.Namespace) -> int:
    detail = control.get_run(args.run_id)
    info = _run_dict(detail.run)
    rounds = [
        {
            "round": r.round,
            "num_clients": r.num_clients,
            "num_examples": r.num_examples,
            "train_loss": _nan_to_none(r.train_loss),
            "eval_loss": _nan_to_none(r.eval_loss),
            "eval_accuracy": _nan_to_none(r.eval_accuracy),
            "eval_clients": r.eval_clients,
            "duration_seconds": r.duration_seconds,
            **({"epsilon": r.epsilon, "clip_norm": r.clip_norm} if info["privacy"] else {}),
        }
        for r in detail.rounds
    ]
    if args.json:
        print(json.dumps({**info, "rounds": rounds}, indent=2))
        return 0
    print(
        f"run {info['run_id']}  status {info['status']}"
        f"{' (' + info['status_reason'] + ')' if info['status_reason'] else ''}"
    )
    print(
        f"app {info['app']}, strategy {info['strategy']}, rounds {info['committed_rounds']}/{info['num_rounds']}, "
        f"{info['clients_per_round']} clients per round (min {info['min_clients']})"
    )
    if info["privacy"]:
        print(f"central DP: {info['privacy']}, epsilon {info['epsilon']:.4f} so far")
    if info["local_dp_clients"]:
        print(f"local DP: {info['local_dp_clients']} clients reported epsilon, largest {info['max_local_epsilon']:.4f}")
    if rounds:
        from simulations.grpc_backend import record_from_summary
        from simulations.report import render_round_table

        print(render_round_table([record_from_summary(r, bool(info["privacy"])) for r in detail.rounds]))
    return 0


def _watch(control: ControlClient, args: argparse.Namespace) -> int:
    from server.control_client import status_name

    for event in control.watch(args.run_id):
        if event.HasField("round"):
            r = event.round
            print(
                f"round {r.round}: {r.num_clients} clients, train_loss {r.train_loss:.4f}, "
                f"accuracy {r.eval_accuracy:.4f}",
                file=sys.stderr,
            )
        elif event.open_round:
            print(
                f"round {event.open_round}: {event.open_round_updates}/{event.open_round_selected} updates",
                file=sys.stderr,
            )
        status = status_name(event.run)
    print(status)
    return 0 if status == "completed" else 1


def _cancel(control: ControlClient, args: argparse.Namespace) -> int:
    control.cancel_run(args.run_id, args.reason)
    print(f"cancelled {args.run_id}", file=sys.stderr)
    return 0


def _model(control: ControlClient, args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    weights = control.download(args.run_id, args.round)
    save_file({k: v.contiguous() for k, v in weights.items()}, args.output)
    print(f"wrote {len(weights)} tensors to {args.output}", file=sys.stderr)
    return 0


_RUN_COMMANDS = {"create": _create, "list": _list, "show": _show, "watch": _watch, "cancel": _cancel, "model": _model}


# client ------------------------------------------------------------------------------------
def client(args: argparse.Namespace) -> int:
    import torch

    from client_sdk import FederatedClient, LeptonError, TorchTrainer
    from simulations.apps import AppError, loader
    from simulations.partition import parse_partition_label

    torch.set_num_threads(max(1, args.threads))
    app = _load_app(args.app)
    try:
        index, count = parse_partition_label(args.partition)
        train, test = app.partition(index, count, args.partitioner, args.seed)
    except (ValueError, AppError) as exc:
        raise CommandError(str(exc)) from exc
    batch_size = int(app.default_config.get("batch_size", 32))
    trainer = TorchTrainer(
        app.build_model(),
        loader(train, batch_size, True, args.seed + index),
        loader(test, 256, False, 0),
        optimizer=app.make_optimizer,
        loss_fn=app.loss_fn,
    )
    if (args.certs or os.environ.get("LEPTONFL_CERTS")) and not args.ca and not args.name:
        raise CommandError("with --certs, name the client (--name NAME) to pick clients/NAME.pem")
    fl_client = FederatedClient(
        _server_address(args),
        app.name,
        trainer,
        name=args.name or f"partition {args.partition}",
        run_id=args.run_id,
        exit_when_idle=not args.serve_forever,
        tls=tls_from_args(args, f"clients/{args.name}"),
    )
    import signal

    signal.signal(signal.SIGTERM, lambda *_: fl_client.stop(timeout=0))
    try:
        stats = fl_client.run()
    except LeptonError as exc:
        raise CommandError(str(exc)) from exc
    print(
        f"client {fl_client.client_id}: trained {stats.rounds_trained} rounds, evaluated {stats.rounds_evaluated}",
        file=sys.stderr,
    )
    return 0


# certs -------------------------------------------------------------------------------------
def certs(args: argparse.Namespace) -> int:
    from server import provisioning
    from server.enrollment import issue_token

    try:
        if args.certs_command == "init":
            made = provisioning.init_ca(Path(args.dir), args.host or ["localhost", "127.0.0.1"])
            for role, credential in made.items():
                print(f"{role:<9} {credential.cert}  (key {credential.key}, mode 0600)", file=sys.stderr)
            print(f"start the daemon with --tls-dir {args.dir}; operators use --certs {args.dir}", file=sys.stderr)
        elif args.certs_command == "client":
            directory = Path(args.dir)
            if args.rotate and provisioning.client_cert(directory, args.name).exists():
                serial = provisioning.revoke_client(directory, args.name)
                print(f"revoked the previous certificate of {args.name} (serial {serial:x})", file=sys.stderr)
            if args.enrollment_token:
                token = issue_token(directory, args.name, ttl_s=args.token_ttl, days=args.days)
                print(token)  # stdout alone, for scripts; it is a secret until used or expired
                print(
                    f"enrollment token for {args.name}: valid once, for {args.token_ttl:g} s; on the client run "
                    f"`leptonfl certs enroll --server HOST:ENROLL_PORT --ca ca.pem --out DIR` with it in "
                    f"${ENROLLMENT_TOKEN_ENV}",
                    file=sys.stderr,
                )
            else:
                credential = provisioning.issue_client(directory, args.name, args.days)
                print(f"client {args.name}: {credential.cert} (key {credential.key}, mode 0600)", file=sys.stderr)
        elif args.certs_command == "enroll":
            return _enroll(args)
        else:
            serial = provisioning.revoke_client(Path(args.dir), args.name)
            print(
                f"revoked {args.name} (serial {serial:x}); a running daemon reloads crl.pem within a second",
                file=sys.stderr,
            )
    except (provisioning.ProvisioningError, OSError) as exc:
        raise CommandError(str(exc)) from exc
    return 0


def _enroll(args: argparse.Namespace) -> int:
    """On the client: trade a one-time token for a certificate, keeping the key on this machine."""
    from client_sdk import LeptonError, enroll

    token = args.token or os.environ.get(ENROLLMENT_TOKEN_ENV, "")
    if not token:
        raise CommandError(f"give the enrollment token in ${ENROLLMENT_TOKEN_ENV} (or --token)")
    try:
        enrolled = enroll(args.server, token.strip(), Path(args.ca), Path(args.out))
    except LeptonError as exc:
        raise CommandError(str(exc)) from exc
    print(
        f"enrolled as {enrolled.name}: {enrolled.tls.cert} (key {enrolled.tls.key}, mode 0600); run "
        f"`leptonfl client --certs {args.out} --name {enrolled.name} ...`",
        file=sys.stderr,
    )
    return 0


# sim ---------------------------------------------------------------------------------------
def sim(args: argparse.Namespace) -> int:
    import torch

    from simulations.apps import AppError
    from simulations.config import SimulationConfig
    from simulations.report import render_round_table
    from simulations.runner import run_simulation

    torch.set_num_threads(1)  # many small models: threads cost more than they give
    config = SimulationConfig(
        app=args.app,
        clients=args.clients,
        rounds=args.rounds,
        clients_per_round=args.clients_per_round,
        partition=args.partition,
        backend=args.backend,
        seed=args.seed,
        out=Path(args.out),
        strategy=args.strategy,
        strategy_params=parse_settings(args.strategy_params),
        client_config=parse_settings(args.settings),
        privacy=privacy_from_args(args),
        workers=args.workers,
        ray_address=args.ray_address,
        plots=args.plots,
    )
    from server.control_client import ControlError

    try:
        result = run_simulation(config)
    except (ValueError, AppError, RuntimeError, ControlError, ImportError) as exc:
        raise CommandError(str(exc)) from exc
    print(render_round_table(result.records))
    print(
        f"final test accuracy {result.final_accuracy:.4f} after {len(result.records)} rounds in {result.seconds:.1f} s"
    )
    print(f"metrics: {result.metrics_path}\nplots:   {', '.join(map(str, result.plots))}")
    print(f"summary: {result.summary_path}\nmodel:   {result.model_path}")
    return 0
