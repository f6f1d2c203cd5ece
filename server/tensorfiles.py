"""Safetensors files written as streams, read one tensor at a time.

`safetensors.torch.save` builds the whole file in memory and `load` reads it whole: for a
model of several GiB that is one or two extra model-sized buffers in the daemon. These
helpers write the same format (an 8-byte little-endian header length, a JSON header with
dtype, shape and byte offsets, then the raw little-endian bytes in order) tensor by tensor
— or chunk by chunk, straight from an upload stream — hashing as they go, and read tensors
lazily as memory maps. Files are written under a temporary name, fsynced
and renamed, so a crash never leaves a half-written file under its final name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch

from protos.codec import WIRE_TO_TORCH, CodecError, ModelAssembler, StreamLimits, raw_bytes
from protos.v1 import tensors_pb2 as pb

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def _header(entries: list[tuple[str, torch.dtype, list[int]]], metadata: Mapping[str, str]) -> bytes:
    """The length-prefixed JSON header for tensors stored back to back in `entries` order."""
    table: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        table[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(table, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


class _HashingFile:
    """A file opened for writing that also keeps the sha256 and size of what was written."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        self.file: BinaryIO = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish/abort
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.size += len(data)

    def finish(self) -> tuple[str, int]:
        """fsync, rename into place (atomically), fsync the directory; (sha256, size)."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self.sha.hexdigest(), self.size

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX needs the directory itself synced)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, int]:
    """Write `tensors` as a safetensors file without a file-sized buffer; (sha256, size)."""
    out = _HashingFile(path)
    try:
        out.write(_header([(n, t.dtype, list(t.shape)) for n, t in tensors.items()], metadata))
        for tensor in tensors.values():
            out.write(raw_bytes(tensor))  # a view of the tensor's memory when it is contiguous
        return out.finish()
    except BaseException:
        out.abort()
        raise


def sha256_of(path: Path, block: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


class _Entry(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def _read_table(path: Path) -> dict[str, _Entry]:
    """Name → dtype, shape and absolute byte range, from a safetensors file's header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        table = json.loads(f.read(length))
    table.pop("__metadata__", None)
    start = 8 + length
    entries = {}
    for name, info in table.items():
        dtype = TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        entries[name] = _Entry(dtype, tuple(info["shape"]), start + begin, start + end)
    return entries


class LazyTensors(Mapping[str, torch.Tensor]):
    """A safetensors file as a read-only mapping that loads each tensor only when asked.

    Each tensor is a copy-on-write memory map of its bytes in the file: backed by the page
    cache and resident only while it is in use. Folding an update through it
    (`for name, t in lazy.items()`) or streaming the global model from it holds one tensor
    at a time, so the daemon's memory for a model it only reads is its largest tensor.
    (Read with numpy's memmap rather than `safetensors.safe_open(...).get_tensor`, which
    keeps a small Python object alive per call in safetensors 0.8: a slow leak in a daemon
    that reads every tensor of every update.)
    """

    def __init__(self, path: Path, sha256: str = "", entries: dict[str, _Entry] | None = None) -> None:
        self.path, self.sha256 = path, sha256
        self._entries = _read_table(path) if entries is None else entries

    def view(self, keep: Callable[[str], bool]) -> LazyTensors:
        """The same file restricted to the tensors whose names `keep` accepts."""
        return LazyTensors(self.path, self.sha256, {n: e for n, e in self._entries.items() if keep(n)})

    def __getitem__(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        raw = np.memmap(self.path, dtype=np.uint8, mode="c", offset=begin, shape=(end - begin,))
        return torch.from_numpy(raw).view(dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class SpoolAssembler(ModelAssembler):
    """Validates an upload stream exactly like `ModelAssembler` but writes the bytes to a
    safetensors file as they arrive, so an update of any size costs the daemon one chunk of
    memory; `finish()` makes the file durable and returns its lazy view."""

    def __init__(self, header: pb.ModelHeader, limits: StreamLimits, path: Path) -> None:
        super().__init__(header, limits)  # validates the header before anything touches the disk
        self._out = _HashingFile(path)
        try:
            entries = [(s.name, WIRE_TO_TORCH[s.dtype], list(s.shape)) for s in header.tensors]
            if len({name for name, _, _ in entries}) != len(entries):
                raise CodecError("tensor names repeat")
            self._out.write(_header(entries, {}))
        except BaseException:
            self._out.abort()
            raise

    def _store(self, data: bytes) -> None:
        self._out.write(data)

    def finish(self) -> LazyTensors:  # type: ignore[override]
        if not self.complete:
            raise CodecError(f"stream ended early: {self.received_bytes} of {self.total_bytes} bytes received")
        digest, _ = self._out.finish()
        return LazyTensors(self._out.path, digest)

    def abort(self) -> None:
        """Drop the partial file (a stream that failed validation or broke off)."""
        if not self._out.file.closed:
            self._out.abort()
