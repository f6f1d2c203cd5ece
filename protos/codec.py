"""Tensors ⇄ chunks of raw bytes, with explicit name, dtype and shape. No pickle.

A model stream is one `ModelHeader` (every tensor's spec and the total byte count)
followed by `TensorData` chunks carrying each tensor's little-endian bytes in order.
`ModelAssembler` is the receiving half: it checks every chunk against the header and
against `StreamLimits`, so a hostile or broken sender costs one `CodecError`, never
unbounded memory.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from protos.v1 import tensors_pb2 as pb

if sys.byteorder != "little":  # pragma: no cover - all supported hosts are little-endian
    raise ImportError("the Lepton FL tensor codec needs a little-endian host")

Weights = dict[str, torch.Tensor]

TORCH_TO_WIRE: dict[torch.dtype, int] = {
    torch.float32: pb.FLOAT32,
    torch.float64: pb.FLOAT64,
    torch.float16: pb.FLOAT16,
    torch.bfloat16: pb.BFLOAT16,
    torch.int64: pb.INT64,
    torch.int32: pb.INT32,
    torch.int16: pb.INT16,
    torch.int8: pb.INT8,
    torch.uint8: pb.UINT8,
    torch.bool: pb.BOOL,
}
WIRE_TO_TORCH: dict[int, torch.dtype] = {v: k for k, v in TORCH_TO_WIRE.items()}
DEFAULT_CHUNK_BYTES = 1 << 20


class CodecError(ValueError):
    """A model stream that does not follow the contract (message says exactly how)."""


@dataclass(frozen=True)
class StreamLimits:
    """Bounds a receiver enforces on a model stream before allocating anything."""

    max_total_bytes: int = 4 << 30
    max_tensors: int = 10_000
    max_rank: int = 8
    max_name_length: int = 256
    max_chunk_bytes: int = 8 << 20
    max_elements: int = 1 << 40


def dtype_name(wire_dtype: int) -> str:
    if wire_dtype not in pb.DType.values():
        return f"<unknown {wire_dtype}>"
    return pb.DType.Name(pb.DType.ValueType(wire_dtype))


def spec_of(name: str, tensor: torch.Tensor) -> pb.TensorSpec:
    if tensor.dtype not in TORCH_TO_WIRE:
        raise CodecError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
    return pb.TensorSpec(name=name, dtype=pb.DType.ValueType(TORCH_TO_WIRE[tensor.dtype]), shape=list(tensor.shape))


def spec_nbytes(spec: pb.TensorSpec) -> int:
    itemsize = torch.empty((), dtype=WIRE_TO_TORCH[spec.dtype]).element_size()
    return math.prod(spec.shape) * itemsize


def model_header(weights: Mapping[str, torch.Tensor]) -> pb.ModelHeader:
    specs = [spec_of(name, t) for name, t in weights.items()]
    return pb.ModelHeader(tensors=specs, total_bytes=sum(spec_nbytes(s) for s in specs))


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


def iter_tensor_data(
    weights: Mapping[str, torch.Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.TensorData]:
    """Yield each tensor's bytes in slices of at most `chunk_bytes`; one copy per chunk only."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    for index, tensor in enumerate(weights.values()):
        raw = raw_bytes(tensor)
        for offset in range(0, len(raw), chunk_bytes):
            yield pb.TensorData(tensor_index=index, offset=offset, data=bytes(raw[offset : offset + chunk_bytes]))


def iter_model_chunks(
    weights: Mapping[str, torch.Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.ModelChunk]:
    yield pb.ModelChunk(header=model_header(weights))
    for data in iter_tensor_data(weights, chunk_bytes):
        yield pb.ModelChunk(data=data)


def validate_header(header: pb.ModelHeader, limits: StreamLimits) -> None:
    """Refuse a header that is malformed or announces more than `limits` allow."""
    if len(header.tensors) > limits.max_tensors:
        raise CodecError(f"{len(header.tensors)} tensors exceed the limit of {limits.max_tensors}")
    names: set[str] = set()
    total = 0
    for spec in header.tensors:
        if not spec.name or len(spec.name) > limits.max_name_length:
            raise CodecError(f"tensor name must be 1..{limits.max_name_length} characters")
        if spec.name in names:
            raise CodecError(f"tensor {spec.name!r} appears twice")
        names.add(spec.name)
        if spec.dtype not in WIRE_TO_TORCH:
            raise CodecError(f"tensor {spec.name!r} has unsupported dtype {dtype_name(spec.dtype)}")
        if len(spec.shape) > limits.max_rank:
            raise CodecError(f"tensor {spec.name!r} has rank {len(spec.shape)} > {limits.max_rank}")
        if any(d < 0 for d in spec.shape):
            raise CodecError(f"tensor {spec.name!r} has a negative dimension {list(spec.shape)}")
        # Even an empty tensor must have strides that fit: bound the product of its non-zero dims.
        if math.prod(d for d in spec.shape if d) > limits.max_elements:
            raise CodecError(
                f"tensor {spec.name!r} has shape {list(spec.shape)}, beyond {limits.max_elements} elements"
            )
        total += spec_nbytes(spec)
        if total > limits.max_total_bytes:
            raise CodecError(f"model exceeds the size limit of {limits.max_total_bytes} bytes")
    if total != header.total_bytes:
        raise CodecError(f"header says {header.total_bytes} bytes but its tensors need {total}")


def check_same_specs(header: pb.ModelHeader, expected: pb.ModelHeader) -> None:
    """Refuse an update whose tensor names, dtypes or shapes differ from the global model."""
    got = {s.name: s for s in header.tensors}
    want = {s.name: s for s in expected.tensors}
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    if missing or extra:
        raise CodecError(f"tensor names differ from the global model: missing {missing}, unexpected {extra}")
    for name, w in want.items():
        g = got[name]
        if g.dtype != w.dtype:
            raise CodecError(
                f"tensor {name!r} has dtype {dtype_name(g.dtype)}, the global model has {dtype_name(w.dtype)}"
            )
        if list(g.shape) != list(w.shape):
            raise CodecError(f"tensor {name!r} has shape {list(g.shape)}, the global model has {list(w.shape)}")


class ModelAssembler:
    """Rebuilds a model from a header and in-order chunks, checking each as it arrives."""

    def __init__(self, header: pb.ModelHeader, limits: StreamLimits = StreamLimits()) -> None:
        validate_header(header, limits)
        self._specs = list(header.tensors)
        self._sizes = [spec_nbytes(s) for s in self._specs]
        self._limits = limits
        self._buffers: list[bytearray] = []
        self._index = 0
        self._offset = 0
        self.received_bytes = 0
        self.total_bytes = header.total_bytes
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._index < len(self._specs) and self._offset == self._sizes[self._index]:
            if len(self._buffers) == self._index:
                self._buffers.append(bytearray(0))
            self._index += 1
            self._offset = 0

    def add(self, chunk: pb.TensorData) -> None:
        if self._index >= len(self._specs):
            raise CodecError("data after the last tensor was complete")
        if len(chunk.data) == 0 or len(chunk.data) > self._limits.max_chunk_bytes:
            raise CodecError(f"chunk must carry 1..{self._limits.max_chunk_bytes} bytes")
        if chunk.tensor_index != self._index or chunk.offset != self._offset:
            raise CodecError(
                f"out-of-order chunk: expected tensor {self._index} offset {self._offset}, "
                f"got tensor {chunk.tensor_index} offset {chunk.offset}"
            )
        size = self._sizes[self._index]
        if self._offset + len(chunk.data) > size:
            raise CodecError(f"tensor {self._specs[self._index].name!r} overflows its {size} bytes")
        self._store(chunk.data)
        self._offset += len(chunk.data)
        self.received_bytes += len(chunk.data)
        self._skip_empty()

    def _store(self, data: bytes) -> None:
        """Keep the validated bytes of the current tensor (subclasses may write them elsewhere)."""
        if len(self._buffers) == self._index:
            # Grown as bytes arrive (chunks are in order), so a sender that declares a huge tensor
            # and stalls holds memory only for what it actually sent.
            self._buffers.append(bytearray())
        self._buffers[self._index] += data

    @property
    def complete(self) -> bool:
        return self._index >= len(self._specs)

    def finish(self) -> Weights:
        if not self.complete:
            raise CodecError(f"stream ended early: {self.received_bytes} of {self.total_bytes} bytes received")
        out: Weights = {}
        for spec, buf in zip(self._specs, self._buffers, strict=True):
            dtype = WIRE_TO_TORCH[spec.dtype]
            flat = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            out[spec.name] = flat.reshape(tuple(spec.shape))
        self._buffers = []
        return out


def assemble(chunks: Iterable[pb.ModelChunk], limits: StreamLimits = StreamLimits()) -> Weights:
    """Collect a whole `ModelChunk` stream (header first) into named tensors."""
    assembler: ModelAssembler | None = None
    for chunk in chunks:
        if chunk.HasField("header"):
            if assembler is not None:
                raise CodecError("second header in one model stream")
            assembler = ModelAssembler(chunk.header, limits)
        elif chunk.HasField("data"):
            if assembler is None:
                raise CodecError("model data before the header")
            assembler.add(chunk.data)
        else:
            raise CodecError("empty model chunk")
    if assembler is None:
        raise CodecError("empty model stream")
    return assembler.finish()


def non_finite_tensors(weights: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN or Inf."""
    return [name for name, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
