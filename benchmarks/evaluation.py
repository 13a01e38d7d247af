"""Full-ranking evaluation at Amazon Beauty's size: every one of its 22,363 validation users'
targets ranked against all 12,101 items, by a fresh attention-LSTM (embedding and hidden 32,
max-len 50, 2 threads unless told), without and with history masking. Seconds for one whole
evaluation (`common.metrics.evaluate_model`, median of a few after a warm-up), split into the
model's forward (`last_scores`, read off a timer around it) and the rest (top-K lists and
ranks, masking, metric counts, batching).

    python -m benchmarks.evaluation [--repeats 3] [--batch-size 512] [--threads 2] [--smoke] [--profile]

`--smoke` runs on the small synthetic data set and writes nothing; `--profile` also prints
torch.profiler's busiest operators per setting (from one more, untimed evaluation) and writes
nothing. On a loaded machine 2 threads wait on each other at every small operator (the LSTM's
steps most of all) and the seconds swing several-fold from run to run; `--threads 1` is steadier.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from benchmarks.report import require_shared, write_section
from common.config import Config, defaults
from common.dataset import eval_examples, load_dataset
from common.metrics import evaluate_model
from common.model import build_model

DATASETS = {"beauty": {"dataset": "seq", "data-dir": "seqrec/s3rec/Beauty.txt"},
            "synthetic": {"dataset": "synthetic", "synthetic-users": 300}}  # --smoke


@contextmanager
def timed_forward(model: nn.Module) -> Iterator[list[float]]:
    """Seconds spent in `model.last_scores`, appended call by call while the block runs."""
    seconds: list[float] = []
    forward = model.last_scores

    def last_scores(*args: object, **kwargs: object) -> torch.Tensor:
        started = time.perf_counter()
        scores = forward(*args, **kwargs)
        seconds.append(time.perf_counter() - started)
        return scores

    model.last_scores = last_scores  # an instance attribute, ahead of the class's method
    try:
        yield seconds
    finally:
        del model.last_scores


def measure(name: str, repeats: int, batch_size: int, profile: bool) -> tuple[list[str], str]:
    settings = dict(DATASETS[name])
    if "data-dir" in settings:
        settings["data-dir"] = str(require_shared(settings["data-dir"]))
    cfg = Config.from_run_config({**defaults(), **settings})
    data = load_dataset(cfg)
    inputs, lengths, targets = eval_examples(data.sequences, "valid", cfg.max_len)
    torch.manual_seed(0)
    model = build_model(cfg, data.num_items)
    users = len(targets)
    # Columns the model reads once each batch is cut to its longest history, against full width.
    batches = np.sort(lengths)[np.arange(batch_size - 1, users + batch_size - 1, batch_size).clip(max=users - 1)]
    read = sum(int(width) * min(batch_size, users - start)
               for start, width in zip(range(0, users, batch_size), batches, strict=True))
    size = f"{name} ({users:,} users × {data.num_items:,} items)"
    print(f"{size}: history length mean {lengths.mean():.1f}, median {np.median(lengths):g}, max {lengths.max()} "
          f"of {cfg.max_len}; the model reads {read / inputs.size:.0%} of the padded columns", flush=True)
    rows = []
    for mask in (False, True):
        evaluate_model(model, inputs, lengths, targets, data.num_items, batch_size=batch_size, mask_history=mask)
        totals, forwards = [], []
        for _ in range(repeats):
            with timed_forward(model) as seconds:
                started = time.perf_counter()
                evaluate_model(model, inputs, lengths, targets, data.num_items, batch_size=batch_size,
                               mask_history=mask)
                totals.append(time.perf_counter() - started)
            forwards.append(sum(seconds))
        total, forward = statistics.median(totals), statistics.median(forwards)
        rows.append(f"| {size} | {'on' if mask else 'off'} | {batch_size} | **{total:.2f}** | {forward:.2f} "
                    f"({forward / total:.0%}) | {total - forward:.2f} ({(total - forward) / total:.0%}) | "
                    f"{1e6 * total / users:.0f} |")
        print(rows[-1], flush=True)
        if profile:  # one more evaluation, under the profiler (which slows it), after the timed ones
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                evaluate_model(model, inputs, lengths, targets, data.num_items, batch_size=batch_size,
                               mask_history=mask)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    note = (f"History length: mean {lengths.mean():.1f}, median {np.median(lengths):g}, max {lengths.max()} of "
            f"{cfg.max_len}; cut to each batch's longest history, the model reads {read / inputs.size:.0%} of the "
            "padded columns.")
    return rows, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512, help="users per batch (evaluate_model's default)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--smoke", action="store_true", help="synthetic data, one repeat, nothing written")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's busiest operators; nothing written")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name = "synthetic" if args.smoke else "beauty"
    rows, note = measure(name, 1 if args.smoke else args.repeats, args.batch_size, args.profile)
    if args.smoke or args.profile:  # a look, not the benchmark: nothing written
        return
    write_section("evaluation", "\n".join([
        "## Full-ranking evaluation at Amazon Beauty's size", "",
        "One server evaluation (`evaluate_model`): every validation user's target ranked against all items "
        "(no sampled negatives) by a fresh attention-LSTM (embedding and hidden 32, max-len 50, "
        f"{args.threads} thread{'s' if args.threads > 1 else ''}); "
        f"median of {args.repeats} after a warm-up. Users go shortest history first and each batch is cut to "
        "its own longest history; the rank is the target's place in the top-K list found by `topk`. "
        "\"Forward\" is the model's `last_scores` (LSTM, attention and the (B, N+1) score matmul); "
        "\"ranking\" is the rest (top-K lists and ranks, history masking, metric counts, batching).", "",
        note, "",
        "| data | history masked | users per batch | seconds | forward s | ranking s | µs per user |",
        "|---|---|---|---|---|---|---|", *rows,
    ]))


if __name__ == "__main__":
    main()
