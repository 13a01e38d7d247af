"""Flower's Deployment Engine on loopback: seconds per round with 3 SuperNodes, cold (Flower's
stock launcher: a fresh ClientApp process per message) against warm (fedrec's launcher: the app
imported once, a fork per message), next to the same rounds in one process; memory of an idle and
a busy SuperNode; what importing the ClientApp costs against importing torch; the installed size
of a client; and the edge exports (ONNX and TorchScript, float and int8) of the model trained:
size, latency, and how far the int8 model's top 10 are from the float model's.

Everything runs as in README's "Deploy" section: `fedrec certs`, `fedrec server` (TLS, node
authentication), `fedrec nodes register`, three `fedrec client` (`--cold` for the stock launcher),
`fedrec run`.

    python -m benchmarks.deploy_loopback [--rounds R]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
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
# Three devices: local DP (a handful of clients cannot carry central DP's noise), every device every round.
TRAINING = {"min-train-nodes": 3, "fraction-train": 1.0, "fraction-evaluate": 1.0, "local-epochs": 1, "dp": True,
            "target-epsilon": 8.0, "central-dp": False}
RUN_CONFIG = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in TRAINING.items())
CLIENT_DISTRIBUTIONS = ("fedrec", "flwr", "torch", "opacus", "numpy", "pandas", "grpcio")


def deployment(work: Path, rounds: int, cold: bool) -> dict[str, float]:
    """One loopback deployment; returns s/round, memory figures and `fedrec run`'s wall time."""
    env = {**os.environ, "FEDREC_CACHE": str(work / "cache")}
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
                 str(work / f"node-{i}"), "--auth-key", str(certs / f"node-{i}"), "--port", str(fc.free_port()), *tls,
                 *(["--cold"] if cold else [])],
                env, work / f"node-{i}.log"))
            monitors.append(fc.ProcessMonitor(f"FLWR_HOME={work / f'node-{i}' / 'flwr-home'}", interval=0.1))
        time.sleep(15)  # joined and settled
        idle = [m.rss_mb() for m in monitors]
        for m in monitors:
            m.start()
        out = work / "out"
        started = time.perf_counter()
        subprocess.run([*FEDREC, "run", "--superlink", address, *tls, "--dataset", "seq", "--data-dir",
                        str(data / "server.txt"), "--out", str(out), "--rounds", str(rounds),
                        "--run-config", RUN_CONFIG],
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
        cfg = Config.from_run_config({**DATA, **TRAINING, "partition": "iid", "num-clients": 3,
                                      "num-server-rounds": rounds, "out-dir": str(Path(tmp) / "run")})
        from simulation.run import simulate

        simulate(cfg, quiet=True)
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()[1:]
    return sum(json.loads(line)["seconds"] for line in lines) / rounds


def import_seconds(statement: str, repeats: int = 3) -> float:
    """Median seconds for a fresh Python to run `statement` (an import)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def installed_mb(distributions: tuple[str, ...]) -> dict[str, float]:
    sizes = {}
    for name in distributions:
        files = importlib.metadata.distribution(name).files or []
        sizes[name] = sum(f.locate().stat().st_size for f in files if Path(f.locate()).is_file()) / 2**20
    return sizes


def exports(run: Path, work: Path) -> list[str]:
    """Table rows: each export format and quantisation of the run's model, its size and latency;
    for int8, how many of the float export's top 10 it keeps on the server's held-out users."""
    from common import export
    from common.artifacts import read_json
    from common.dataset import load_dataset
    from common.model import recommend

    cfg = Config.from_run_config(read_json(run / "config.json"))
    items = read_json(run / "items.json")
    index = {raw: i + 1 for i, raw in enumerate(items["item_ids"])}
    held_out = load_dataset(cfg)  # the server's own file, the run's data-dir
    raw = [str(i) for i in held_out.item_ids]
    histories = [[index[raw[i - 1]] for i in seq if raw[i - 1] in index][:-1] for seq in list(held_out.sequences)[:200]]
    rows, models = [], {}
    for format in export.FORMATS:
        for quantize in export.QUANTIZATIONS:
            path = work / f"model.{quantize}.{export.SUFFIX[format]}"
            subprocess.run([*FEDREC, "export", "--model", str(run), "--out", str(path), "--format", format,
                            "--quantize", quantize], check=True, capture_output=True)
            model, _ = export.load(path)
            models[format, quantize] = model
            agree = "–"
            if quantize == "int8":
                shared = [len(set(recommend(model, h, 10, cfg.max_len)[0])
                              & set(recommend(models[format, "none"], h, 10, cfg.max_len)[0])) for h in histories]
                same = sum(s == 10 for s in shared)
                agree = f"{same} of {len(shared)} users the same top 10; {statistics.mean(shared):.2f} of 10 shared"
            rows.append(f"| {format} | {quantize} | {path.stat().st_size / 1024:.0f} | "
                        f"{export.latency_ms(model, cfg.max_len):.3f} | {agree} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    local = in_process_round(args.rounds)
    with tempfile.TemporaryDirectory(prefix="fedrec-deploy-") as tmp:
        results = {}
        for mode in ("cold", "warm"):
            results[mode] = r = deployment(Path(tmp) / mode, args.rounds, cold=mode == "cold")
            rows.append(f"| {mode} | {r['s_per_round']:.1f} | {r['s_per_round'] / local:.1f}× | {r['wall']:.0f} | "
                        f"{r['idle_mb']:.0f} | {r['busy_mb']:.0f} |")
            print(rows[-1], flush=True)
        edge = exports(Path(results["warm"]["out"]), Path(tmp))
    torch_import = import_seconds("import torch")
    app_import = import_seconds("import client.client_app")
    local_import = import_seconds("import client.local")
    sizes = installed_mb(CLIENT_DISTRIBUTIONS)
    ray = installed_mb(("ray",))["ray"]
    write_section("deploy-loopback", "\n".join([
        "## Deployment Engine on loopback (3 SuperNodes)",
        "",
        f"The embedded synthetic default split as `fedrec data split` does (3 device files of ~530 users, the "
        f"server's 400 held-out users); TLS and SuperNode authentication; local DP on; {args.rounds} rounds; the "
        "SuperExec polls every 0.1 s (fedrec's setting). Cold: Flower's stock launcher (`fedrec client --cold`), a "
        "fresh `flwr-clientapp` process per message. Warm: fedrec's launcher (the default), the app imported "
        "once and a fork per message. Each SuperNode's memory is the sum of its processes' resident memory "
        "(warm: a child's pages shared with the launcher count twice).",
        "",
        "| ClientApp | s/round | against in-process | `fedrec run` wall s | idle MB per SuperNode "
        "| busy MB per SuperNode (peak) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Same rounds in one process (`fedrec simulate`, 3 iid clients): {local:.1f} s/round. A fresh Python "
        f"importing the ClientApp (`import client.client_app`): {app_import:.2f} s, against {torch_import:.2f} s "
        f"for `import torch` ({app_import / torch_import:.2f}×); with the training code a message loads "
        f"(`import client.local`: torch, Opacus, pandas): {local_import:.2f} s.",
        "",
        "Client install (the packages a device needs): "
        + ", ".join(f"{k} {v:.0f} MB" for k, v in sizes.items())
        + f"; total {sum(sizes.values()):.0f} MB. Ray, which only the simulation extra installs: {ray:.0f} MB.",
        "",
        "Edge exports (`fedrec export`) of the warm run's model; latency: one user's full-length history, median "
        "of 200 calls; agreement: the server's first 200 held-out users, each history without its last item.",
        "",
        "| format | quantize | KiB | ms per recommendation | int8 against float |",
        "|---|---|---|---|---|",
        *edge,
    ]))


if __name__ == "__main__":
    main()
