"""The Ray backend: the in-process round loop with clients trained on Ray actors — same math as
one process — and app failures inside an actor surfacing as a clear error in the driver."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.apps import load_app
from simulations.config import SimulationConfig
from simulations.inprocess import run_inprocess
from simulations.pool import WorkerError, WorkerPool
from tests.conftest import DIGITS_APP

ray = pytest.importorskip("ray")

from simulations.ray_backend import RayPool, RayWorkerError, greedy_shares, run_ray  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

BROKEN_APP = f"""
from simulations.apps import load_app

_digits = load_app({DIGITS_APP!r}).module
NAME = "broken-digits"
DEFAULT_CLIENT_CONFIG = _digits.DEFAULT_CLIENT_CONFIG
build_model = _digits.build_model
load_dataset = _digits.load_dataset


def make_optimizer(params, config):
    raise RuntimeError("broken app: no optimizer for you")
"""


def _start_local_ray(attempts: int = 3) -> None:
    """`ray.init` of a local instance, tried again when Ray's own start-up times out.

    Ray gives its raylet a fixed 30 s to register with its GCS; on a busy CI machine it has
    once missed that ("The current node timed out during startup") before any of our code
    ran. That is Ray's start-up, not what these tests check, so it gets more than one try.
    """
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            return
        except Exception as exc:
            ray.shutdown()
            if attempt == attempts or "timed out during startup" not in str(exc):
                raise


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray instance with 2 CPUs for the whole module; the pools join it and leave it up."""
    _start_local_ray()
    try:
        yield
    finally:
        ray.shutdown()
    assert not ray.is_initialized()


def test_greedy_shares_match_the_worker_pool() -> None:
    sizes = {0: 50, 1: 10, 2: 40, 3: 20, 4: 30}
    assert greedy_shares(sizes, [4, 3, 2, 1, 0], 2) == [[0, 1, 3], [2, 4]]
    assert greedy_shares(sizes, [1], 3) == [[1], [], []]
    # The same split as the worker processes' (a pool object without processes, just for `_shares`).
    config = SimulationConfig(app=DIGITS_APP, clients=12, rounds=1, partition="dirichlet:0.5", seed=5)
    pool = WorkerPool.__new__(WorkerPool)
    pool.app, pool.config, pool._conns = load_app(DIGITS_APP), config, [None] * 3  # type: ignore[list-item]
    sizes = {c: len(pool.app.partition(c, 12, config.partition, config.seed)[0]) for c in range(12)}
    clients = [0, 2, 3, 5, 7, 8, 10, 11]
    assert greedy_shares(sizes, clients, 3) == pool._shares(clients)


def test_ray_matches_one_process(local_ray: None, tmp_path: Path) -> None:
    config = SimulationConfig(app=DIGITS_APP, clients=10, rounds=3, seed=3, workers=2, out=tmp_path)
    messages: list[str] = []
    records, weights = run_ray(load_app(DIGITS_APP), config, lambda _: None, messages.append)
    assert "training on 2 Ray actors" in messages
    assert [r.round for r in records] == [1, 2, 3] and all(r.num_clients == 10 for r in records)

    one = dataclasses.replace(config, workers=1)
    one_records, one_weights = run_inprocess(load_app(DIGITS_APP), one, lambda _: None)
    assert max(float((weights[k] - one_weights[k]).abs().max()) for k in weights) < 1e-6
    for a, b in zip(records, one_records, strict=True):
        assert (a.num_clients, a.num_examples) == (b.num_clients, b.num_examples)
        assert abs(a.train_loss - b.train_loss) < 1e-6 and abs(a.eval_accuracy - b.eval_accuracy) < 1e-6
    assert records[-1].eval_accuracy > 0.8  # it actually learned
    assert ray.is_initialized()  # the pool joined the module's instance and left it running


def test_app_error_in_an_actor_is_a_clear_error(local_ray: None, tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text(BROKEN_APP, encoding="utf-8")
    config = SimulationConfig(app=str(broken), clients=4, rounds=2, seed=0, workers=2, out=tmp_path)
    with pytest.raises(RayWorkerError, match="broken app: no optimizer for you") as caught:
        run_ray(load_app(str(broken)), config, lambda _: None)
    assert isinstance(caught.value, WorkerError) and "a Ray actor failed" in str(caught.value)

    # An app the actors cannot load fails when the pool starts, naming the cause.
    missing = dataclasses.replace(config, app=str(tmp_path / "nowhere" / "app.py"))
    with pytest.raises(RayWorkerError, match="no app at"):
        RayPool(missing, 2, app=load_app(DIGITS_APP), start_timeout_s=60)

    # Both failed pools stopped their actors: the module's 2 CPUs are free again.
    deadline = time.monotonic() + 15
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == 2
