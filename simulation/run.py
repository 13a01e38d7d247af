"""`fedrec simulate`: the real ServerApp, strategy and ClientApp in one process, no Ray.

The in-process grid (simulation/grid.py) delivers each message by calling the ClientApp; a
client exists only while it handles a message, so memory stays flat as clients grow.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from client.client_app import app as client_app
from client.local import LEDGER
from common import artifacts
from common.config import Config
from common.federation import federation
from server.server_app import app as server_app
from server.server_app import show_progress
from simulation.attacks import with_attackers
from simulation.grid import COHORT_SIZE, InProcessGrid, run_server_app


def simulate(cfg: Config, *, quiet: bool = False, cohort_size: int = COHORT_SIZE) -> dict[str, Any]:
    """Run the federated training the run config describes; return summary.json's content.
    `cohort_size`: train messages whose local training runs as one batch (1: one at a time)."""
    if not cfg.out_dir:
        raise artifacts.OutputExistsError("a simulation needs an output folder (--out)")
    if not cfg.resume:  # before the data is loaded: the ServerApp would find out only when it writes
        artifacts.check_output_folder(Path(cfg.out_dir), hint="choose a new folder, or --resume it")
    logging.getLogger("flwr").setLevel(logging.WARNING)  # fedrec prints its own line per round
    show_progress(not quiet)
    clients = len(federation(cfg).clients)
    grid = InProcessGrid(with_attackers(client_app, cfg, clients), clients, cfg.to_run_config(),
                         cohort_size=cohort_size)
    run_server_app(server_app, grid)
    out = Path(cfg.out_dir)
    _copy_ledgers(grid, out / artifacts.LEDGERS)
    return artifacts.read_json(out / artifacts.SUMMARY)


def _copy_ledgers(grid: InProcessGrid, folder: Path) -> None:
    """Each simulated client's ledger, by node id, for `fedrec privacy` (deployed, they stay on the devices)."""
    for node_id, state in grid.node_states.items():
        if LEDGER in state.config_records:
            folder.mkdir(exist_ok=True)
            (folder / f"{node_id}.json").write_text(str(state.config_records[LEDGER]["ledger"]))
