"""`fedrec privacy`: what a run spent, recomputed, so nobody has to take a number on trust.

For every client ledger it can read (a simulation copies them under `<run>/ledgers/`; a device
keeps its own under its state folder) it checks the checksum, recomputes ε from the mechanism
history with fedrec's accountant (Opacus PRV) and with an independent one (Google's
`dp-accounting`, PLD), and compares both with the ε the client reported to the server
(`privacy.json`). A ledger edited without its checksum fails the checksum; one edited with a
fresh checksum no longer matches what its client reported. The server's central guarantee is
recomputed the same way.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from common import artifacts
from common.errors import DataError
from common.privacy import Ledger, Mechanism, independent_epsilon

TOLERANCE = 0.05  # PRV and PLD discretise differently: agreement within 5% relative (or 0.05 absolute)


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    history: tuple[Mechanism, ...]
    reported: float | None
    prv: float | None
    pld: float | None
    problem: str  # "" when everything agrees


def audit_run(run: Path) -> tuple[list[Check], Check | None]:
    """Checks of every client ledger under `run/ledgers`, and of the central guarantee (or None)."""
    if not (run / artifacts.PRIVACY).is_file():
        raise DataError(f"{run / artifacts.PRIVACY} not found: --run must be the --out folder of a finished run")
    record = artifacts.read_json(run / artifacts.PRIVACY)
    delta, reported = float(record["delta"]), record["reported_epsilon"]
    paths = sorted((run / artifacts.LEDGERS).glob("*.json"), key=lambda p: int(p.stem)) if (run / artifacts.LEDGERS).is_dir() else []
    clients = [audit_ledger(p, delta, reported.get(p.stem), name=f"client {p.stem}") for p in paths]
    central = None
    if record["central"].get("enabled"):
        c = record["central"]
        central = _check("server (central DP)", tuple(tuple(h) for h in c["history"]), c["epsilon"], delta)
    return clients, central


def audit_ledger(path: Path, delta: float, reported: float | None, name: str | None = None) -> Check:
    try:
        ledger = Ledger.from_json(path.read_text())
    except (OSError, DataError) as e:
        return Check(name or str(path), (), reported, None, None, str(e))
    return _check(name or str(path), ledger.history, reported, delta)


def _check(name: str, history: tuple, reported: float | None, delta: float) -> Check:
    prv = Ledger(history).epsilon(delta)
    pld = independent_epsilon(history, delta) if history else 0.0
    problems = []
    if not _close(prv, pld):
        problems.append(f"accountants disagree (PRV {prv:.3f}, PLD {pld:.3f})")
    if reported is not None and not _close(float(reported), prv):
        problems.append(f"reported ε {float(reported):.3f} does not match the ledger's {prv:.3f}")
    return Check(name, history, None if reported is None else float(reported), prv, pld, "; ".join(problems))


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= max(TOLERANCE * max(abs(a), abs(b)), 0.05)
