"""Federated training on MovieLens 100K: cross-device (943 clients, one user each) and
cross-silo (10 clients of ~94 users), non-private and local DP-SGD at ε = 8 and ε = 1
(δ = 1e-5), next to the centralized model on the same split; plus one round on Flower's Ray
engine against the in-process engine.

Each setting runs as its own `fedrec simulate` process, so its peak memory is its own.

    python -m benchmarks.federated_ml100k [--only NAME ...] [--rounds R] [--engines R]
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

from benchmarks.report import ROOT, require_shared, write_section

COMMON = {"dataset": "ml-100k", "kcore": "0", "max-len": "50", "embedding-dim": "64", "hidden-dim": "64",
          "dropout": "0.1", "batch-size": "64"}
CROSS_DEVICE = {"partition": "user", "fraction-train": "0.1", "local-epochs": "5", "lr": "0.01"}
CROSS_SILO = {"partition": "iid", "num-clients": "10", "fraction-train": "1.0", "local-epochs": "1", "lr": "0.003"}
DP = {"dp": "true", "batch-size": "64", "max-grad-norm": "1.0", "delta": "1e-5"}
SETTINGS: dict[str, dict[str, str]] = {
    "cross-device, non-private": {**CROSS_DEVICE, "dp": "false"},
    "cross-device, DP ε=8": {**CROSS_DEVICE, **DP, "target-epsilon": "8"},
    "cross-device, DP ε=1": {**CROSS_DEVICE, **DP, "target-epsilon": "1"},
    "cross-silo, non-private": {**CROSS_SILO, "dp": "false"},
    "cross-silo, DP ε=8": {**CROSS_SILO, **DP, "target-epsilon": "8", "batch-size": "128", "lr": "0.01"},
    "cross-silo, DP ε=1": {**CROSS_SILO, **DP, "target-epsilon": "1", "batch-size": "128", "lr": "0.01"},
}
# FLAGS maps run-config keys to `fedrec simulate` options where the names differ.
FLAGS = {"num-server-rounds": "rounds"}


def run_setting(name: str, settings: dict[str, str], rounds: int, data_dir: Path, workdir: Path) -> dict[str, Any]:
    """`fedrec simulate` in a child process; returns its summary, rounds and peak RSS."""
    out = workdir / name.replace(" ", "_").replace(",", "").replace("=", "")
    options = {**COMMON, "data-dir": str(data_dir), "num-server-rounds": str(rounds), **settings}
    argv = [sys.executable, "-m", "fedrec", "simulate", "--out", str(out), "--quiet"]
    for key, value in options.items():
        flag = FLAGS.get(key, key)
        if key == "dp":
            argv.append("--dp" if value == "true" else "--no-dp")
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


def engines_side_by_side(rounds: int, data_dir: Path, workdir: Path) -> str:
    """The same cross-silo non-private rounds in-process and on Flower's Ray engine."""
    from simulation.ray_engine import run_on_ray

    settings = {**CROSS_SILO, "dp": "false"}
    local = run_setting("in-process", settings, rounds, data_dir, workdir)
    out = workdir / "ray"
    config = {**COMMON, **settings, "data-dir": str(data_dir), "num-server-rounds": rounds, "out-dir": str(out)}
    ray = run_on_ray(ROOT, num_supernodes=10, run_config={k: _typed(v) for k, v in config.items()}, timeout=1800)
    ray_rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    per_round = {"in-process": sum(r["seconds"] for r in local["rounds"][1:]) / rounds,
                 "Ray": sum(r["seconds"] for r in ray_rounds) / rounds}
    return "\n".join([
        "## In-process engine against Flower's Ray engine (MovieLens 100K)", "",
        f"Cross-silo non-private, {rounds} rounds of 10 clients, the same app and settings on both engines.", "",
        "| engine | s/round | whole run s | peak MB |", "|---|---|---|---|",
        f"| in-process (`fedrec simulate`) | {per_round['in-process']:.1f} | {local['wall']:.1f} | {local['peak_mb']:.0f} |",
        f"| Flower Ray engine (`flwr run`, 10 SuperNodes) | {per_round['Ray']:.1f} | {ray.wall_s:.1f} | {ray.peak_rss_mb:.0f} (all processes) |",
        "", f"Ray / in-process seconds per round: {per_round['Ray'] / per_round['in-process']:.2f}×.",
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
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--engines", type=int, default=0, metavar="R",
                        help="also compare R rounds in-process and on Ray (0: skip)")
    args = parser.parse_args()
    data_dir = require_shared("ml-100k")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            result = run_setting(name, SETTINGS[name], args.rounds, data_dir, Path(tmp))
            s, per_round = result["summary"], result["rounds"][1:]
            t, p = s["test"], s["popularity_test"]
            eps = f"{s['dp']['epsilon_max']:.2f}" if s["dp"]["enabled"] else "∞"
            seconds = sum(r["seconds"] for r in per_round) / len(per_round)
            clients = sum(r["trained"] for r in per_round) / len(per_round)
            rows.append(f"| {name} | {eps} | {t['hr@10']:.4f} | {t['ndcg@10']:.4f} | {p['ndcg@10']:.4f} | "
                        f"{len(per_round)} | {clients:.0f} of {s['setting']['clients']} | {seconds:.1f} | "
                        f"{result['peak_mb']:.0f} |")
            print(rows[-1], flush=True)
        if args.engines:
            write_section("engines-ml100k", engines_side_by_side(args.engines, data_dir, Path(tmp)))
    if not rows:
        return
    write_section("federated-ml100k", "\n".join([
        "## Federated training on MovieLens 100K",
        "",
        "Same data, split and evaluator as the centralized baseline (all users' leave-one-out targets, "
        "full ranking, no masking). ε is the largest cumulative ε of any client (local DP-SGD, per window).",
        "",
        "| setting | ε (max over clients) | test HR@10 | test NDCG@10 | popularity NDCG@10 | rounds | "
        "clients per round | s/round | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]))


if __name__ == "__main__":
    main()
