"""Regenerate the committed protobuf/gRPC modules and their `.pyi` stubs.

Run with `make proto` (or `python -m protos.generate`). The generated code is
committed so that installs need no code generator; `tests/unit/test_protos_fresh.py`
regenerates into a temporary folder and fails if the committed files are stale.
Needs the dev extra (grpcio-tools, mypy-protobuf), pinned so output is stable.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent / "v1"
ROOT = PROTO_DIR.parent.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_sources() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def generated_files(root: Path) -> list[Path]:
    """Generated files under `root` (a project root or a scratch output root)."""
    out = root / "protos" / "v1"
    return sorted(p for p in out.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def generate(out_root: Path) -> list[Path]:
    """Run protoc for every `.proto` of `protos/v1`, writing below `out_root/protos/v1`."""
    import grpc_tools
    from grpc_tools import protoc  # dev extra only

    plugin_dir = Path(sys.executable).parent
    (out_root / "protos" / "v1").mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *[str(p.relative_to(ROOT)) for p in proto_sources()],
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    return generated_files(out_root)


def main() -> None:
    for path in generated_files(ROOT):
        path.unlink()
    for path in generate(ROOT):
        print(f"wrote {path.relative_to(ROOT)}")
    shutil.rmtree(PROTO_DIR / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    main()
