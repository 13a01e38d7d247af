"""The checkpoint written after every round: everything a resumed run needs to replay the rest exactly.

It holds the global weights, FedAdam's moments, the clients' reported ε and, with the in-process
grid, its clients' Flower state (their privacy ledgers); a deployed client keeps its ledger on its
own device instead. Resuming also drops the metrics.jsonl lines of rounds after the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from common import artifacts
from common.errors import DataError
from common.flower_compat import restore_server_optimizer, server_optimizer_state
from server.strategy import GuardedStrategy

CHECKPOINT = "checkpoint.pt"


def save(out: Path, done: int, arrays: ArrayRecord, strategy: GuardedStrategy, grid: Grid,
         elapsed: float, epsilons: dict[int, float]) -> None:
    """Checkpoint the run after round `done`, `elapsed` seconds in."""
    artifacts.save_tensors(out / CHECKPOINT, {
        "round": done,
        "elapsed": elapsed,
        "arrays": arrays.to_torch_state_dict(),
        "optimizer": {name: {k: torch.from_numpy(np.asarray(v)) for k, v in values.items()}
                      for name, values in server_optimizer_state(strategy.inner).items()},
        "epsilons": json.dumps(epsilons),
        "clients": json.dumps(grid.snapshot()) if hasattr(grid, "snapshot") else "",
    })


def restore(out: Path | None, strategy: GuardedStrategy, grid: Grid, model: torch.nn.Module) -> dict[str, Any]:
    """Put the strategy and the grid's clients back where the checkpoint left them; return the
    run's state (round, elapsed seconds, clients' ε, global weights).

    The weights go through `model`, which checks them and gives them the layout of this version
    (a tied embedding travels once), so an older checkpoint resumes too.
    """
    if out is None or not (out / CHECKPOINT).is_file():
        raise artifacts.OutputExistsError(f"cannot resume: no {CHECKPOINT} under out-dir {out}")
    saved = artifacts.load_tensors(out / CHECKPOINT)
    model.load_state_dict(saved["arrays"])
    restore_server_optimizer(strategy.inner, {name: {k: v.numpy() for k, v in values.items()}
                                              for name, values in saved["optimizer"].items()})
    if saved["clients"] and hasattr(grid, "restore"):
        grid.restore(_json(saved["clients"], out / CHECKPOINT))
    lines = (out / artifacts.METRICS).read_text().splitlines() if (out / artifacts.METRICS).exists() else []
    kept = [line for line in lines if _json(line, out / artifacts.METRICS)["round"] <= saved["round"]]
    artifacts.replace_atomically(out / artifacts.METRICS, lambda tmp: tmp.write_text("".join(f"{k}\n" for k in kept)))
    return {"round": int(saved["round"]), "elapsed": float(saved["elapsed"]),
            "epsilons": {int(k): v for k, v in _json(saved["epsilons"], out / CHECKPOINT).items()},
            "arrays": ArrayRecord(model.state_dict())}


def _json(text: str, source: Path) -> Any:
    """A JSON record of the run; a corrupt one ends the resume with one line, not a traceback."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"cannot resume: {source} holds corrupt JSON ({e}): the run cannot continue") from None
