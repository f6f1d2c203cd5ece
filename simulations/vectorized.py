"""Vectorised backend: many virtual clients trained at once with `torch.func`.

Same algorithm, same results as `simulations.inprocess` (up to float rounding): the same
clients are sampled from the same `random.Random(seed)`, each client sees exactly the
batches its `loader(train, batch_size, shuffle=True, seed=client_seed(...))` would yield,
the strategy gets one `ClientUpdate` per client in selection order, and evaluation is the
same federated evaluation. Only the local training loop differs: instead of one model
stepping through one client after another, the global weights are copied into a stack of
G client models (leading dimension G) and every SGD step of all G clients is one forward
pass vmapped over them through `functional_call` (for a plain MLP, batched matmuls:
`stacked_forward`) and one backward pass of the summed per-client losses (each client's
gradient, as ``vmap(grad(loss))`` would give, but faster), followed by a functional SGD update on
the stacked tensors (with momentum the way `torch.optim.SGD` does it: ``buf = m*buf + g``,
the first step's ``buf = g``; no dampening, Nesterov or weight decay, as the default
optimizer `client_sdk.training.sgd` never sets them).

Clients rarely have equal data, so:

* clients are packed into groups by number of local steps (sorted, then cut where a
  simple cost model — per-step overhead plus per-client work — says a new group pays off;
  a group is also capped by a memory budget), and a client with fewer steps than its
  group's longest has its missing steps padded and masked: neither its weights nor its
  momentum buffer move, and its loss is not counted;
* a partial last batch is padded with masked samples, the loss being the mean over the
  real samples only (sum of per-sample cross-entropy × mask / real count), which is the
  same mean as `cross_entropy` over the unpadded batch.

What cannot be vectorised exactly falls back to `run_inprocess` with one line
``vectorized: falling back to inprocess: <reason>``: an app's own `make_optimizer` or
`loss_fn`, a model with buffers (BatchNorm) or frozen or shared parameters, datasets that
are not two-tensor `TensorDataset`s, and models that do not run (or give different
gradients) under `vmap` — random ops like dropout among them. FedProx (`proximal_mu`) is
vectorised: the objective gains (μ/2)‖w − w_global‖², as in `train_epochs`.

Memory: a group holds G × (weights, gradients, momentum, one batch of activations); G is
capped so that this stays under `memory_budget_bytes`. The trained weights of the round's
clients are kept (as rows of the stacked tensors) until they are handed to the strategy in
selection order, i.e. O(clients per round × model), like one stacked group of them.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from client_sdk.training import sgd
from simulations.apps import App, loader
from simulations.batching import EpochOrders, fast_orders_valid, loader_orders
from simulations.config import SimulationConfig
from simulations.inprocess import Progress, client_seed, intra_op_threads, one_intra_op_thread, run_inprocess
from simulations.inprocess import evaluation_sums as stacked_evaluation_sums
from simulations.report import RoundRecord
from strategies import RoundAggregate

Params = dict[str, torch.Tensor]

DEFAULT_MEMORY_BUDGET = 256 * 2**20
# Cost model for packing, in "client-steps": one vmapped step over G clients costs about
# (STEP_OVERHEAD + G) client-steps (Python, dispatch and vmap bookkeeping are per step).
STEP_OVERHEAD = 24.0
EVAL_CHUNK = 8192


# ---------------------------------------------------------------------------- entry point


def run_vectorized(
    app: App,
    config: SimulationConfig,
    on_round: Progress,
    echo: Callable[[str], None] = lambda _: None,
    *,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    **hooks: Any,
) -> tuple[list[RoundRecord], dict[str, torch.Tensor]]:
    """`run_inprocess`'s round loop and results, local training vectorised over clients.

    The loop (sampling, strategy, DP ledger, records) is `run_inprocess` itself; this backend
    only supplies a pool whose `train` runs all of a round's clients at once."""
    with one_intra_op_thread():  # as run_inprocess: the probe below is this backend's first vmap
        model = app.build_model()
        reason = unsupported_reason(app, config, model)
        if reason is not None:
            echo(f"vectorized: falling back to inprocess: {reason}")
            return run_inprocess(app, config, on_round, echo, **hooks)
        trainer = _VectorTrainer(app, model, memory_budget_bytes)
        keep_freed_blocks()
        return run_inprocess(
            app, config, on_round, echo, pool_factory=lambda _app, _config, _n: VectorizedPool(config, trainer), **hooks
        )


class VectorizedPool:
    """The `Pool` of `run_inprocess`, in this process: every client of a round trained at once."""

    def __init__(self, config: SimulationConfig, trainer: _VectorTrainer) -> None:
        self.config, self.trainer = config, trainer
        # One process; its cores come in through torch's intra-op threads, which pay off here
        # (a step is one batched op over every client of a group, not many tiny ones).
        self.threads = config.worker_count()

    def train(
        self,
        number: int,
        weights: Mapping[str, torch.Tensor],
        template: RoundAggregate,
        clients: Sequence[int],
        client_config: Mapping[str, Any],
    ) -> list[tuple[RoundAggregate, list[float]]]:
        started = time.perf_counter()
        aggregate = copy.deepcopy(template)
        batch_size = int(client_config.get("batch_size", 32))
        epochs = int(client_config.get("local_epochs", 1))
        plan = self.trainer.plan_round(self.config, number, clients, batch_size, epochs)
        with intra_op_threads(self.threads):
            for group, params, metrics in self.trainer.train_groups(plan, weights, client_config):
                # A group's updates folded together (one contraction per tensor for FedAvg's sum).
                aggregate.add_stacked(params, [plan.clients[i].examples for i in group], metrics)
        # Clients train together: each is charged an equal share of the round's training time.
        share = (time.perf_counter() - started) / max(1, len(clients))
        return [(aggregate, [share] * len(clients))]

    def evaluate(self, weights: Mapping[str, torch.Tensor], clients: Sequence[int]) -> tuple[int, float, float]:
        return stacked_evaluation_sums(self.trainer.app, self.config, self.trainer.model, weights, list(clients))

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------ what is supported


def unsupported_reason(app: App, config: SimulationConfig, model: nn.Module | None = None) -> str | None:
    """Why this app cannot be trained vectorised with inprocess' exact semantics, or None."""
    if app.make_optimizer is not sgd:
        return "the app defines its own make_optimizer"
    if app.loss_fn is not F.cross_entropy:
        return "the app defines its own loss_fn (only cross-entropy is vectorised)"
    model = app.build_model() if model is None else model
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        return f"the model has buffers ({', '.join(buffers[:3])}), e.g. BatchNorm statistics"
    params = dict(model.named_parameters())
    if not params:
        return "the model has no parameters"
    frozen = [name for name, p in params.items() if not p.requires_grad]
    if frozen:
        return f"the model has frozen parameters ({', '.join(frozen[:3])})"
    if list(model.state_dict()) != list(params):
        return "the model's state_dict is not exactly its parameters (shared or extra tensors)"
    train, test = app.load_dataset()
    for part, dataset in (("train", train), ("test", test)):
        if not isinstance(dataset, TensorDataset) or len(dataset.tensors) != 2:
            return f"the {part} set is not a TensorDataset of (inputs, labels)"
    if len(train) == 0:
        return "the training set is empty"
    batch_size = int({**app.default_config, **config.client_config}.get("batch_size", 32))
    return _probe(model, train.tensors[0][: max(1, min(batch_size, 4))], train.tensors[1][: max(1, min(batch_size, 4))])


def _probe(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> str | None:
    """Run one vmapped gradient on two stacked copies and compare it to eager autograd."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    stacked = {name: p.unsqueeze(0).expand(2, *p.shape).clone() for name, p in params.items()}
    model.train()
    step = _make_step(model, 0.0)
    count = float(len(targets))
    try:
        grads, _ = step(
            stacked,
            inputs.unsqueeze(0).expand(2, *inputs.shape),
            targets.unsqueeze(0).expand(2, *targets.shape),
            torch.ones(2, len(targets)),
            torch.full((2,), count),
            params,
        )
        eager = torch.autograd.grad(F.cross_entropy(model(inputs), targets), list(model.parameters()))
    except Exception as exc:  # any failure means: not vectorisable
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"the model does not train under torch.func.vmap ({type(exc).__name__}: {first[:160]})"
    for (name, g), e in zip(grads.items(), eager, strict=True):
        if not (torch.allclose(g[0], e, rtol=1e-4, atol=1e-6) and torch.allclose(g[1], e, rtol=1e-4, atol=1e-6)):
            return f"vmapped gradients differ from eager ones (parameter {name})"
    return None


# ------------------------------------------------------------------------ the training step

StepFn = Callable[..., tuple[Params, torch.Tensor]]


def _make_step(model: nn.Module, mu: float) -> StepFn:
    """Per-client gradients and data losses for stacked clients, in one batched backward pass.

    The forward pass runs over the clients (leading axis of `params`, `inputs`, `targets`):
    `functional_call` vmapped, or `stacked_forward`'s batched matmuls where the model is a
    plain MLP; the per-client objectives are summed and differentiated with plain autograd.
    Client j's objective depends only on its own row of the parameters, so the gradient of
    the sum is each client's own gradient, exactly what ``vmap(grad(objective))`` gives
    (bit for bit on the W1 workload) at a fifth less time per step. The data loss is the mean
    cross-entropy over the batch's real samples (`weight` 1, padding 0, `count` the number of
    real ones); FedProx adds (μ/2)‖w − anchor‖² to what is differentiated.
    """
    forward = stacked_forward(model) or vmap(lambda params, inputs: functional_call(model, params, (inputs,)))

    def step(
        params: Params,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        weight: torch.Tensor,
        count: torch.Tensor,
        anchors: Params,
    ) -> tuple[Params, torch.Tensor]:
        with torch.enable_grad():
            leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
            outputs = forward(leaves, inputs)
            per_sample = F.cross_entropy(outputs.flatten(0, 1), targets.flatten(0, 1), reduction="none")
            loss = (per_sample.view(weight.shape) * weight).sum(dim=1) / count
            total = loss.sum()
            if mu > 0:
                total = total + mu / 2 * sum(((leaves[name] - anchors[name]) ** 2).sum() for name in leaves)
            grads = torch.autograd.grad(total, list(leaves.values()))
        return dict(zip(leaves, grads, strict=True)), loss.detach()

    return step


# Built-in modules that act on each element alone, the same for any batch shape: applied as they
# are to stacked activations, they compute every client's activations at once.
ELEMENTWISE_MODULES = frozenset(
    {
        nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU,
        nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh,
        nn.Hardswish, nn.Hardsigmoid, nn.Tanhshrink, nn.Softsign,
    }
)  # fmt: skip


Layer = Callable[[Params, torch.Tensor], torch.Tensor]


def stacked_forward(model: nn.Module) -> Layer | None:
    """The model's forward over stacked clients as batched matmuls, if it is a plain MLP.

    Applies to an `nn.Sequential` (exactly that class) of `nn.Linear`, `nn.Flatten` and the
    parameter-free `ELEMENTWISE_MODULES`, with no hooks anywhere: then its forward is fixed by
    those modules, and client j's output is `model(inputs[j])` under parameters `params[·][j]`.
    Each Linear becomes one `baddbmm` over the clients, which is what `vmap` of `F.linear` does
    too, minus its per-op batching work: on the W1 benchmark (100 clients × 10 samples, MLP
    64-128-10) a training step takes 1.3 ms instead of 2.0 ms. Any other model returns None and
    is vmapped; `_probe` checks either path's gradients against eager autograd before a run.
    """
    if type(model) is not nn.Sequential or _has_hooks(model):
        return None
    layers: list[Layer] = []
    for name, module in model.named_children():
        kind = type(module)
        if kind is nn.Linear:
            layers.append(_stacked_linear(name, module.bias is not None))
        elif isinstance(module, nn.Flatten) and kind is nn.Flatten:
            layers.append(_stacked_flatten(module.start_dim, module.end_dim))
        elif kind in ELEMENTWISE_MODULES and not list(module.parameters()) and not list(module.buffers()):
            layers.append(_stacked_elementwise(module))
        else:
            return None

    def forward(params: Params, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        for layer in layers:
            x = layer(params, x)
        return x

    return forward


def _stacked_elementwise(module: nn.Module) -> Layer:
    return lambda _params, x: module(x)


def _stacked_flatten(start_dim: int, end_dim: int) -> Layer:
    # dims of one client's input, shifted past the client axis (negative ones count from the end)
    start, end = (d + 1 if d >= 0 else d for d in (start_dim, end_dim))
    return lambda _params, x: x.flatten(start, end)


def _stacked_linear(name: str, bias: bool) -> Layer:
    weight_name, bias_name = f"{name}.weight", f"{name}.bias"

    def linear(params: Params, x: torch.Tensor) -> torch.Tensor:
        weight = params[weight_name]  # [clients, out, in]
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # [clients, samples (× any extra dims), in]
        if bias:
            out = torch.baddbmm(params[bias_name].unsqueeze(1), rows, weight.transpose(1, 2))
        else:
            out = torch.bmm(rows, weight.transpose(1, 2))
        return out.view(*x.shape[:-1], weight.shape[1])

    return linear


def _has_hooks(model: nn.Module) -> bool:
    """Whether any forward/backward hook (the module's own or global) could change what runs."""
    global_hooks = (
        nn.modules.module._global_forward_hooks,
        nn.modules.module._global_forward_pre_hooks,
        nn.modules.module._global_backward_hooks,
        nn.modules.module._global_backward_pre_hooks,
    )
    if any(global_hooks):
        return True
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in model.modules()
    )


# --------------------------------------------------------------------------- client plans


@dataclass
class ClientPlan:
    """One selected client's local training: how much data, and where its samples are listed."""

    client: int
    examples: int  # per epoch
    epochs: int
    batch_size: int
    start: int  # its epochs' shuffled rows are RoundPlan.rows[start : start + epochs * examples]

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.examples // self.batch_size)

    @property
    def steps(self) -> int:
        return self.epochs * self.batches_per_epoch


@dataclass
class RoundPlan:
    """A round's selected clients (selection order) and, in one tensor, the base-dataset rows
    every one of them reads: client after client, epoch after epoch, in shuffled batch order."""

    clients: list[ClientPlan]
    rows: torch.Tensor


# ------------------------------------------------------------------------------- packing


def pack_groups(steps: Sequence[int], cap: int, overhead: float = STEP_OVERHEAD) -> list[list[int]]:
    """Partition clients (given their step counts) into groups trained together.

    Clients are sorted by steps (descending, ties by position) and cut into contiguous runs;
    a run of size s whose longest client has T steps costs T × (⌈s/cap⌉ × overhead + s)
    client-steps (padding included), and the cheapest cut is found by dynamic programming
    over the points where the step count changes. Runs larger than `cap` are split evenly.
    Returns lists of indices into `steps`; deterministic.
    """
    order = sorted((i for i in range(len(steps)) if steps[i] > 0), key=lambda i: (-steps[i], i))
    if not order:
        return []
    cuts = [0] + [k for k in range(1, len(order)) if steps[order[k]] != steps[order[k - 1]]] + [len(order)]
    best = [0.0] + [math.inf] * (len(cuts) - 1)
    back = [0] * len(cuts)
    for j in range(1, len(cuts)):
        for i in range(j):
            size = cuts[j] - cuts[i]
            cost = best[i] + steps[order[cuts[i]]] * (math.ceil(size / cap) * overhead + size)
            if cost < best[j]:
                best[j], back[j] = cost, i
    runs = []
    j = len(cuts) - 1
    while j > 0:
        runs.append((cuts[back[j]], cuts[j]))
        j = back[j]
    groups: list[list[int]] = []
    for start, stop in reversed(runs):
        pieces = math.ceil((stop - start) / cap)
        bounds = [start + (stop - start) * k // pieces for k in range(pieces + 1)]
        groups.extend(order[a:b] for a, b in zip(bounds, bounds[1:], strict=False))
    return groups


# ------------------------------------------------------------------------------- trainer


class _VectorTrainer:
    def __init__(self, app: App, model: nn.Module, memory_budget_bytes: int) -> None:
        self.app = app
        self.model = model
        self.model.train()
        train, _ = app.load_dataset()
        assert isinstance(train, TensorDataset)
        self.inputs, self.targets = train.tensors[0], train.tensors[1]
        self.names = [name for name, _ in model.named_parameters()]
        self.budget = memory_budget_bytes
        self.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.sample_bytes = self.inputs[:1].numel() * self.inputs.element_size()
        self.activation_bytes_per_sample = _saved_bytes_per_sample(model, self.inputs[:8], self.targets[:8])
        self._draw = EpochOrders()
        self._steps: dict[float, StepFn] = {}

    # -- planning

    def plan_round(
        self, config: SimulationConfig, number: int, clients: Sequence[int], batch_size: int, epochs: int
    ) -> RoundPlan:
        """Each client's data and its shuffled batch order this round, as `loader(train,
        batch_size, shuffle=True, seed=client_seed(...))` iterated `epochs` times would give it.
        Runs once per client and round, so it is kept to a few tensor ops per client."""
        plans: list[ClientPlan] = []
        pieces: list[torch.Tensor] = []
        start = 0
        for client in clients:
            rows = self.app.partition_rows(client, config.clients, config.partition, config.seed)[0]
            count = rows.shape[0]
            seed = client_seed(config.seed, number, client)
            if count == 0:  # raises exactly as inprocess does on empty data
                loader(
                    self.app.partition(client, config.clients, config.partition, config.seed)[0], batch_size, True, seed
                )
            pieces.extend(rows.take(positions) for positions in self._orders(count, batch_size, seed, epochs))
            plans.append(ClientPlan(client, count, epochs, batch_size, start))
            start += count * max(epochs, 0)
        return RoundPlan(plans, torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long))

    def _orders(self, count: int, batch_size: int, seed: int, epochs: int) -> Sequence[torch.Tensor]:
        """The client's shuffled positions, one tensor per epoch."""
        if epochs < 1:
            return []
        if not fast_orders_valid():  # a torch release changed DataLoader's draws: iterate the real one
            return loader_orders(count, batch_size, seed, epochs).unbind(0)
        return self._draw(count, seed, epochs)

    # -- training

    def group_cap(self, batch_size: int, momentum: float) -> int:
        state = self.param_bytes * (4 if momentum else 3)  # weights, gradients, update temporaries, momentum
        batch = batch_size * (self.sample_bytes + 3 * self.activation_bytes_per_sample + 64)
        return max(1, self.budget // max(1, state + batch))

    def train_groups(
        self, plan: RoundPlan, weights: Mapping[str, torch.Tensor], client_config: Mapping[str, Any]
    ) -> Iterator[tuple[list[int], Params, list[dict[str, float]]]]:
        """Train every planned client from `weights`, a group at a time: (indices into
        `plan.clients`, their parameters stacked along a leading client axis, their metrics)."""
        plans = plan.clients
        lr = float(client_config.get("lr", 0.05))
        momentum = float(client_config.get("momentum", 0.0))
        mu = float(client_config.get("proximal_mu", 0.0))
        if mu not in self._steps:
            self._steps[mu] = _make_step(self.model, mu)
        step = self._steps[mu]
        self.model.train()
        anchors = {name: weights[name].detach() for name in self.names}
        idle = [i for i, plan in enumerate(plans) if plan.steps == 0]
        if idle:  # local_epochs < 1: train_epochs returns the weights untouched
            stacked = {n: weights[n].unsqueeze(0).expand(len(idle), *weights[n].shape).clone() for n in self.names}
            yield idle, stacked, [{"train_loss": math.nan} for _ in idle]
        batch_size = plans[0].batch_size if plans else 1
        cap = self.group_cap(batch_size, momentum)
        for group in pack_groups([p.steps for p in plans], cap):
            members = [plans[i] for i in group]
            params, losses = self._train_group(members, plan.rows, anchors, step, lr, momentum)
            yield group, params, [{"train_loss": loss} for loss in losses]

    def _train_group(
        self,
        members: list[ClientPlan],
        round_rows: torch.Tensor,
        anchors: Params,
        step: StepFn,
        lr: float,
        momentum: float,
    ) -> tuple[Params, list[float]]:
        size = len(members)
        rows, weight, last_epoch = _group_layout(members, round_rows)
        longest = rows.shape[0]
        counts = weight.sum(dim=2)  # [longest, size] real samples per step
        active = counts > 0
        full = active.all(dim=1).tolist()
        # the last epoch's loss is what train_epochs reports: weight each step's mean by its count
        last_epoch = last_epoch.double() * counts.double()
        counts.clamp_(min=1.0)

        params = {n: anchors[n].unsqueeze(0).expand(size, *anchors[n].shape).clone() for n in self.names}
        buffers = {n: torch.zeros_like(p) for n, p in params.items()} if momentum else {}
        step_losses = []
        with torch.no_grad():
            for t in range(longest):
                index = rows[t]
                grads, loss = step(params, self.inputs[index], self.targets[index], weight[t], counts[t], anchors)
                step_losses.append(loss)
                keep = None if full[t] else active[t]
                for n in self.names:
                    g = grads[n]
                    if momentum:
                        buf = buffers[n]
                        if keep is None:
                            direction = buf.mul_(momentum).add_(g)
                        else:
                            shaped = keep.view(size, *([1] * (g.dim() - 1)))
                            buf.copy_(torch.where(shaped, buf * momentum + g, buf))
                            direction = buf
                    else:
                        direction = g
                    if keep is None:
                        params[n].add_(direction, alpha=-lr)
                    else:
                        shaped = keep.view(size, *([1] * (g.dim() - 1)))
                        params[n].copy_(torch.where(shaped, params[n] - lr * direction, params[n]))
        loss_sums = (torch.stack(step_losses).double() * last_epoch).sum(dim=0)
        examples = torch.tensor([m.examples for m in members], dtype=torch.float64)
        return params, (loss_sums / examples).tolist()


def _group_layout(members: Sequence[ClientPlan], flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each of a group's clients reads its samples, step by step, built in a few tensor ops
    for the whole group (a loop over clients here cost more than the training it set up).

    Returns `rows` [longest, size, batch] (base-dataset rows), `weight` [longest, size, batch]
    (1 for a real sample, 0 for padding) and `last_epoch` [longest, size] (the steps of each
    client's last epoch). Client j's step t, slot b holds sample (t mod per_epoch_j) × batch + b
    of its epoch ⌊t / per_epoch_j⌋; slots past its data (a partial last batch) or steps past its
    last one are padding, filled with the client's first row (any real row: its weight is 0).
    """
    batch = members[0].batch_size
    examples = torch.tensor([m.examples for m in members]).view(1, -1, 1)
    per_epoch = torch.tensor([m.batches_per_epoch for m in members]).view(1, -1, 1)
    steps = torch.tensor([m.steps for m in members]).view(1, -1, 1)
    starts = torch.tensor([m.start for m in members]).view(1, -1, 1)  # where each client's rows begin in `flat`
    t = torch.arange(int(steps.max())).view(-1, 1, 1)
    epoch, slot = t // per_epoch, (t % per_epoch) * batch + torch.arange(batch).view(1, 1, -1)
    real = (t < steps) & (slot < examples)
    rows = flat[torch.where(real, starts + epoch * examples + slot, starts)]
    last_epoch = ((t >= steps - per_epoch) & (t < steps))[:, :, 0]
    return rows, real.to(torch.float32), last_epoch


def keep_freed_blocks(largest: int = 31 << 20) -> None:
    """Have glibc's malloc keep freed blocks of up to `largest` bytes for reuse.

    glibc serves each block above its mmap threshold (128 KiB at first) with a fresh mapping and
    unmaps it when freed, so a step's multi-MB stacked tensors are page-faulted in anew every
    step until a freed mapped block raises that threshold on its own, a round or two in (W1:
    ~1,300 faults, about 1 ms, in each of its first four steps). Allocating and freeing one
    untouched block of `largest` bytes (at most glibc's 32 MiB cap) raises it now. Other
    allocators ignore this; no page is touched, so it costs one map and one unmap."""
    block = torch.empty(largest, dtype=torch.uint8)
    del block


def _saved_bytes_per_sample(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes autograd saves for backward per sample (activations), measured on a small batch."""
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(inputs), targets)
    return saved // max(1, len(inputs))


# ----------------------------------------------------------------------------- evaluation


def evaluate_stacked(
    app: App, config: SimulationConfig, model: nn.Module, weights: Mapping[str, torch.Tensor], clients: list[int]
) -> tuple[float, float]:
    """Mean loss and accuracy of the batched federated evaluation."""
    examples, loss_sum, correct = stacked_evaluation_sums(app, config, model, weights, clients)
    return (loss_sum / examples, correct / examples) if examples else (math.nan, math.nan)
