"""Prometheus metrics of one daemon (its own registry, so several daemons can share a process).

Served at `--metrics-address HOST:PORT` (`/metrics`). Every refused RPC is counted by method
and status code, accepted and rejected updates separately, so an operator sees both the
healthy flow and what hostile or broken peers are trying.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class DaemonMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpc_rejections = Counter(
            "leptonfl_rpc_rejections", "RPCs refused, by method and gRPC status code", ["method", "code"], registry=r
        )
        self.updates_accepted = Counter("leptonfl_updates_accepted", "client updates folded into a round", registry=r)
        self.updates_rejected = Counter(
            "leptonfl_updates_rejected", "client updates refused, by gRPC status code", ["code"], registry=r
        )
        self.rounds_committed = Counter("leptonfl_rounds_committed", "rounds committed", registry=r)
        self.rounds_failed = Counter("leptonfl_rounds_failed", "round attempts without quorum", registry=r)
        self.client_failures = Counter(
            "leptonfl_client_failures", "tasks whose client reported that its app's code failed", ["kind"], registry=r
        )
        self.round_duration = Histogram(
            "leptonfl_round_duration_seconds",
            "training phase of committed rounds",
            registry=r,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
        )
        self.aggregation_seconds = Histogram(
            "leptonfl_aggregation_seconds",
            "finish_round + checkpoint + commit",
            registry=r,
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60),
        )
        self.bytes_received = Counter("leptonfl_bytes_received", "model bytes received in uploads", registry=r)
        self.bytes_sent = Counter("leptonfl_bytes_sent", "model bytes sent in downloads", registry=r)
        self.clients_online = Gauge("leptonfl_clients_online", "clients seen within the liveness timeout", registry=r)
        self.runs_active = Gauge("leptonfl_runs_active", "runs pending or running", registry=r)

    def track(self, online: Callable[[], int], active_runs: Callable[[], int]) -> None:
        """Gauges read live values at scrape time."""
        self.clients_online.set_function(online)
        self.runs_active.set_function(active_runs)

    def serve(self, address: str) -> int:
        """Start the `/metrics` HTTP endpoint; returns the bound port."""
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        return int(server.server_port)
