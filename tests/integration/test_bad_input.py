"""Every malformed upload gets a precise status; the daemon, the other client and the round go on.

Two raw clients are selected for one round. The "bad" one sends each kind of broken
upload; then both send valid updates and the round must commit the exact FedAvg of those
two — proof that nothing of the rejected uploads leaked into the aggregate.
"""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from protos.v1 import control_pb2, control_pb2_grpc, fleet_pb2_grpc, tensors_pb2
from protos.v1 import fleet_pb2 as pb
from server.control_client import ControlClient, ControlError, status_name
from tests.conftest import tiny_weights
from tests.integration.rawclient import RawClient, update_messages


@pytest.fixture
def round_open(daemon):
    with ControlClient(daemon.address) as control:
        run = control.create_run(
            app="tiny", weights=tiny_weights(), num_rounds=1, clients_per_round=2, min_clients=2, round_timeout_s=60
        )
        good, bad = RawClient(daemon.address, name="good"), RawClient(daemon.address, name="bad")
        yield control, run, good, good.wait_task(), bad, bad.wait_task()
        good.close()
        bad.close()


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_each_bad_upload_gets_its_status_and_the_round_still_commits_exactly(round_open, daemon):
    control, run, good, good_task, bad, bad_task = round_open
    base = tiny_weights()
    cases = {
        "wrong name": ({"w": base["w"], "bias": base["b"]}, {}, grpc.StatusCode.INVALID_ARGUMENT, "names differ"),
        "wrong shape": ({"w": torch.zeros(2, 3), "b": base["b"]}, {}, grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        "wrong dtype": (
            {"w": base["w"].double(), "b": base["b"]},
            {},
            grpc.StatusCode.INVALID_ARGUMENT,
            "dtype FLOAT64",
        ),
        "nan": (
            {"w": torch.full((3, 2), float("nan")), "b": base["b"]},
            {},
            grpc.StatusCode.INVALID_ARGUMENT,
            "NaN or Inf values in w",
        ),
        "inf": (
            {"w": base["w"], "b": torch.tensor([0.0, float("inf"), 0.0])},
            {},
            grpc.StatusCode.INVALID_ARGUMENT,
            "NaN or Inf values in b",
        ),
        "zero examples": (base, {"num_examples": 0}, grpc.StatusCode.INVALID_ARGUMENT, "num_examples"),
        "round not assigned": (base, {"round": 7}, grpc.StatusCode.PERMISSION_DENIED, "not assigned"),
        "another client's task": (
            base,
            {"task_id": good_task.task_id},
            grpc.StatusCode.PERMISSION_DENIED,
            "not assigned",
        ),
        "unknown run": (base, {"run_id": "run-nope"}, grpc.StatusCode.NOT_FOUND, "unknown run"),
        "unknown task": (base, {"task_id": "feedface"}, grpc.StatusCode.FAILED_PRECONDITION, "unknown or expired"),
    }
    for name, (weights, overrides, code, text) in cases.items():
        got_code, details = status_of(lambda w=weights, o=overrides: bad.upload(bad_task, w, 5, o))
        assert (got_code, text in details) == (code, True), f"{name}: {got_code} {details}"

    messages = update_messages(bad_task, base, 5)
    short = status_of(lambda: bad.upload_messages(messages[:-1]))
    assert short[0] == grpc.StatusCode.INVALID_ARGUMENT and "ended early" in short[1]
    extra = pb.UploadChunk(data=tensors_pb2.TensorData(tensor_index=1, offset=12, data=b"\0" * 4))
    over = status_of(lambda: bad.upload_messages([*messages, extra]))
    assert over[0] == grpc.StatusCode.INVALID_ARGUMENT and "after the last tensor" in over[1]
    huge = messages[0].__deepcopy__()
    huge.header.model.total_bytes = 3 << 30
    oversized = status_of(lambda: bad.upload_messages([huge]))
    assert oversized[0] == grpc.StatusCode.INVALID_ARGUMENT and "exceeds the limit" in oversized[1]
    no_header = status_of(lambda: bad.upload_messages(messages[1:]))
    assert no_header[0] == grpc.StatusCode.INVALID_ARGUMENT and "must start with an UploadHeader" in no_header[1]

    # A client that vanishes mid-upload: its partial update is discarded, so its retry is accepted.
    release = threading.Event()

    def stalled():
        yield messages[0]
        yield messages[1]
        release.wait(10)

    future = bad.stub.UploadUpdate.future(stalled(), metadata=bad.metadata, timeout=10)
    threading.Event().wait(0.3)
    future.cancel()
    release.set()

    good_w = {"w": torch.full((3, 2), 1.0), "b": torch.full((3,), 2.0)}
    bad_w = {"w": torch.full((3, 2), 4.0), "b": torch.full((3,), -1.0)}
    assert good.upload(good_task, good_w, 1).accepted
    assert bad.upload(bad_task, bad_w, 3).accepted
    dup = status_of(lambda: bad.upload(bad_task, bad_w, 3))
    assert dup[0] == grpc.StatusCode.ALREADY_EXISTS and "already accepted" in dup[1]

    for client in (good, bad):
        eval_task = client.wait_task()
        assert eval_task.type == pb.EVALUATE and eval_task.round == 1
        client.stub.ReportEvaluation(
            pb.EvaluationReport(task_id=eval_task.task_id, run_id=run.run_id, round=1, num_examples=10, loss=0.5),
            metadata=client.metadata,
        )
    detail = wait_for_status(control, run.run_id, "completed")
    assert [(r.round, r.num_clients, r.num_examples) for r in detail.rounds] == [(1, 2, 4)]
    final = control.download(run.run_id)
    # FedAvg of (1 example at 1.0 / 2.0) and (3 examples at 4.0 / -1.0): 3.25 and -0.25, exactly.
    assert torch.equal(final["w"], torch.full((3, 2), 3.25))
    assert torch.equal(final["b"], torch.full((3,), -0.25))


def test_join_refuses_other_protocols_and_unknown_runs(daemon):
    channel = grpc.insecure_channel(daemon.address)
    stub = fleet_pb2_grpc.FleetStub(channel)
    code, details = status_of(lambda: stub.Join(pb.JoinRequest(protocol_version=2, app="tiny"), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "v2" in details and "v1" in details
    code, _ = status_of(lambda: stub.GetTask(pb.GetTaskRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, details = status_of(
        lambda: stub.Join(pb.JoinRequest(protocol_version=1, app="tiny", run_id="run-nope"), timeout=5)
    )
    assert code == grpc.StatusCode.NOT_FOUND and "run-nope" in details
    channel.close()


def test_control_api_rejects_unknown_runs_and_bad_specs(daemon):
    with ControlClient(daemon.address) as control:
        with pytest.raises(ControlError) as info:
            control.get_run("run-missing")
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ControlError) as info:
            control.download("run-missing")
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        for kwargs, text in (
            ({"strategy": "fedmagic"}, "unknown strategy"),
            ({"min_clients": 5}, "min clients"),
            ({"num_rounds": 0}, "rounds"),
        ):
            spec = {
                "app": "tiny",
                "weights": tiny_weights(),
                "num_rounds": 1,
                "clients_per_round": 2,
                "min_clients": 1,
                **kwargs,
            }
            with pytest.raises(ControlError) as info:
                control.create_run(**spec)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and text in str(info.value)
        with pytest.raises(ControlError) as info:
            control.create_run(
                app="tiny",
                weights={"w": torch.tensor([float("nan")])},
                num_rounds=1,
                clients_per_round=1,
                min_clients=1,
            )
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        # A CreateRun stream without a spec.
        stub = control_pb2_grpc.ControlStub(grpc.insecure_channel(daemon.address))
        code, details = status_of(lambda: stub.CreateRun(iter([control_pb2.CreateRunChunk()]), timeout=5))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "RunSpec" in details
        assert control.list_runs() == []


def wait_for_status(control: ControlClient, run_id: str, status: str, timeout: float = 30.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        detail = control.get_run(run_id)
        if status_name(detail.run) == status:
            return detail
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} is {status_name(detail.run)}, not {status}")


def test_deadline_closes_a_round_with_the_quorum_and_a_straggler_hears_round_closed(daemon):
    with ControlClient(daemon.address) as control:
        run = control.create_run(
            app="tiny", weights=tiny_weights(), num_rounds=2, clients_per_round=2, min_clients=1, round_timeout_s=1.0
        )
        fast, slow = RawClient(daemon.address, name="fast"), RawClient(daemon.address, name="slow")
        fast_task, slow_task = fast.wait_task(), slow.wait_task()
        assert fast.upload(fast_task, {"w": torch.ones(3, 2), "b": torch.ones(3)}, 2).accepted
        eval_task = fast.wait_task(timeout=10)  # the deadline passed: round 1 committed with one update
        assert (eval_task.type, eval_task.round) == (pb.EVALUATE, 1)
        code, details = status_of(lambda: slow.upload(slow_task, tiny_weights(), 2))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "closed" in details
        detail = control.get_run(run.run_id)
        assert [(r.round, r.num_clients, r.num_examples) for r in detail.rounds] == [(1, 1, 2)]
        assert torch.equal(control.download(run.run_id, 1)["w"], torch.ones(3, 2))
        fast.close()
        slow.close()


def test_a_round_without_quorum_is_retried_then_the_run_fails_with_the_reason(tmp_path):
    from tests.conftest import start_daemon

    d = start_daemon(tmp_path / "data", max_round_attempts=2)
    try:
        with ControlClient(d.address) as control:
            run = control.create_run(
                app="tiny",
                weights=tiny_weights(),
                num_rounds=1,
                clients_per_round=1,
                min_clients=1,
                round_timeout_s=0.5,
            )
            silent = RawClient(d.address, name="silent")
            first = silent.wait_task()
            assert silent.wait_task().task_id == first.task_id  # asking again returns the same task
            second = first
            for _ in range(200):
                second = silent.wait_task(timeout=10)
                if second.task_id != first.task_id:
                    break
                threading.Event().wait(0.05)
            assert second.task_id != first.task_id and second.round == 1  # retried with a fresh task
            detail = wait_for_status(control, run.run_id, "failed")
            assert "0 of 1 updates" in detail.run.status_reason and "2 attempts" in detail.run.status_reason
            silent.close()
    finally:
        d.stop(grace=0.5)
