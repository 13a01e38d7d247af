"""Attacks and defences on MovieLens 100K: clean test NDCG@10 and a pushed item's exposure.

For the cross-silo and cross-device recipes of the federated benchmark (non-private, fewer
rounds), each defence runs clean and with 10% and 20% malicious clients of each kind; a cell
is test NDCG@10 / the target item's exposure (share of users with it in their top 10). Every
run watches the same target item, so its clean exposure is known too.

    python -m benchmarks.robustness_ml100k [--settings ...] [--fractions ...] [--attacks ...] [--defences ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.federated_ml100k import CROSS_DEVICE, CROSS_SILO, run_setting
from benchmarks.report import merge_rows, require_shared, table_cells, write_section
from common.config import Config
from common.dataset import load_dataset, popularity

SETTINGS = {
    "cross-silo": {**CROSS_SILO, "dp": "false", "num-server-rounds": "10", "eval-every": "10"},
    "cross-device": {**CROSS_DEVICE, "dp": "false", "num-server-rounds": "40", "eval-every": "40"},
}
# Each defence alone: the robust aggregations run without the norm bound, FedAvg with and without it.
NO_BOUND = {"update-norm-factor": "0"}
DEFENCES = {
    "FedAvg": NO_BOUND,
    "FedAvg + norm bound": {},  # the default: 3 x the round's median update norm
    "median": {**NO_BOUND, "aggregation": "median"},
    "trimmed mean": {**NO_BOUND, "aggregation": "trimmed-mean"},
    "Krum": {**NO_BOUND, "aggregation": "krum"},
    "Multi-Krum": {**NO_BOUND, "aggregation": "multi-krum"},
    "Bulyan": {**NO_BOUND, "aggregation": "bulyan"},
}
# NaN updates are rejected by validation before any aggregation: one FedAvg run shows it.
ATTACKS = ("scale", "sign-flip", "random", "target", "nan")


def target_item(data_dir: Path) -> str:
    """A rarely watched film (a quarter of the way up the popularity order): what an attacker would push."""
    data = load_dataset(Config.from_run_config({"dataset": "ml-100k", "data-dir": str(data_dir), "kcore": 0}))
    counts = popularity(data.sequences, data.num_items)[1:]
    return str(data.item_ids[counts.argsort(kind="stable")[len(counts) // 4]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--fractions", nargs="*", default=["0.1", "0.2"])
    parser.add_argument("--attacks", nargs="*", default=list(ATTACKS))
    parser.add_argument("--defences", nargs="*", default=list(DEFENCES))
    parser.add_argument("--no-clean", action="store_true", help="skip the clean runs")
    args = parser.parse_args()
    data_dir = require_shared("ml-100k")
    target = target_item(data_dir)
    conditions = ["clean"] + [f"{a} {float(f):.0%}" for f in args.fractions for a in args.attacks]
    cells: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            for condition in conditions:
                if condition == "clean" and args.no_clean:
                    continue
                attack = {} if condition == "clean" else {
                    "attack": condition.split()[0], "attack-fraction": str(float(condition.split()[1][:-1]) / 100)}
                for defence in args.defences:
                    if attack.get("attack") == "nan" and defence != "FedAvg":
                        continue
                    name = f"{setting}, {condition}, {defence}"
                    result = run_setting(name.replace("%", "pct"), {**SETTINGS[setting], **DEFENCES[defence], **attack,
                                                                    "target-item": target}, data_dir, Path(tmp))
                    t = result["summary"]["test"]
                    cells.setdefault(f"{setting}, {condition}", {})[defence] = \
                        f"{t['ndcg@10']:.4f} / {t['target-exposure@10']:.3f}"
                    print(name, cells[f"{setting}, {condition}"][defence], flush=True)
    order = [f"{s}, {c}" for s in SETTINGS for c in ["clean"] + [f"{a} {f:.0%}" for f in (0.1, 0.2) for a in ATTACKS]]
    earlier = {key: dict(zip(DEFENCES, row, strict=False)) for key, row in table_cells("robustness-ml100k").items()}
    reused = any(earlier.get(key, {}).get(d, "–") != "–"
                 for key, row in cells.items() for d in DEFENCES if d not in row)
    rows = {key: f"| {key} | " + " | ".join(row.get(d) or earlier.get(key, {}).get(d, "–") for d in DEFENCES) + " |"
            for key, row in cells.items()}  # a run of some defences keeps the other defences' cells
    table, kept = merge_rows("robustness-ml100k", rows, order, cells_kept=reused)
    write_section("robustness-ml100k", "\n".join([
        "## Attacks and defences on MovieLens 100K",
        "",
        f"Non-private; cross-silo: 10 clients, {SETTINGS['cross-silo']['num-server-rounds']} rounds; "
        "cross-device: 94 of "
        f"943 clients a round, {SETTINGS['cross-device']['num-server-rounds']} rounds (recipes of the federated "
        f"benchmark, fewer rounds). Attackers: `attack-scale` 10, chosen from the seed; the target attack pushes item "
        f"{target} (a rarely watched film). Each cell: test NDCG@10 / share of users with item {target} in their top "
        "10. Robust aggregations assume `byzantine-fraction` 0.1 and run without the norm bound; NaN updates are "
        "rejected by validation before any aggregation, so only FedAvg runs them.",
        "",
        "| setting, attack | " + " | ".join(DEFENCES) + " |",
        "|---|" + "---|" * len(DEFENCES),
        *table,
    ]), kept=kept)


if __name__ == "__main__":
    main()
