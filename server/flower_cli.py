"""Driving Flower's own command-line tools as processes: what `fedrec` needs from them.

The Ray engine (`simulation.ray_engine`) and the deployment commands (`fedrec server`, `client`,
`run`) all start `flower-superlink` / `flower-supernode` and call `flwr run` / `flwr ls`. This
module holds what they share, each piece for a reason learned the hard way:

- Every process gets a private `FLWR_HOME` (Flower keeps connections in
  `$FLWR_HOME/config.toml` as `[superlink.<name>]`), telemetry and update checks off, and no
  runtime dependency installation (Flower would run `uv sync` against PyPI).
- `flwr run --stream` exits 0 even when the ServerApp raises, so a run's outcome is read with
  `flwr ls --run-id <id> --format json` (`finished:completed` vs `finished:failed`).
- Flower's processes start others (SuperExec, ServerApp/ClientApp processes, Ray), several in
  their own sessions, so stopping one process group is not enough: they all inherit the
  `FLWR_HOME` marker and are found in `/proc` and stopped by PID (Linux).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import tomli_w

_RUN_ID = re.compile(r"Successfully started run (\d+)")
BIN = Path(sys.executable).parent  # flwr, flower-superlink, flower-supernode of this environment


def environment(home: Path) -> dict[str, str]:
    """Environment for every Flower process: isolated, quiet, offline, this venv first."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # start a private Ray cluster, never join a user's one
    bin_dir = str(BIN)  # the SuperLink spawns `flower-superexec` by name
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=os.pathsep.join([bin_dir, env.get("PATH", "")]),
    )
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_process(command: list[str], env: Mapping[str, str], log_path: Path, cwd: Path | None = None,
                  ) -> subprocess.Popen[bytes]:
    """A Flower server process in its own session, its output in `log_path`."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, env=dict(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_listening(process: subprocess.Popen[bytes], host: str, port: int, log_path: Path,
                   timeout: float = 30) -> None:
    """Return once `host:port` accepts connections; raise with the log's last line if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"{Path(str(process.args[0])).name} exited with code {process.returncode}: {tail}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    stop(process)
    raise RuntimeError(f"nothing answered on {host}:{port} within {timeout:.0f} s")


def write_connection(home: Path, name: str, address: str, root_certificates: Path | None = None) -> None:
    """A `[superlink.<name>]` connection for `flwr`: TLS with that CA, or plain text without one."""
    entry: dict[str, object] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    config = {"superlink": {"default": name, name: entry}}
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")


def submit_run(app_dir: Path, connection: str, env: dict[str, str], run_config: Mapping[str, object],
               deadline: float, extra: Iterable[str] = (), echo: bool = False) -> tuple[str, str, int | None, str]:
    """`flwr run <app_dir> <connection> --stream`, then the run's real final state from `flwr ls`.

    Returns (status, details, run id, log). Status is Flower's (`finished:completed`,
    `finished:failed`, ...), `timeout (<status>)` past the deadline, or `flwr-run-exit-N` when no
    run started. Run-config values travel in a TOML file: any type, no shell quoting.
    """
    command = [str(BIN / "flwr"), "run", str(app_dir), connection, "--stream", *extra]
    if run_config:
        overrides = Path(env["FLWR_HOME"]) / "run-config.toml"
        overrides.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
        command += ["--run-config", str(overrides)]
    lines: list[str] = []
    returncode = run_streaming(command, env, app_dir, deadline, lines, echo)
    run_id, status, details = parse_run_id(lines), "not-started", ""
    if run_id is not None:
        ls_deadline = min(deadline, time.monotonic() + 30)  # `--stream` ends at "finished"
        status, details = final_status(connection, run_id, env, app_dir, ls_deadline)
    if returncode == "timeout":
        status = f"timeout ({status})"
    elif returncode != 0 and run_id is None:
        status = f"flwr-run-exit-{returncode}"
    return status, details, run_id, "".join(lines)


def failure_reason(log: str, details: str) -> str:
    """One line saying why a run failed: Flower's status details, else the log's last words."""
    last = next((text for line in reversed(log.splitlines()) if re.search(r"\w", text := line.strip(" │╭╰─╮╯"))), "")
    return (details if details not in ("", "N/A") else last).strip().split("\n")[0]


def run_streaming(command: list[str], env: dict[str, str], cwd: Path, deadline: float,
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


def parse_run_id(lines: Iterable[str]) -> int | None:
    for line in lines:
        if match := _RUN_ID.search(line):
            return int(match.group(1))
    return None


def final_status(connection: str, run_id: int, env: dict[str, str], cwd: Path,
                 deadline: float) -> tuple[str, str]:
    """Poll ``flwr ls`` until the run is finished (or the deadline); return (status, details)."""
    status, details = "unknown", ""
    while True:
        try:
            command = [str(BIN / "flwr"), "ls", connection, "--run-id", str(run_id), "--format", "json"]
            out = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True,
                                 timeout=30).stdout
            runs = json.loads(out[out.index("{"):])["runs"]
            status, details = runs[0]["status"], runs[0].get("status-details", "")
        except (ValueError, KeyError, IndexError, subprocess.TimeoutExpired):
            pass
        if status.startswith("finished") or time.monotonic() >= deadline:
            return status, details
        time.sleep(0.5)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s; the SuperLink stops its SuperExec on SIGTERM."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stop_pids(pids: Iterable[int], grace: float = 5) -> None:
    """SIGTERM the leftovers (Ray, simulation), then SIGKILL what still lives after ``grace``."""
    pids = list(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        end = time.monotonic() + grace
        while (pids := [p for p in pids if is_running(p)]) and time.monotonic() < end:
            time.sleep(0.1)
        if not pids:
            return


def is_running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (zombies hold no memory and no ports)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def processes(marker: str) -> list[tuple[int, int]]:
    """(pid, resident kB) of every live process, but this one, whose environment contains `marker`."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            pid = int(entry.name)
            if pid == os.getpid() or needle not in (entry / "environ").read_bytes() or not is_running(pid):
                continue
            status = (entry / "status").read_text()
        except (OSError, ValueError):
            continue
        rss = re.search(r"^VmRSS:\s+(\d+)", status, re.MULTILINE)
        found.append((pid, int(rss.group(1)) if rss else 0))
    return found


class ProcessMonitor:
    """Find a group of processes by an environment entry (`NAME=value`) in `/proc`; sample their memory.

    Linux only: elsewhere it finds nothing, and clean-up relies on stopping the SuperLink.
    """

    def __init__(self, entry: str, interval: float = 0.5) -> None:
        self.marker = entry + "\0"
        self.interval = interval
        self.seen: set[int] = set()
        self.peak_kb = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._done.set()
            self._thread.join()

    def alive(self) -> list[int]:
        """Processes carrying the marker now (scanned afresh, so late children are included)."""
        return [pid for pid, _ in processes(self.marker)]

    def rss_mb(self) -> float:
        """Their resident memory now."""
        return sum(rss for _, rss in processes(self.marker)) / 1024

    def _loop(self) -> None:
        while not self._done.wait(self.interval):
            found = processes(self.marker)
            self.seen.update(pid for pid, _ in found)
            self.peak_kb = max(self.peak_kb, sum(rss for _, rss in found))
