"""User-level central DP on MovieLens 100K, cross-device (943 clients): test NDCG@10 at central
ε ∈ {8, 4, 1} next to the non-private run and local DP at the same ε (rows of the federated
benchmark), with Flower's client-side fixed clipping and fedrec's PRV accounting.

    python -m benchmarks.central_dp_ml100k [--only NAME ...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.federated_ml100k import CROSS_DEVICE, run_setting
from benchmarks.report import require_shared, write_section

CENTRAL = {**CROSS_DEVICE, "dp": "false", "central-dp": "true", "central-clip": "0.5"}  # updates measured 0.5-1.2
SETTINGS = {f"central DP ε={e}": {**CENTRAL, "central-target-epsilon": e} for e in ("8", "4", "1")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(SETTINGS))
    args = parser.parse_args()
    data_dir = require_shared("ml-100k")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            result = run_setting(name, SETTINGS[name], data_dir, Path(tmp))
            s = result["summary"]
            c, t = s["central_dp"], s["test"]
            seconds = sum(r["seconds"] for r in result["rounds"][1:]) / (len(result["rounds"]) - 1)
            rows.append(f"| {name} | {c['epsilon']:.2f} | {c['noise_multiplier']:.3f} | {c['sample_rate']:.3f} | "
                        f"{t['hr@10']:.4f} | {t['ndcg@10']:.4f} | {s['popularity_test']['ndcg@10']:.4f} | "
                        f"{s['setting']['rounds']} | {seconds:.1f} | {result['peak_mb']:.0f} |")
            print(rows[-1], flush=True)
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
        *rows,
    ]))


if __name__ == "__main__":
    main()
