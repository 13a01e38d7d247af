"""`fedrec privacy`: what a run spent, recomputed, so nobody has to take a number on trust.

The evidence is the server's own participation record (`participation.json`: every round each
client trained in, and on how many DP units, users or windows by `dp-unit`). From it and the
run's settings the audit recomputes
the mechanism every client ran and its ε, with fedrec's accountant (Opacus PRV) and an
independent one (Google's `dp-accounting`, PLD). It then checks, client by client, that
- the client's ledger exists (a simulation copies them under `<run>/ledgers/`; deployed, each
  device keeps its own: check it there with `--ledger`), passes its checksum and holds exactly the
  recorded mechanisms: a deleted, reset or shortened ledger fails, however consistently edited;
- the ε the client reported (`privacy.json`) is there and matches the record's;
- no ledger or reported ε belongs to a client the record does not know.
The server's central guarantee is recomputed the same way.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from common import artifacts
from common.config import Config
from common.errors import DataError
from common.privacy import Ledger, Mechanism, compressed, independent_epsilon, round_mechanism

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
    """Checks of every client the run's participation record names (and of any ledger or
    reported ε it does not), and of the central guarantee (or None)."""
    for name in (artifacts.PRIVACY, artifacts.PARTICIPATION, artifacts.CONFIG):
        if not (run / name).is_file():
            raise DataError(f"{run / name} not found: --run must be the --out folder of a finished run")
    cfg = Config.from_run_config(artifacts.read_json(run / artifacts.CONFIG))
    record = artifacts.read_json(run / artifacts.PRIVACY)
    delta, reported = float(record["delta"]), record["reported_epsilon"]
    participation = artifacts.read_json(run / artifacts.PARTICIPATION)
    folder = run / artifacts.LEDGERS
    ledgers = {p.stem: p for p in folder.glob("*.json")} if folder.is_dir() else {}
    nodes = sorted(set(participation) | set(ledgers) | set(reported), key=int)
    clients = [_client(cfg, node, participation.get(node), ledgers.get(node), reported.get(node), delta)
               for node in nodes] if cfg.dp else []
    central = None
    if record["central"].get("enabled"):
        c = record["central"]
        name = f"server ({'distributed' if cfg.distributed_dp else 'central'} DP: {c.get('unit', 'one client')})"
        central = _check(name, tuple(tuple(h) for h in c["history"]), c["epsilon"], delta)
    return clients, central


def recorded_history(cfg: Config, entries: list[list[int]]) -> tuple[Mechanism, ...]:
    """The mechanisms a client ran, as the server recorded its rounds: [round, DP units] each."""
    return compressed(round_mechanism(cfg, units) for _, units in sorted(entries))


def _client(cfg: Config, node: str, entries: list[list[int]] | None, ledger_path: Path | None,
            reported: float | None, delta: float) -> Check:
    name = f"client {node}"
    if entries is None:
        return Check(name, (), reported, None, None, "not in the server's participation record, yet it has "
                     + ("a ledger" if ledger_path else "a reported ε"))
    history = recorded_history(cfg, entries)
    check = _check(name, history, reported, delta)
    problems = [check.problem] if check.problem else []
    if reported is None:
        problems.append("no reported ε in privacy.json")
    if ledger_path is not None:
        ledger = _read_ledger(ledger_path)
        if isinstance(ledger, str):
            problems.append(ledger)
        elif not _same(ledger.history, history):
            problems.append(f"ledger (ε {ledger.epsilon(delta):.3f}) differs from the server's participation "
                            f"record (ε {check.prv:.3f}): it was reset, shortened or edited")
    elif cfg.partition != "devices":
        problems.append("ledger missing")
    return dataclasses.replace(check, problem="; ".join(problems))


def audit_ledger(path: Path, delta: float, reported: float | None, name: str | None = None) -> Check:
    """One device's own ledger: checksum, and the two accountants on its history."""
    ledger = _read_ledger(path)
    if isinstance(ledger, str):
        return Check(name or str(path), (), reported, None, None, ledger)
    return _check(name or str(path), ledger.history, reported, delta)


def _read_ledger(path: Path) -> Ledger | str:
    """The ledger, or why it cannot be read (an audit reports it rather than stopping)."""
    try:
        return Ledger.from_json(path.read_text())
    except (OSError, DataError) as e:
        return str(e)


def _check(name: str, history: tuple, reported: float | None, delta: float) -> Check:
    prv = Ledger(history).epsilon(delta)
    pld = independent_epsilon(history, delta) if history else 0.0
    problems = []
    if not _close(prv, pld):
        problems.append(f"accountants disagree (PRV {prv:.3f}, PLD {pld:.3f})")
    if reported is not None and not _close(float(reported), prv):
        problems.append(f"reported ε {float(reported):.3f} does not match the record's {prv:.3f}")
    return Check(name, history, None if reported is None else float(reported), prv, pld, "; ".join(problems))


def _same(a: tuple[Mechanism, ...], b: tuple[Mechanism, ...]) -> bool:
    return len(a) == len(b) and all(x[2] == y[2] and math.isclose(x[0], y[0], rel_tol=1e-9)
                                    and math.isclose(x[1], y[1], rel_tol=1e-12) for x, y in zip(a, b, strict=True))


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= max(TOLERANCE * max(abs(a), abs(b)), 0.05)
