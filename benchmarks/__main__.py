"""Every benchmark, one after the other, each in its own process:

    python -m benchmarks [--only speed scale_beauty ...]

Each part also runs alone as `python -m benchmarks.NAME` (its options are in its own doc) and
rewrites only its own section of BENCHMARKS.md. The whole suite takes hours on 2 cores; CI runs
`python -m benchmarks.speed --smoke` instead.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from benchmarks.report import ROOT

PARTS = ["centralized_ml100k", "federated_ml100k", "central_dp_ml100k", "canary_exposure", "robustness_ml100k",
         "deploy_loopback", "speed", "scale_beauty", "evaluation", "privacy_utility"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=PARTS, choices=PARTS)
    args = parser.parse_args()
    failed = []
    for part in args.only:  # a part whose data is missing says so and the others still run
        print(f"== benchmarks.{part}", flush=True)
        if subprocess.run([sys.executable, "-m", f"benchmarks.{part}"], cwd=ROOT, check=False).returncode:
            failed.append(part)
    if failed:
        raise SystemExit(f"not completed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
