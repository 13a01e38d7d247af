"""Privacy against utility: federated cross-device training (one user per client, local DP-SGD)
at ε ∈ {0.5, 1, 2, 4, 8, ∞}, with the centralized non-private model and the most-popular
baseline as references; learning curves (validation NDCG@10 by round) of every run.

Results accumulate in `benchmarks/results/privacy_utility.json` (one entry per data set and ε),
so each data set or ε can run alone; the table in BENCHMARKS.md and the plots under
`benchmarks/figures/` are redrawn from everything stored.

    python -m benchmarks.privacy_utility [--datasets ml-100k ml-latest-small beauty] [--epsilons 8 inf] [--rounds R]
                                         [--central-epochs E]
    python -m benchmarks.privacy_utility --plot-only
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.centralized_ml100k import SETTINGS as CENTRAL_RECIPES
from benchmarks.federated_ml100k import COMMON, CROSS_DEVICE, DEVICE_DP, run_setting
from benchmarks.report import ROOT, require_shared, write_section
from common.config import Config
from simulation.centralized import train_centralized

RESULTS = ROOT / "benchmarks" / "results" / "privacy_utility.json"
FIGURES = ROOT / "benchmarks" / "figures"
EPSILONS = [0.5, 1.0, 2.0, 4.0, 8.0, math.inf]
DATASETS = {"ml-100k": {"dataset": "ml-100k", "data-dir": "ml-100k"},
            "ml-latest-small": {"dataset": "ml-latest-small", "data-dir": "ml-latest-small"},
            "beauty": {"dataset": "seq", "data-dir": "seqrec/s3rec/Beauty.txt"}}


def run_dataset(name: str, epsilons: list[float], rounds: int | None, central_epochs: int | None,
                workdir: Path) -> dict[str, Any]:
    """The federated runs of one data set, and its centralized and popularity references."""
    data = {**DATASETS[name], "data-dir": str(require_shared(DATASETS[name]["data-dir"]))}
    common = {**COMMON, **data}
    central_cfg = Config.from_run_config({**common, **CENTRAL_RECIPES["non-private"],
                                          **({"epochs": central_epochs} if central_epochs else {})})
    central = train_centralized(central_cfg, workdir / f"{name}-central")
    entry: dict[str, Any] = {"centralized_ndcg@10": central["test"]["ndcg@10"], "centralized_epochs": central["epochs"],
                             "popularity_ndcg@10": central["popularity_test"]["ndcg@10"],
                             "users": central["users"], "items": central["items"], "runs": {}}
    for epsilon in epsilons:
        recipe = {**CROSS_DEVICE, "dp": "false"} if math.isinf(epsilon) else {
            **CROSS_DEVICE, **DEVICE_DP, "target-epsilon": str(epsilon)}
        if rounds:
            recipe["num-server-rounds"] = str(rounds)
        result = run_setting(f"{name} eps {epsilon}", recipe, Path(data["data-dir"]), workdir, common=common)
        s, per_round = result["summary"], result["rounds"]
        entry["runs"][str(epsilon)] = {
            "epsilon_spent": s["dp"]["epsilon_max"] if s["dp"]["enabled"] else None,
            "test_ndcg@10": s["test"]["ndcg@10"], "test_hr@10": s["test"]["hr@10"],
            "rounds": len(per_round) - 1,
            "seconds_per_round": sum(r["seconds"] for r in per_round[1:]) / (len(per_round) - 1),
            "curve": [[r["round"], r["ndcg@10"]] for r in per_round if "ndcg@10" in r]}
        print(name, epsilon, entry["runs"][str(epsilon)]["test_ndcg@10"], flush=True)
    return entry


def plot(results: dict[str, Any]) -> list[Path]:
    """The privacy–utility curve of every data set, and each data set's learning curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite = [float(e) for r in results.values() for e in r["runs"] if not math.isinf(float(e))]
    infinity = 2 * max(finite, default=8.0)  # where ε = ∞ sits on the log axis
    for (name, entry), colour in zip(results.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False):
        points = sorted((float(e), run["test_ndcg@10"]) for e, run in entry["runs"].items())
        ax.plot([infinity if math.isinf(e) else e for e, _ in points], [v for _, v in points], "o-", color=colour,
                label=f"{name}: federated, local DP")
        ax.axhline(entry["centralized_ndcg@10"], color=colour, linestyle="--", linewidth=1,
                   label=f"{name}: centralized, non-private")
        ax.axhline(entry["popularity_ndcg@10"], color=colour, linestyle=":", linewidth=1, label=f"{name}: most popular")
    ax.set_xscale("log")
    ticks = sorted({*finite, infinity})
    ax.set_xticks(ticks, [("∞" if t == infinity else f"{t:g}") for t in ticks])
    ax.set_xlabel("ε (δ = 1e-5, per client, per window)")
    ax.set_ylabel("test NDCG@10")
    ax.set_title("Privacy against utility, cross-device (one user per client)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(FIGURES / "privacy_utility.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    for name, entry in results.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for epsilon, run in sorted(entry["runs"].items(), key=lambda item: float(item[0])):
            rounds, values = zip(*run["curve"], strict=True)
            ax.plot(rounds, values, label="non-private" if math.isinf(float(epsilon)) else f"ε = {float(epsilon):g}")
        ax.axhline(entry["popularity_ndcg@10"], color="grey", linestyle=":", label="most popular (test)")
        ax.set_xlabel("round")
        ax.set_ylabel("validation NDCG@10")
        ax.set_title(f"Learning curves, {name}, cross-device")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(FIGURES / f"learning_curves_{name}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def table(results: dict[str, Any]) -> list[str]:
    rows = []
    for name, entry in results.items():
        for epsilon, run in sorted(entry["runs"].items(), key=lambda item: float(item[0])):
            spent = "∞" if run["epsilon_spent"] is None else f"{run['epsilon_spent']:.2f}"
            rows.append(f"| {name} | {'∞' if math.isinf(float(epsilon)) else f'{float(epsilon):g}'} | {spent} | "
                        f"{run['test_hr@10']:.4f} | {run['test_ndcg@10']:.4f} | {entry['centralized_ndcg@10']:.4f} | "
                        f"{entry['popularity_ndcg@10']:.4f} | {run['rounds']} | {run['seconds_per_round']:.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--epsilons", type=float, nargs="*", default=EPSILONS)
    parser.add_argument("--rounds", type=int, default=None, help="rounds for every run (default: the recipes')")
    parser.add_argument("--central-epochs", type=int, default=None,
                        help="most centralized epochs (default: the recipe's 60)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the table and plots from stored results")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.plot_only:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.datasets:
                entry = run_dataset(name, args.epsilons, args.rounds, args.central_epochs, Path(tmp))
                previous = results.get(name, {}).get("runs", {})
                results[name] = {**entry, "runs": {**previous, **entry["runs"]}}
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(results, indent=1))
    figures = plot(results)
    write_section("privacy-utility", "\n".join([
        "## Privacy against utility (cross-device, local DP)", "",
        "Federated, one user per client, the cross-device recipes of the MovieLens 100K section (non-private: "
        "150 rounds; DP: 10 rounds, 10% of clients a round, σ from the target ε over the planned rounds); "
        "centralized: the non-private recipe of the centralized baseline. Test NDCG@10, full ranking.", "",
        "| data | target ε | ε spent (max) | test HR@10 | test NDCG@10 | centralized NDCG@10 | most popular NDCG@10 | "
        "rounds | s/round |", "|---|---|---|---|---|---|---|---|---|", *table(results), "",
        *(f"![{p.stem}]({p.relative_to(ROOT).as_posix()})" for p in figures),
    ]))


if __name__ == "__main__":
    main()
