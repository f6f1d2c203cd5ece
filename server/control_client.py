"""A typed client of the Control API, used by `leptonfl run ...` and the gRPC simulation backend."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import grpc
import torch

from protos.channels import TLSFiles, open_channel
from protos.codec import assemble, iter_tensor_data, model_header
from protos.scalars import fill_scalar_map
from protos.v1 import control_pb2 as pb
from protos.v1 import control_pb2_grpc
from strategies.factory import PrivacySettings

STATUS_NAMES = {
    pb.BUDGET_EXHAUSTED: "budget_exhausted",
    pb.PENDING: "pending",
    pb.RUNNING: "running",
    pb.COMPLETED: "completed",
    pb.FAILED: "failed",
    pb.CANCELLED: "cancelled",
}


class ControlError(Exception):
    """A Control API call failed; `code` is the gRPC status (e.g. NOT_FOUND)."""

    def __init__(self, message: str, code: grpc.StatusCode | None) -> None:
        super().__init__(message)
        self.code = code


def status_name(run: pb.Run) -> str:
    return STATUS_NAMES.get(run.status, "unknown")


class ControlClient:
    def __init__(self, server: str, timeout: float = 30.0, tls: TLSFiles | None = None) -> None:
        self.server = server
        self.timeout = timeout
        self._channel = open_channel(server, tls, options=[("grpc.max_receive_message_length", 16 << 20)])
        self._stub = control_pb2_grpc.ControlStub(self._channel)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _wrap(self, action: str, exc: grpc.RpcError) -> ControlError:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        if code == grpc.StatusCode.UNAVAILABLE:
            details = f"no Lepton FL server reachable at {self.server} ({details})"
        return ControlError(f"{action}: {details}", code)

    def create_run(
        self,
        *,
        app: str,
        weights: Mapping[str, torch.Tensor],
        num_rounds: int,
        clients_per_round: int,
        min_clients: int,
        round_timeout_s: float = 300.0,
        strategy: str = "fedavg",
        strategy_params: Mapping[str, Any] | None = None,
        client_config: Mapping[str, Any] | None = None,
        name: str = "",
        privacy: PrivacySettings | None = None,
        chunk_bytes: int = 1 << 20,
        over_selection: float = 0.0,
    ) -> pb.Run:
        spec = pb.RunSpec(
            app=app,
            strategy=strategy,
            num_rounds=num_rounds,
            clients_per_round=clients_per_round,
            min_clients=min_clients,
            round_timeout_seconds=round_timeout_s,
            name=name,
            privacy=pb.PrivacySpec(**(privacy or PrivacySettings()).to_dict()),
            over_selection=over_selection,
        )
        fill_scalar_map(spec.strategy_params, strategy_params or {})
        fill_scalar_map(spec.client_config, client_config or {})

        def chunks() -> Iterator[pb.CreateRunChunk]:
            yield pb.CreateRunChunk(spec=spec)
            yield pb.CreateRunChunk(model_header=model_header(weights))
            for data in iter_tensor_data(weights, chunk_bytes):
                yield pb.CreateRunChunk(data=data)

        try:
            return self._stub.CreateRun(chunks(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._wrap("create run", exc) from None

    def list_runs(self) -> list[pb.Run]:
        try:
            return list(self._stub.ListRuns(pb.ListRunsRequest(), timeout=self.timeout).runs)
        except grpc.RpcError as exc:
            raise self._wrap("list runs", exc) from None

    def get_run(self, run_id: str) -> pb.RunDetail:
        try:
            return self._stub.GetRun(pb.GetRunRequest(run_id=run_id), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._wrap(f"show run {run_id}", exc) from None

    def cancel_run(self, run_id: str, reason: str = "") -> pb.Run:
        try:
            return self._stub.CancelRun(pb.CancelRunRequest(run_id=run_id, reason=reason), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._wrap(f"cancel run {run_id}", exc) from None

    def watch(self, run_id: str) -> Iterator[pb.RunEvent]:
        try:
            yield from self._stub.WatchRun(pb.WatchRunRequest(run_id=run_id))
        except grpc.RpcError as exc:
            raise self._wrap(f"watch run {run_id}", exc) from None

    def download(self, run_id: str, round_: int | None = None) -> dict[str, torch.Tensor]:
        request = pb.DownloadCheckpointRequest(run_id=run_id)
        if round_ is not None:
            request.round = round_
        try:
            return assemble(self._stub.DownloadCheckpoint(request, timeout=None))
        except grpc.RpcError as exc:
            raise self._wrap(f"download model of run {run_id}", exc) from None
