"""PrivacyLedger: ε comes from Opacus' accountants unchanged, and survives a JSON round trip bit for bit."""

from __future__ import annotations

import json
import math
import warnings

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from strategies.accounting import PrivacyLedger


def opacus_epsilon(accountant, steps: list[tuple[float, float]], delta: float) -> float:
    for z, q in steps:
        accountant.step(noise_multiplier=z, sample_rate=q)
    return float(accountant.get_epsilon(delta))


SETTINGS = [
    pytest.param([(1.0, 0.01)] * 100, 1e-5, id="z1-q0.01-100"),
    pytest.param([(1.1, 1.0)] * 10, 1e-5, id="full-participation"),
    pytest.param([(0.8, 0.1)] * 50, 1e-6, id="z0.8-q0.1-50"),
    pytest.param([(3.0, 0.5)], 1e-3, id="single-round"),
    # Varying q (clients joining/leaving the population) and z between rounds.
    pytest.param([(1.0, 0.01)] * 20 + [(1.0, 0.02)] * 5 + [(1.3, 0.02)] * 7 + [(1.0, 0.01)] * 3, 1e-5, id="varying"),
    pytest.param([(1.0, 0.05 + 0.01 * (i % 3)) for i in range(4)], 1e-5, id="alternating-q"),
]


@pytest.mark.parametrize(("steps", "delta"), SETTINGS)
def test_rdp_epsilon_matches_opacus(steps: list[tuple[float, float]], delta: float) -> None:
    ledger = PrivacyLedger(delta=delta)
    assert ledger.accountant == "rdp"
    for z, q in steps:
        ledger.record_round(z, q)
    assert ledger.rounds == len(steps)
    expected = opacus_epsilon(RDPAccountant(), steps, delta)
    assert ledger.epsilon() == pytest.approx(expected, abs=1e-6, rel=0)
    assert expected > 0


def test_epsilon_grows_with_rounds_and_starts_at_zero() -> None:
    ledger = PrivacyLedger("rdp", delta=1e-5)
    assert ledger.epsilon() == 0.0 and ledger.rounds == 0
    previous = 0.0
    for _ in range(5):
        ledger.record_round(1.0, 0.1)
        eps = ledger.epsilon()
        assert eps > previous
        previous = eps
    assert ledger.history == [(1.0, 0.1, 5)]


def test_prv_is_selectable_and_matches_opacus() -> None:
    steps = [(1.0, 0.01)] * 100 + [(1.2, 0.02)] * 10
    ledger = PrivacyLedger("prv", delta=1e-5)
    for z, q in steps:
        ledger.record_round(z, q)
    expected = opacus_epsilon(PRVAccountant(), steps, 1e-5)
    assert ledger.epsilon() == pytest.approx(expected, abs=1e-6, rel=0)
    # PRV is the tighter of the two here; make sure the names map to different accountants.
    rdp = PrivacyLedger("rdp", delta=1e-5)
    for z, q in steps:
        rdp.record_round(z, q)
    assert ledger.epsilon() < rdp.epsilon()
    assert PrivacyLedger("prv", delta=1e-5).epsilon() == 0.0


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_epsilon_if_does_not_mutate(name: str) -> None:
    ledger = PrivacyLedger(name, delta=1e-5)
    for _ in range(20):
        ledger.record_round(1.0, 0.05)
    before_state, before_eps = ledger.state_dict(), ledger.epsilon()
    projected = ledger.epsilon_if(1.0, 0.05)
    projected_other = ledger.epsilon_if(0.9, 0.07)
    assert ledger.state_dict() == before_state and ledger.epsilon() == before_eps and ledger.rounds == 20
    assert projected > before_eps and projected_other > before_eps
    ledger.record_round(1.0, 0.05)
    assert ledger.epsilon() == projected
    empty = PrivacyLedger(name, delta=1e-5)
    assert empty.epsilon_if(1.0, 0.05) > 0 and empty.rounds == 0 and empty.epsilon() == 0.0


@pytest.mark.parametrize("name", ["rdp", "prv"])
def test_state_round_trip_is_exact(name: str) -> None:
    schedule = [(1.0, 0.01)] * 7 + [(1.0 / 0.9, 0.1 / 3.0)] * 3 + [(1.5, 0.1)] * 2
    ledger = PrivacyLedger(name, delta=1e-5)
    for z, q in schedule:
        ledger.record_round(z, q)
    state = json.loads(json.dumps(ledger.state_dict()))  # what the server's database holds
    assert state == {
        "accountant": name,
        "delta": 1e-5,
        "history": [[1.0, 0.01, 7], [1.0 / 0.9, 0.1 / 3.0, 3], [1.5, 0.1, 2]],
    }
    restored = PrivacyLedger.from_state(state)
    assert restored.epsilon() == ledger.epsilon()  # to the last bit
    assert restored.rounds == ledger.rounds == 12
    other = PrivacyLedger(name, delta=1e-5)
    other.load_state_dict(state)
    assert other.history == ledger.history
    # Continuing after a restore composes exactly like an uninterrupted ledger (the run-length
    # encoding merges the next identical round into the restored entry).
    for z, q in [(1.5, 0.1), (1.0, 0.01), (1.0, 0.01)]:
        ledger.record_round(z, q)
        restored.record_round(z, q)
    assert restored.state_dict() == ledger.state_dict()
    assert restored.history[2] == (1.5, 0.1, 3)
    assert restored.epsilon() == ledger.epsilon()


def test_empty_state_round_trip() -> None:
    state = json.loads(json.dumps(PrivacyLedger(delta=0.01).state_dict()))
    assert state == {"accountant": "rdp", "delta": 0.01, "history": []}
    restored = PrivacyLedger.from_state(state)
    assert restored.epsilon() == 0.0 and restored.rounds == 0


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 1.5, math.nan, True, "1e-5"])
def test_rejects_bad_delta(delta: object) -> None:
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger(delta=delta)  # type: ignore[arg-type]


def test_rejects_unknown_accountant() -> None:
    with pytest.raises(ValueError, match="unknown accountant 'gdp'"):
        PrivacyLedger("gdp", delta=1e-5)


@pytest.mark.parametrize(
    ("z", "q", "match"),
    [
        (0.0, 0.1, "noise_multiplier"),
        (-1.0, 0.1, "noise_multiplier"),
        (math.inf, 0.1, "noise_multiplier"),
        (math.nan, 0.1, "noise_multiplier"),
        (1.0, 0.0, "sample_rate"),
        (1.0, 1.01, "sample_rate"),
        (1.0, -0.5, "sample_rate"),
        (1.0, math.nan, "sample_rate"),
        (True, 0.1, "noise_multiplier"),
    ],
)
def test_rejects_bad_rounds(z: float, q: float, match: str) -> None:
    ledger = PrivacyLedger(delta=1e-5)
    with pytest.raises(ValueError, match=match):
        ledger.record_round(z, q)
    with pytest.raises(ValueError, match=match):
        ledger.epsilon_if(z, q)
    assert ledger.rounds == 0


def test_full_participation_allowed() -> None:
    ledger = PrivacyLedger("prv", delta=1e-5)
    ledger.record_round(2.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Opacus' PRV takes log(1 - q) = log(0) at q = 1
        assert ledger.epsilon() > 0


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"accountant": "prv", "delta": 1e-5, "history": []}, "accountant"),
        ({"accountant": "rdp", "delta": 1e-6, "history": []}, "delta"),
        ({"accountant": "rdp", "delta": 1e-5}, "keys"),
        ({"accountant": "rdp", "delta": 1e-5, "history": [], "epsilon": 1.0}, "keys"),
        ({"accountant": "rdp", "delta": 1e-5, "history": [[1.0, 0.1]]}, "history entries"),
        ({"accountant": "rdp", "delta": 1e-5, "history": [[1.0, 0.1, 0]]}, "step counts"),
        ({"accountant": "rdp", "delta": 1e-5, "history": [[1.0, 0.1, 1.5]]}, "step counts"),
        ({"accountant": "rdp", "delta": 1e-5, "history": [[0.0, 0.1, 1]]}, "noise_multiplier"),
        ({"accountant": "rdp", "delta": 1e-5, "history": [[1.0, 2.0, 1]]}, "sample_rate"),
        ({"accountant": "rdp", "delta": 1e-5, "history": "oops"}, "history must be a list"),
    ],
)
def test_load_rejects_bad_state(state: dict[str, object], match: str) -> None:
    ledger = PrivacyLedger("rdp", delta=1e-5)
    ledger.record_round(1.0, 0.1)
    with pytest.raises(ValueError, match=match):
        ledger.load_state_dict(state)
    assert ledger.history == [(1.0, 0.1, 1)]  # untouched


def test_from_state_rejects_incomplete_state() -> None:
    with pytest.raises(ValueError, match="lacks 'delta'"):
        PrivacyLedger.from_state({"accountant": "rdp", "history": []})
    with pytest.raises(ValueError, match="unknown accountant"):
        PrivacyLedger.from_state({"accountant": "moments", "delta": 1e-5, "history": []})
