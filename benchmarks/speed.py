"""Speed, side by side in one run: (1) a DP-SGD step against a plain step on the same windows
(fedrec's step, and Opacus's hooks as the reference); (2) one cross-device DP round over every
user against one centralized DP epoch over the same windows, with ms per client and peak memory;
(3) the same round against Apple's pfl simulating the same model, data and cohort; (4) the
in-process engine against Flower's Ray engine.

    python -m benchmarks.speed [--datasets ml-100k beauty] [--batches 1 3 256] [--pfl-cohort 1000]
                               [--engine-rounds 2] [--smoke] [--profile]

Every round and epoch of (2) runs in a child process of its own, so each peak memory is its own.
`--smoke` runs (1) and (2) on the small synthetic data set and writes nothing (CI runs it); its
last line is what it measured, as JSON, so a test can check the table against the measurements.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.report import ROOT, require_shared, write_section

DATASETS = {"ml-100k": {"dataset": "ml-100k", "data-dir": "ml-100k"},
            "beauty": {"dataset": "seq", "data-dir": "seqrec/s3rec/Beauty.txt"},
            "synthetic": {"dataset": "synthetic", "synthetic-users": 200}}  # --smoke
GOALS = {"step": 2.5, "round": 1.2, "ms_per_client": 2.0, "epoch_speedup": 4.0, "ray": 10.0}
BEFORE = {"beauty": {"epoch_s": 209.0, "round_s": 477.0, "ms_per_client": 21.3, "ratio": 2.28},
          "ml-100k": {"ratio": 3.92}}  # BENCHMARKS.md, commit 233bc3a (one ClientApp call per client)
DP = {"dp": True, "dp-unit": "window", "target-epsilon": 8.0, "delta": 1e-5, "max-grad-norm": 1.0, "batch-size": 256,
      "central-dp": False, "server-strategy": "fedavg"}  # local DP-SGD per window, as measured before


def config(name: str, **overrides: object):
    from common.config import Config, defaults

    settings = dict(DATASETS[name])
    if "data-dir" in settings:
        settings["data-dir"] = str(require_shared(settings["data-dir"]))
    return Config.from_run_config({**defaults(), **settings, "optimizer": "sgd", "lr": 0.1, **overrides})


# --- (1) One step.


def step_seconds(kind: str, cfg, num_items: int, batch: torch.Tensor, repeats: int, profile: bool = False) -> float:
    """Median seconds of one optimizer step on `batch`: plain, fedrec's DP step or Opacus's.
    fedrec's go through `train` with the batch as the whole data set and batch size (one step;
    under DP Poisson sampling at rate 1 takes every window). `profile` prints the busiest operators."""
    import dataclasses

    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from client.training import train
    from common.model import build_model, window_losses

    torch.manual_seed(0)
    model = build_model(cfg, num_items)
    step: Callable[[], None]
    if kind == "Opacus hooks":  # what fedrec used before, and the reference its test checks against
        model.private = True
        net = GradSampleModule(model, loss_reduction="mean")
        optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=cfg.lr), noise_multiplier=1.0,
                                max_grad_norm=cfg.max_grad_norm, expected_batch_size=len(batch))

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            window_losses(net, batch, select=False).mean().backward()
            optimizer.step()
    else:
        one_batch = dataclasses.replace(cfg, batch_size=len(batch))
        sigma = 1.0 if kind == "fedrec DP" else None

        def step() -> None:
            train(model, batch.numpy(), one_batch, epochs=1, noise_multiplier=sigma)
    model.train()
    times = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else nullcontext() as prof:
        for _ in range(repeats + 1):  # the first step warms up and is not counted
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
    if profile:
        print(f"{kind}, {len(batch)} windows:\n{prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=8)}")
    return statistics.median(times[1:])


def step_ratios(names: list[str], batches: list[int], repeats: int, profile: bool = False) -> list[dict[str, Any]]:
    """Per data set and batch size: the seconds of each step kind, their ratio and the table row."""
    from common.dataset import load_dataset, training_windows

    measured = []
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
            row = (f"| {name} ({data.num_items:,} items) | {size} | {1000 * seconds['plain']:.1f} | "
                   f"{1000 * seconds['fedrec DP']:.1f} | {1000 * seconds['Opacus hooks']:.1f} | "
                   f"**{ratio:.2f}×** {'✓' if ratio <= GOALS['step'] else '✗'} | "
                   f"{seconds['Opacus hooks'] / seconds['plain']:.2f}× |")
            print(row, flush=True)
            measured.append({"data": name, "windows": len(batch), "seconds": seconds, "ratio": ratio, "row": row})
    return measured


# --- (2) A round against an epoch, each in a child process.


def worker(name: str, clients: int, out: Path) -> dict[str, Any]:
    """In the child: one centralized DP epoch (clients = 0), or one cross-device DP round with
    `clients` users as clients (one local epoch each, no norm bound, no federated evaluation).
    Seconds exclude loading the data and the server's evaluation; peak MB is the child's."""
    from common.federation import federation

    torch.set_num_threads(2)
    if clients == 0:
        from simulation.centralized import train_centralized

        summary = train_centralized(config(name, **DP, epochs=1, lr=0.01), out)
        return {"seconds": summary["seconds_per_epoch"], "windows": summary["training_windows"],
                "epsilon": summary["dp"]["epsilon"],
                "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    from simulation.run import simulate

    users = len(federation(config(name)).data.sequences)
    cfg = config(name, **DP, partition="user", lr=5.0, **{
        "num-server-rounds": 1, "local-epochs": 1, "fraction-train": min(clients / users, 1.0),
        "fraction-evaluate": 0.0, "update-norm-factor": 0.0, "min-train-nodes": 1, "out-dir": str(out)})
    federation(cfg)  # data loaded before the clock starts, as in the centralized epoch
    simulate(cfg, quiet=True)
    before, first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # A round's record includes the server's evaluation that ends it; round 0's is that evaluation alone.
    return {"seconds": first["seconds"] - before["seconds"], "trained": first["trained"], "users": users,
            "epsilon_max": first["epsilon_max"], "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(name: str, clients: int, workdir: Path) -> dict[str, Any]:
    out = workdir / f"{name}-{clients}"
    argv = [sys.executable, "-m", "benchmarks.speed", "--worker", name, str(clients), str(out)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name}, {clients} clients: the child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def round_against_epoch(name: str, workdir: Path) -> tuple[str, dict[str, Any]]:
    central = run_child(name, 0, workdir)
    fed = run_child(name, 10**9, workdir)  # every user
    ratio = fed["seconds"] / central["seconds"]
    per_client = 1000 * fed["seconds"] / max(fed["trained"], 1)
    before = BEFORE.get(name, {})
    row = (f"| {name} | {central['windows']:,} windows, {fed['trained']:,} clients | {central['seconds']:.1f} | "
           f"{fed['seconds']:.1f} | **{ratio:.2f}×** {'✓' if ratio <= GOALS['round'] else '✗'} "
           f"(before {before.get('ratio', '–')}×) | {per_client:.2f} | "
           f"{central['peak_mb']:.0f} / {fed['peak_mb']:.0f} |")
    print(row, flush=True)
    return row, {"central": central, "round": fed, "ratio": ratio, "ms_per_client": per_client, "row": row}


# --- (3) pfl, (4) Ray.


def pfl_side_by_side(cohort: int, workdir: Path, rounds: int = 3) -> str:
    from benchmarks.pfl_peer import pfl_seconds_per_round

    data = require_shared(DATASETS["beauty"]["data-dir"])
    fed = run_child("beauty", cohort, workdir)
    peer = pfl_seconds_per_round(str(data), cohort, rounds, 50)
    ratio = peer["pfl_seconds_per_round"] / fed["seconds"]
    row = (f"| Amazon Beauty, {cohort:,} clients a round, 1 local epoch | {fed['seconds']:.1f} | "
           f"{peer['pfl_seconds_per_round']:.1f} | **{ratio:.2f}×** {'✓' if ratio >= 1 else '✗'} | "
           f"pfl {peer['pfl_version']}: {peer['mechanism']} |")
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=["ml-100k", "beauty"])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 3, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pfl-cohort", type=int, default=1000, help="clients a round in (3); 0 skips it")
    parser.add_argument("--engine-rounds", type=int, default=2, help="rounds per engine in (4); 0 skips it")
    parser.add_argument("--smoke", action="store_true", help="synthetic data, tiny sizes, nothing written")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's busiest operators per step kind; nothing written")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), Path(args.worker[2]))))
        return
    torch.set_num_threads(2)
    names = ["synthetic"] if args.smoke else args.datasets
    with tempfile.TemporaryDirectory() as tmp:
        # (2) and (3) first, while this process is small: a child's peak RSS counts what it inherited.
        measured = [round_against_epoch(name, Path(tmp)) for name in names] if not args.profile else []
        rounds, found = zip(*measured, strict=True) if measured else ((), ())
        results = dict(zip(names, found, strict=True))
        peer = pfl_side_by_side(args.pfl_cohort, Path(tmp)) if args.pfl_cohort and not (args.smoke or args.profile) \
            else "| (not run) | | | | |"
    steps = step_ratios(names, [1, 3, 16] if args.smoke else args.batches, 2 if args.smoke else args.repeats,
                        args.profile)
    if args.smoke:  # a look, not the benchmark: nothing written
        print(json.dumps({"steps": steps, "rounds": results}))
        return
    if args.profile:
        return
    if args.engine_rounds:
        # (4) has its own section; a fresh parent process, so that its peak memory is its own.
        subprocess.run([sys.executable, "-m", "benchmarks.federated_ml100k", "--only", "--engines",
                        str(args.engine_rounds)], cwd=ROOT, check=True)
    beauty = results.get("beauty")
    epoch_line = ""
    if beauty:
        speedup = BEFORE["beauty"]["epoch_s"] / beauty["central"]["seconds"]
        epoch_line = (f"Centralized DP epoch on Amazon Beauty: {beauty['central']['seconds']:.1f} s against "
                      f"{BEFORE['beauty']['epoch_s']:.0f} s before, **{speedup:.1f}×** faster "
                      f"{'✓' if speedup >= GOALS['epoch_speedup'] else '✗'} (goal ≥ {GOALS['epoch_speedup']:g}×). "
                      f"The round over all {beauty['round']['trained']:,} Beauty users: "
                      f"{beauty['round']['seconds']:.1f} s, "
                      f"{beauty['ms_per_client']:.2f} ms per client (before {BEFORE['beauty']['round_s']:.0f} s, "
                      f"{BEFORE['beauty']['ms_per_client']} ms; goal ≤ {GOALS['ms_per_client']:g} ms).")
    write_section("speed", "\n".join([
        "## Speed: DP against plain training, a round against an epoch, fedrec against pfl and Ray", "",
        "(1) One optimizer step on the same windows (median of "
        f"{args.repeats} after a warm-up; embedding and hidden 32, max-len 50, 2 threads): plain, fedrec's DP "
        "step (per-window gradients of the small layers by `torch.func`, ghost norms for the embedding and "
        "output layer, clip, noise) and Opacus's hooks with its DPOptimizer (what fedrec used before). "
        f"Goal: DP / plain ≤ {GOALS['step']}×.", "",
        "| data | windows in the batch | plain ms | fedrec DP ms | Opacus hooks ms | fedrec DP / plain | "
        "Opacus / plain |", "|---|---|---|---|---|---|---|", *(step["row"] for step in steps), "",
        "(2) One cross-device DP round with every user as a client (local DP-SGD, ε = 8, one local SGD epoch "
        "each, no norm bound, no federated evaluation; the in-process engine trains each cohort of 128 clients "
        "as one batch) against one centralized DP epoch (batch 256) over the same windows; the server's "
        f"evaluation is left out of both. Each in a child process of its own. Goal: round / epoch ≤ {GOALS['round']}×.",
        "", "| data | size | centralized epoch s | federated round s | round / epoch | ms per client | "
        "peak MB (epoch / round) |", "|---|---|---|---|---|---|---|", *rounds, "", epoch_line, "",
        "(3) The same round setting against Apple's pfl (PyTorch backend, its own venv `.bench-pfl/`, made by "
        "`benchmarks/pfl_peer.py`), same model, data, cohort and local epochs; s/round after a warm-up round. "
        "Goal: fedrec at least as fast.", "",
        "| setting | fedrec s/round | pfl s/round | pfl / fedrec | pfl's DP |", "|---|---|---|---|---|", peer, "",
        "(4) In-process against Ray: the section \"In-process engine against Flower's Ray engine\", which this "
        "command reruns (as `python -m benchmarks.federated_ml100k --only --engines "
        f"{args.engine_rounds}`) in the same run.",
    ]))


if __name__ == "__main__":
    main()
