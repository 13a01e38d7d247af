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
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from common.artifacts import replace_atomically
from common.config import Config, ConfigError
from common.errors import DataError
from common.memo import cached

Mechanism = tuple[float, float, int]  # (noise multiplier, sample rate, steps)
# Steps a ledger may hold in all. A run takes rounds x local epochs x 1/q steps: thousands, some
# 10^5 for a centralized DP run on MovieLens 32M. The accountants' cost grows faster than the
# steps (PRV: 7 s and 1.6 GB at 10^5, over 5 min and 7 GB at 10^6; 10^12 asks numpy for 226 GiB),
# so a crafted ledger must not reach them.
MAX_STEPS = 1_000_000


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
    # np.errstate: PRV takes log(0) at q = 1
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for message in ("Secure RNG turned off", "Full backward hook is firing", "Optimal order is the"):
            warnings.filterwarnings("ignore", message=message)
        yield


@cached(4096)
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


def batches_per_epoch(num_units: int, batch_size: int) -> int:
    """Steps in one epoch over `num_units` DP units (users or windows, `dp-unit`), as many as a
    plain loader's batches."""
    return math.ceil(num_units / batch_size)


def sample_rate(num_units: int, batch_size: int) -> float:
    """The probability that a DP step samples a given unit, the q of the ledger: 1 / batches per
    epoch, as Opacus's `DPDataLoader` sets it. The one definition that sampling, the accountant,
    the budget check, the σ search and the server's participation record all use, so that ε is
    computed for the steps that ran."""
    return 1 / batches_per_epoch(num_units, batch_size)


def noise_multiplier_for(cfg: Config, num_units: int, epochs: int) -> float:
    """σ from the config: given outright, or the smallest that keeps `epochs` under target ε
    at the rate and steps training will run (`sample_rate`, `batches_per_epoch`)."""
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    return _searched_noise_multiplier(cfg.target_epsilon, cfg.delta, sample_rate(num_units, cfg.batch_size),
                                      epochs * batches_per_epoch(num_units, cfg.batch_size))


@cached(1024)
def _searched_noise_multiplier(target_epsilon: float, delta: float, rate: float, steps: int) -> float:
    """Cached: a search takes 0.1 s or more, and a round's clients share a handful of plans."""
    with quiet_opacus():
        return get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=rate,
            steps=steps,
            accountant="prv",
            epsilon_tolerance=0.05,  # each PRV evaluation is slow; ε ends within 0.05 below target
        )


def round_mechanism(cfg: Config, num_units: int, sigma: float | None = None) -> Mechanism:
    """What one federated round of local DP-SGD spends on a client of `num_units` DP units: σ for
    its whole plan (every round, `local-epochs` each; `sigma` when the caller already knows it), at
    its sample rate, for the round's steps. The client trains with it; the server recomputes it
    from the units the client reports, for its own participation record."""
    if sigma is None:
        sigma = noise_multiplier_for(cfg, num_units, cfg.num_server_rounds * cfg.local_epochs)
    return (float(sigma), sample_rate(num_units, cfg.batch_size),
            cfg.local_epochs * batches_per_epoch(num_units, cfg.batch_size))


def compressed(history: Iterable[Mechanism]) -> tuple[Mechanism, ...]:
    """Consecutive mechanisms of the same σ and q merged, as Opacus's accountants keep their history."""
    merged: list[Mechanism] = []
    for sigma, q, steps in history:
        if merged and merged[-1][:2] == (sigma, q):
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        else:
            merged.append((sigma, q, steps))
    return tuple(merged)


def check_plan(cfg: Config, plans: Iterable[tuple[int, int]]) -> None:
    """Refuse DP training that cannot keep its promise, before it starts; each plan is (DP units,
    epochs) and the most expensive one must fit:
    - more DP steps than fedrec accounts (`MAX_STEPS`: PRV's cost grows with the steps, seconds at
      10^5 and minutes beyond 10^6, so the accountant would seem to hang);
    - a fixed `noise-multiplier` that would spend more than `target-epsilon`: a run would overspend
      (centralized) or decline every round (federated)."""
    if not cfg.dp:
        return
    distinct = {(sample_rate(w, cfg.batch_size), e * batches_per_epoch(w, cfg.batch_size)) for w, e in plans}
    most = max((steps for _, steps in distinct), default=0)
    if most > MAX_STEPS:
        raise ConfigError(f"the planned training takes {most:,} DP steps, more than fedrec accounts "
                          f"({MAX_STEPS:,}): raise --batch-size or train fewer epochs or rounds")
    if cfg.noise_multiplier <= 0:
        return
    spent = max((Ledger(((cfg.noise_multiplier, q, steps),)).epsilon(cfg.delta) for q, steps in distinct), default=0.0)
    if spent > cfg.target_epsilon * (1 + 1e-9):
        raise ConfigError(f"noise-multiplier {cfg.noise_multiplier:g} spends ε = {spent:.3g} over the planned "
                          f"training, more than target-epsilon {cfg.target_epsilon:g}: raise --noise-multiplier, "
                          "or set it to 0 to derive σ from the target")
