"""Federated training on MovieLens 100K: cross-device (943 clients, one user each) and
cross-silo (10 clients of ~94 users), non-private and local DP-SGD at ε = 8 and ε = 1
(δ = 1e-5), next to the centralized model on the same split; plus one round on Flower's Ray
engine against the in-process engine.

Each setting runs as its own `fedrec simulate` process, so its peak memory is its own.

    python -m benchmarks.federated_ml100k [--only NAME ...] [--rounds R] [--engines R]

Each recipe names its own rounds; `--rounds` overrides them all (for a quick look).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import ROOT, merge_rows, require_shared, write_section

# The run config's defaults turn on user-level central DP and FedAdam (the recommended private
# configuration); these recipes state their own privacy and use FedAvg unless they say otherwise.
COMMON = {"dataset": "ml-100k", "kcore": "0", "max-len": "50", "embedding-dim": "64", "hidden-dim": "64",
          "dropout": "0.1", "batch-size": "64", "central-dp": "false", "server-strategy": "fedavg"}
# Recipes (what the trials recorded in BENCHMARKS.md found): cross-device clients hold one to
# three windows, so local work is one SGD epoch and progress comes from many cheap rounds;
# cross-silo clients hold ~240 windows and take two Adam epochs a round.
CROSS_DEVICE = {"partition": "user", "fraction-train": "0.1", "local-epochs": "1", "optimizer": "sgd", "lr": "5",
                "dropout": "0.3", "num-server-rounds": "150"}
CROSS_SILO = {"partition": "iid", "num-clients": "10", "fraction-train": "1.0", "local-epochs": "2",
              "batch-size": "32", "lr": "0.003", "dropout": "0.3", "num-server-rounds": "20"}
DP = {"dp": "true", "dp-unit": "window", "max-grad-norm": "1.0", "delta": "1e-5"}  # the tables are per window
SILO_DP = {**DP, "batch-size": "128", "lr": "0.01", "local-epochs": "1", "dropout": "0.1"}
DEVICE_DP = {**DP, "num-server-rounds": "10"}  # a DP round costs ~15x a plain one here
SETTINGS: dict[str, dict[str, str]] = {
    "cross-device, non-private": {**CROSS_DEVICE, "dp": "false"},
    "cross-device, DP ε=8": {**CROSS_DEVICE, **DEVICE_DP, "target-epsilon": "8"},
    "cross-device, DP ε=4": {**CROSS_DEVICE, **DEVICE_DP, "target-epsilon": "4"},
    "cross-device, DP ε=1": {**CROSS_DEVICE, **DEVICE_DP, "target-epsilon": "1"},
    "cross-silo, non-private": {**CROSS_SILO, "dp": "false"},
    "cross-silo, DP ε=8": {**CROSS_SILO, **SILO_DP, "target-epsilon": "8"},
    "cross-silo, DP ε=1": {**CROSS_SILO, **SILO_DP, "target-epsilon": "1"},
}
# FLAGS maps run-config keys to `fedrec simulate` options where the names differ.
FLAGS = {"num-server-rounds": "rounds"}


def run_setting(name: str, settings: dict[str, str], data_dir: Path, workdir: Path,
                common: dict[str, str] = COMMON) -> dict[str, Any]:
    """`fedrec simulate` in a child process; returns its summary, rounds and peak RSS."""
    out = workdir / name.replace(" ", "_").replace(",", "").replace("=", "")
    options = {**common, "data-dir": str(data_dir), **settings}
    argv = [sys.executable, "-m", "fedrec", "simulate", "--out", str(out), "--quiet"]
    for key, value in options.items():
        flag = FLAGS.get(key, key)
        if value in ("true", "false"):  # on/off options: --dp/--no-dp, --central-dp/--no-central-dp
            argv.append(f"--{flag}" if value == "true" else f"--no-{flag}")
        else:
            argv += [f"--{flag}", value]
    started = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"{name}: fedrec simulate failed (status {status})")
    rounds_log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"summary": summary, "rounds": rounds_log, "wall": time.perf_counter() - started,
            "peak_mb": usage.ru_maxrss / 1024}


# Cross-device with every user a round: 943 ClientApp calls a round, the scale of issue 13's goal.
ENGINE_SETTINGS = {"cross-silo": (CROSS_SILO, 10), "cross-device": ({**CROSS_DEVICE, "fraction-train": "1.0"}, 943)}


def engines_side_by_side(rounds: int, data_dir: Path, workdir: Path) -> str:
    """The same non-private rounds in-process and on Flower's Ray engine, for both settings."""
    from simulation.ray_engine import run_on_ray

    rows = []
    for name, (recipe, supernodes) in ENGINE_SETTINGS.items():
        settings = {**recipe, "dp": "false", "num-server-rounds": str(rounds)}
        local = run_setting(f"in-process {name}", settings, data_dir, workdir)
        out = workdir / f"ray-{name}"
        config = {**COMMON, **settings, "data-dir": str(data_dir), "out-dir": str(out)}
        ray = run_on_ray(ROOT, num_supernodes=supernodes, run_config={k: _typed(v) for k, v in config.items()},
                         timeout=1800)
        ray_rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
        local_s = sum(r["seconds"] for r in local["rounds"][1:]) / rounds
        ray_s = sum(r["seconds"] for r in ray_rounds) / rounds
        rows.append(f"| {name}, {supernodes} clients, {ray_rounds[0]['sampled']} a round | {local_s:.1f} | "
                    f"{ray_s:.1f} | "
                    f"{ray_s / local_s:.1f}× | {local['wall']:.1f} / {ray.wall_s:.1f} | "
                    f"{local['peak_mb']:.0f} / {ray.peak_rss_mb:.0f} |")
        print(rows[-1], flush=True)
    return "\n".join([
        "## In-process engine against Flower's Ray engine (MovieLens 100K)", "",
        f"Non-private, {rounds} rounds, the same app and settings on both engines (Ray: one SuperNode "
        "per client, one CPU per ClientApp actor). Peak memory of Ray is the sum over all its processes.", "",
        "| setting | in-process s/round | Ray s/round | Ray / in-process | whole run s (in-process / Ray) | "
        "peak MB (in-process / Ray) |", "|---|---|---|---|---|---|", *rows,
    ])


def _typed(value: str) -> object:
    """Run-config values as TOML types for `flwr run` (the CLI path takes strings)."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(SETTINGS), help="settings to run (none: only --engines)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds for every setting (default: its recipe's)")
    parser.add_argument("--engines", type=int, default=0, metavar="R",
                        help="also compare R rounds in-process and on Ray (0: skip)")
    args = parser.parse_args()
    data_dir = require_shared("ml-100k")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            settings = {**SETTINGS[name], **({"num-server-rounds": str(args.rounds)} if args.rounds else {})}
            result = run_setting(name, settings, data_dir, Path(tmp))
            s, per_round = result["summary"], result["rounds"][1:]
            t, p = s["test"], s["popularity_test"]
            eps = f"{s['dp']['epsilon_max']:.2f}" if s["dp"]["enabled"] else "∞"
            seconds = sum(r["seconds"] for r in per_round) / len(per_round)
            clients = sum(r["trained"] for r in per_round) / len(per_round)
            rows[name] = (f"| {name} | {eps} | {t['hr@10']:.4f} | {t['ndcg@10']:.4f} | {p['ndcg@10']:.4f} | "
                          f"{len(per_round)} | {clients:.0f} of {s['setting']['clients']} | {seconds:.1f} | "
                          f"{result['peak_mb']:.0f} |")
            print(rows[name], flush=True)
        if args.engines:
            write_section("engines-ml100k", engines_side_by_side(args.engines, data_dir, Path(tmp)))
    if not rows:
        return
    table, kept = merge_rows("federated-ml100k", rows, list(SETTINGS))
    write_section("federated-ml100k", "\n".join([
        "## Federated training on MovieLens 100K",
        "",
        "Same data, split and evaluator as the centralized baseline (all users' leave-one-out targets, "
        "full ranking, no masking). ε is the largest cumulative ε of any client (local DP-SGD, per window).",
        "",
        "| setting | ε (max over clients) | test HR@10 | test NDCG@10 | popularity NDCG@10 | rounds | "
        "clients per round | s/round | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
        *table,
    ]), kept=kept)


if __name__ == "__main__":
    main()
