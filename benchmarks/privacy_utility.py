"""Privacy against utility: federated cross-device training (one user per client) at
ε ∈ {1, 2, 4, 8, ∞}, with the centralized non-private model and the most-popular baseline as
references; learning curves (validation NDCG@10 by round) of every run.

Three mechanisms (`--mechanism`): `user`, user-level central DP (each client clips its whole
update, the server adds the noise; ε protects one user's whole history), the default and the
headline; `silo`, cross-silo user-level local DP (`--clients` silos, each running DP-SGD whose
sampled and clipped unit is one of its users; ε protects each user against everyone, the server
included); `window`, local DP-SGD on each cross-device client (ε per window), the earlier recipe.

Results accumulate in `benchmarks/results/privacy_utility.json` (one entry per data set, one run
per mechanism, clients a round and ε), so each can run alone; the table in BENCHMARKS.md and the
plots under `benchmarks/figures/` are redrawn from everything stored.

    python -m benchmarks.privacy_utility [--datasets beauty sports ml-100k] [--mechanism user|window]
                                         [--clients 1000] [--epsilons 8 inf] [--rounds R] [--central-epochs E]
    python -m benchmarks.privacy_utility --plot-only
"""

from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import accuracy
from benchmarks.federated_ml100k import CROSS_DEVICE, DEVICE_DP, run_setting
from benchmarks.report import ROOT, require_shared, write_section

RESULTS = ROOT / "benchmarks" / "results" / "privacy_utility.json"
FIGURES = ROOT / "benchmarks" / "figures"
EPSILONS = [1.0, 2.0, 4.0, 8.0, math.inf]
# The recommended recipe's model and data settings (the accuracy benchmark's, tuned centrally):
# each data set under its own protocol (Amazon: S3-Rec's, history masked; MovieLens: RecBole's),
# width 64, dropout 0.3, the last 50 items, MovieLens's windows every 10 items. The federated
# recipes below bring their own local optimizer, in batches of 64 training units.
MODEL_KEYS = ("dataset", "data-dir", "kcore", "max-len", "window-stride", "mask-history", "embedding-dim",
              "hidden-dim", "dropout")
DATASETS = {name: {**{k: str(v).lower() if isinstance(v, bool) else str(v)
                      for k, v in accuracy.DATASETS[name].items() if k in MODEL_KEYS}, "batch-size": "64"}
            for name in ("ml-100k", "ml-latest-small", "beauty", "sports")}
# User-level DP-FedAvg (McMahan et al., 2018): one local SGD epoch, the update clipped on the
# device with the norm adapted towards the median update (Andrew et al.), Gaussian noise on the
# average, and FedAdam stepping on the noised average (post-processing). Non-private (ε = ∞): the
# same recipe without clipping or noise. Found on Beauty's validation split (tuning record).
USER_LEVEL = {"partition": "user", "dp": "false", "central-dp": "false", "local-epochs": "1", "optimizer": "sgd",
              "lr": "1", "server-strategy": "fedadam", "server-lr": "0.1", "fraction-evaluate": "0", "eval-every": "10",
              "num-server-rounds": "150"}
USER_DP = {"central-dp": "true", "central-clip": "0.5", "central-clip-quantile": "0.5", "delta": "1e-5"}
# Cross-silo: every silo trains every round, one local SGD epoch over its users in batches of 256
# (users under DP, windows without); FedAvg. Under DP each silo runs user-level DP-SGD (C = 1).
# Local Adam (lr 0.003) turned the noise into sign-like steps on every weight (validation 0.0004
# after 5 rounds); SGD at lr 5 and 10 reached 0.0071 and 0.0084 by round 4 (non-private lr 5: 0.0081).
SILO = {"partition": "iid", "fraction-train": "1.0", "dp": "false", "central-dp": "false", "local-epochs": "1",
        "optimizer": "sgd", "lr": "10", "batch-size": "256", "server-strategy": "fedavg", "fraction-evaluate": "0",
        "eval-every": "5", "num-server-rounds": "30"}
SILO_DP = {"dp": "true", "dp-unit": "user", "max-grad-norm": "1.0", "delta": "1e-5"}


def recipe(mechanism: str, epsilon: float, clients: int, users: int) -> dict[str, str]:
    """The run config of one federated run: `clients` a round of `users` (`silo`: `clients` silos)."""
    if mechanism == "silo":
        private = {} if math.isinf(epsilon) else {**SILO_DP, "target-epsilon": str(epsilon)}
        return {**SILO, **private, "num-clients": str(clients)}
    if mechanism == "window":
        base = {**CROSS_DEVICE, "dp": "false"} if math.isinf(epsilon) else {
            **CROSS_DEVICE, **DEVICE_DP, "target-epsilon": str(epsilon)}
        base["window-stride"] = "0"  # a window is the unit: windows must not overlap
    else:
        base = USER_LEVEL if math.isinf(epsilon) else {**USER_LEVEL, **USER_DP,
                                                      "central-target-epsilon": str(epsilon)}
    return {**base, "fraction-train": f"{clients / users:.6f}"}


def run_key(mechanism: str, clients: int, epsilon: float) -> str:
    return f"{mechanism}/{clients}/{epsilon}"


def run_dataset(name: str, mechanism: str, clients: int, epsilon: float, rounds: int | None,
                central_epochs: int | None, stored: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """One federated run of a data set, added to its stored entry; the centralized and popularity
    references (seed 0 of the accuracy benchmark, the same model and data) are fetched with the
    first run and reused after."""
    common = {**DATASETS[name], "data-dir": str(require_shared(DATASETS[name]["data-dir"]))}
    entry = {k: v for k, v in stored.items() if k != "runs"}
    if "centralized_ndcg@10" not in entry:
        central = accuracy.reference(name, central_epochs)  # the same model and data, trained centrally
        own = central["test"][central["protocol"]]
        entry = {"centralized_ndcg@10": own["model"]["ndcg@10"], "centralized_hr@10": own["model"]["hr@10"],
                 "centralized_epochs": central["epochs"], "popularity_ndcg@10": own["popularity"]["ndcg@10"],
                 "popularity_hr@10": own["popularity"]["hr@10"], "mask_history": central["protocol"] == "s3rec",
                 "users": central["users"], "items": central["items"]}
        print(name, "centralized", entry["centralized_ndcg@10"], flush=True)
    settings = recipe(mechanism, epsilon, clients, entry["users"])
    if rounds:
        settings["num-server-rounds"] = str(rounds)
    result = run_setting(f"{name} {mechanism} {clients} eps {epsilon}", settings, Path(common["data-dir"]),
                         workdir, common=common)
    s, per_round = result["summary"], result["rounds"]
    private = s["central_dp"] if mechanism == "user" else s["dp"]  # silo, window: the clients' local DP
    run = {"epsilon_spent": (private["epsilon"] if mechanism == "user" else private["epsilon_max"])
           if private["enabled"] else None,
           "test_ndcg@10": s["test"]["ndcg@10"], "test_hr@10": s["test"]["hr@10"],
           "rounds": len(per_round) - 1,
           "clients_per_round": sum(r["trained"] for r in per_round[1:]) / (len(per_round) - 1),
           "seconds_per_round": sum(r["seconds"] for r in per_round[1:]) / (len(per_round) - 1),
           "peak_mb": result["peak_mb"],
           "curve": [[r["round"], r["ndcg@10"]] for r in per_round if "ndcg@10" in r]}
    print(name, mechanism, clients, epsilon, run["test_ndcg@10"], flush=True)
    return {**entry, "runs": {**stored.get("runs", {}), run_key(mechanism, clients, epsilon): run}}


def _series(entry: dict[str, Any]) -> dict[tuple[str, int], list[tuple[float, dict[str, Any]]]]:
    """A data set's runs as curves: (mechanism, clients a round) -> [(ε, run)] by ε."""
    curves: dict[tuple[str, int], list[tuple[float, dict[str, Any]]]] = {}
    for key, run in entry["runs"].items():
        mechanism, clients, epsilon = key.split("/")
        curves.setdefault((mechanism, int(clients)), []).append((float(epsilon), run))
    return {k: sorted(v, key=lambda item: item[0]) for k, v in sorted(curves.items())}


LABELS = {"user": "user-level central DP", "silo": "cross-silo user-level local DP", "window": "local DP per window"}


def plot(results: dict[str, Any]) -> list[Path]:
    """The privacy–utility curves of every data set (as a multiple of popularity), and each data
    set's learning curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    finite = [float(k.split("/")[2]) for r in results.values() for k in r["runs"] if "inf" not in k]
    infinity = 2 * max(finite, default=8.0)  # where ε = ∞ sits on the log axis
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    for name, entry in results.items():
        pop = entry["popularity_ndcg@10"]
        for (mechanism, clients), points in _series(entry).items():
            ax.plot([infinity if math.isinf(e) else e for e, _ in points], [r["test_ndcg@10"] / pop for _, r in points],
                    "o-", color=next(colours), label=f"{name}: {LABELS[mechanism]}, {clients} a round")
        ax.axhline(entry["centralized_ndcg@10"] / pop, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"{name}: centralized", (infinity, entry["centralized_ndcg@10"] / pop), fontsize=7,
                    ha="right", va="bottom")
    ax.axhline(1.0, color="black", linestyle=":", linewidth=1, label="most popular")
    ax.set_xscale("log")
    ticks = sorted({*finite, infinity})
    ax.set_xticks(ticks, [("∞" if t == infinity else f"{t:g}") for t in ticks])
    ax.set_xlabel("ε (δ = 1e-5)")
    ax.set_ylabel("test NDCG@10 / most popular's")
    ax.set_title("Privacy against utility")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(FIGURES / "privacy_utility.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    for name, entry in results.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (mechanism, clients), points in _series(entry).items():
            for epsilon, run in points:
                rounds, values = zip(*run["curve"], strict=True)
                privacy = "non-private" if math.isinf(epsilon) else f"ε = {epsilon:g}"
                ax.plot(rounds, values, label=f"{LABELS[mechanism]}, {clients} a round, {privacy}")
        ax.set_xlabel("round")
        ax.set_ylabel("validation NDCG@10")
        ax.set_title(f"Learning curves, {name}, cross-device")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(FIGURES / f"learning_curves_{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def table(results: dict[str, Any]) -> list[str]:
    rows = []
    for name, entry in results.items():
        pop, central = entry["popularity_ndcg@10"], entry["centralized_ndcg@10"]
        for (mechanism, clients), points in _series(entry).items():
            private = {e: r for e, r in points}
            plain = private.get(math.inf)
            for epsilon, run in points:
                spent = "∞" if run["epsilon_spent"] is None else f"{run['epsilon_spent']:.2f}"
                share = f"{run['test_ndcg@10'] / plain['test_ndcg@10']:.0%}" if plain else "–"
                target = "∞" if math.isinf(epsilon) else f"{epsilon:g}"
                rows.append(f"| {name} | {LABELS[mechanism]} | {clients:,} | {target} | {spent} | "
                            f"{run['test_hr@10']:.4f} | {run['test_ndcg@10']:.4f} | "
                            f"{run['test_ndcg@10'] / pop:.2f}× | {share} | {central:.4f} | {pop:.4f} | "
                            f"{run['rounds']} | {run['seconds_per_round']:.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=["beauty"], choices=list(DATASETS))
    parser.add_argument("--mechanism", default="user", choices=list(LABELS))
    parser.add_argument("--clients", type=int, default=1000, help="clients a round (silo: silos, all every round)")
    parser.add_argument("--epsilons", type=float, nargs="*", default=EPSILONS)
    parser.add_argument("--rounds", type=int, default=None, help="rounds for every run (default: the recipes')")
    parser.add_argument("--central-epochs", type=int, default=None,
                        help="most centralized epochs (default: the recipe's)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the table and plots from stored results")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.plot_only:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.datasets:
                for epsilon in args.epsilons:  # stored after every run: a long benchmark keeps what it measured
                    results[name] = run_dataset(name, args.mechanism, args.clients, epsilon, args.rounds,
                                                args.central_epochs, results.get(name, {}), Path(tmp))
                    RESULTS.parent.mkdir(parents=True, exist_ok=True)
                    RESULTS.write_text(json.dumps(results, indent=1))
    figures = plot(results)
    write_section("privacy-utility", "\n".join([
        "## Privacy against utility (cross-device, one user per client; cross-silo)", "",
        "User-level central DP: `benchmarks/privacy_utility.py`'s `USER_LEVEL` recipe (one local SGD epoch, "
        "FedAdam on the server, each update clipped on the device to an adaptive norm, Gaussian noise on the "
        "average; ε for one user's whole history, δ = 1e-5, over all rounds, accounted with PRV); non-private "
        "(ε = ∞): the same recipe without clipping or noise. Cross-silo user-level local DP: `SILO` (the users "
        "dealt to the silos at random, every silo every round, one local SGD epoch of user-level DP-SGD: Poisson "
        "sampling of users, each user's summed gradient clipped to 1, noise per silo; ε for each user, δ = 1e-5); "
        "'clients a round' is then the silos. Local DP per window: the cross-device recipe of the "
        "MovieLens 100K section (10 rounds under DP). Centralized: non-private, the same model. Amazon sets: "
        "S3-Rec's protocol (history masked); MovieLens: RecBole's (not masked). Test NDCG@10, full ranking; "
        "'of ∞' is the share of the non-private federated run with the same recipe.", "",
        "| data | mechanism | clients a round | target ε | ε spent | test HR@10 | test NDCG@10 | × popularity | "
        "of ∞ | centralized NDCG@10 | most popular NDCG@10 | rounds | s/round |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|", *table(results), "",
        *(f"![{p.stem}]({p.relative_to(ROOT).as_posix()})" for p in figures),
    ]))


if __name__ == "__main__":
    main()
