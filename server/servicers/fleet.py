"""Fleet service: converts client RPCs into `RoundEngine` calls; no logic of its own."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from protos import PROTOCOL_VERSION
from protos.codec import iter_model_chunks
from protos.scalars import fill_scalar_map
from protos.v1 import fleet_pb2 as pb
from protos.v1 import fleet_pb2_grpc, tensors_pb2
from server.auth import Authorizer, RateLimiter
from server.engine import EVALUATE, Idle, RoundEngine
from server.errors import InvalidArgument
from server.faults import crash_point
from server.provisioning import ROLE_CLIENT
from server.servicers.status import streaming, unary

CLIENT_ID_KEY = "x-leptonfl-client-id"
TOKEN_KEY = "x-leptonfl-token"
MIN_CHUNK, MAX_CHUNK = 64 << 10, 4 << 20


def chunk_size(requested: int, default: int) -> int:
    """The chunk size of a model download: the caller's hint (or the daemon's default), capped."""
    return min(max(requested or default, MIN_CHUNK), MAX_CHUNK)


class FleetServicer(fleet_pb2_grpc.FleetServicer):
    def __init__(
        self,
        engine: RoundEngine,
        chunk_bytes: int,
        authorizer: Authorizer,
        join_rate: float = 2.0,
        upload_rate: float = 2.0,
        call_rate: float = 20.0,
    ) -> None:
        self.engine = engine
        self.metrics = engine.metrics
        self.chunk_bytes = chunk_bytes
        self.authorizer = authorizer
        self.join_limit = RateLimiter(join_rate, burst=10, what="joins")
        self.upload_limit = RateLimiter(upload_rate, burst=10, what="uploads")
        # Every call after Join, per client: the SDK makes about 4 a second while idle (GetTask
        # polls) and fewer while training; this only stops a client that floods the daemon.
        self.call_limit = RateLimiter(call_rate, burst=max(10, int(2 * call_rate)), what="calls")

    def _caller(self, context: grpc.ServicerContext) -> str:
        """The authenticated client id of this call (session token, and certificate under mTLS)."""
        identity = self.authorizer.require(context, ROLE_CLIENT)
        metadata = dict(context.invocation_metadata())
        client_id = str(metadata.get(CLIENT_ID_KEY, ""))
        # Checked before the token (which may cost a database read): by certificate under mTLS,
        # else by the client id the call claims.
        self.call_limit.check(identity.name if identity else client_id)
        return self.engine.authenticate(
            client_id, str(metadata.get(TOKEN_KEY, "")), identity.name if identity else None
        )

    @unary
    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        identity = self.authorizer.require(context, ROLE_CLIENT)
        self.join_limit.check(identity.name if identity else context.peer().rsplit(":", 1)[0])
        client_id, token = self.engine.join(
            request.protocol_version,
            request.app,
            request.name,
            request.run_id,
            request.client_id,
            request.token,
            identity.name if identity else None,
        )
        return pb.JoinResponse(
            client_id=client_id,
            token=token,
            server_protocol_version=PROTOCOL_VERSION,
            heartbeat_interval_ms=int(self.engine.config.heartbeat_interval_s * 1000),
        )

    @unary
    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        self._caller(context)
        return pb.HeartbeatResponse()

    @unary
    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.GetTaskResponse:
        answer = self.engine.get_task(self._caller(context))
        if isinstance(answer, Idle):
            return pb.GetTaskResponse(
                idle=pb.Idle(
                    retry_after_ms=answer.retry_after_ms, active_runs=answer.active_runs, run_ended=answer.run_ended
                )
            )
        task = pb.Task(
            task_id=answer.task_id,
            type=pb.EVALUATE if answer.kind == EVALUATE else pb.TRAIN,
            run_id=answer.run_id,
            round=answer.round,
            model_round=answer.model_round,
            deadline_seconds=max(0.0, answer.deadline - time.monotonic()),
        )
        fill_scalar_map(task.config, answer.config)
        return pb.GetTaskResponse(task=task)

    @streaming
    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[tensors_pb2.ModelChunk]:
        weights = self.engine.task_model(self._caller(context), request.task_id)
        for chunk in iter_model_chunks(weights, chunk_size(request.chunk_bytes, self.chunk_bytes)):
            self.metrics.bytes_sent.inc(len(chunk.data.data))  # 0 for the header
            yield chunk
            crash_point("download")

    @unary
    def UploadUpdate(
        self, request_iterator: Iterator[pb.UploadChunk], context: grpc.ServicerContext
    ) -> pb.UploadResponse:
        client_id = self._caller(context)
        self.upload_limit.check(client_id)
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("an upload must start with an UploadHeader")
        self.engine.receive_update(client_id, first.header, _data_only(request_iterator))
        return pb.UploadResponse(accepted=True)

    @unary
    def ReportEvaluation(self, request: pb.EvaluationReport, context: grpc.ServicerContext) -> pb.EvaluationResponse:
        self.engine.report_evaluation(self._caller(context), request)
        return pb.EvaluationResponse(accepted=True)

    @unary
    def ReportFailure(self, request: pb.FailureReport, context: grpc.ServicerContext) -> pb.FailureResponse:
        self.engine.report_failure(self._caller(context), request)
        return pb.FailureResponse()


def _data_only(messages: Iterator[pb.UploadChunk]) -> Iterator[tensors_pb2.TensorData]:
    for message in messages:
        if not message.HasField("data"):
            raise InvalidArgument("only TensorData may follow the UploadHeader")
        yield message.data
