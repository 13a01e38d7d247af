"""User-level central DP on MovieLens 100K, cross-device (943 clients): test NDCG@10 at central
ε ∈ {8, 4, 1} next to the non-private run and local DP at the same ε (rows of the federated
benchmark), with Flower's client-side fixed clipping and fedrec's PRV accounting; and, from the
accountant alone, how much noise the same ε costs with Amazon Beauty's 22,363 users.

    python -m benchmarks.central_dp_ml100k [--only NAME ...]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from benchmarks.federated_ml100k import CROSS_DEVICE, run_setting
from benchmarks.report import merge_rows, require_shared, write_section
from common.config import Config
from common.model import build_model
from server import central_dp

# Fixed clipping (the run config's default adapts it); updates measured 0.5-1.2.
CENTRAL = {**CROSS_DEVICE, "dp": "false", "central-dp": "true", "central-clip": "0.5", "central-clip-quantile": "0"}
MODEL = {"embedding-dim": 64, "hidden-dim": 64, "central-clip": 0.5, "dp": False}  # as COMMON and CENTRAL
SETTINGS = {f"central DP ε={e}": {**CENTRAL, "central-target-epsilon": e} for e in ("8", "4", "1")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(SETTINGS))
    args = parser.parse_args()
    data_dir = require_shared("ml-100k")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            result = run_setting(name, SETTINGS[name], data_dir, Path(tmp))
            s = result["summary"]
            c, t = s["central_dp"], s["test"]
            seconds = sum(r["seconds"] for r in result["rounds"][1:]) / (len(result["rounds"]) - 1)
            rows[name] = (f"| {name} | {c['epsilon']:.2f} | {c['noise_multiplier']:.3f} | {c['sample_rate']:.3f} | "
                          f"{t['hr@10']:.4f} | {t['ndcg@10']:.4f} | {s['popularity_test']['ndcg@10']:.4f} | "
                          f"{s['setting']['rounds']} | {seconds:.1f} | {result['peak_mb']:.0f} |")
            print(rows[name], flush=True)
    table, kept = merge_rows("central-dp-ml100k", rows, list(SETTINGS))
    write_section("central-dp-ml100k", "\n".join([
        "## User-level central DP on MovieLens 100K (cross-device, 943 clients)",
        "",
        "The cross-device recipe of the federated benchmark, local DP off, each client's whole update clipped "
        "to 0.5 on the device (Flower's `fixedclipping_mod`), Gaussian noise σ·C/94 on the average "
        "(`DifferentialPrivacyClientSideFixedClipping`); ε is the server's, over all rounds, for all of one "
        "client's (= one user's) data, δ = 1e-5, sampling 94 of 943 a round accounted as Poisson q = 0.1.",
        "",
        "| setting | central ε | σ | q | test HR@10 | test NDCG@10 | popularity NDCG@10 | rounds | s/round | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *table,
        "",
        "### The same ε with a larger population (accountant only)",
        "",
        "Noise the server adds for the same guarantee, 150 rounds, clip C = 0.5, the benchmark's model "
        "(width 64) over each data set's catalogue; d weights. σ·C/m is the noise std on each averaged weight; "
        "σ·√d/m is the noise norm in units of C, against an averaged clipped update of norm at most 1 in those units.",
        "",
        "| data set | users N | clients per round m | q | ε | σ | σ·C/m | σ·√d/m |",
        "|---|---|---|---|---|---|---|---|",
        *population_rows(),
    ]), kept=kept)


POPULATIONS = {"ml-100k": (943, 1682), "Amazon Beauty": (22363, 12101)}  # users, items (the data sets' own counts)


def population_rows() -> list[str]:
    """σ for ε ∈ {8, 4, 1} at m = 94 a round (ml-100k's recipe) and at q = 0.1, for each population."""
    rows = []
    for name, (users, items) in POPULATIONS.items():
        weights = sum(p.numel() for p in build_model(Config.from_run_config(MODEL), items).state_dict().values())
        for per_round in sorted({94, users // 10}):
            for epsilon in (8, 4, 1):
                cfg = Config.from_run_config({**MODEL, "central-dp": True, "central-target-epsilon": epsilon,
                                              "fraction-train": per_round / users, "num-server-rounds": 150})
                m, sigma = central_dp.sampled_per_round(cfg, users), central_dp.noise_multiplier(cfg, users)
                rows.append(f"| {name} | {users:,} | {m:,} | {m / users:.4f} | {epsilon} | {sigma:.3f} | "
                            f"{sigma * 0.5 / m:.5f} | {sigma * math.sqrt(weights) / m:.2f} |")
                print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
