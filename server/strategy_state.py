"""Persisting a strategy's state: JSON values go to the database, tensors (momentum,
adaptive moments) into the round's checkpoint file under a reserved prefix — so model,
strategy tensors and their sha256 are written and committed together."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

STATE_PREFIX = "__strategy__/"


def split_state(state: Mapping[str, object]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-serialisable part, tensor part) of a strategy's `state_dict()`."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return {k: v for k, v in state.items() if k not in tensors}, tensors


def pack(weights: Mapping[str, torch.Tensor], state_tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**weights, **{STATE_PREFIX + k: v for k, v in state_tensors.items()}}


def unpack(stored: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model weights, strategy tensors) of a checkpoint file's contents."""
    weights = {k: v for k, v in stored.items() if not k.startswith(STATE_PREFIX)}
    state = {k[len(STATE_PREFIX) :]: v for k, v in stored.items() if k.startswith(STATE_PREFIX)}
    return weights, state
