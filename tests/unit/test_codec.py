"""Tensor codec: exact round trips and every way a model stream can break the contract."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import codec
from protos.codec import (
    CodecError,
    ModelAssembler,
    StreamLimits,
    assemble,
    check_same_specs,
    iter_model_chunks,
    iter_tensor_data,
    model_header,
    non_finite_tensors,
    validate_header,
)
from protos.v1 import tensors_pb2 as pb

ALL_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]
CHUNK_SIZES = [1, 3, 7, 1 << 20]


def make_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).to(torch.bool)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


def raw(t: torch.Tensor) -> bytes:
    """Exact bytes of a tensor (bit-for-bit comparison, NaN payloads and -0.0 included)."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def assert_same_model(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert tuple(g.shape) == tuple(w.shape), name
        assert raw(g) == raw(w), name


def round_trip(weights: dict[str, torch.Tensor], chunk_bytes: int) -> dict[str, torch.Tensor]:
    return assemble(iter_model_chunks(weights, chunk_bytes))


def spec(name: str, dtype: int = pb.FLOAT32, shape: list[int] | None = None) -> pb.TensorSpec:
    # `dtype` may be a value outside the enum (e.g. 99): proto3 enums are open on the wire.
    wire = cast("pb.DType.ValueType", dtype)
    return pb.TensorSpec(name=name, dtype=wire, shape=[2] if shape is None else shape)


def header_of(*specs: pb.TensorSpec, total_bytes: int) -> pb.ModelHeader:
    return pb.ModelHeader(tensors=list(specs), total_bytes=total_bytes)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("chunk_bytes", CHUNK_SIZES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_round_trip_each_dtype(dtype: torch.dtype, chunk_bytes: int) -> None:
    weights = {
        "matrix": make_tensor((3, 5), dtype, seed=1),
        "scalar": make_tensor((), dtype, seed=2),
        "empty": make_tensor((0, 4), dtype, seed=3),
        "vector": make_tensor((11,), dtype, seed=4),
    }
    assert_same_model(round_trip(weights, chunk_bytes), weights)


@pytest.mark.parametrize("chunk_bytes", CHUNK_SIZES)
def test_round_trip_mixed_dtypes_in_one_model(chunk_bytes: int) -> None:
    weights = {f"t{i}": make_tensor((2, i + 1), d, seed=i) for i, d in enumerate(ALL_DTYPES)}
    assert_same_model(round_trip(weights, chunk_bytes), weights)


def test_chunks_are_bounded_and_cover_each_tensor_in_order() -> None:
    weights = {"a": torch.arange(5, dtype=torch.float32), "b": torch.arange(3, dtype=torch.int16)}
    chunks = list(iter_model_chunks(weights, chunk_bytes=7))
    assert chunks[0].HasField("header")
    header = chunks[0].header
    assert header.total_bytes == 5 * 4 + 3 * 2
    assert [(s.name, s.dtype, list(s.shape)) for s in header.tensors] == [
        ("a", pb.FLOAT32, [5]),
        ("b", pb.INT16, [3]),
    ]
    layout = [(c.data.tensor_index, c.data.offset, len(c.data.data)) for c in chunks[1:]]
    # 20 bytes in 7-byte slices, then 6 bytes in one slice.
    assert layout == [(0, 0, 7), (0, 7, 7), (0, 14, 6), (1, 0, 6)]


def test_scalar_header_has_empty_shape_and_one_element() -> None:
    header = model_header({"s": torch.tensor(2.5, dtype=torch.float64)})
    assert list(header.tensors[0].shape) == []
    assert header.total_bytes == 8
    out = round_trip({"s": torch.tensor(2.5, dtype=torch.float64)}, 3)
    assert out["s"].shape == () and out["s"].item() == 2.5


def test_empty_tensors_send_no_data_chunks() -> None:
    weights = {"e1": torch.empty(0), "e2": torch.empty(3, 0, dtype=torch.int64)}
    chunks = list(iter_model_chunks(weights, 1))
    assert len(chunks) == 1 and chunks[0].header.total_bytes == 0
    assert_same_model(assemble(chunks), weights)


def test_empty_tensor_between_full_ones() -> None:
    weights = {
        "a": torch.tensor([1, 2], dtype=torch.int8),
        "e": torch.empty(0, dtype=torch.float32),
        "b": torch.tensor([3.0], dtype=torch.float16),
    }
    assert_same_model(round_trip(weights, 1), weights)


def test_model_with_no_tensors() -> None:
    assert assemble(iter_model_chunks({}, 4)) == {}


def test_special_float_values_survive_bit_for_bit() -> None:
    values = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-45, 3.4e38]
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        weights = {"x": torch.tensor(values, dtype=torch.float32).to(dtype)}
        assert_same_model(round_trip(weights, 3), weights)


def test_non_contiguous_and_grad_tensors_are_sent_by_value() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    weights = {
        "transposed": base.t(),
        "sliced": base[1:3, ::2],
        "grad": torch.ones(3, requires_grad=True),
    }
    out = round_trip(weights, 5)
    for name, tensor in weights.items():
        assert torch.equal(out[name], tensor.detach()), name
        assert out[name].shape == tensor.shape


def test_assembled_tensors_are_independent_and_writable() -> None:
    weights = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0])}
    out = round_trip(weights, 3)
    out["a"].add_(10)
    assert out["a"].tolist() == [11.0, 12.0]
    assert out["b"].tolist() == [3.0, 4.0]
    assert weights["a"].tolist() == [1.0, 2.0]


def test_iter_tensor_data_rejects_non_positive_chunk_size() -> None:
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        list(iter_tensor_data({"a": torch.zeros(2)}, 0))


def test_unsupported_dtype_is_refused_when_building_the_header() -> None:
    with pytest.raises(CodecError, match="tensor 'c' has unsupported dtype torch.complex64"):
        model_header({"c": torch.zeros(2, dtype=torch.complex64)})


def test_assembler_progress_counters() -> None:
    weights = {"a": torch.arange(4, dtype=torch.int32)}
    chunks = list(iter_model_chunks(weights, 6))
    asm = ModelAssembler(chunks[0].header)
    assert (asm.received_bytes, asm.total_bytes, asm.complete) == (0, 16, False)
    asm.add(chunks[1].data)
    assert (asm.received_bytes, asm.complete) == (6, False)
    for c in chunks[2:]:
        asm.add(c.data)
    assert (asm.received_bytes, asm.complete) == (16, True)
    assert asm.finish()["a"].tolist() == [0, 1, 2, 3]


shapes = st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=4).map(tuple)
models = st.lists(
    st.tuples(shapes, st.sampled_from(ALL_DTYPES), st.integers(0, 2**31 - 1)),
    min_size=0,
    max_size=4,
)
chunk_sizes = st.one_of(st.integers(min_value=1, max_value=64), st.sampled_from(CHUNK_SIZES))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(model=models, chunk_bytes=chunk_sizes)
def test_round_trip_random_models(model: list[tuple[tuple[int, ...], torch.dtype, int]], chunk_bytes: int) -> None:
    weights = {f"layer{i}.w": make_tensor(s, d, seed) for i, (s, d, seed) in enumerate(model)}
    chunks = list(iter_model_chunks(weights, chunk_bytes))
    assert all(len(c.data.data) <= chunk_bytes for c in chunks[1:])
    assert sum(len(c.data.data) for c in chunks[1:]) == chunks[0].header.total_bytes
    assert_same_model(assemble(chunks), weights)


# --------------------------------------------------------------------------- header errors


def test_header_total_bytes_mismatch() -> None:
    header = model_header({"a": torch.zeros(4)})
    header.total_bytes = 17
    with pytest.raises(CodecError, match=r"header says 17 bytes but its tensors need 16"):
        validate_header(header, StreamLimits())
    with pytest.raises(CodecError, match=r"header says 17 bytes"):
        ModelAssembler(header)


def test_duplicate_names() -> None:
    header = header_of(spec("w"), spec("w"), total_bytes=16)
    with pytest.raises(CodecError, match=r"tensor 'w' appears twice"):
        ModelAssembler(header)


def test_unknown_dtype_enum_value() -> None:
    header = header_of(spec("w", dtype=99), total_bytes=8)
    with pytest.raises(CodecError, match=r"tensor 'w' has unsupported dtype <unknown 99>"):
        ModelAssembler(header)


def test_unspecified_dtype() -> None:
    header = header_of(spec("w", dtype=pb.DTYPE_UNSPECIFIED), total_bytes=8)
    with pytest.raises(CodecError, match=r"tensor 'w' has unsupported dtype DTYPE_UNSPECIFIED"):
        ModelAssembler(header)


def test_negative_dimension() -> None:
    header = header_of(spec("w", shape=[2, -3]), total_bytes=0)
    with pytest.raises(CodecError, match=r"tensor 'w' has a negative dimension \[2, -3\]"):
        ModelAssembler(header)


def test_rank_over_limit() -> None:
    header = header_of(spec("w", shape=[1] * 9), total_bytes=4)
    with pytest.raises(CodecError, match=r"tensor 'w' has rank 9 > 8"):
        ModelAssembler(header)
    small = StreamLimits(max_rank=2)
    with pytest.raises(CodecError, match=r"tensor 'w' has rank 3 > 2"):
        ModelAssembler(header_of(spec("w", shape=[1, 1, 1]), total_bytes=4), small)
    # exactly at the limit is fine
    ModelAssembler(header_of(spec("w", shape=[1, 1]), total_bytes=4), small)


def test_too_many_tensors() -> None:
    header = model_header({n: torch.zeros(1) for n in "abc"})
    with pytest.raises(CodecError, match=r"3 tensors exceed the limit of 2"):
        ModelAssembler(header, StreamLimits(max_tensors=2))
    ModelAssembler(header, StreamLimits(max_tensors=3))


def test_bad_names() -> None:
    with pytest.raises(CodecError, match=r"tensor name must be 1\.\.256 characters"):
        ModelAssembler(header_of(spec(""), total_bytes=8))
    with pytest.raises(CodecError, match=r"tensor name must be 1\.\.4 characters"):
        ModelAssembler(header_of(spec("abcde"), total_bytes=8), StreamLimits(max_name_length=4))
    ModelAssembler(header_of(spec("abcd"), total_bytes=8), StreamLimits(max_name_length=4))


def test_model_over_size_limit_is_refused_at_the_header_before_any_data() -> None:
    weights = {"a": torch.zeros(2), "b": torch.zeros(2)}  # 16 bytes
    pulled: list[pb.ModelChunk] = []

    def stream() -> Iterator[pb.ModelChunk]:
        for chunk in iter_model_chunks(weights, 1):
            pulled.append(chunk)
            yield chunk

    with pytest.raises(CodecError, match=r"model exceeds the size limit of 15 bytes"):
        assemble(stream(), StreamLimits(max_total_bytes=15))
    assert len(pulled) == 1 and pulled[0].HasField("header")
    # exactly at the limit is accepted
    assert_same_model(assemble(iter_model_chunks(weights, 1), StreamLimits(max_total_bytes=16)), weights)


def test_huge_announced_tensor_is_refused_without_allocating() -> None:
    # 2**40 float64 elements = 8 TiB; refused from the header alone (the default limit is 4 GiB).
    header = header_of(spec("big", dtype=pb.FLOAT64, shape=[1 << 20, 1 << 20]), total_bytes=8 << 40)
    with pytest.raises(CodecError, match=r"model exceeds the size limit of 4294967296 bytes"):
        ModelAssembler(header)


# --------------------------------------------------------------------------- data errors


def chunks_of(weights: dict[str, torch.Tensor], chunk_bytes: int) -> list[pb.ModelChunk]:
    return list(iter_model_chunks(weights, chunk_bytes))


TWO = {
    "a": torch.arange(4, dtype=torch.float32),
    "b": torch.arange(2, dtype=torch.int64),
}  # 16 + 16


def test_out_of_order_chunk() -> None:
    chunks = chunks_of(TWO, 3)
    with pytest.raises(CodecError, match=r"out-of-order chunk: expected tensor 0 offset 0, got tensor 0 offset 3"):
        assemble([chunks[0], *chunks[2:]])


def test_chunk_for_the_wrong_tensor() -> None:
    header, *data = chunks_of(TWO, 16)
    assert [d.data.tensor_index for d in data] == [0, 1]
    with pytest.raises(CodecError, match=r"out-of-order chunk: expected tensor 0 offset 0, got tensor 1 offset 0"):
        assemble([header, data[1], data[0]])


def test_repeated_chunk() -> None:
    chunks = chunks_of(TWO, 3)
    with pytest.raises(CodecError, match=r"out-of-order chunk: expected tensor 0 offset 3, got tensor 0 offset 0"):
        assemble([chunks[0], chunks[1], chunks[1], *chunks[2:]])


def test_chunk_overflowing_its_tensor() -> None:
    header = model_header(TWO)
    asm = ModelAssembler(header)
    with pytest.raises(CodecError, match=r"tensor 'a' overflows its 16 bytes"):
        asm.add(pb.TensorData(tensor_index=0, offset=0, data=bytes(17)))
    asm2 = ModelAssembler(header)
    asm2.add(pb.TensorData(tensor_index=0, offset=0, data=bytes(10)))
    with pytest.raises(CodecError, match=r"tensor 'a' overflows its 16 bytes"):
        asm2.add(pb.TensorData(tensor_index=0, offset=10, data=bytes(7)))


def test_empty_and_oversized_data_chunks() -> None:
    asm = ModelAssembler(model_header(TWO), StreamLimits(max_chunk_bytes=8))
    with pytest.raises(CodecError, match=r"chunk must carry 1\.\.8 bytes"):
        asm.add(pb.TensorData(tensor_index=0, offset=0, data=b""))
    with pytest.raises(CodecError, match=r"chunk must carry 1\.\.8 bytes"):
        asm.add(pb.TensorData(tensor_index=0, offset=0, data=bytes(9)))
    asm.add(pb.TensorData(tensor_index=0, offset=0, data=bytes(8)))
    assert asm.received_bytes == 8


def test_data_after_the_end() -> None:
    chunks = chunks_of(TWO, 16)
    extra = pb.ModelChunk(data=pb.TensorData(tensor_index=2, offset=0, data=b"x"))
    with pytest.raises(CodecError, match=r"data after the last tensor was complete"):
        assemble([*chunks, extra])
    with pytest.raises(CodecError, match=r"data after the last tensor was complete"):
        assemble([*chunks, chunks[-1]])


def test_data_for_a_model_with_only_empty_tensors() -> None:
    header = model_header({"e": torch.empty(0)})
    with pytest.raises(CodecError, match=r"data after the last tensor was complete"):
        ModelAssembler(header).add(pb.TensorData(tensor_index=0, offset=0, data=b"x"))


def test_stream_ending_early() -> None:
    chunks = chunks_of(TWO, 3)
    asm = ModelAssembler(chunks[0].header)
    asm.add(chunks[1].data)
    assert not asm.complete
    with pytest.raises(CodecError, match=r"stream ended early: 3 of 32 bytes received"):
        asm.finish()
    with pytest.raises(CodecError, match=r"stream ended early: 0 of 32 bytes received"):
        ModelAssembler(chunks[0].header).finish()
    with pytest.raises(CodecError, match=r"stream ended early: 31 of 32 bytes received"):
        assemble(chunks[:-1])  # b is 16 bytes: 3+3+3+3+3+1, the last slice is 1 byte


def test_data_before_header() -> None:
    chunks = chunks_of(TWO, 16)
    with pytest.raises(CodecError, match=r"model data before the header"):
        assemble([chunks[1], chunks[0], *chunks[2:]])


def test_second_header() -> None:
    chunks = chunks_of(TWO, 16)
    with pytest.raises(CodecError, match=r"second header in one model stream"):
        assemble([chunks[0], chunks[1], chunks[0], chunks[2]])


def test_empty_stream() -> None:
    with pytest.raises(CodecError, match=r"empty model stream"):
        assemble([])


def test_chunk_with_neither_header_nor_data() -> None:
    chunks = chunks_of(TWO, 16)
    with pytest.raises(CodecError, match=r"empty model chunk"):
        assemble([chunks[0], pb.ModelChunk(), *chunks[1:]])


def test_codec_error_is_a_value_error() -> None:
    assert issubclass(CodecError, ValueError)


# --------------------------------------------------------------------------- spec checks


GLOBAL = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}


def test_check_same_specs_accepts_identical_specs_in_any_order() -> None:
    check_same_specs(model_header(GLOBAL), model_header(GLOBAL))
    check_same_specs(model_header({"b": GLOBAL["b"], "w": GLOBAL["w"]}), model_header(GLOBAL))


def test_check_same_specs_wrong_name() -> None:
    update = {"w": torch.zeros(2, 3), "c": torch.zeros(3)}
    with pytest.raises(
        CodecError,
        match=r"tensor names differ from the global model: missing \['b'\], unexpected \['c'\]",
    ):
        check_same_specs(model_header(update), model_header(GLOBAL))
    with pytest.raises(CodecError, match=r"missing \['b'\], unexpected \[\]"):
        check_same_specs(model_header({"w": GLOBAL["w"]}), model_header(GLOBAL))


def test_check_same_specs_wrong_dtype() -> None:
    update = {"w": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(3)}
    with pytest.raises(CodecError, match=r"tensor 'w' has dtype FLOAT64, the global model has FLOAT32"):
        check_same_specs(model_header(update), model_header(GLOBAL))


def test_check_same_specs_wrong_shape() -> None:
    update = {"w": torch.zeros(3, 2), "b": torch.zeros(3)}
    with pytest.raises(CodecError, match=r"tensor 'w' has shape \[3, 2\], the global model has \[2, 3\]"):
        check_same_specs(model_header(update), model_header(GLOBAL))
    # same element count, different rank
    update = {"w": torch.zeros(6), "b": torch.zeros(3)}
    with pytest.raises(CodecError, match=r"tensor 'w' has shape \[6\], the global model has \[2, 3\]"):
        check_same_specs(model_header(update), model_header(GLOBAL))


# --------------------------------------------------------------------------- non-finite


def test_non_finite_tensors() -> None:
    nan, inf = float("nan"), float("inf")
    weights = {
        "finite": torch.tensor([1.0, -2.0]),
        "has_nan": torch.tensor([1.0, nan]),
        "ints": torch.tensor([1, 2], dtype=torch.int64),
        "has_neg_inf": torch.tensor([[0.0], [-inf]], dtype=torch.float64),
        "bool": torch.tensor([True]),
        "empty": torch.empty(0),
        "half_inf": torch.tensor([inf], dtype=torch.float16),
        "bf16_nan": torch.tensor(nan, dtype=torch.bfloat16),
        "uint8": torch.tensor([255], dtype=torch.uint8),
    }
    assert non_finite_tensors(weights) == ["has_nan", "has_neg_inf", "half_inf", "bf16_nan"]
    assert non_finite_tensors({"a": torch.zeros(3), "i": torch.zeros(3, dtype=torch.int32)}) == []


def test_float16_overflow_is_non_finite() -> None:
    # 70000 does not fit float16: a cast produces inf, which must be caught.
    assert non_finite_tensors({"x": torch.tensor([70000.0]).half()}) == ["x"]


def test_wire_dtype_table_is_a_bijection() -> None:
    assert len(codec.WIRE_TO_TORCH) == len(codec.TORCH_TO_WIRE) == 10
    assert set(codec.TORCH_TO_WIRE.values()) == set(pb.DType.values()) - {pb.DTYPE_UNSPECIFIED}


def test_a_stalled_sender_holds_memory_only_for_the_bytes_it_sent() -> None:
    """A header may declare 1 GiB; one byte later the receiver must not have allocated it."""
    import tracemalloc

    header = pb.ModelHeader(tensors=[pb.TensorSpec(name="w", dtype=pb.FLOAT32, shape=[2**28])], total_bytes=2**30)
    tracemalloc.start()
    assembler = ModelAssembler(header, StreamLimits())
    assembler.add(pb.TensorData(tensor_index=0, offset=0, data=b"x"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20
    assert assembler.received_bytes == 1 and not assembler.complete
