"""The checkpoint written after every round: everything a resumed run needs to replay the rest exactly.

It holds the global weights, FedAdam's moments, the clients' reported ε, the server's participation
record, a fingerprint of the input data and, with the in-process grid, its clients' Flower state
(their privacy ledgers); a deployed client keeps its ledger on its own device instead. Resuming
also drops the metrics.jsonl lines of rounds after the checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from common import artifacts
from common.config import Config
from common.dataset import SequenceData
from common.errors import DataError
from common.flower_compat import restore_server_optimizer, server_optimizer_state
from server import central_dp
from server.strategy import GuardedStrategy

CHECKPOINT = "checkpoint.pt"


def save(out: Path, done: int, arrays: ArrayRecord, strategy: GuardedStrategy, grid: Grid,
         elapsed: float, epsilons: dict[int, float], origin: dict[str, Any]) -> None:
    """Checkpoint the run after round `done`, `elapsed` seconds in; `origin` (see `origin`) names
    the input data and the settings it runs with."""
    artifacts.save_tensors(out / CHECKPOINT, {
        "round": done,
        "elapsed": elapsed,
        "arrays": arrays.to_torch_state_dict(),
        "optimizer": {name: {k: torch.from_numpy(np.asarray(v)) for k, v in values.items()}
                      for name, values in server_optimizer_state(strategy.inner).items()},
        "epsilons": json.dumps(epsilons),
        "clients": json.dumps(grid.snapshot()) if hasattr(grid, "snapshot") else "",
        "participation": json.dumps(strategy.participation),
        "clipping_norm": json.dumps(central_dp.clipping_norm(strategy.inner)),
        "data": origin["data"],
        "settings": json.dumps(origin["settings"], sort_keys=True),
    })


def fingerprint(data: SequenceData) -> str:
    """What the run's input was, in a line: its size and a digest of every user's sequence and
    the catalogue. A resumed run must train on the data it started with."""
    digest = hashlib.sha256(data.sequences.items.tobytes() + data.sequences.offsets.tobytes())
    digest.update("\n".join(str(i) for i in data.item_ids.tolist()).encode())
    return f"{len(data.sequences)} users, {data.num_items} items, sha256 {digest.hexdigest()[:16]}"


def origin(cfg: Config, data: SequenceData) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the input data's `fingerprint`
    and every setting but where the run lives and whether it resumes."""
    settings = {k: v for k, v in cfg.to_run_config().items() if k not in ("out-dir", "resume")}
    return {"data": fingerprint(data), "settings": settings}


def restore(out: Path | None, strategy: GuardedStrategy, grid: Grid, model: torch.nn.Module,
            now: dict[str, Any] | None = None) -> dict[str, Any]:
    """Put the strategy and the grid's clients back where the checkpoint left them; return the
    run's state (round, elapsed seconds, clients' ε, global weights).

    `now` is the resumed run's `origin`: a checkpoint of other data or other settings is refused
    (a checkpoint older than that record is not checked). The weights go through `model`, which
    checks them and gives them the layout of this version (a tied embedding travels once), so an
    older checkpoint resumes too.
    """
    if out is None or not (out / CHECKPOINT).is_file():
        raise artifacts.OutputExistsError(f"cannot resume: no {CHECKPOINT} under out-dir {out}")
    saved = artifacts.load_tensors(out / CHECKPOINT)
    if now is not None:
        _check_origin(saved, now)
    model.load_state_dict(saved["arrays"])
    restore_server_optimizer(strategy.inner, {name: {k: v.numpy() for k, v in values.items()}
                                              for name, values in saved["optimizer"].items()})
    if saved["clients"] and hasattr(grid, "restore"):
        grid.restore(_json(saved["clients"], out / CHECKPOINT))
    norm = _json(saved.get("clipping_norm", "null"), out / CHECKPOINT)
    if norm is not None:  # adaptive clipping resumes where it was
        central_dp.restore_clipping_norm(strategy.inner, norm)
    strategy.participation = {int(k): v for k, v in _json(saved.get("participation", "{}"), out / CHECKPOINT).items()}
    lines = (out / artifacts.METRICS).read_text().splitlines() if (out / artifacts.METRICS).exists() else []
    kept = [line for line in lines if _json(line, out / artifacts.METRICS)["round"] <= saved["round"]]
    artifacts.replace_atomically(out / artifacts.METRICS, lambda tmp: tmp.write_text("".join(f"{k}\n" for k in kept)))
    return {"round": int(saved["round"]), "elapsed": float(saved["elapsed"]),
            "epsilons": {int(k): v for k, v in _json(saved["epsilons"], out / CHECKPOINT).items()},
            "arrays": ArrayRecord(model.state_dict())}


def _check_origin(saved: dict[str, Any], now: dict[str, Any]) -> None:
    if saved.get("data", now["data"]) != now["data"]:
        raise DataError(f"cannot resume: the input data changed since the run started (then {saved['data']}; "
                        f"now {now['data']}): resume with the data it started with, or start a new run")
    then, settings = _json(saved.get("settings", "null"), Path(CHECKPOINT)) or now["settings"], now["settings"]
    changed = [f"{k}: {then.get(k)!r} -> {settings.get(k)!r}"
               for k in sorted(set(then) | set(settings)) if then.get(k) != settings.get(k)]
    if changed:
        raise DataError(f"cannot resume: {artifacts.CONFIG} differs from the settings the run started with "
                        f"({', '.join(changed[:3])}): restore it, or start a new run")


def _json(text: str, source: Path) -> Any:
    """A JSON record of the run; a corrupt one ends the resume with one line, not a traceback."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"cannot resume: {source} holds corrupt JSON ({e}): the run cannot continue") from None
