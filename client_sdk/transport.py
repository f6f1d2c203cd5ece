"""The SDK's side of the Fleet API: one channel, credentials, retries with backoff.

Every RPC goes through `FleetTransport._call`, which retries while the server is
unreachable (exponential backoff with jitter, capped, interruptible by `stop`), joins
again when the server no longer knows this client (e.g. after its data dir was reset),
and turns every other failure into an SDK exception from `client_sdk.errors`.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch

from client_sdk.errors import AuthenticationError, ConnectionFailed, LeptonError, from_rpc_error
from protos import PROTOCOL_VERSION
from protos.channels import TLSFiles, open_channel
from protos.codec import StreamLimits, assemble, iter_tensor_data, model_header
from protos.scalars import fill_scalar_map, scalar_map_to_dict
from protos.v1 import fleet_pb2 as pb
from protos.v1 import fleet_pb2_grpc

log = logging.getLogger("leptonfl.client")
T = TypeVar("T")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
MAX_CHUNK_BYTES = 8 << 20  # the daemon refuses bigger chunks
MAX_FAILURE_REASON = 1000  # characters of a failure report the daemon takes
# HTTP/2 keepalive pings while the channel is idle (e.g. during minutes of local training), so
# NATs and proxies keep the connection open; the daemon permits one every 10 s or slower.
KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS = 20_000, 10_000


def _retryable(error: grpc.RpcError) -> bool:
    """Server unreachable, or the daemon's rate limit ("slow down"). gRPC also answers
    RESOURCE_EXHAUSTED for an oversized message; retrying that identical message cannot help."""
    if not isinstance(error, grpc.Call):
        return False
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "slow down" in (error.details() or "")
    return error.code() in RETRYABLE


class Stopped(Exception):
    """Raised inside the SDK when `stop()` interrupts a wait; never reaches the host app."""


@dataclass(frozen=True)
class Backoff:
    """Reconnect schedule: initial, doubled up to `maximum`, ±`jitter` fraction; `timeout` None = forever."""

    initial: float = 0.5
    maximum: float = 15.0
    jitter: float = 0.2
    timeout: float | None = None

    def delays(self, rng: random.Random) -> Iterator[float]:
        delay = self.initial
        while True:
            yield delay * (1 + rng.uniform(-self.jitter, self.jitter))
            delay = min(delay * 2, self.maximum)


class FleetTransport:
    def __init__(
        self,
        server: str,
        app: str,
        name: str = "",
        run_id: str = "",
        backoff: Backoff = Backoff(),
        stop: threading.Event | None = None,
        rpc_timeout: float = 30.0,
        chunk_bytes: int = 1 << 20,
        limits: StreamLimits = StreamLimits(),
        tls: TLSFiles | None = None,
    ) -> None:
        self.server, self.app, self.name, self.run_id = server, app, name, run_id
        self.backoff = backoff
        self.stop_event = stop or threading.Event()
        self.rpc_timeout = rpc_timeout
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}")
        self.chunk_bytes = chunk_bytes
        self.limits = limits
        self.client_id = ""
        self.token = ""
        self.heartbeat_interval = 5.0
        self._rng = random.Random()
        self._channel = open_channel(
            server,
            tls,
            options=[
                ("grpc.max_receive_message_length", 16 << 20),
                # gRPC keeps its own reconnect schedule (1 s growing to 120 s) under ours; without
                # these, a retry during its wait fails at once and `Backoff` would mean nothing.
                ("grpc.initial_reconnect_backoff_ms", int(backoff.initial * 1000)),
                ("grpc.min_reconnect_backoff_ms", int(backoff.initial * 1000)),
                ("grpc.max_reconnect_backoff_ms", int(backoff.maximum * 1000)),
                ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
                ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        self._stub = fleet_pb2_grpc.FleetStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    # plumbing ---------------------------------------------------------------------------
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-leptonfl-client-id", self.client_id), ("x-leptonfl-token", self.token))

    def wait(self, seconds: float) -> None:
        """Sleep, but end at once (raising `Stopped`) when the client is stopped."""
        if self.stop_event.wait(seconds):
            raise Stopped()

    def _call(self, action: str, fn: Callable[[], T], authenticated: bool = True) -> T:
        started = time.monotonic()
        delays = self.backoff.delays(self._rng)
        rejoined = False
        while True:
            if self.stop_event.is_set():
                raise Stopped()
            try:
                return fn()
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if _retryable(exc):
                    if self.backoff.timeout is not None and time.monotonic() - started > self.backoff.timeout:
                        raise ConnectionFailed(
                            f"{action}: server {self.server} unreachable for {self.backoff.timeout:g} s",
                            code.name if code else "UNAVAILABLE",
                        ) from None
                    delay = next(delays)
                    log.warning("%s: server %s answered %s, retrying in %.1f s", action, self.server, code, delay)
                    self.wait(delay)
                    continue
                if code == grpc.StatusCode.UNAUTHENTICATED and authenticated and not rejoined:
                    log.warning("%s: server does not know this client any more; joining again", action)
                    self.client_id = self.token = ""
                    self.join()
                    rejoined = True
                    continue
                raise from_rpc_error(exc, action) from None

    # RPCs -------------------------------------------------------------------------------
    def join(self) -> str:
        request = pb.JoinRequest(
            protocol_version=PROTOCOL_VERSION,
            app=self.app,
            name=self.name,
            run_id=self.run_id,
            client_id=self.client_id,
            token=self.token,
        )
        response = self._call("join", lambda: self._stub.Join(request, timeout=self.rpc_timeout), authenticated=False)
        self.client_id, self.token = response.client_id, response.token
        self.heartbeat_interval = response.heartbeat_interval_ms / 1000 or 5.0
        log.info("joined %s as %s", self.server, self.client_id)
        return self.client_id

    def heartbeat(self) -> bool:
        """One best-effort liveness ping, no retries (the next one is seconds away)."""
        try:
            self._stub.Heartbeat(pb.HeartbeatRequest(), metadata=self._metadata(), timeout=5.0)
            return True
        except grpc.RpcError as exc:
            log.debug("heartbeat failed: %s", exc)
            return False

    def get_task(self) -> pb.GetTaskResponse:
        return self._call(
            "get task",
            lambda: self._stub.GetTask(pb.GetTaskRequest(), metadata=self._metadata(), timeout=self.rpc_timeout),
        )

    def download(self, task: pb.Task) -> dict[str, torch.Tensor]:
        request = pb.DownloadModelRequest(task_id=task.task_id, chunk_bytes=self.chunk_bytes)

        def fetch() -> dict[str, torch.Tensor]:
            stream = self._stub.DownloadModel(request, metadata=self._metadata(), timeout=None)
            try:
                return assemble(stream, self.limits)
            except ValueError as exc:
                raise LeptonError(f"download of the global model failed: {exc}") from exc

        return self._call("download model", fetch)

    def upload(
        self, task: pb.Task, weights: Mapping[str, torch.Tensor], num_examples: int, metrics: Mapping[str, Any]
    ) -> None:
        header = pb.UploadHeader(
            task_id=task.task_id,
            run_id=task.run_id,
            round=task.round,
            num_examples=num_examples,
            model=model_header(weights),
            # One key for this result, re-sent on every retry: if the server made the update
            # durable but its answer was lost (e.g. it was killed), the retry is acknowledged
            # and counted once.
            idempotency_key=secrets.token_hex(16),
        )
        fill_scalar_map(header.metrics, metrics)

        def chunks() -> Iterator[pb.UploadChunk]:
            yield pb.UploadChunk(header=header)
            for data in iter_tensor_data(weights, self.chunk_bytes):
                yield pb.UploadChunk(data=data)

        self._call("upload update", lambda: self._stub.UploadUpdate(chunks(), metadata=self._metadata()))

    def report_evaluation(self, task: pb.Task, num_examples: int, loss: float, metrics: Mapping[str, Any]) -> None:
        report = pb.EvaluationReport(
            task_id=task.task_id,
            run_id=task.run_id,
            round=task.round,
            num_examples=num_examples,
            loss=loss,
            idempotency_key=secrets.token_hex(16),
        )
        fill_scalar_map(report.metrics, metrics)
        self._call(
            "report evaluation",
            lambda: self._stub.ReportEvaluation(report, metadata=self._metadata(), timeout=self.rpc_timeout),
        )

    def report_failure(self, task: pb.Task, reason: str) -> bool:
        """Tell the server, once and without retrying, that this task's app code failed, so its
        round need not wait for this client until the deadline. Never raises: the failure the
        host app hears about is its own, not this report's (an older server answers UNIMPLEMENTED)."""
        if len(reason) > MAX_FAILURE_REASON:
            reason = reason[: MAX_FAILURE_REASON - 1] + "…"
        report = pb.FailureReport(task_id=task.task_id, run_id=task.run_id, round=task.round, reason=reason)
        try:
            self._stub.ReportFailure(report, metadata=self._metadata(), timeout=self.rpc_timeout)
            return True
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            log.warning("could not tell the server that the task failed (%s)", code.name if code else exc)
            return False


def task_config(task: pb.Task) -> dict[str, Any]:
    return dict(scalar_map_to_dict(task.config))


__all__ = ["AuthenticationError", "Backoff", "FleetTransport", "Stopped", "task_config"]
