"""Strategies register under a name, so runs and simulations pick them with `--strategy NAME`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from strategies.base import Scalar, Strategy

S = TypeVar("S", bound="type[Strategy]")
_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(name: str) -> Callable[[S], S]:
    def decorate(cls: S) -> S:
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def strategy_names() -> list[str]:
    return sorted(_REGISTRY)


def create_strategy(name: str, params: Mapping[str, Scalar] | None = None) -> Strategy:
    """Build the strategy registered as `name`; unknown names or parameters get a clear error."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(strategy_names())}")
    cls = _REGISTRY[name]
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(params or {}) - set(accepted))
    if unknown:
        raise ValueError(f"strategy {name!r} takes {accepted or 'no parameters'}, not {unknown}")
    return cls(**dict(params or {}))
