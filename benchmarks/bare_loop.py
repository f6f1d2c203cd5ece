"""The baseline of the simulation benchmark: the same FedAvg work as a plain single-thread
PyTorch loop, no framework.

Outside the timed section (as the brief asks, so the baseline is tight): the app's data is
loaded, split over the clients by the framework's own ``App.partition`` (same partitioner,
seed and test shares), the clients of every round are drawn as the framework draws them, and each selected
client's train rows are materialised once, in a fixed shuffled order, as contiguous tensors
cut into batches; the test rows of each round's clients are gathered into one tensor.

Timed, with ``torch.set_num_threads(1)``: per round, for each selected client, copy the global
weights into the one model, run one epoch of SGD over its batches, add ``n_k * w_k`` to a
float64 running sum (as the framework's FedAvg does); divide by ``sum n_k``; then evaluate the
new global model on the round's clients' test rows (the framework evaluates too, so both
include evaluation; here it is one batched forward pass, the cheapest way).

Run alone: ``python benchmarks/bare_loop.py --workload W1 [--quick]`` prints a JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from typing import Any

from workloads import WORKLOADS, Workload


@dataclass
class Prepared:
    model: Any  # torch.nn.Module
    initial: list[Any]  # global weights, state_dict order
    rounds: list[list[int]]  # selected clients per round
    batches: dict[int, list[tuple[Any, Any]]]  # client -> [(inputs, targets)] in its fixed order
    examples: dict[int, int]
    test: list[tuple[Any, Any]]  # per round: (inputs, targets) of its clients' test rows
    lr: float


def prepare(workload: Workload, rounds: int) -> Prepared:
    import torch

    from simulations.apps import load_app

    app = load_app(workload.app)
    config = {**app.default_config, **workload.client_config}
    if int(config.get("local_epochs", 1)) != 1 or float(config.get("momentum", 0.0)) != 0.0:
        raise ValueError("the bare loop implements one local epoch of plain SGD only")
    batch_size = int(config["batch_size"])
    train, test = app.load_dataset()
    (x, y), (x_test, y_test) = train.tensors, test.tensors
    sampler = random.Random(workload.seed)  # the framework's client selection, draw for draw
    selected = [sorted(sampler.sample(range(workload.clients), workload.per_round)) for _ in range(rounds)]
    # The framework's own split (same partitioner, seed and test sharing), computed before the clock starts.
    shares = {
        client: app.partition(client, workload.clients, workload.partition, workload.seed)
        for client in sorted({c for chosen in selected for c in chosen})
    }
    batches: dict[int, list[tuple[Any, Any]]] = {}
    examples: dict[int, int] = {}
    for client, (train_share, _) in shares.items():
        rows = torch.as_tensor(list(train_share.indices), dtype=torch.long)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(workload.seed * 1_000_003 + client))
        inputs, targets = x[rows[order]].contiguous(), y[rows[order]].contiguous()
        batches[client] = list(zip(inputs.split(batch_size), targets.split(batch_size), strict=True))
        examples[client] = len(rows)
    test_rounds = []
    for chosen in selected:
        rows = torch.cat([torch.as_tensor(list(shares[c][1].indices), dtype=torch.long) for c in chosen])
        test_rounds.append((x_test[rows].contiguous(), y_test[rows].contiguous()))
    model = app.build_model()
    return Prepared(
        model=model,
        initial=list(app.initial_weights(workload.seed).values()),
        rounds=selected,
        batches=batches,
        examples=examples,
        test=test_rounds,
        lr=float(config["lr"]),
    )


def run(prepared: Prepared) -> dict[str, float]:
    """The timed FedAvg loop; returns seconds and the final global model's test loss/accuracy."""
    import torch
    from torch.nn import functional as F

    torch.set_num_threads(1)
    model = prepared.model
    state = list(model.state_dict().values())  # live references to the model's tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=prepared.lr)
    global_weights = [t.clone() for t in prepared.initial]
    loss, accuracy = float("nan"), float("nan")
    started = time.perf_counter()
    for chosen, (x_test, y_test) in zip(prepared.rounds, prepared.test, strict=True):
        sums = [torch.zeros_like(t, dtype=torch.float64) for t in global_weights]
        total = 0
        model.train()
        for client in chosen:
            with torch.no_grad():
                for live, weights in zip(state, global_weights, strict=True):
                    live.copy_(weights)
            for inputs, targets in prepared.batches[client]:
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(inputs), targets).backward()
                optimizer.step()
            count = prepared.examples[client]
            with torch.no_grad():
                for acc, live in zip(sums, state, strict=True):
                    acc.add_(live, alpha=count)
            total += count
        global_weights = [(acc / total).to(t.dtype) for acc, t in zip(sums, global_weights, strict=True)]
        model.eval()
        with torch.no_grad():
            for live, weights in zip(state, global_weights, strict=True):
                live.copy_(weights)
            loss_sum, correct = 0.0, 0
            for inputs, targets in zip(x_test.split(8192), y_test.split(8192), strict=True):
                outputs = model(inputs)
                loss_sum += float(F.cross_entropy(outputs, targets, reduction="sum"))
                correct += int((outputs.argmax(dim=1) == targets).sum())
        loss, accuracy = loss_sum / len(y_test), correct / len(y_test)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "eval_loss": loss, "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    workload = WORKLOADS[args.workload]
    print(json.dumps(run(prepare(workload, workload.rounds_for(args.quick)))))


if __name__ == "__main__":
    main()
