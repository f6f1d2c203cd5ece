"""A run of the digits app through the real daemon and real SDK clients over loopback gRPC."""

from __future__ import annotations

import hashlib
import math

import torch

from client_sdk import FederatedClient, TorchTrainer
from server.control_client import ControlClient, status_name
from simulations.apps import load_app, loader
from tests.conftest import DIGITS_APP, start_daemon


def test_fedavg_run_over_grpc_commits_every_round_and_learns(tmp_path, db_url):
    daemon = start_daemon(tmp_path / "data", db=db_url)
    try:
        _run_digits(daemon)
    finally:
        daemon.stop(grace=0.5)


def _run_digits(daemon):
    app = load_app(DIGITS_APP)
    with ControlClient(daemon.address) as control:
        run = control.create_run(
            app=app.name,
            weights=app.initial_weights(0),
            num_rounds=3,
            clients_per_round=3,
            min_clients=3,
            round_timeout_s=60,
            client_config={**app.default_config, "local_epochs": 2},
        )
        clients = []
        for i in range(3):
            train, test = app.partition(i, 3)
            trainer = TorchTrainer(app.build_model(), loader(train, 10, True, i), loader(test, 256, False, 0))
            clients.append(FederatedClient(daemon.address, app.name, trainer, name=f"p{i}"))
        for c in clients:
            c.start()
        for c in clients:
            stats = c.join(timeout=120)
            assert stats.rounds_trained == 3 and stats.rounds_evaluated == 3
        detail = control.get_run(run.run_id)
        assert status_name(detail.run) == "completed"
        assert [r.round for r in detail.rounds] == [1, 2, 3]
        assert all(r.num_clients == 3 and r.eval_clients == 3 for r in detail.rounds)
        assert all(r.num_examples == len(app.load_dataset()[0]) for r in detail.rounds)
        assert detail.rounds[-1].eval_accuracy > detail.rounds[0].eval_accuracy
        assert not math.isnan(detail.rounds[-1].train_loss)
        # Each round names the sha256 of its checkpoint file, so an operator can verify a copy.
        files = sorted((daemon.config.data_dir / "runs" / run.run_id).glob("round-*.safetensors"))
        digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
        assert [r.checkpoint_sha256 for r in detail.rounds] == digests[1:]
        final = control.download(run.run_id)
        initial = control.download(run.run_id, 0)
        assert all(torch.equal(initial[k], v) for k, v in app.initial_weights(0).items())
        assert not torch.equal(final["0.weight"], initial["0.weight"])
