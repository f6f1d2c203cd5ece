"""Seeded crash points for the crash tests: `kill -9` at an exact step of a round.

`LEPTONFL_CRASH_AT=point:n` makes the daemon send itself SIGKILL the n-th time execution
passes `crash_point("point")` — mid-download, mid-upload, after an update became durable,
mid-aggregation, between the checkpoint file and the commit, after the commit, ... A timer
`kill -9` from outside can hit these windows only by luck; this hits each one every time.
Unset (always, in production), `crash_point` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import threading

POINTS = frozenset(
    {"download", "upload", "accepted", "aggregate", "checkpoint", "committed", "evaluation", "evaluated"}
)


def _parse(spec: str) -> tuple[str, int] | None:
    if not spec:
        return None
    point, _, count = spec.partition(":")
    if point not in POINTS or not count.isdigit() or int(count) < 1:
        raise ValueError(f"LEPTONFL_CRASH_AT must be one of {sorted(POINTS)} followed by ':n' (n ≥ 1), got {spec!r}")
    return point, int(count)


_TARGET = _parse(os.environ.get("LEPTONFL_CRASH_AT", ""))
_passes = 0
_lock = threading.Lock()


def crash_point(point: str) -> None:
    """SIGKILL this process if `point` is the configured crash point and its count is reached."""
    global _passes
    if _TARGET is None or _TARGET[0] != point:
        return
    with _lock:
        _passes += 1
        if _passes == _TARGET[1]:
            os.kill(os.getpid(), signal.SIGKILL)
