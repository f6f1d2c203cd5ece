"""Build the strategy a run or simulation asks for: a named strategy, optionally wrapped in
central differential privacy. The daemon and the simulator both go through here, so the
same settings give the same math in both."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from strategies.accounting import PrivacyLedger
from strategies.base import Scalar, Strategy
from strategies.registry import create_strategy

ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class PrivacySettings:
    """Central DP of a run (`mode == "central"`) or none (`mode == ""`).

    The privacy unit is one client: the guarantee covers everything a client contributes to
    the run. `expected_clients` (K) fixes the sampling rate q = K / population.
    """

    mode: str = ""
    noise_multiplier: float = 0.0
    clip_norm: float = 0.0
    adaptive_clipping: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    initial_clip_norm: float = 0.1
    delta: float = 1e-5
    epsilon_budget: float = 0.0  # 0: no budget
    accountant: str = "rdp"
    clipped_count_stddev: float = 0.0  # adaptive: noise of the clipped count; 0 means K/20 (Andrew et al.)

    @property
    def enabled(self) -> bool:
        return self.mode == "central"

    def validate(self) -> None:
        numbers = {k: v for k, v in asdict(self).items() if isinstance(v, float)}
        bad = sorted(k for k, v in numbers.items() if not math.isfinite(v))
        if bad:
            raise ValueError(f"privacy settings must be finite numbers: {', '.join(bad)}")
        if self.mode not in ("", "central"):
            raise ValueError(f"unknown DP mode {self.mode!r}; use 'central' (or none)")
        if not self.enabled:
            return
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError("central DP needs a positive noise multiplier")
        if not self.adaptive_clipping and not self.clip_norm > 0:
            raise ValueError("central DP needs a positive clip norm, or adaptive clipping")
        if self.adaptive_clipping and not self.initial_clip_norm > 0:
            raise ValueError("adaptive clipping needs a positive initial clip norm")
        if not 0 < self.target_quantile < 1:
            raise ValueError("the clipping target quantile must be in (0, 1)")
        if not 0 < self.delta < 1:
            raise ValueError("delta must be in (0, 1)")
        if self.epsilon_budget < 0:
            raise ValueError("the epsilon budget must be positive (or 0 for none)")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {self.accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacySettings:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def epsilon_over_budget(privacy: PrivacySettings, ledger: PrivacyLedger, sample_rate: float) -> float | None:
    """The epsilon one more round would reach, if that is above the budget; else None."""
    if not privacy.epsilon_budget:
        return None
    upcoming = ledger.epsilon_if(privacy.noise_multiplier, sample_rate)
    return upcoming if upcoming > privacy.epsilon_budget else None


def build_strategy(
    name: str,
    params: Mapping[str, Scalar] | None,
    privacy: PrivacySettings = PrivacySettings(),
    expected_clients: float = 1.0,
    seed: int | None = None,
) -> Strategy:
    """The named strategy, wrapped in central DP when `privacy` asks for it.

    `seed=None` draws DP noise from a cryptographically seeded generator (the daemon);
    a seed makes it reproducible (simulations).
    """
    privacy.validate()
    strategy = create_strategy(name, params)
    if not privacy.enabled:
        return strategy
    from strategies.dp import CentralDP
    from strategies.fedavg import MeanBasedStrategy

    if not isinstance(strategy, MeanBasedStrategy):
        raise ValueError(f"central DP works with FedAvg-family strategies, not {name!r}")
    return CentralDP(
        strategy,
        noise_multiplier=privacy.noise_multiplier,
        clip_norm=None if privacy.adaptive_clipping else privacy.clip_norm,
        expected_clients=expected_clients,
        adaptive=privacy.adaptive_clipping,
        target_quantile=privacy.target_quantile,
        clip_lr=privacy.clip_lr,
        initial_clip_norm=privacy.initial_clip_norm,
        clipped_count_stddev=(privacy.clipped_count_stddev or None) if privacy.adaptive_clipping else None,
        seed=seed,
    )
