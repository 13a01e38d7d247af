"""A peer, side by side: Apple's pfl (its PyTorch backend) simulating fedrec's model and setting.

    python -m benchmarks.pfl_peer --data PATH --cohort 1000 --rounds 3 [--max-len 50] [--synthetic]

pfl pins dp-accounting < 0.6 (and packaging < 26), which fedrec's own venv cannot hold, so it
runs in a venv of its own, `.bench-pfl/` (gitignored), that `ensure_venv` builds on first use
(torch pinned to fedrec's 2.13.0 CPU build, then pfl[pytorch], numpy, pandas, opacus 1.6). The
main-venv entry runs this same file inside that venv as a worker (`--worker`) and prints one JSON
line: {"pfl_seconds_per_round", "cohort", "pfl_version", "mechanism", ...}.

What the worker mirrors (fedrec's cross-device setting):
- Model and loss: fedrec's own `common.model.AttentionLSTM(num_items, 32, 32, dropout 0.1, tied
  weights)` and `common.model.window_loss`, imported from this checkout.
- Data: one user = one client; a client's examples are fedrec's training windows
  (`common.dataset.training_windows` on the sequences `common.dataset.clean` makes, kcore 0),
  read with fedrec's loaders where they import (they need only numpy and pandas), else with the
  minimal reader below (`read_seq`, `client_windows`), which cuts the same windows.
- Round: C clients sampled without replacement (pfl's `MinimizeReuseUserSampler` over shuffled
  users), 1 local epoch of SGD at lr 5.0 with local batch 256 (so a client with <= 256 windows
  takes one step), FedAvg on the server (SGD lr 1.0 on the averaged update).
- DP: pfl's `GaussianMechanism(clipping_bound=1.0, relative_noise_stddev=1.0)` as a *local*
  postprocessor of `SimulatedBackend`: every client's model update is clipped to L2 norm 1.0
  and N(0, 1.0²) noise is added on the client, before aggregation. pfl has no per-example
  DP-SGD inside a client, so this is its closest equivalent of fedrec's per-client local DP
  (which clips every window's gradient and noises every step). The local step itself is then a
  plain step: the model runs with `private=False` (PyTorch's fused LSTM kernel), as a pfl user
  would run it.
- Timing: no federated evaluation (pfl evaluates at iteration 0 whatever evaluation_frequency
  says; `_NoEvalFedAvg` turns that off); one warm-up round, then the median of `rounds` rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".bench-pfl"
TORCH_PIN = "torch==2.13.0"  # fedrec's build; unpinned, pip would pull a multi-GB CUDA torch
REQUIREMENTS = ["pfl[pytorch]==0.6.0", "numpy", "pandas", "opacus==1.6.*"]
MIN_SEQUENCE = 3  # as common.dataset: a training item, a validation and a test target
MECHANISM = ("pfl.privacy.GaussianMechanism(clipping_bound={clip}, relative_noise_stddev={noise}) as a local "
             "postprocessor of pfl.aggregate.simulate.SimulatedBackend: each client's update clipped to L2 norm "
             "{clip} and N(0, ({noise}*{clip})^2) noise added per client (local DP), FedAvg of the noised updates")


# --------------------------------------------------------------------------- the venv


def venv_python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path = VENV, quiet: bool = True) -> float:
    """Build the pfl venv if it is missing or incomplete; returns the seconds spent (0 when ready).

    A marker file written last records what was installed, so a half-built venv is completed
    rather than trusted. torch is installed first and kept pinned by a constraints file for every
    later install, so no dependency can swap it for another build.
    """
    marker = venv / ".fedrec-pfl-ready"
    wanted = json.dumps([TORCH_PIN, *REQUIREMENTS])
    if venv_python(venv).exists() and marker.exists() and marker.read_text() == wanted:
        return 0.0
    started = time.perf_counter()
    if not venv_python(venv).exists():
        if venv.exists():
            shutil.rmtree(venv)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    pip = [str(venv_python(venv)), "-m", "pip", "install", *(["-q"] if quiet else []), "-c", str(constraints)]
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, *REQUIREMENTS], check=True)
    marker.write_text(wanted)
    return time.perf_counter() - started


# --------------------------------------------------------------------------- data (pure helpers)


def read_seq(lines: Iterable[str]) -> tuple[list[np.ndarray], int]:
    """S3-Rec `seq` lines (`user i1 i2 ...`, items in time order) -> per-user sequences, items 1..N.

    A user on several lines continues their sequence in file order. Users with fewer than
    MIN_SEQUENCE items are dropped (fedrec's cleaning with kcore 0 does the same), then item ids
    are numbered 1..N in order of first appearance among the kept users. fedrec numbers them in
    raw-id order instead; that is a relabelling only and changes neither windows' shape nor cost.
    """
    raw: dict[str, list[str]] = {}
    for line in lines:
        tokens = line.split()
        if len(tokens) > 1:
            raw.setdefault(tokens[0], []).extend(tokens[1:])
    ids: dict[str, int] = {}
    sequences = []
    for items in raw.values():
        if len(items) >= MIN_SEQUENCE:
            sequences.append(np.array([ids.setdefault(item, len(ids) + 1) for item in items], dtype=np.int64))
    return sequences, len(ids)


def cut_windows(train: np.ndarray, max_len: int) -> np.ndarray:
    """Windows of one user's training part: int64 (W, max_len + 1), right-padded with 0.

    Cut from the end backwards: window ends at n, n - max_len, ... (>= 2), each window the up to
    max_len + 1 items before its end, so consecutive windows share one item; oldest first.
    """
    n = len(train)
    ends = list(range(n, 1, -max_len))[::-1]
    out = np.zeros((len(ends), max_len + 1), dtype=np.int64)
    for row, end in enumerate(ends):
        start = max(end - (max_len + 1), 0)
        out[row, : end - start] = train[start:end]
    return out


def client_windows(sequences: list[np.ndarray], max_len: int) -> list[np.ndarray]:
    """One array of windows per user (their sequence less the validation and test targets);
    users without a window are left out."""
    windows = [cut_windows(np.asarray(s)[:-2], max_len) for s in sequences]
    return [w for w in windows if len(w)]


def synthetic_sequences(users: int = 300, items: int = 200, seed: int = 0) -> tuple[list[np.ndarray], int]:
    """Small random data for a smoke run: lengths 5..80."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, items + 1, size=int(rng.integers(5, 81))) for _ in range(users)], items


def load_clients(data: str | None, max_len: int, synthetic: bool) -> tuple[list[np.ndarray], int, str]:
    """(windows per client, number of items, how they were read)."""
    if synthetic:
        sequences, num_items = synthetic_sequences()
        return client_windows(sequences, max_len), num_items, "synthetic"
    path = Path(data)
    fmt = "ml-100k" if path.name == "u.data" else "seq"
    try:
        sys.path.insert(0, str(ROOT))
        from common.dataset import clean, training_windows, window_counts
        from common.loaders import read_interactions
    except ImportError as e:
        if fmt != "seq":
            raise SystemExit(f"fedrec's loaders do not import here ({e}); the fallback reads seq files only") from None
        with path.open(encoding="utf-8") as f:
            sequences, num_items = read_seq(f)
        return client_windows(sequences, max_len), num_items, "pfl_peer.read_seq"
    cleaned = clean(read_interactions(fmt, path), min_rating=0.0, kcore=0)
    windows = training_windows(cleaned.sequences, max_len)
    counts = window_counts(cleaned.sequences, max_len)
    parts = np.split(windows, np.cumsum(counts)[:-1])
    return [p for p in parts if len(p)], cleaned.num_items, "common.dataset.training_windows"


# --------------------------------------------------------------------------- the worker (pfl venv)


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # pfl draws its seeds from numpy's global state
    # The framework module is chosen when pfl.model.pytorch is imported: import it first.
    import pfl
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.pytorch import PyTorchTensorDataset
    from pfl.data.sampling import MinimizeReuseUserSampler
    from pfl.hyperparam import NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel
    from pfl.privacy import GaussianMechanism

    sys.path.insert(0, str(ROOT))
    from common.model import AttentionLSTM, window_loss

    started = time.perf_counter()
    clients, num_items, reader = load_clients(args.data, args.max_len, args.synthetic)
    load_s = time.perf_counter() - started
    if args.cohort > len(clients):
        raise SystemExit(f"cohort {args.cohort} > {len(clients)} clients")
    tensors = [torch.from_numpy(w) for w in clients]  # int64: pfl's to_tensor would make numpy arrays float32

    class PflRecommender(torch.nn.Module):
        """fedrec's model with the `loss` and `metrics` methods pfl's PyTorchModel calls."""

        def __init__(self) -> None:
            super().__init__()
            self.net = AttentionLSTM(num_items, embedding_dim=32, hidden_dim=32, dropout=0.1, tie_weights=True)

        def loss(self, windows: torch.Tensor) -> torch.Tensor:
            self.train()
            return window_loss(self.net, windows)

        @torch.no_grad()
        def metrics(self, windows: torch.Tensor) -> dict:
            self.eval()
            return {"loss": Weighted.from_unweighted(float(window_loss(self.net, windows)), len(windows))}

    class NoEvalFedAvg(FederatedAveraging):
        """FedAvg without the per-user evaluation pfl runs at every iteration that is a multiple
        of evaluation_frequency (iteration 0 always is)."""

        def get_next_central_contexts(self, *a, **kw):
            contexts, model, metrics = super().get_next_central_contexts(*a, **kw)
            if contexts is not None:
                import dataclasses
                contexts = tuple(dataclasses.replace(c, do_evaluation=False) for c in contexts)
            return contexts, model, metrics

    class RoundClock(TrainingProcessCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []
            self.loads: list[float | None] = []

        def on_train_begin(self, *, model):
            self.marks.append(time.perf_counter())
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            self.marks.append(time.perf_counter())
            self.loads.append(_load_average())
            print(f"pfl round {central_iteration}{' (warm-up)' if central_iteration == 0 else ''}: "
                  f"{self.marks[-1] - self.marks[-2]:.2f} s (load average {self.loads[-1]})",
                  file=sys.stderr, flush=True)
            return False, Metrics()

    net = PflRecommender()
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    order = np.random.default_rng(args.seed).permutation(len(tensors)).tolist()
    federated = FederatedDataset(lambda uid: PyTorchTensorDataset((tensors[uid],), user_id=str(uid)),
                                 MinimizeReuseUserSampler(order))
    mechanism = GaussianMechanism(clipping_bound=args.clip, relative_noise_stddev=args.noise_multiplier)
    backend = SimulatedBackend(training_data=federated, val_data=federated, postprocessors=[mechanism])
    algorithm_params = NNAlgorithmParams(central_num_iterations=args.rounds + 1,  # + the warm-up round
                                         evaluation_frequency=args.rounds + 10, train_cohort_size=args.cohort,
                                         val_cohort_size=None)
    train_params = NNTrainHyperParams(local_num_epochs=1, local_learning_rate=args.lr,
                                      local_batch_size=args.local_batch)
    clock = RoundClock()
    NoEvalFedAvg().run(algorithm_params=algorithm_params, backend=backend, model=model,
                       model_train_params=train_params, callbacks=[clock], send_metrics_to_platform=False)
    rounds = np.diff(clock.marks).tolist()
    sizes = np.array([len(w) for w in clients])
    return {"pfl_seconds_per_round": statistics.median(rounds[1:]), "cohort": args.cohort,
            "pfl_min_seconds_per_round": min(rounds[1:]),  # the least disturbed, on a shared box
            "pfl_version": pfl.__version__ if hasattr(pfl, "__version__") else _version("pfl"),
            "mechanism": MECHANISM.format(clip=args.clip, noise=args.noise_multiplier),
            "round_seconds": [round(s, 3) for s in rounds], "warmup_round_s": round(rounds[0], 3),
            "load_average_after_round": clock.loads,  # 1-minute; well above the thread count = a contended box
            "clients": len(clients), "items": num_items, "windows": int(sizes.sum()),
            "max_windows_per_client": int(sizes.max()), "reader": reader, "data_load_s": round(load_s, 2),
            "max_len": args.max_len, "local_epochs": 1, "local_lr": args.lr, "local_batch": args.local_batch,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _version(package: str) -> str:
    from importlib.metadata import version
    return version(package)


# --------------------------------------------------------------------------- the main-venv entry


def pfl_seconds_per_round(data_path: str, cohort: int, rounds: int, max_len: int, *, synthetic: bool = False,
                          threads: int = 2, timeout: float = 3600) -> dict:
    """Build the pfl venv if needed, run the worker there, return its JSON result (plus
    `venv_setup_s`, the seconds spent installing this call, 0 when the venv was ready)."""
    setup_s = ensure_venv()
    command = [str(venv_python()), str(Path(__file__).resolve()), "--worker", "--cohort", str(cohort),
               "--rounds", str(rounds), "--max-len", str(max_len), "--threads", str(threads)]
    command += ["--synthetic"] if synthetic else ["--data", str(data_path)]
    # stderr passes through: the worker's per-round progress, and its traceback if it fails
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=timeout, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"pfl worker failed (exit {done.returncode}); its stderr is above")
    return {**json.loads(lines[-1]), "venv_setup_s": round(setup_s, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="an S3-Rec seq file (e.g. Beauty.txt) or ml-100k's u.data")
    parser.add_argument("--synthetic", action="store_true", help="small random data instead (smoke run)")
    parser.add_argument("--cohort", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, after one warm-up round")
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # inside .bench-pfl
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, default=5.0, help=argparse.SUPPRESS)
    parser.add_argument("--local-batch", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--clip", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--noise-multiplier", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.synthetic and not args.data:
        parser.error("give --data PATH or --synthetic")
    if args.worker:
        result = worker(args)
    else:
        result = pfl_seconds_per_round(args.data, args.cohort, args.rounds, args.max_len,
                                       synthetic=args.synthetic, threads=args.threads)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
