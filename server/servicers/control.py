"""Control service: operator RPCs (runs, progress, checkpoints) → `RoundEngine` calls."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import grpc

from protos.codec import CodecError, ModelAssembler, iter_model_chunks, non_finite_tensors
from protos.scalars import fill_scalar_map, scalar_map_to_dict
from protos.v1 import control_pb2 as pb
from protos.v1 import control_pb2_grpc, tensors_pb2
from server.auth import Authorizer
from server.engine import RoundEngine, RunSpecInput
from server.errors import InvalidArgument
from server.provisioning import ROLE_OPERATOR
from server.servicers.fleet import chunk_size
from server.servicers.status import streaming, unary
from server.store import RoundRecord, RunRecord
from strategies.factory import PrivacySettings

STATUS_TO_PB = {
    "pending": pb.PENDING,
    "running": pb.RUNNING,
    "completed": pb.COMPLETED,
    "failed": pb.FAILED,
    "cancelled": pb.CANCELLED,
    "budget_exhausted": pb.BUDGET_EXHAUSTED,
}
WATCH_POLL_S = 1.0


def privacy_to_pb(privacy: PrivacySettings) -> pb.PrivacySpec:
    return pb.PrivacySpec(**privacy.to_dict())


def privacy_from_pb(spec: pb.PrivacySpec) -> PrivacySettings:
    """Defaults fill fields a client left at zero (proto3 has no presence for doubles)."""
    defaults = PrivacySettings()
    return PrivacySettings(
        mode=spec.mode,
        noise_multiplier=spec.noise_multiplier,
        clip_norm=spec.clip_norm,
        adaptive_clipping=spec.adaptive_clipping,
        target_quantile=spec.target_quantile or defaults.target_quantile,
        clip_lr=spec.clip_lr or defaults.clip_lr,
        initial_clip_norm=spec.initial_clip_norm or defaults.initial_clip_norm,
        delta=spec.delta or defaults.delta,
        epsilon_budget=spec.epsilon_budget,
        accountant=spec.accountant or defaults.accountant,
        clipped_count_stddev=spec.clipped_count_stddev,
    )


def run_to_pb(run: RunRecord, local_epsilons: Mapping[str, float] | None = None) -> pb.Run:
    spec = pb.RunSpec(
        app=run.app,
        strategy=run.strategy,
        num_rounds=run.num_rounds,
        clients_per_round=run.clients_per_round,
        min_clients=run.min_clients,
        round_timeout_seconds=run.round_timeout_s,
        name=run.name,
        privacy=privacy_to_pb(PrivacySettings.from_dict(run.privacy)),
        over_selection=run.over_selection,
    )
    fill_scalar_map(spec.strategy_params, run.strategy_params)
    fill_scalar_map(spec.client_config, run.client_config)
    local = list((local_epsilons or {}).values())
    return pb.Run(
        run_id=run.id,
        spec=spec,
        status=STATUS_TO_PB[run.status],
        status_reason=run.status_reason,
        committed_rounds=run.committed_rounds,
        created_at=run.created_at.isoformat(),
        updated_at=run.updated_at.isoformat(),
        epsilon=float(run.privacy_ledger.get("epsilon", 0.0)),
        local_dp_clients=len(local),
        max_local_epsilon=max(local, default=0.0),
    )


def round_to_pb(r: RoundRecord) -> pb.RoundSummary:
    nan = math.nan
    summary = pb.RoundSummary(
        round=r.number,
        num_clients=r.num_clients,
        num_examples=r.num_examples,
        train_loss=nan if r.train_loss is None else r.train_loss,
        eval_loss=nan if r.eval_loss is None else r.eval_loss,
        eval_accuracy=nan if r.eval_accuracy is None else r.eval_accuracy,
        eval_clients=r.eval_clients,
        duration_seconds=r.duration_s,
        epsilon=float(r.metrics.get("epsilon") or 0.0),
        clip_norm=float(r.metrics.get("clip_norm") or 0.0),
        checkpoint_sha256=r.checkpoint_sha256,
    )
    fill_scalar_map(summary.metrics, {k: v for k, v in r.metrics.items() if isinstance(v, int | float | str | bool)})
    return summary


class ControlServicer(control_pb2_grpc.ControlServicer):
    """Every method first checks for an operator certificate (under TLS)."""

    def __init__(self, engine: RoundEngine, chunk_bytes: int, authorizer: Authorizer) -> None:
        self.engine = engine
        self.metrics = engine.metrics
        self.authorizer = authorizer
        self.chunk_bytes = chunk_bytes

    @unary
    def CreateRun(self, request_iterator: Iterator[pb.CreateRunChunk], context: grpc.ServicerContext) -> pb.Run:
        self.authorizer.require(context, ROLE_OPERATOR)
        first = next(request_iterator, None)
        if first is None or not first.HasField("spec"):
            raise InvalidArgument("CreateRun must start with a RunSpec")
        header = next(request_iterator, None)
        if header is None or not header.HasField("model_header"):
            raise InvalidArgument("the RunSpec must be followed by the initial model's header")
        s = first.spec
        try:
            spec = RunSpecInput(
                app=s.app,
                strategy=s.strategy or "fedavg",
                strategy_params=scalar_map_to_dict(s.strategy_params),
                num_rounds=s.num_rounds,
                clients_per_round=s.clients_per_round,
                min_clients=s.min_clients,
                round_timeout_s=s.round_timeout_seconds or 300.0,
                client_config=scalar_map_to_dict(s.client_config),
                name=s.name,
                privacy=privacy_from_pb(s.privacy),
                over_selection=s.over_selection,
            )
            assembler = ModelAssembler(header.model_header, self.engine.config.stream_limits())
            for message in request_iterator:
                if not message.HasField("data"):
                    raise InvalidArgument("only TensorData may follow the model header")
                assembler.add(message.data)
            weights = assembler.finish()
        except (CodecError, ValueError) as exc:
            raise InvalidArgument(str(exc)) from exc
        if non_finite_tensors(weights):
            raise InvalidArgument("the initial model has NaN or Inf values")
        return run_to_pb(self.engine.create_run(spec, weights))

    @unary
    def ListRuns(self, request: pb.ListRunsRequest, context: grpc.ServicerContext) -> pb.ListRunsResponse:
        self.authorizer.require(context, ROLE_OPERATOR)
        store = self.engine.store
        return pb.ListRunsResponse(runs=[run_to_pb(r, store.local_epsilons(r.id)) for r in self.engine.list_runs()])

    @unary
    def GetRun(self, request: pb.GetRunRequest, context: grpc.ServicerContext) -> pb.RunDetail:
        self.authorizer.require(context, ROLE_OPERATOR)
        run = self.engine.get_run(request.run_id)
        local = self.engine.store.local_epsilons(run.id)
        return pb.RunDetail(run=run_to_pb(run, local), rounds=[round_to_pb(r) for r in self.engine.rounds(run.id)])

    @unary
    def CancelRun(self, request: pb.CancelRunRequest, context: grpc.ServicerContext) -> pb.Run:
        self.authorizer.require(context, ROLE_OPERATOR)
        return run_to_pb(self.engine.cancel_run(request.run_id, request.reason))

    @streaming
    def WatchRun(self, request: pb.WatchRunRequest, context: grpc.ServicerContext) -> Iterator[pb.RunEvent]:
        self.authorizer.require(context, ROLE_OPERATOR)
        version = -1
        sent: dict[int, bytes] = {}
        last_progress: bytes = b""
        epsilons: tuple[int, Mapping[str, float]] = (-1, {})
        while context.is_active():
            version = self.engine.wait_for_change(version, WATCH_POLL_S)
            run = self.engine.get_run(request.run_id)
            # Per event, only what can have changed: clients' epsilons move only with a commit,
            # and only the newest round can still change (its evaluation). A long run's watch
            # must not re-read its whole history on every update.
            if epsilons[0] != run.committed_rounds:
                epsilons = (run.committed_rounds, self.engine.store.local_epsilons(run.id))
            run_pb = run_to_pb(run, epsilons[1])
            for r in (round_to_pb(r) for r in self.engine.rounds(run.id, since=max(sent, default=0))):
                if sent.get(r.round) != (wire := r.SerializeToString()):
                    sent[r.round] = wire
                    yield pb.RunEvent(run=run_pb, round=r)
            number, updates, selected = self.engine.progress(run.id)
            progress = pb.RunEvent(
                run=run_pb, open_round=number, open_round_updates=updates, open_round_selected=selected
            )
            if (wire := progress.SerializeToString()) != last_progress:
                last_progress = wire
                yield progress
            if not run.active:
                return

    @streaming
    def DownloadCheckpoint(
        self, request: pb.DownloadCheckpointRequest, context: grpc.ServicerContext
    ) -> Iterator[tensors_pb2.ModelChunk]:
        self.authorizer.require(context, ROLE_OPERATOR)
        number = request.round if request.HasField("round") else None
        weights = self.engine.checkpoint_weights(request.run_id, number)
        yield from iter_model_chunks(weights, chunk_size(request.chunk_bytes, self.chunk_bytes))
