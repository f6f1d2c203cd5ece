"""Global-model checkpoints on disk: one safetensors file per committed round — and the
spool of the open round's accepted updates, one file each, until the round commits.

Files are written to a temporary name, fsynced, then renamed, so a crash never leaves a
half-written checkpoint under a committed name; the sha256 recorded in the database is
checked on every load.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from server.store import CheckpointRecord
from server.tensorfiles import LazyTensors, sha256_of, write_tensors


class CheckpointCorrupt(RuntimeError):
    """A checkpoint file is missing or does not match the sha256 recorded for it."""


class CheckpointStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def relative_path(self, run_id: str, number: int) -> str:
        return f"runs/{run_id}/round-{number:05d}.safetensors"

    def save(self, run_id: str, number: int, weights: Mapping[str, torch.Tensor]) -> CheckpointRecord:
        """Stream `weights` to disk (no file-sized buffer), durable before this returns."""
        rel = self.relative_path(run_id, number)
        digest, size = write_tensors(self.root / rel, weights, {"run_id": run_id, "round": str(number)})
        return CheckpointRecord(run_id, number, rel, digest, size)

    def update_path(self, run_id: str, number: int, client_id: str) -> str:
        """A fresh relative path for one upload of `client_id` (unique, so a rejected duplicate
        never overwrites the file of the accepted one)."""
        return f"updates/{run_id}/round-{number:05d}/{client_id}-{secrets.token_hex(4)}.safetensors"

    def discard_updates(self, run_id: str, keep_round: int | None = None) -> None:
        """Delete a run's spooled updates (all but those of `keep_round`, the open round)."""
        base = self.root / "updates" / run_id
        for directory in base.glob("round-*"):
            if keep_round is None or directory.name != f"round-{keep_round:05d}":
                shutil.rmtree(directory, ignore_errors=True)
        if keep_round is None:
            shutil.rmtree(base, ignore_errors=True)

    def load(self, record: CheckpointRecord) -> dict[str, torch.Tensor]:
        """Every tensor of a checkpoint, in memory (sha256 checked)."""
        return {name: tensor.clone() for name, tensor in self.open(record).items()}

    def open(self, record: CheckpointRecord, verify: bool = True) -> LazyTensors:
        """A checkpoint as a lazy, file-backed mapping (sha256 checked unless just written)."""
        path = self.root / record.path
        if verify:
            try:
                digest = sha256_of(path)
            except FileNotFoundError as exc:
                raise CheckpointCorrupt(f"checkpoint {path} is missing") from exc
            if digest != record.sha256:
                raise CheckpointCorrupt(f"checkpoint {path} has sha256 {digest}, expected {record.sha256}")
        return LazyTensors(path, record.sha256)
