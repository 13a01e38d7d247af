"""Flower's Deployment Engine on loopback: seconds per round with 3 SuperNodes, where the time
goes, memory of an idle and a busy SuperNode, the installed size of a client, and the edge
export's size and latency.

Everything runs as in README's "Deploy" section: `fedrec certs`, `fedrec server` (TLS, node
authentication), `fedrec nodes register`, three `fedrec client`, `fedrec run`; each setup runs
twice, with Flower's default SuperExec poll interval (1 s) and with fedrec's (0.1 s).

    python -m benchmarks.deploy_loopback [--rounds R]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import write_section
from common.config import Config
from common.federation import write_device_files
from server import flower_cli as fc

FEDREC = [sys.executable, "-m", "fedrec"]
DATA = {"dataset": "synthetic", "holdout-users": 0.2}  # the embedded default: 2,000 users, 100 items
TRAINING = "min-train-nodes=3 fraction-train=1.0 fraction-evaluate=1.0 local-epochs=1 dp=true target-epsilon=8"
CLIENT_DISTRIBUTIONS = ("fedrec", "flwr", "torch", "opacus", "numpy", "pandas", "grpcio")


def deployment(work: Path, rounds: int, poll_interval: str) -> dict[str, float]:
    """One loopback deployment; returns s/round, memory figures and the ClientApp start-up time."""
    env = {**os.environ, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": poll_interval, "FEDREC_CACHE": str(work / "cache")}
    certs, data = work / "certs", work / "data"
    subprocess.run([*FEDREC, "certs", "--out", str(certs), "--nodes", "3"], env=env, check=True, capture_output=True)
    write_device_files(Config.from_run_config(DATA), data, clients=3)
    port = fc.free_port()
    address, tls = f"127.0.0.1:{port}", ["--root-certificates", str(certs / "ca.crt")]
    processes, monitors = [], []
    try:
        processes.append(fc.start_process(
            [*FEDREC, "server", "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(work / "server"),
             "--certfile", str(certs / "server.crt"), "--keyfile", str(certs / "server.key"),
             "--ca-certfile", str(certs / "ca.crt")], env, work / "server.log"))
        fc.wait_listening(processes[0], "127.0.0.1", port, work / "server.log")
        for i in (1, 2, 3):
            subprocess.run([*FEDREC, "nodes", "register", str(certs / f"node-{i}.pub"), "--superlink", address, *tls],
                           env=env, check=True, capture_output=True)
            processes.append(fc.start_process(
                [*FEDREC, "client", "--superlink", address, "--data", str(data / f"client-{i}.txt"), "--state-dir",
                 str(work / f"node-{i}"), "--auth-key", str(certs / f"node-{i}"), "--port", str(fc.free_port()), *tls],
                env, work / f"node-{i}.log"))
            monitors.append(fc.ProcessMonitor(f"FLWR_HOME={work / f'node-{i}' / 'flwr-home'}", interval=0.1))
        time.sleep(15)  # joined and settled
        idle = [m.rss_mb() for m in monitors]
        for m in monitors:
            m.start()
        out = work / "out"
        started = time.perf_counter()
        subprocess.run([*FEDREC, "run", "--superlink", address, *tls, "--dataset", "seq", "--data-dir",
                        str(data / "server.txt"), "--out", str(out), "--rounds", str(rounds), "--run-config", TRAINING],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - started
    finally:
        for m in monitors:
            m.stop()
        for process in processes:
            fc.stop(process)
        fc.stop_pids(pid for pid, _ in fc.processes(str(work)))
    per_round = [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()[1:]]
    return {"s_per_round": sum(per_round) / len(per_round), "wall": wall, "idle_mb": max(idle),
            "busy_mb": max(m.peak_kb for m in monitors) / 1024, "out": str(out)}


def in_process_round(rounds: int) -> float:
    """The same rounds in one process (`fedrec simulate`): the training and evaluation alone."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config.from_run_config({**DATA, "partition": "iid", "num-clients": 3, "min-train-nodes": 3,
                                      "fraction-train": 1.0, "fraction-evaluate": 1.0, "local-epochs": 1,
                                      "num-server-rounds": rounds, "out-dir": str(Path(tmp) / "run")})
        from simulation.run import simulate

        simulate(cfg, quiet=True)
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()[1:]
    return sum(json.loads(line)["seconds"] for line in lines) / rounds


def clientapp_startup() -> float:
    """Seconds for a fresh Python to import the ClientApp: what every message pays in deployment."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import client.client_app"], check=True)
    return time.perf_counter() - started


def installed_mb(distributions: tuple[str, ...]) -> dict[str, float]:
    sizes = {}
    for name in distributions:
        files = importlib.metadata.distribution(name).files or []
        sizes[name] = sum(f.locate().stat().st_size for f in files if Path(f.locate()).is_file()) / 2**20
    return sizes


def _export_line(model: str, quantize: str) -> str:
    """What `fedrec export` printed for the run folder `model`: file size and latency, on one line."""
    printed = subprocess.run([*FEDREC, "export", "--model", model, "--quantize", quantize],
                             capture_output=True, text=True, check=True).stdout
    return printed.replace("\n", " ").split(": ", 1)[1].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedrec-deploy-") as tmp:
        results = {}
        for poll in ("1.0", "0.1"):
            results[poll] = deployment(Path(tmp) / f"poll-{poll}", args.rounds, poll)
            r = results[poll]
            rows.append(f"| {poll} s | {r['s_per_round']:.1f} | {r['wall']:.0f} | {r['idle_mb']:.0f} "
                        f"| {r['busy_mb']:.0f} |")
            print(rows[-1], flush=True)
        exports = [_export_line(results["0.1"]["out"], q) for q in ("none", "int8")]
    local = in_process_round(args.rounds)
    startup = clientapp_startup()
    sizes = installed_mb(CLIENT_DISTRIBUTIONS)
    ray = installed_mb(("ray",))["ray"]
    write_section("deploy-loopback", "\n".join([
        "## Deployment Engine on loopback (3 SuperNodes)",
        "",
        f"The embedded synthetic default split by `fedrec data split` logic (3 device files of ~530 users, the "
        f"server's 400 held-out users); TLS and SuperNode authentication; DP on; {args.rounds} rounds; each "
        "SuperNode's memory is the sum over its processes (SuperNode, SuperExec, the ClientApp process of a message).",
        "",
        "| SuperExec poll interval | s/round | `fedrec run` wall s | idle MB per SuperNode "
        "| busy MB per SuperNode (peak) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Same rounds in one process (`fedrec simulate`, 3 iid clients): {local:.1f} s/round. "
        f"A fresh Python importing the ClientApp: {startup:.1f} s (paid by every message: Flower starts one "
        "`flwr-clientapp` process per message).",
        "",
        "Client install (the packages a device needs): "
        + ", ".join(f"{k} {v:.0f} MB" for k, v in sizes.items())
        + f"; total {sum(sizes.values()):.0f} MB. Ray, which only the simulation extra installs: {ray:.0f} MB.",
        "",
        "Edge export (`fedrec export`, then `--quantize int8`): " + "; ".join(exports) + ".",
    ]))


if __name__ == "__main__":
    main()
