"""Speed ratios side by side, in one run: (1) a DP-SGD step against a plain step on the same
windows (fedrec's `torch.func` per-window gradients, and Opacus's hooks as the reference);
(2) one federated round over all clients against one centralized epoch over the same windows,
DP on both; (3) the in-process engine against Flower's Ray engine, per round.

    python -m benchmarks.speed [--datasets ml-100k beauty] [--batches 1 3 256] [--engine-rounds 2] [--smoke] [--profile]

`--smoke` runs every part on the small synthetic data set and writes nothing (CI runs it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from benchmarks.report import ROOT, require_shared, write_section
from client.training import private_gradients
from common.config import Config, defaults
from common.dataset import load_dataset, training_windows
from common.model import build_model, window_loss

DATASETS = {"ml-100k": {"dataset": "ml-100k", "data-dir": "ml-100k"},
            "beauty": {"dataset": "seq", "data-dir": "seqrec/s3rec/Beauty.txt"},
            "synthetic": {"dataset": "synthetic", "synthetic-users": 200}}  # --smoke
GOALS = {"step": 2.5, "round": 1.5}


def config(name: str, **overrides: object) -> Config:
    settings = dict(DATASETS[name])
    if "data-dir" in settings:
        settings["data-dir"] = str(require_shared(settings["data-dir"]))
    return Config.from_run_config({**defaults(), **settings, "optimizer": "sgd", "lr": 0.1, **overrides})


def step_seconds(kind: str, cfg: Config, num_items: int, batch: torch.Tensor, repeats: int,
                 profile: bool = False) -> float:
    """Median seconds of one optimizer step on `batch`: plain, fedrec's DP step or Opacus's.
    `profile` prints where the time goes (torch.profiler's busiest operators)."""
    torch.manual_seed(0)
    model = build_model(cfg, num_items)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    step: Callable[[], None]
    if kind == "plain":
        def step() -> None:
            window_loss(model, batch).backward()
    elif kind == "fedrec DP":
        def step() -> None:
            private_gradients(model, batch, cfg.max_grad_norm, 1.0, len(batch))
    else:  # Opacus's hooks and DPOptimizer: what fedrec used before, and the reference its test checks against
        model.private = True
        net = GradSampleModule(model, loss_reduction="mean")
        optimizer = DPOptimizer(optimizer, noise_multiplier=1.0, max_grad_norm=cfg.max_grad_norm,
                                expected_batch_size=len(batch))

        def step() -> None:
            window_loss(net, batch).backward()
    model.train()
    times = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else nullcontext() as prof:
        for _ in range(repeats + 1):  # the first step warms up and is not counted
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            step()
            optimizer.step()
            times.append(time.perf_counter() - started)
    if profile:
        print(f"{kind}, {len(batch)} windows:\n{prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=8)}")
    return statistics.median(times[1:])


def step_ratios(names: list[str], batches: list[int], repeats: int, profile: bool = False) -> list[str]:
    rows = []
    for name in names:
        cfg = config(name)
        data = load_dataset(cfg)
        windows = training_windows(data.sequences, cfg.max_len)
        order = np.random.default_rng(0).permutation(len(windows))
        for size in batches:
            batch = torch.from_numpy(windows[order[:size]])
            seconds = {kind: step_seconds(kind, cfg, data.num_items, batch, repeats, profile)
                       for kind in ("plain", "fedrec DP", "Opacus hooks")}
            ratio = seconds["fedrec DP"] / seconds["plain"]
            rows.append(f"| {name} ({data.num_items:,} items) | {size} | {1000 * seconds['plain']:.1f} | "
                        f"{1000 * seconds['fedrec DP']:.1f} | {1000 * seconds['Opacus hooks']:.1f} | "
                        f"**{ratio:.2f}×** {'✓' if ratio <= GOALS['step'] else '✗'} | "
                        f"{seconds['Opacus hooks'] / seconds['plain']:.2f}× |")
            print(rows[-1], flush=True)
    return rows


def round_against_epoch(name: str, workdir: Path) -> str:
    """All of a data set's users as clients for one DP round, against one centralized DP epoch."""
    from simulation.centralized import train_centralized
    from simulation.run import simulate

    common = {"dp": True, "target-epsilon": 8.0, "max-grad-norm": 1.0, "batch-size": 256}
    central = train_centralized(config(name, **common, epochs=1), workdir / f"{name}-central")
    cfg = config(name, **common, partition="user", **{"num-server-rounds": 1, "local-epochs": 1, "fraction-train": 1.0,
                                                    "fraction-evaluate": 0.0, "update-norm-factor": 0.0,
                                                    "out-dir": str(workdir / f"{name}-round")})
    summary = simulate(cfg, quiet=True)
    before, first = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    round_s = first["seconds"] - before["seconds"]  # the server's evaluation left out, as in the epoch's time
    ratio = round_s / central["seconds_per_epoch"]
    row = (f"| {name} | {central['training_windows']:,} windows, {summary['setting']['clients']:,} clients | "
           f"{central['seconds_per_epoch']:.1f} | {round_s:.1f} | **{ratio:.2f}×** {'✓' if ratio <= GOALS['round'] else '✗'} |")
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=["ml-100k", "beauty"])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 3, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--engine-rounds", type=int, default=2, help="rounds per engine in part (3); 0 skips it")
    parser.add_argument("--smoke", action="store_true", help="synthetic data, tiny sizes, nothing written")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's busiest operators per step kind; nothing written")
    args = parser.parse_args()
    torch.set_num_threads(2)
    names = ["synthetic"] if args.smoke else args.datasets
    batches = [1, 3, 16] if args.smoke else args.batches
    steps = step_ratios(names, batches, 2 if args.smoke else args.repeats, args.profile)
    with tempfile.TemporaryDirectory() as tmp:
        rounds = [round_against_epoch(name, Path(tmp)) for name in names if name != "beauty"]
        if args.smoke or args.profile:  # a look, not the benchmark: nothing written
            return
        if args.engine_rounds:
            # (3) has its own section. A fresh parent process: a child's peak RSS counts what it
            # inherited at fork, and this one holds Beauty's data by now.
            subprocess.run([sys.executable, "-m", "benchmarks.federated_ml100k", "--only", "--engines",
                            str(args.engine_rounds)], cwd=ROOT, check=True)
    write_section("speed", "\n".join([
        "## Speed: DP against plain training, federated against centralized, in-process against Ray", "",
        "(1) One optimizer step on the same windows (median of "
        f"{args.repeats} after a warm-up; embedding and hidden 32, max-len 50, 2 threads): plain, fedrec's DP "
        "step (per-window gradients by `torch.func`, clip, noise) and Opacus's hooks with its DPOptimizer "
        f"(what fedrec used before). Goal: DP / plain ≤ {GOALS['step']}×.", "",
        "| data | windows in the batch | plain ms | fedrec DP ms | Opacus hooks ms | fedrec DP / plain | "
        "Opacus / plain |", "|---|---|---|---|---|---|---|", *steps, "",
        "(2) One federated round with every user as a client (one local DP epoch each, no norm bound, no "
        "federated evaluation) against one centralized DP epoch (batch 256) over the same windows; the "
        f"server's evaluation is left out of both. Goal: ≤ {GOALS['round']}×. Amazon Beauty's row is in the "
        "scale section.", "",
        "| data | size | centralized epoch s | federated round s | round / epoch |", "|---|---|---|---|---|",
        *rounds, "",
        "(3) In-process against Ray: the section \"In-process engine against Flower's Ray engine\", which this "
        "command reruns (as `python -m benchmarks.federated_ml100k --only --engines 2`) in the same run.",
    ]))


if __name__ == "__main__":
    main()
