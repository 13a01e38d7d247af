"""One cross-device DP round over Amazon Beauty's users (one user per client) as the round grows
to all 22,363 clients: seconds, ms per client and peak memory, each size in a child process of
its own (`benchmarks.speed`'s worker), next to one centralized DP epoch over the same windows.

    python -m benchmarks.scale_beauty [--clients 1000 5000 22363] [--no-centralized]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.report import require_shared, write_section
from benchmarks.speed import DATASETS, run_child

USERS = 22363
GOAL_MB = 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="*", default=[1000, 5000, USERS])
    parser.add_argument("--no-centralized", action="store_true", help="skip the centralized DP epoch")
    args = parser.parse_args()
    require_shared(DATASETS["beauty"]["data-dir"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        central = None if args.no_centralized else run_child("beauty", 0, Path(tmp))
        if central:
            rows.append(f"| centralized, one DP epoch, batch 256 | {central['windows']:,} windows | "
                        f"{central['seconds']:.1f} | – | {central['peak_mb']:.0f} | – |")
            print(rows[-1], flush=True)
        for clients in args.clients:
            r = run_child("beauty", clients, Path(tmp))
            ratio = f"{r['seconds'] / central['seconds']:.2f}×" if central and clients >= USERS else "–"
            rows.append(f"| federated round | {r['trained']:,} clients | {r['seconds']:.1f} | "
                        f"{1000 * r['seconds'] / max(r['trained'], 1):.2f} | {r['peak_mb']:.0f} "
                        f"{'✓' if r['peak_mb'] <= GOAL_MB else '✗'} | {ratio} |")
            print(rows[-1], flush=True)
    write_section("scale-beauty", "\n".join([
        "## One round over Amazon Beauty's users (scale)", "",
        f"Amazon Beauty (S3-Rec file): {USERS:,} users, 12,101 items; one user per client, local DP-SGD "
        "(ε = 8 planned over the round, δ = 1e-5, clip 1), one local SGD epoch, embedding and hidden 32, "
        "no federated evaluation (the server's evaluation of all users is left out of the seconds); the "
        "in-process engine trains each cohort of 256 clients as one batch and folds the replies into a "
        f"streamed FedAvg sum; one child process per row. Goal: peak memory ≤ {GOAL_MB} MB and flat from 1k "
        "to all clients.", "",
        "| run | size | seconds | ms per client | peak MB | round / centralized epoch |",
        "|---|---|---|---|---|---|", *rows,
    ]))


if __name__ == "__main__":
    main()
