"""One federated round over Amazon Beauty's users as clients (one user each), DP on, in one
process: seconds per client and peak memory as the round grows to all 22,363 clients, next to
one centralized DP epoch over the same windows with the same DP settings.

Each size runs in its own child process, so each peak memory is its own. The norm bound is off
(`update-norm-factor 0`), so the guard aggregates replies as they arrive; `--median-bound-at N`
adds a row with the default median-derived bound, which keeps every reply of the round.

    python -m benchmarks.scale_beauty [--clients 1000 5000 22363] [--median-bound-at 1000] [--no-centralized]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.report import ROOT, require_shared, write_section

USERS = 22363
SETTINGS = {"dataset": "seq", "partition": "user", "num-server-rounds": 1, "local-epochs": 1, "optimizer": "sgd",
            "lr": 5.0, "dp": True, "target-epsilon": 8.0, "delta": 1e-5, "max-grad-norm": 1.0,
            "fraction-evaluate": 0.0, "update-norm-factor": 0.0, "min-train-nodes": 1}


def worker(clients: int, factor: float, out: Path) -> dict[str, Any]:
    """In the child: the round (or, with clients = 0, one centralized epoch); its seconds and peak MB."""
    import torch

    from common.config import Config, defaults
    from common.federation import federation

    torch.set_num_threads(2)
    settings = {**defaults(), **SETTINGS, "data-dir": str(require_shared("seqrec/s3rec/Beauty.txt")),
                "out-dir": str(out), "update-norm-factor": factor}
    if clients == 0:
        from simulation.centralized import train_centralized

        cfg = Config.from_run_config({**settings, "epochs": 1, "batch-size": 256, "lr": 0.01})
        summary = train_centralized(cfg, out)
        return {"seconds": summary["seconds_per_epoch"], "windows": summary["training_windows"],
                "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    from simulation.run import simulate

    cfg = Config.from_run_config({**settings, "fraction-train": clients / USERS})
    federation(cfg)  # data loaded before the clock starts, as in the centralized epoch
    simulate(cfg, quiet=True)
    before, round_one = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # A round's record includes the server's evaluation that ends it; round 0's is that evaluation alone.
    return {"seconds": round_one["seconds"] - before["seconds"], "trained": round_one["trained"], "sampled": round_one["sampled"],
            "epsilon_max": round_one["epsilon_max"],
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(clients: int, factor: float, workdir: Path) -> dict[str, Any]:
    out = workdir / f"clients-{clients}-factor-{factor:g}"
    argv = [sys.executable, "-m", "benchmarks.scale_beauty", "--worker", str(clients), str(factor), str(out)]
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{clients} clients: the child failed:\n{done.stderr[-2000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="*", default=[1000, 5000, USERS])
    parser.add_argument("--median-bound-at", type=int, default=0, metavar="N",
                        help="also run N clients with the median-derived norm bound (0: skip)")
    parser.add_argument("--no-centralized", action="store_true", help="skip the centralized DP epoch")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(int(args.worker[0]), float(args.worker[1]), Path(args.worker[2]))))
        return
    require_shared("seqrec/s3rec/Beauty.txt")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        central = None if args.no_centralized else run_child(0, 0.0, Path(tmp))
        if central:
            rows.append(f"| centralized, one DP epoch, batch 256 | {central['windows']:,} windows | "
                        f"{central['seconds']:.0f} | – | {central['peak_mb']:.0f} | – |")
            print(rows[-1], flush=True)
        runs = [(n, 0.0) for n in args.clients] + ([(args.median_bound_at, 3.0)] if args.median_bound_at else [])
        for clients, factor in runs:
            r = run_child(clients, factor, Path(tmp))
            aggregation = "streamed (no bound)" if factor == 0 else "list (median bound)"
            ratio = f"{r['seconds'] / central['seconds']:.2f}×" if central and clients == USERS else "–"
            rows.append(f"| federated round, {aggregation} | {r['trained']:,} of {r['sampled']:,} clients | "
                        f"{r['seconds']:.0f} | {1000 * r['seconds'] / max(r['trained'], 1):.1f} | "
                        f"{r['peak_mb']:.0f} | {ratio} |")
            print(rows[-1], flush=True)
    write_section("scale-beauty", "\n".join([
        "## One round over Amazon Beauty's users (scale)", "",
        f"Amazon Beauty (S3-Rec file): {USERS:,} users, 12,101 items; one user per client, local DP-SGD "
        "(ε = 8 planned over the round, δ = 1e-5, clip 1), one local SGD epoch, embedding and hidden 32, "
        "no federated evaluation (the server's evaluation of all users is left out of the seconds); one "
        "child process per row. Goals: the round over all users fits on this "
        "2-core, 24 GB machine with flat memory; round / centralized epoch ≤ 1.5×.", "",
        "| run | size | seconds | ms per client | peak MB | round / centralized epoch |",
        "|---|---|---|---|---|---|", *rows,
    ]))


if __name__ == "__main__":
    main()
