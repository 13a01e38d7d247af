"""An edge device's side of a deployment: a Flower SuperNode whose ClientApp reads one local file.

`fedrec client` checks the data file once (a bad file fails here, with one line, not in round 1),
writes the node config (data path, format, state folder) as a TOML file, which is the only
form of `--node-config` that takes any path, and then becomes `flower-supernode`. The
privacy ledger lives in the state folder, so a reboot resumes the spent ε.
"""

from __future__ import annotations

from pathlib import Path

import tomli_w

from common.config import Config
from common.dataset import load_dataset, stats


def check_data(data: Path, data_format: str) -> dict:
    """Load the device's file as its ClientApp will (one clear error if it cannot); return its stats."""
    cfg = Config.from_run_config({}, dataset=data_format, **{"data-dir": str(data), "kcore": 0})
    return stats(load_dataset(cfg))


def supernode_command(bin_dir: Path, *, superlink: str, data: Path, data_format: str, state_dir: Path,
                      port: int, root_certificates: Path | None, auth_key: Path | None,
                      max_retries: int | None, max_wait_time: float | None, warm: bool) -> list[str]:
    """The `flower-supernode` command line; writes `state_dir/node-config.toml` for it. `warm`:
    the SuperNode leaves launching ClientApps to fedrec's warm launcher (`client.warm`), which
    runs beside it, instead of starting Flower's own SuperExec."""
    state_dir.mkdir(parents=True, exist_ok=True)
    node_config = state_dir / "node-config.toml"
    node_config.write_text(tomli_w.dumps({"data-path": str(data.resolve()), "data-format": data_format,
                                          "state-dir": str(state_dir.resolve())}), encoding="utf-8")
    command = [str(bin_dir / "flower-supernode"), "--superlink", superlink, "--node-config", str(node_config),
               "--port", str(port)]
    if warm:
        command += ["--isolation", "process"]
    command += ["--insecure"] if root_certificates is None else ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(auth_key)]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        command += ["--max-wait-time", str(max_wait_time)]
    return command
