"""Global-model checkpoints on disk: one safetensors file per committed round.

Files are written to a temporary name, fsynced, then renamed, so a crash never leaves a
half-written checkpoint under a committed name; the sha256 recorded in the database is
checked on every load.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load, save

from server.store import CheckpointRecord


class CheckpointCorrupt(RuntimeError):
    """A checkpoint file is missing or does not match the sha256 recorded for it."""


class CheckpointStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def relative_path(self, run_id: str, number: int) -> str:
        return f"runs/{run_id}/round-{number:05d}.safetensors"

    def save(self, run_id: str, number: int, weights: Mapping[str, torch.Tensor]) -> CheckpointRecord:
        rel = self.relative_path(run_id, number)
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = save({k: v.contiguous() for k, v in weights.items()}, metadata={"run_id": run_id, "round": str(number)})
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return CheckpointRecord(run_id, number, rel, hashlib.sha256(data).hexdigest(), len(data))

    def load(self, record: CheckpointRecord) -> dict[str, torch.Tensor]:
        path = self.root / record.path
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise CheckpointCorrupt(f"checkpoint {path} is missing") from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != record.sha256:
            raise CheckpointCorrupt(f"checkpoint {path} has sha256 {digest}, expected {record.sha256}")
        return load(data)
