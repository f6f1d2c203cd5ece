"""`leptonfl` command line. Results go to stdout (e.g. a new run's id, alone), human
messages and logs to stderr, so commands compose in shell scripts.

    leptonfl server start|migrate      the daemon (operator)
    leptonfl run create|list|show|watch|cancel|model   runs over the Control API (operator)
    leptonfl client                    a federated client for an app (edge node / demo)
    leptonfl sim                       a simulation (researcher)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from leptonfl import __version__

DEFAULT_SERVER_HELP = "HOST:PORT of the daemon (default: $LEPTONFL_SERVER, else 127.0.0.1:9721)"
ENROLLMENT_TOKEN_ENV = "LEPTONFL_ENROLLMENT_TOKEN"


class CommandError(Exception):
    """A user-facing failure: printed as `error: ...` with exit code 1, no traceback."""


def _add_server(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None, help=DEFAULT_SERVER_HELP)
    tls = p.add_argument_group("TLS (default: plaintext, with a warning)")
    tls.add_argument(
        "--certs",
        default=None,
        metavar="DIR",
        help="certificates dir from `leptonfl certs` (default: $LEPTONFL_CERTS): its ca.pem, and "
        "operator.pem/key for `run`, clients/NAME.pem/key for `client --name NAME`",
    )
    tls.add_argument("--ca", help="CA certificate that signed the server's certificate")
    tls.add_argument("--cert", help="this peer's certificate (mutual TLS)")
    tls.add_argument("--key", help="this peer's private key")


def _add_strategy(p: argparse.ArgumentParser) -> None:
    """Strategy and central-DP flags, the same on `run create` and `sim`."""
    p.add_argument("--strategy", default="fedavg", help="aggregation strategy (default fedavg; see docs/strategies.md)")
    p.add_argument(
        "--param",
        dest="strategy_params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="strategy parameter, e.g. --param server_lr=0.01 --param momentum=0.9",
    )
    dp = p.add_argument_group("central differential privacy (user level; docs/privacy.md)")
    dp.add_argument("--dp", choices=["central"], help="clip each client's update, add Gaussian noise, account epsilon")
    dp.add_argument("--noise-multiplier", type=float, default=1.0, help="z: noise std is z times the clip norm")
    dp.add_argument("--clip-norm", default="1.0", help="L2 clip norm C, or 'adaptive' (Andrew et al. 2021)")
    dp.add_argument("--clip-quantile", type=float, default=0.5, help="adaptive: target unclipped fraction")
    dp.add_argument("--clip-lr", type=float, default=0.2, help="adaptive: learning rate of the clip norm")
    dp.add_argument("--initial-clip-norm", type=float, default=0.1, help="adaptive: starting clip norm")
    dp.add_argument(
        "--clipped-count-stddev",
        type=float,
        default=0.0,
        help="adaptive: noise std of the unclipped count (default K/20; needs z < 2x this)",
    )
    dp.add_argument("--delta", type=float, default=1e-5, help="delta of the (epsilon, delta) guarantee")
    dp.add_argument("--epsilon-budget", type=float, default=0.0, help="stop before epsilon would exceed this")
    dp.add_argument("--accountant", choices=["rdp", "prv"], default="rdp", help="Opacus accountant (default rdp)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leptonfl", description="Lepton FL: federated learning daemon, client SDK and simulator."
    )
    parser.add_argument("--version", action="version", version=f"leptonfl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    server = commands.add_parser("server", help="run or maintain the aggregation daemon")
    server_cmds = server.add_subparsers(dest="server_command", required=True)
    start = server_cmds.add_parser("start", help="run the daemon in the foreground (SIGTERM/SIGINT stop it)")
    start.add_argument("--config", type=str, help="TOML file with a [server] table; flags override it")
    start.add_argument("--address", help="listen address HOST:PORT (default 127.0.0.1:9721; port 0 picks a free one)")
    start.add_argument("--data-dir", help="state directory: SQLite database and checkpoints (default ./leptonfl-data)")
    start.add_argument("--db", help="SQLAlchemy URL instead of the SQLite file, e.g. postgresql+psycopg://user@host/db")
    start.add_argument("--max-workers", type=int, help="gRPC worker threads (default 32)")
    start.add_argument("--chunk-bytes", type=int, help="model stream chunk size (default 1 MiB)")
    start.add_argument("--max-update-bytes", type=int, help="largest accepted update (default 2 GiB)")
    start.add_argument(
        "--upload-concurrency", type=int, help="uploads streamed at once; more are told to retry (default 16)"
    )
    start.add_argument(
        "--max-round-attempts", type=int, help="tries of a round short of its quorum before the run fails (default 3)"
    )
    start.add_argument(
        "--deadline-extension",
        type=float,
        help="fraction of the round timeout granted once to a round short of min clients (default 0.5)",
    )
    start.add_argument(
        "--heartbeat-interval",
        dest="heartbeat_interval_s",
        type=float,
        help="seconds between client heartbeats (default 5)",
    )
    start.add_argument(
        "--liveness-timeout",
        dest="liveness_timeout_s",
        type=float,
        help="seconds of silence before a client counts as offline (default 30)",
    )
    start.add_argument(
        "--selection-grace",
        dest="selection_grace_s",
        type=float,
        help="seconds to wait for a full round once min clients are online (default 3)",
    )
    start.add_argument("--log-level", help="DEBUG, INFO (default), WARNING or ERROR")
    start.add_argument(
        "--tls-dir", help="certificates dir from `leptonfl certs init` (server.pem, server.key, ca.pem, crl.pem)"
    )
    start.add_argument("--tls-cert", help="server certificate (overrides --tls-dir)")
    start.add_argument("--tls-key", help="server private key")
    start.add_argument("--tls-ca", help="CA that signs client and operator certificates")
    start.add_argument("--crl", help="revocation list, re-read when it changes (default: crl.pem of --tls-dir)")
    start.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="serve plaintext without authentication (loopback demos and trusted networks only)",
    )
    start.add_argument("--metrics-address", help="serve Prometheus metrics at HOST:PORT/metrics (default: off)")
    start.add_argument(
        "--enroll-address",
        help="serve enrollment (one-time tokens for client certificates) at HOST:PORT; needs --tls-dir "
        "with ca.key (default: off)",
    )
    start.add_argument("--enroll-rate", type=float, help="enrollments per second per peer (default 1, bursts of 5)")
    start.add_argument("--log-format", choices=["text", "json"], help="log lines as text (default) or JSON objects")
    start.add_argument("--join-rate", type=float, help="joins per second per peer (default 2, bursts of 10)")
    start.add_argument("--upload-rate", type=float, help="uploads per second per client (default 2, bursts of 10)")
    start.add_argument(
        "--call-rate", type=float, help="calls after Join per second per client (default 20, bursts of 40)"
    )
    status = server_cmds.add_parser("status", help="is the daemon serving? (gRPC health) and its runs")
    _add_server(status)
    migrate = server_cmds.add_parser("migrate", help="upgrade the database schema of a data dir")
    migrate.add_argument("--data-dir", default="leptonfl-data")
    migrate.add_argument("--db", default="")

    run = commands.add_parser("run", help="create and watch runs on a daemon")
    run_cmds = run.add_subparsers(dest="run_command", required=True)
    create = run_cmds.add_parser("create", help="create a run; prints its id alone on stdout")
    _add_server(create)
    create.add_argument("--app", required=True, help="app folder, .py file or module (see docs/apps.md)")
    create.add_argument("--weights", help="initial weights (.safetensors); default: the app's model, seeded")
    create.add_argument("--seed", type=int, default=0, help="seed of the initial model (default 0)")
    _add_strategy(create)
    create.add_argument("--rounds", type=int, default=5)
    create.add_argument("--clients-per-round", type=int, default=2)
    create.add_argument(
        "--min-clients",
        type=int,
        help="fewest updates a round may close with (default: clients per round); under --dp central, the "
        "smallest online population a round samples from (q = K / population), which may exceed K",
    )
    create.add_argument("--round-timeout", type=float, default=300.0, help="seconds per round phase (default 300)")
    create.add_argument(
        "--over-selection",
        type=float,
        default=0.0,
        help="select K x (1 + this) clients and close each round at K updates (default 0; e.g. 0.3)",
    )
    create.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="client config handed to every task, e.g. --set lr=0.05 --set local_epochs=2",
    )
    create.add_argument("--name", default="", help="a label for operators")
    for name, helptext in (
        ("list", "list runs"),
        ("show", "status and per-round metrics"),
        ("watch", "follow a run until it ends"),
        ("cancel", "cancel a run"),
    ):
        sub = run_cmds.add_parser(name, help=helptext)
        _add_server(sub)
        if name != "list":
            sub.add_argument("run_id")
        if name in ("list", "show"):
            sub.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "cancel":
            sub.add_argument("--reason", default="")
    model = run_cmds.add_parser("model", help="download a committed global model as .safetensors")
    _add_server(model)
    model.add_argument("run_id")
    model.add_argument("-o", "--output", required=True)
    model.add_argument("--round", type=int, help="round to download (default: the latest committed; 0: initial)")

    client = commands.add_parser("client", help="serve an app's training tasks from a daemon")
    _add_server(client)
    client.add_argument("--app", required=True)
    client.add_argument("--partition", default="0/1", help="this client's data share I/N (default 0/1: all)")
    client.add_argument(
        "--partitioner", default="iid", help="iid, dirichlet:ALPHA, shards:K, quantity:SIGMA or natural (default iid)"
    )
    client.add_argument("--seed", type=int, default=0, help="partitioning seed; equal on every client")
    client.add_argument("--run", dest="run_id", default="", help="take part in this run only")
    client.add_argument("--name", default="", help="label shown to operators (default: the partition)")
    client.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for local training (default 1: fastest for small models and "
        "several clients per host; raise it for a large model on a dedicated device)",
    )
    client.add_argument(
        "--serve-forever", action="store_true", help="keep serving new runs instead of exiting when idle"
    )

    certs = commands.add_parser("certs", help="provision a CA, server, operator and client certificates")
    certs_cmds = certs.add_subparsers(dest="certs_command", required=True)
    init = certs_cmds.add_parser("init", help="create a CA, a server certificate and an operator credential")
    init.add_argument("dir")
    init.add_argument(
        "--host",
        action="append",
        default=[],
        help="server host name or IP (repeatable; default localhost and 127.0.0.1)",
    )
    issue = certs_cmds.add_parser("client", help="issue a client certificate (its name is the client's identity)")
    issue.add_argument("name")
    issue.add_argument("--dir", required=True, help="the certificates dir of `certs init`")
    issue.add_argument("--days", type=int, default=365)
    issue.add_argument(
        "--rotate", action="store_true", help="revoke the client's current certificate and issue a new one"
    )
    issue.add_argument(
        "--enrollment-token",
        action="store_true",
        help="print a one-time token instead of writing a key: the client makes its own key and trades the "
        "token for a certificate with `certs enroll` at the daemon's --enroll-address",
    )
    issue.add_argument(
        "--token-ttl", type=float, default=3600.0, help="seconds the enrollment token stays valid (default 3600)"
    )
    enroll = certs_cmds.add_parser("enroll", help="on a client: trade an enrollment token for a certificate")
    enroll.add_argument("--server", required=True, help="HOST:PORT of the daemon's enrollment port (--enroll-address)")
    enroll.add_argument("--ca", required=True, help="the deployment's ca.pem, to verify the daemon")
    enroll.add_argument("--out", required=True, metavar="DIR", help="writes DIR/ca.pem and DIR/clients/NAME.pem/key")
    enroll.add_argument("--token", help=f"the enrollment token (default: ${ENROLLMENT_TOKEN_ENV}; safer than argv)")
    revoke = certs_cmds.add_parser("revoke", help="revoke a client's certificate (the daemon reloads crl.pem)")
    revoke.add_argument("name")
    revoke.add_argument("--dir", required=True)

    sim = commands.add_parser("sim", help="simulate many clients on this machine")
    sim.add_argument("--app", required=True)
    sim.add_argument("--clients", type=int, required=True)
    sim.add_argument("--rounds", type=int, required=True)
    sim.add_argument("--clients-per-round", type=int, help="default: all clients every round")
    sim.add_argument(
        "--partition", default="iid", help="iid, dirichlet:ALPHA, shards:K, quantity:SIGMA or natural (default iid)"
    )
    sim.add_argument(
        "--backend",
        default="inprocess",
        choices=["inprocess", "vectorized", "grpc", "ray"],
        help="inprocess (default), vectorized (many small clients at once, torch.func), grpc (real daemon), "
        "ray (actors on a Ray cluster; pip install 'leptonfl[ray]')",
    )
    _add_strategy(sim)
    sim.add_argument(
        "--workers",
        type=int,
        default=0,
        help="inprocess: worker processes, one intra-op thread each; vectorized: intra-op threads "
        "(default 0: one per core)",
    )
    sim.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="ray: join this cluster (auto, HOST:PORT, ray://HOST:10001); default $RAY_ADDRESS or local",
    )
    sim.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--out", default="sim-out", help="output folder (metrics.jsonl, metrics.csv, metrics.png)")
    sim.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="client config overrides, e.g. --set lr=0.05",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # import-time noise
    from leptonfl import commands

    handler = {
        "server": commands.server,
        "run": commands.run,
        "client": commands.client,
        "sim": commands.sim,
        "certs": commands.certs,
    }[args.command]
    try:
        return handler(args)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
