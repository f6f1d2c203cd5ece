"""A bare Fleet API client for tests that must send what the SDK never would."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import torch

from protos import PROTOCOL_VERSION
from protos.codec import iter_tensor_data, model_header
from protos.v1 import fleet_pb2 as pb
from protos.v1 import fleet_pb2_grpc


class RawClient:
    def __init__(self, address: str, app: str = "tiny", name: str = "raw") -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = fleet_pb2_grpc.FleetStub(self.channel)
        joined = self.stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, app=app, name=name), timeout=10)
        self.client_id, self.token = joined.client_id, joined.token

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-leptonfl-client-id", self.client_id), ("x-leptonfl-token", self.token))

    def wait_task(self, timeout: float = 30.0) -> pb.Task:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = self.stub.GetTask(pb.GetTaskRequest(), metadata=self.metadata, timeout=10)
            if answer.HasField("task"):
                return answer.task
            time.sleep(0.05)
        raise TimeoutError("no task")

    def upload_messages(self, messages: Iterator[pb.UploadChunk] | list[pb.UploadChunk]) -> pb.UploadResponse:
        return self.stub.UploadUpdate(iter(messages), metadata=self.metadata, timeout=10)

    def upload(
        self,
        task: pb.Task,
        weights: dict[str, torch.Tensor],
        num_examples: int = 1,
        header_overrides: dict[str, object] | None = None,
        chunk_bytes: int = 8,
    ) -> pb.UploadResponse:
        return self.upload_messages(update_messages(task, weights, num_examples, header_overrides, chunk_bytes))

    def close(self) -> None:
        self.channel.close()


def update_messages(
    task: pb.Task,
    weights: dict[str, torch.Tensor],
    num_examples: int = 1,
    header_overrides: dict[str, object] | None = None,
    chunk_bytes: int = 8,
) -> list[pb.UploadChunk]:
    fields: dict[str, object] = {
        "task_id": task.task_id,
        "run_id": task.run_id,
        "round": task.round,
        "num_examples": num_examples,
        **(header_overrides or {}),
    }
    header = pb.UploadHeader(model=model_header(weights), **fields)  # type: ignore[arg-type]
    return [pb.UploadChunk(header=header)] + [pb.UploadChunk(data=d) for d in iter_tensor_data(weights, chunk_bytes)]
