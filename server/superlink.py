"""The coordinating side of a deployment: Flower's SuperLink, with TLS and SuperNode authentication.

`fedrec server` becomes `flower-superlink` (same PID, so it is stopped like any server), with
its state in a SQLite database under the state folder, so registered nodes and finished runs
survive a restart. The SuperLink runs each submitted ServerApp in a subprocess of its own.
"""

from __future__ import annotations

from pathlib import Path


def superlink_command(bin_dir: Path, *, host: str, port: int, state_dir: Path, certfile: Path | None,
                      keyfile: Path | None, ca_certfile: Path | None, auth: bool) -> list[str]:
    """The `flower-superlink` command line; TLS unless all three certificate paths are None."""
    state_dir.mkdir(parents=True, exist_ok=True)
    command = [str(bin_dir / "flower-superlink"), "--host", host, "--port", str(port),
               "--database", str(state_dir / "superlink.db"), "--isolation", "subprocess",
               "--disable-runtime-dependency-installation"]
    if certfile is None:
        command.append("--insecure")
    else:
        command += ["--ssl-certfile", str(certfile), "--ssl-keyfile", str(keyfile),
                    "--ssl-ca-certfile", str(ca_certfile)]
    if auth:
        command.append("--enable-supernode-auth")
    return command
