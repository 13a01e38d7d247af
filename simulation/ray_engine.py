"""Run a Flower App, unchanged, on Flower's own Ray simulation engine via ``flwr run``.

`simulation.grid` runs the apps in one process; this module is the check that the *same* app
also runs the way Flower users run it: ``flwr run <app-dir> <connection> --stream``. It drives
the ``flwr`` CLI as subprocesses and never imports the apps, so what it tests is exactly the
Flower App Bundle (FAB) that ``flwr run`` builds from ``app_dir``.

Why it is shaped the way it is (facts read from flwr 1.42's source and measured):

- Isolation: every call gets a fresh ``FLWR_HOME`` (connections live in
  ``$FLWR_HOME/config.toml`` as ``[superlink.<name>]``; installed FABs in ``$FLWR_HOME/apps``).
- The SuperLink: a connection with ``address = ":local:"`` makes ``flwr run`` start a *detached*
  simulation SuperLink on the fixed port 39091 (``$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``), reuse
  whatever already answers there (even another user's, with another ``FLWR_HOME``), leave it
  running afterwards (~300 MB) and never say its PID. So this module starts the same command
  itself (``flower-superlink --insecure --simulation --isolation subprocess``) on a free port,
  owns its PID, and points an explicit ``address = "127.0.0.1:<port>"`` connection at it.
- Status: ``flwr run --stream`` exits 0 even when the ServerApp raises, so the final status is
  read with ``flwr ls --run-id <id> --format json`` (``finished:completed`` vs
  ``finished:failed``), and anything else raises `RayRunError`.
- Clean-up: the SuperLink starts ``flower-superexec``, which starts ``flwr-simulation``, which
  starts Ray (gcs_server, raylet, workers); several run in their own sessions, so killing one
  process group is not enough. All of them inherit this call's unique ``FLWR_HOME`` in their
  environment, so on Linux they are found in ``/proc`` and stopped by PID, on success, failure,
  timeout or exception alike. The same scan samples their total memory (``peak_rss_mb``).
- Offline: ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (and the SuperLink flag of the
  same name) keeps Flower from running ``uv sync`` against PyPI; the installed packages are used.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from server import flower_cli as fc

CONNECTION = "fedrec-sim"
"""Name of the SuperLink connection written into the temporary ``config.toml``."""

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class RayRun:
    """What one ``flwr run`` on the Ray engine did."""

    status: str  # "finished:completed", "finished:failed", "timeout (running)", "flwr-run-exit-1"
    run_id: int | None
    wall_s: float  # SuperLink start to final status (clean-up excluded)
    log: str  # `flwr run --stream` output (ServerApp logs, prints, Ray actor output), no colours
    peak_rss_mb: float  # sampled peak of the summed RSS of every process of the run
    pids: tuple[int, ...]  # every process seen carrying this run's FLWR_HOME (all stopped)
    details: str = ""  # Flower's "status-details", e.g. the ServerApp's exception


class RayRunError(RuntimeError):
    """The run did not finish as completed; ``.run`` holds the log and status."""

    def __init__(self, message: str, run: RayRun) -> None:
        super().__init__(message)
        self.run = run


def run_on_ray(
    app_dir: Path,
    *,
    num_supernodes: int,
    run_config: Mapping[str, object],
    timeout: float = 600,
    cpus_per_client: float = 1,
    echo: bool = False,
) -> RayRun:
    """Run the Flower App in ``app_dir`` on Flower's Ray simulation engine and wait for it.

    ``run_config`` overrides keys of ``[tool.flwr.app.config]`` (unknown keys are an error in
    Flower). ``cpus_per_client`` is Ray's ``num_cpus`` per ClientApp actor (Ray's default is 2,
    so on a 2-core machine only one client would run at a time). ``echo`` copies the log to
    stderr as it arrives. Processes run with ``app_dir`` as working directory. Returns the
    `RayRun` of a completed run; raises `RayRunError` (a `RuntimeError`) otherwise.
    """
    app_dir = Path(app_dir).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise ValueError(f"{app_dir} is not a Flower App (no pyproject.toml)")
    home = Path(tempfile.mkdtemp(prefix="flwr-ray-"))
    env = fc.environment(home)
    if len(str(home)) <= 40:  # Ray's Unix socket paths under RAY_TMPDIR must stay < 108 bytes
        env["RAY_TMPDIR"] = str(home)  # Ray's session logs go away with FLWR_HOME
    monitor = fc.ProcessMonitor(f"FLWR_HOME={home}")
    superlink: subprocess.Popen[bytes] | None = None
    status, details, run_id, log, wall_s = "not-started", "", None, "", 0.0
    start = time.monotonic()
    try:
        monitor.start()
        port = fc.free_port()
        # What `address = ":local:"` would start, but on our port and with our PID; in-memory state.
        superlink = fc.start_process(
            [str(fc.BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
             "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"],
            env, home / "superlink.log", cwd=app_dir)
        fc.wait_listening(superlink, "127.0.0.1", port, home / "superlink.log")
        fc.write_connection(home, CONNECTION, f"127.0.0.1:{port}")
        federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"
        status, details, run_id, log = fc.submit_run(app_dir, CONNECTION, env, run_config, start + timeout,
                                                     extra=["--federation-config", federation], echo=echo)
        wall_s = time.monotonic() - start
    finally:
        if superlink is not None:
            fc.stop(superlink)
        monitor.stop()
        leftovers = monitor.alive()  # Ray and flwr-simulation, if the SuperLink did not stop them
        monitor.seen.update(leftovers)
        fc.stop_pids(leftovers)
        shutil.rmtree(home, ignore_errors=True)

    run = RayRun(status=status, run_id=run_id, wall_s=wall_s, log=_ANSI.sub("", log),
                 peak_rss_mb=monitor.peak_kb / 1024, pids=tuple(sorted(monitor.seen)),
                 details=details)
    if status != "finished:completed":
        raise RayRunError(f"Flower run {run_id} on Ray ended as {status!r}: {fc.failure_reason(run.log, details)}", run)
    return run
