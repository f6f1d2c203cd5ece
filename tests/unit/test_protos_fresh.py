"""The committed protobuf/gRPC modules and stubs must match what the `.proto` files generate."""

from __future__ import annotations

from pathlib import Path

from protos.generate import ROOT, generate, generated_files, proto_sources

FIX = "the generated protobuf code is stale: run `make proto` (python -m protos.generate) and commit the result"


def test_committed_generated_files_are_fresh(tmp_path: Path) -> None:
    fresh = {p.name: p for p in generate(tmp_path)}
    committed = {p.name: p for p in generated_files(ROOT)}

    # every .proto yields a module, a gRPC module and both stubs
    expected = {
        f"{src.stem}{suffix}"
        for src in proto_sources()
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
    }
    assert set(fresh) == expected, f"protoc produced {sorted(fresh)}, expected {sorted(expected)}"

    missing, extra = (
        sorted(fresh.keys() - committed.keys()),
        sorted(committed.keys() - fresh.keys()),
    )
    assert not missing and not extra, f"{FIX}; missing {missing}, no longer generated {extra}"

    stale = sorted(name for name in fresh if fresh[name].read_bytes() != committed[name].read_bytes())
    assert not stale, f"{FIX}; differing files: {stale}"


def test_generated_modules_import() -> None:
    # The committed modules are what the codec imports: they load and carry the wire enums.
    from protos.v1 import tensors_pb2

    assert tensors_pb2.DType.Name(tensors_pb2.FLOAT32) == "FLOAT32"
    assert tensors_pb2.DESCRIPTOR.package == "leptonfl.v1"
