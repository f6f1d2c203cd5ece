"""Privacy accounting for central DP-FedAvg: a thin, persistable wrapper around Opacus' accountants.

Each committed DP round is one application of the subsampled Gaussian mechanism with noise
multiplier z (noise std / sensitivity) and client sampling rate q (expected clients per
round / client population). `PrivacyLedger` records those (z, q) pairs and asks Opacus for
the (ε, δ) spent; it never does privacy math itself:

* ``"rdp"`` (default) → `opacus.accountants.RDPAccountant` (Rényi DP, Mironov et al.).
* ``"prv"`` → `opacus.accountants.PRVAccountant` (numerical composition of privacy loss
  random variables, Gopi et al. 2021): tighter, but slower and an upper bound with
  Opacus' default ε error of 0.01.

The ledger's state is plain JSON (accountant name, δ, and Opacus' run-length encoded
history of ``[z, q, steps]``); Python floats survive a JSON round trip bit for bit, so a
restored ledger reports exactly the same ε and keeps composing like an uninterrupted one.

Caveat on q: the guarantees assume each client joins a round independently with
probability q (Poisson sampling) and that a "client" is the privacy unit (user-level DP).
Sampling a fixed number of clients without replacement is the usual approximation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing opacus costs ~2 s (it pulls in torch.distributed): only when DP is on
    from opacus.accountants.accountant import IAccountant

ACCOUNTANTS = ("rdp", "prv")

HistoryEntry = tuple[float, float, int]


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_step(noise_multiplier: float, sample_rate: float) -> tuple[float, float]:
    for label, value in (("noise_multiplier", noise_multiplier), ("sample_rate", sample_rate)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{label} must be a number, got {value!r}")
    z, q = float(noise_multiplier), float(sample_rate)
    if not (math.isfinite(z) and z > 0.0):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    return z, q


def _make_accountant(name: str) -> IAccountant:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; choose one of {', '.join(sorted(ACCOUNTANTS))}")
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if name == "rdp" else PRVAccountant()


class PrivacyLedger:
    """The privacy spent by a run so far, as (ε, δ) at a fixed δ.

    `record_round(z, q)` adds one round (one Opacus accountant step); `epsilon()` is the ε
    spent at the ledger's δ; `epsilon_if(z, q)` is what ε would be after one more such
    round, for budget checks before starting it.
    """

    def __init__(self, accountant: str = "rdp", *, delta: float) -> None:
        self._name = accountant
        self._accountant = _make_accountant(accountant)
        self._delta = _check_delta(delta)

    @property
    def accountant(self) -> str:
        return self._name

    @property
    def delta(self) -> float:
        return self._delta

    @property
    def rounds(self) -> int:
        """Number of rounds recorded."""
        return sum(steps for _, _, steps in self._accountant.history)

    @property
    def history(self) -> list[HistoryEntry]:
        """Run-length encoded ``(noise_multiplier, sample_rate, steps)``, oldest first (a copy)."""
        return [(float(z), float(q), int(s)) for z, q, s in self._accountant.history]

    def record_round(self, noise_multiplier: float, sample_rate: float) -> None:
        """Account for one round with noise multiplier z and client sampling rate q."""
        z, q = _check_step(noise_multiplier, sample_rate)
        self._accountant.step(noise_multiplier=z, sample_rate=q)

    def epsilon(self) -> float:
        """ε spent so far at the ledger's δ (0.0 before the first round)."""
        return self._epsilon_of(self._accountant)

    def epsilon_if(self, noise_multiplier: float, sample_rate: float) -> float:
        """ε after one more round with (z, q); the ledger itself is left unchanged."""
        z, q = _check_step(noise_multiplier, sample_rate)
        trial = _make_accountant(self._name)
        trial.history = list(self._accountant.history)
        trial.step(noise_multiplier=z, sample_rate=q)
        return self._epsilon_of(trial)

    def _epsilon_of(self, accountant: IAccountant) -> float:
        if not accountant.history:
            return 0.0
        return float(accountant.get_epsilon(self._delta))

    # ----------------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: ``{"accountant", "delta", "history": [[z, q, steps], ...]}``."""
        return {
            "accountant": self._name,
            "delta": self._delta,
            "history": [[z, q, s] for z, q, s in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (accountant and δ must match this ledger's)."""
        expected = {"accountant", "delta", "history"}
        if set(state) != expected:
            raise ValueError(f"privacy ledger state needs exactly the keys {sorted(expected)}, got {sorted(state)}")
        if state["accountant"] != self._name:
            raise ValueError(f"state is for the {state['accountant']!r} accountant, this ledger uses {self._name!r}")
        if _check_delta(state["delta"]) != self._delta:
            raise ValueError(f"state is for delta={state['delta']!r}, this ledger uses delta={self._delta!r}")
        history = self._parse_history(state["history"])
        self._accountant.history = history

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PrivacyLedger:
        """A new ledger restored from `state_dict` output."""
        try:
            ledger = cls(state["accountant"], delta=state["delta"])
        except KeyError as err:
            raise ValueError(f"privacy ledger state lacks {err.args[0]!r}") from None
        ledger.load_state_dict(state)
        return ledger

    @staticmethod
    def _parse_history(raw: object) -> list[HistoryEntry]:
        if not isinstance(raw, list | tuple):
            raise ValueError(f"history must be a list of [noise_multiplier, sample_rate, steps], got {raw!r}")
        history: list[HistoryEntry] = []
        for entry in raw:
            if not isinstance(entry, list | tuple) or len(entry) != 3:
                raise ValueError(f"history entries must be [noise_multiplier, sample_rate, steps], got {entry!r}")
            z, q = _check_step(entry[0], entry[1])
            steps = entry[2]
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"history step counts must be integers >= 1, got {steps!r}")
            history.append((z, q, steps))
        return history

    def __repr__(self) -> str:
        return f"PrivacyLedger({self._name!r}, delta={self._delta!r}, rounds={self.rounds})"
