"""The privacy ledger: ε checked against an independent accountant, and the JSON/file format.

The independent reference is Google's `dp_accounting` with its privacy-loss-distribution
accountant (tight, like Opacus's PRV accountant the ledger uses): each ledger entry is a
Poisson-subsampled Gaussian mechanism self-composed over its steps, under add/remove-one
neighbouring (Opacus's relation too).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant

from common.errors import DataError
from common.privacy import Ledger, Mechanism

DELTA = 1e-5


def pld_epsilon(history: list[Mechanism], delta: float = DELTA) -> float:
    """ε of composing every (σ, q, steps) entry, by dp_accounting's PLD accountant."""
    accountant = PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in history:
        accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


def digest(body: list) -> str:
    """The checksum format the ledger documents: sha256 of the compact JSON of the history."""
    return hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()


@pytest.mark.parametrize("history", [
    [(1.1, 0.1, 50), (1.1, 0.1, 50)],
    [(0.9, 0.25, 20), (1.3, 0.05, 100)],
])
def test_epsilon_matches_dp_accounting_pld(history):
    ours = Ledger(tuple(history)).epsilon(DELTA)
    reference = pld_epsilon(history)
    assert reference > 1.0  # a meaningful, non-trivial ε
    assert ours == pytest.approx(reference, rel=0.03)


def test_epsilon_grows_with_steps_and_shrinks_with_delta():
    small, large = Ledger(((1.1, 0.1, 20),)), Ledger(((1.1, 0.1, 200),))
    assert 0 < small.epsilon(DELTA) < large.epsilon(DELTA)
    assert large.epsilon(1e-3) < large.epsilon(DELTA)


def test_empty_ledger_spent_nothing():
    assert Ledger().epsilon(DELTA) == 0.0


def test_steps_split_over_entries_compose_like_one_entry():
    """Rounds append an entry each: splitting one mechanism's steps must not change ε."""
    whole = Ledger(((1.1, 0.1, 100),)).epsilon(DELTA)
    split = Ledger(((1.1, 0.1, 30), (1.1, 0.1, 50), (1.1, 0.1, 20))).epsilon(DELTA)
    assert split == pytest.approx(whole, rel=1e-3)
    assert whole == pytest.approx(pld_epsilon([(1.1, 0.1, 100)]), rel=0.03)


def test_planned_and_extended():
    ledger = Ledger(((1.1, 0.1, 10),))
    planned = ledger.planned(0.9, 0.25, 5)
    assert planned.history == ((1.1, 0.1, 10), (0.9, 0.25, 5))
    assert ledger.history == ((1.1, 0.1, 10),)  # unchanged: ledgers are values
    assert planned.epsilon(DELTA) > ledger.epsilon(DELTA)
    # extended() takes the accountant's full history (what it started from included)
    extended = ledger.extended([(1.1, 0.1, 10), (0.9, 0.25, 5)])
    assert extended == planned
    assert all(isinstance(n, int) for _, _, n in extended.history)


def test_json_round_trip():
    ledger = Ledger(((0.9, 0.25, 20), (1.3, 0.05, 100)))
    text = ledger.to_json()
    data = json.loads(text)
    assert data["history"] == [[0.9, 0.25, 20], [1.3, 0.05, 100]]
    assert data["sha256"] == digest(data["history"])
    again = Ledger.from_json(text)
    assert again == ledger
    assert again.epsilon(DELTA) == ledger.epsilon(DELTA)
    assert Ledger.from_json(Ledger().to_json()) == Ledger()


@pytest.mark.parametrize("edit", [
    lambda body: body[0].__setitem__(2, 5),  # fewer steps: an under-counted ε
    lambda body: body[1].__setitem__(0, 13.0),  # more noise
    lambda body: body.pop(),  # a forgotten round
])
def test_tampered_ledger_is_refused(edit):
    data = json.loads(Ledger(((1.1, 0.1, 50), (1.1, 0.1, 50))).to_json())
    edit(data["history"])  # the old checksum stays
    with pytest.raises(DataError, match="checksum"):
        Ledger.from_json(json.dumps(data))


def test_tampered_text_is_refused():
    text = Ledger(((1.1, 0.1, 50),)).to_json()
    assert '"history": [[1.1, 0.1, 50]]' in text
    with pytest.raises(DataError):
        Ledger.from_json(text.replace("[[1.1, 0.1, 50]]", "[[1.1, 0.1, 5]]"))


@pytest.mark.parametrize("body", [
    [[0.0, 0.1, 5]],  # σ = 0: no privacy at all
    [[1.0, 0.0, 5]],  # q out of (0, 1]
    [[1.0, 1.5, 5]],
    [[1.0, 0.1, -1]],  # negative steps
])
def test_impossible_values_are_refused_even_with_a_valid_checksum(body):
    with pytest.raises(DataError):
        Ledger.from_json(json.dumps({"history": body, "sha256": digest(body)}))


@pytest.mark.parametrize("body", [[[1.0, 0.01, 10**12]], [[1.0, 0.01, 600_000], [1.0, 0.01, 400_001]]])
def test_absurd_step_counts_are_refused_before_any_accountant_runs(body):
    # 10^12 steps made numpy ask for 226 GiB; the bound is on the sum over all entries.
    with pytest.raises(DataError, match=r"^privacy ledger holds 1,000,00[\d,]+ DP steps, more than any run takes"):
        Ledger.from_json(json.dumps({"history": body, "sha256": digest(body)}))


@pytest.mark.parametrize("text", ["", "not json", "{}", '{"history": [[1, 2]], "sha256": "x"}', "[]"])
def test_unreadable_ledger_raises_data_error(text):
    with pytest.raises(DataError):
        Ledger.from_json(text)


def test_save_and_load(tmp_path: Path):
    path = tmp_path / "node" / "deep" / "privacy-ledger.json"  # parents are created
    ledger = Ledger(((1.1, 0.1, 50), (0.9, 0.25, 20)))
    ledger.save(path)
    assert path.is_file()
    loaded = Ledger.load(path)
    assert loaded == ledger
    assert loaded.epsilon(DELTA) == ledger.epsilon(DELTA)
    # saving again replaces the file, leaving no temporary files behind
    longer = ledger.planned(1.1, 0.1, 10)
    longer.save(path)
    assert Ledger.load(path) == longer
    assert sorted(p.name for p in path.parent.iterdir()) == ["privacy-ledger.json"]


def test_absent_file_loads_as_empty(tmp_path: Path):
    ledger = Ledger.load(tmp_path / "missing" / "privacy-ledger.json")
    assert ledger == Ledger() and ledger.history == ()
    assert ledger.epsilon(DELTA) == 0.0


def test_tampered_file_is_refused(tmp_path: Path):
    path = tmp_path / "privacy-ledger.json"
    Ledger(((1.1, 0.1, 50),)).save(path)
    text = path.read_text()
    assert "[[1.1, 0.1, 50]]" in text
    path.write_text(text.replace("[[1.1, 0.1, 50]]", "[[1.1, 0.1, 5]]"))
    with pytest.raises(DataError):
        Ledger.load(path)


def test_tiny_noise_falls_back_to_an_rdp_bound_instead_of_failing():
    """PRV's discretisation breaks down for σ far below 1; ε is then RDP's (valid, looser) bound."""
    epsilon = Ledger(((0.01, 1.0, 1),)).epsilon(1e-5)
    assert math.isfinite(epsilon) and epsilon > 1000
