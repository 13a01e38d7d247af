"""A client's privacy ledger: every DP-SGD mechanism it ever ran, so that ε is cumulative.

The ledger is Opacus's accountant history — (noise multiplier, sample rate, steps) per entry —
and ε is recomputed from it with the PRV accountant. It must outlive rounds and restarts (a
client that forgot what it spent would report too small an ε), so it is stored with the
client's state: the Flower `Context.state` in simulation, a file under the node's state folder
in deployment. A checksum travels with it, so a hand-edited ledger is detected, not trusted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant

from common.artifacts import replace_atomically
from common.errors import DataError
from common.memo import cached

Mechanism = tuple[float, float, int]  # (noise multiplier, sample rate, steps)
# Steps a ledger may hold in all. A run takes rounds x local epochs x 1/q steps: thousands, some
# 10^5 for a centralized DP run on MovieLens 32M. The accountants' cost grows faster than the
# steps (PRV: 7 s and 1.6 GB at 10^5, over 5 min and 7 GB at 10^6; 10^12 asks numpy for 226 GiB),
# so a crafted ledger must not reach them.
MAX_STEPS = 1_000_000
SECAGG_ARRAY_NAMES = "array-names"  # config key: SecAgg+'s legacy message layout drops the parameter names


@dataclasses.dataclass(frozen=True)
class Ledger:
    history: tuple[Mechanism, ...] = ()

    def epsilon(self, delta: float) -> float:
        """Cumulative ε at δ over every mechanism so far (0 before any)."""
        return _epsilon(self.history, delta) if self.history else 0.0

    def extended(self, history: list[Mechanism]) -> Ledger:
        """The ledger after a training call whose accountant started from this history."""
        return Ledger(tuple((float(s), float(q), int(n)) for s, q, n in history))

    def planned(self, noise_multiplier: float, sample_rate: float, steps: int) -> Ledger:
        """The ledger as it would be after `steps` more steps (to check a budget before training)."""
        return Ledger((*self.history, (noise_multiplier, sample_rate, steps)))

    def to_json(self) -> str:
        body = [list(h) for h in self.history]
        return json.dumps({"history": body, "sha256": _digest(body)})

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        try:
            data = json.loads(text)
            body = data["history"]
            ok = data["sha256"] == _digest(body)
            history = tuple((float(s), float(q), int(n)) for s, q, n in body)
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"privacy ledger is unreadable: {e}") from None
        if not ok or any(not (s > 0 and 0 < q <= 1 and n >= 0 and math.isfinite(s)) for s, q, n in history):
            raise DataError("privacy ledger failed its checksum: it was altered outside fedrec")
        steps = sum(n for _, _, n in history)
        if steps > MAX_STEPS:
            raise DataError(f"privacy ledger holds {steps:,} DP steps, more than any run takes (at most "
                            f"{MAX_STEPS:,}): it is corrupt or crafted, and its ε is not computed")
        return cls(history)

    def save(self, path: Path) -> None:
        """Atomically: a crash mid-write must not lose what was spent."""
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, lambda tmp: tmp.write_text(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> Ledger:
        return cls.from_json(path.read_text()) if path.exists() else cls()


@contextlib.contextmanager
def quiet_opacus() -> Iterator[None]:
    """Hide Opacus warnings that say nothing to a fedrec user: fedrec seeds its RNG on purpose
    (runs must reproduce), the input ids never need gradients, and RDP's order search is only
    used to bracket the PRV accountant."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # PRV: log(0) at q = 1
        for message in ("Secure RNG turned off", "Full backward hook is firing", "Optimal order is the"):
            warnings.filterwarnings("ignore", message=message)
        yield


def independent_epsilon(history: tuple[Mechanism, ...], delta: float) -> float:
    """ε of the same history by Google's `dp-accounting` (PLD), an accountant independent of
    Opacus's PRV one: two implementations that agree are the check that neither is misused."""
    from dp_accounting import dp_event
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in history:
        accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return float(accountant.get_epsilon(delta))


@cached(4096)
def _epsilon(history: tuple[Mechanism, ...], delta: float) -> float:
    """Cached: in a simulation thousands of clients share the same few histories."""
    accountant = PRVAccountant()
    accountant.history = list(history)
    with quiet_opacus():
        try:
            return float(accountant.get_epsilon(delta))
        except (RuntimeError, OverflowError, MemoryError):  # PRV's grid breaks down for σ far below 1
            rdp = RDPAccountant()  # a valid upper bound, and stable there
            rdp.history = list(history)
            return float(rdp.get_epsilon(delta))


def _digest(body: list) -> str:
    return hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()
