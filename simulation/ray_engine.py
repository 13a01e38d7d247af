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

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import tomli_w

CONNECTION = "fedrec-sim"
"""Name of the SuperLink connection written into the temporary ``config.toml``."""

_RUN_ID = re.compile(r"Successfully started run (\d+)")
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
    env = _environment(home)
    flwr = str(Path(sys.executable).parent / "flwr")
    monitor = _ProcessMonitor(f"FLWR_HOME={home}")
    superlink: subprocess.Popen[bytes] | None = None
    lines: list[str] = []
    run_id: int | None = None
    status, details, wall_s = "not-started", "", 0.0
    start = time.monotonic()
    deadline = start + timeout
    try:
        monitor.start()
        port = _free_port()
        superlink = _start_superlink(home, port, env, app_dir)
        _write_connection(home, port)

        command = [flwr, "run", str(app_dir), CONNECTION, "--stream",
                   "--federation-config",
                   f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}"]
        if run_config:
            overrides = home / "run-config.toml"  # a file: any TOML value, no shell quoting
            overrides.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
            command += ["--run-config", str(overrides)]
        returncode = _run_streaming(command, env, app_dir, deadline, lines, echo)

        run_id = _parse_run_id(lines)
        if run_id is not None:
            ls_deadline = min(deadline, time.monotonic() + 30)  # `--stream` ends at "finished"
            status, details = _final_status(flwr, run_id, env, app_dir, ls_deadline)
        if returncode == "timeout":
            status = f"timeout ({status})"
        elif returncode != 0 and run_id is None:
            status = f"flwr-run-exit-{returncode}"
        wall_s = time.monotonic() - start
    finally:
        if superlink is not None:
            _stop(superlink)
        monitor.stop()
        leftovers = monitor.alive()  # Ray and flwr-simulation, if the SuperLink did not stop them
        monitor.seen.update(leftovers)
        _stop_pids(leftovers)
        shutil.rmtree(home, ignore_errors=True)

    run = RayRun(status=status, run_id=run_id, wall_s=wall_s, log=_ANSI.sub("", "".join(lines)),
                 peak_rss_mb=monitor.peak_kb / 1024, pids=tuple(sorted(monitor.seen)),
                 details=details)
    if status != "finished:completed":
        last = next((text for line in reversed(run.log.splitlines())
                     if re.search(r"\w", text := line.strip(" │╭╰─╮╯"))), "")
        reason = (details if details not in ("", "N/A") else last).strip().split("\n")[0]
        raise RayRunError(f"Flower run {run_id} on Ray ended as {status!r}: {reason}", run)
    return run


def _environment(home: Path) -> dict[str, str]:
    """Environment for every Flower process: isolated, quiet, offline, this venv first."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # start a private Ray cluster, never join a user's one
    bin_dir = str(Path(sys.executable).parent)  # the SuperLink spawns `flower-superexec` by name
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=os.pathsep.join([bin_dir, env.get("PATH", "")]),
    )
    if len(str(home)) <= 40:  # Ray's Unix socket paths under RAY_TMPDIR must stay < 108 bytes
        env["RAY_TMPDIR"] = str(home)  # Ray's session logs go away with FLWR_HOME
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_superlink(home: Path, port: int, env: dict[str, str],
                     cwd: Path) -> subprocess.Popen[bytes]:
    """Start what ``address = ":local:"`` would start, but on our port and with our PID."""
    command = [str(Path(sys.executable).parent / "flower-superlink"), "--insecure", "--simulation",
               "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
               "--disable-runtime-dependency-installation"]  # in-memory state: no --database
    with open(home / "superlink.log", "wb") as log:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (home / "superlink.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"flower-superlink exited with code {process.returncode}: {tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as reply:
                if reply.status == 200:
                    return process
        except OSError:
            time.sleep(0.2)
    _stop(process)
    raise RuntimeError(f"flower-superlink did not answer on 127.0.0.1:{port} within 30 s")


def _write_connection(home: Path, port: int) -> None:
    config = {"superlink": {"default": CONNECTION,
                            CONNECTION: {"address": f"127.0.0.1:{port}", "insecure": True}}}
    (home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")


def _run_streaming(command: list[str], env: dict[str, str], cwd: Path, deadline: float,
                   lines: list[str], echo: bool) -> int | str:
    """Run ``command``, collecting (and optionally echoing) its output; "timeout" if too slow."""
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace")

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if echo:
                sys.stderr.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        return process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        return "timeout"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=5)


def _parse_run_id(lines: Iterable[str]) -> int | None:
    for line in lines:
        if match := _RUN_ID.search(line):
            return int(match.group(1))
    return None


def _final_status(flwr: str, run_id: int, env: dict[str, str], cwd: Path,
                  deadline: float) -> tuple[str, str]:
    """Poll ``flwr ls`` until the run is finished (or the deadline); return (status, details)."""
    status, details = "unknown", ""
    while True:
        try:
            command = [flwr, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"]
            out = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True,
                                 timeout=30).stdout
            runs = json.loads(out[out.index("{"):])["runs"]
            status, details = runs[0]["status"], runs[0].get("status-details", "")
        except (ValueError, KeyError, IndexError, subprocess.TimeoutExpired):
            pass
        if status.startswith("finished") or time.monotonic() >= deadline:
            return status, details
        time.sleep(0.5)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s; the SuperLink stops its SuperExec on SIGTERM."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _stop_pids(pids: Iterable[int], grace: float = 5) -> None:
    """SIGTERM the leftovers (Ray, simulation), then SIGKILL what still lives after ``grace``."""
    pids = list(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        end = time.monotonic() + grace
        while (pids := [p for p in pids if _is_running(p)]) and time.monotonic() < end:
            time.sleep(0.1)
        if not pids:
            return


def _is_running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (zombies hold no memory and no ports)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class _ProcessMonitor:
    """Find this run's processes by an environment marker in ``/proc``; sample their memory.

    Linux only: elsewhere it finds nothing, and clean-up relies on stopping the SuperLink.
    """

    def __init__(self, marker: str, interval: float = 0.5) -> None:
        self.marker = marker.encode() + b"\0"
        self.interval = interval
        self.seen: set[int] = set()
        self.peak_kb = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def alive(self) -> list[int]:
        """Processes carrying the marker now (scanned afresh, so late children are included)."""
        return [pid for pid, _ in self._scan()]

    def _loop(self) -> None:
        while not self._done.wait(self.interval):
            found = self._scan()
            self.seen.update(pid for pid, _ in found)
            self.peak_kb = max(self.peak_kb, sum(rss for _, rss in found))

    def _scan(self) -> list[tuple[int, int]]:
        found = []
        own = os.getpid()
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                pid = int(entry.name)
                if pid == own or self.marker not in (entry / "environ").read_bytes():
                    continue
                status = (entry / "status").read_text()
            except (OSError, ValueError):
                continue
            rss = re.search(r"^VmRSS:\s+(\d+)", status, re.MULTILINE)
            found.append((pid, int(rss.group(1)) if rss else 0))
        return found
