"""Config and metrics maps: Python scalars ⇄ `leptonfl.v1.Scalar` messages."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from protos.v1 import fleet_pb2 as pb

PyScalar = bool | int | float | str


def to_scalar(value: PyScalar) -> pb.Scalar:
    if isinstance(value, bool):
        return pb.Scalar(bool_value=value)
    if isinstance(value, int):
        return pb.Scalar(int_value=value)
    if isinstance(value, float):
        return pb.Scalar(double_value=value)
    if isinstance(value, str):
        return pb.Scalar(string_value=value)
    raise TypeError(f"config and metric values must be bool, int, float or str, not {type(value).__name__}")


def from_scalar(scalar: pb.Scalar) -> PyScalar:
    kind = scalar.WhichOneof("value")
    if kind is None:
        raise ValueError("scalar without a value")
    value: PyScalar = getattr(scalar, kind)
    return value


def fill_scalar_map(target: Any, values: Mapping[str, PyScalar]) -> None:
    """Copy `values` into a protobuf `map<string, Scalar>` field."""
    for key, value in values.items():
        target[key].CopyFrom(to_scalar(value))


def scalar_map_to_dict(source: Mapping[str, pb.Scalar]) -> dict[str, PyScalar]:
    return {key: from_scalar(value) for key, value in source.items()}


def finite_or_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)
