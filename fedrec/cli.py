"""The `fedrec` command line: thin wrappers over the jobs in common/, client/, server/ and simulation/.

Every option mirrors a key of the Flower run config (`[tool.flwr.app.config]` in pyproject.toml);
an option left out keeps that default, so `fedrec` and `flwr run .` agree.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from common.artifacts import (
    ITEMS,
    MODEL,
    OutputError,
    OutputExistsError,
    first_sentence,
    load_tensors,
    read_json,
    writable,
)
from common.config import Config, ConfigError, defaults
from common.dataset import DataError, load_dataset, stats
from common.errors import NoProgressError
from fedrec import deploy

app = typer.Typer(help="Privacy-preserving federated next-item recommendation.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Inspect data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()
err = Console(stderr=True)
USER_ERRORS = (ConfigError, DataError, OutputError, NoProgressError)
D = defaults()


def _opt(key: str, help: str, *decls: str) -> Any:
    return typer.Option(*decls, help=f"{help} [default: {D[key]!r}]", show_default=False)


# Options shared by every command that loads data (default None = the run config's value).
Dataset = Annotated[Optional[str], _opt("dataset",
                                        "synthetic, ml-100k, ml-1m, ml-latest-small, ml-latest, seq, inter or csv")]
DataDir = Annotated[Optional[str], _opt("data-dir",
                                        "Folder (or file, for seq/inter/csv) with the data; empty downloads MovieLens")]
Kcore = Annotated[Optional[int], _opt("kcore", "Keep users and items with at least N interactions (0 disables)")]
MinRating = Annotated[Optional[float], _opt("min-rating", "Keep ratings >= this as implicit feedback (0 keeps all)")]
MaxLen = Annotated[Optional[int], _opt("max-len", "Items of history the model reads")]
WindowStride = Annotated[Optional[int], _opt(
    "window-stride", "A training window every this many items (below max-len: overlapping, more history per target)")]
Seed = Annotated[Optional[int], _opt("seed", "Seed of data generation, partitioning and training")]
Out = Annotated[Path, typer.Option(help="Folder for config.json, metrics.jsonl, summary.json, model.pt")]
# Options shared by the training commands.
BatchSize = Annotated[Optional[int], _opt("batch-size", "Windows per batch (under DP: expected units)")]
Lr = Annotated[Optional[float], _opt("lr", "Learning rate")]
Dp = Annotated[Optional[bool], _opt("dp", "DP-SGD (Opacus) on every training step", "--dp/--no-dp")]
DpUnit = Annotated[Optional[str], _opt("dp-unit", "What DP-SGD samples, clips and protects: user or window")]
NoiseMultiplier = Annotated[Optional[float], _opt("noise-multiplier", "DP noise σ (0: derive from --target-epsilon)")]
TargetEpsilon = Annotated[Optional[float], _opt("target-epsilon", "DP budget ε for all of training")]
Delta = Annotated[Optional[float], _opt("delta", "DP δ")]
MaxGradNorm = Annotated[Optional[float], _opt("max-grad-norm", "DP clipping norm of each unit's gradient")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress lines")]
EmbeddingDim = Annotated[Optional[int], _opt("embedding-dim", "Item embedding width")]
HiddenDim = Annotated[Optional[int], _opt("hidden-dim", "LSTM width")]
Dropout = Annotated[Optional[float], _opt("dropout", "Dropout")]
WeightDecay = Annotated[Optional[float], _opt("weight-decay", "L2 penalty")]
MaskHistory = Annotated[Optional[bool], _opt(
    "mask-history", "Evaluate without recommending items already in the user's history (S3-Rec's protocol)",
    "--mask-history/--no-mask-history")]


def _config(**options: Any) -> Config:
    """Run-config defaults overridden by the options the user gave."""
    return Config.from_run_config({}, **{k.replace("_", "-"): v for k, v in options.items()})


@app.command("train")
def train_command(
    out: Out = Path("runs/centralized"),
    dataset: Dataset = None,
    data_dir: DataDir = None,
    kcore: Kcore = None,
    min_rating: MinRating = None,
    max_len: MaxLen = None,
    window_stride: WindowStride = None,
    seed: Seed = None,
    mask_history: MaskHistory = None,
    epochs: Annotated[Optional[int], _opt("epochs", "Most epochs (early stopping on validation NDCG@10)")] = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    patience: Annotated[Optional[int], _opt("patience", "Epochs without validation gain before stopping")] = None,
    lr_schedule: Annotated[Optional[str], _opt("lr-schedule", "constant, or cosine (to 0 over --epochs)")] = None,
    embedding_dim: EmbeddingDim = None,
    hidden_dim: HiddenDim = None,
    dropout: Dropout = None,
    weight_decay: WeightDecay = None,
    dp: Dp = None,
    dp_unit: DpUnit = None,
    noise_multiplier: NoiseMultiplier = None,
    target_epsilon: TargetEpsilon = None,
    delta: Delta = None,
    max_grad_norm: MaxGradNorm = None,
    quiet: Quiet = False,
) -> None:
    """Train the model centrally (the baseline federated runs are compared with)."""
    from simulation.centralized import train_centralized

    options = {k: v for k, v in locals().items() if k not in ("out", "quiet", "train_centralized")}
    cfg = _config(**options)

    def show(r: dict[str, Any]) -> None:
        eps = f"  ε {r['epsilon']:.2f}" if r["epsilon"] is not None else ""
        console.print(f"epoch {r['epoch']:3d}  loss {r['loss']:.4f}  valid NDCG@10 {r['valid_ndcg@10']:.4f}"
                      f"  HR@10 {r['valid_hr@10']:.4f}  {r['seconds']:.1f}s{eps}")

    summary = train_centralized(cfg, out, on_epoch=None if quiet else show)
    _print_summary(summary, out)


@app.command("simulate")
def simulate_command(
    out: Out = Path("runs/simulation"),
    resume: Annotated[Optional[Path],
                      typer.Option(help="Continue the interrupted run in this folder (its own settings)")] = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    kcore: Kcore = None,
    min_rating: MinRating = None,
    max_len: MaxLen = None,
    window_stride: WindowStride = None,
    seed: Seed = None,
    mask_history: MaskHistory = None,
    rounds: Annotated[Optional[int], _opt("num-server-rounds", "Federated rounds")] = None,
    partition: Annotated[Optional[str], _opt("partition", "user (one client per user), iid or skew")] = None,
    num_clients: Annotated[Optional[int], _opt("num-clients", "Clients for iid and skew partitions")] = None,
    fraction_train: Annotated[Optional[float], _opt("fraction-train", "Share of clients sampled per round")] = None,
    min_train_nodes: Annotated[Optional[int], _opt("min-train-nodes",
                                                   "Fewest usable replies to aggregate a round")] = None,
    fraction_evaluate: Annotated[Optional[float], _opt(
        "fraction-evaluate", "Share of clients sampled for federated evaluation (0: the server's only)")] = None,
    local_epochs: Annotated[Optional[int], _opt("local-epochs", "Epochs of local training per round")] = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    optimizer: Annotated[Optional[str], _opt("optimizer", "Clients' optimizer: adam or sgd")] = None,
    server_strategy: Annotated[Optional[str], _opt("server-strategy", "fedavg or fedadam")] = None,
    server_lr: Annotated[Optional[float], _opt("server-lr", "Server learning rate (FedAdam's η)")] = None,
    eval_every: Annotated[Optional[int], _opt("eval-every", "Rounds between central evaluations")] = None,
    embedding_dim: EmbeddingDim = None,
    hidden_dim: HiddenDim = None,
    dropout: Dropout = None,
    weight_decay: WeightDecay = None,
    holdout_users: Annotated[Optional[float], _opt("holdout-users",
                                                   "Share of users kept out of training for the server")] = None,
    dp: Dp = None,
    dp_unit: DpUnit = None,
    noise_multiplier: NoiseMultiplier = None,
    target_epsilon: TargetEpsilon = None,
    delta: Delta = None,
    max_grad_norm: MaxGradNorm = None,
    central_dp: Annotated[Optional[bool], _opt(
        "central-dp", "User-level central DP: clip each client's update, noise on the average",
        "--central-dp/--no-central-dp")] = None,
    central_target_epsilon: Annotated[Optional[float], _opt("central-target-epsilon",
                                                            "Central DP budget ε over all rounds")] = None,
    central_noise_multiplier: Annotated[Optional[float], _opt("central-noise-multiplier",
                                                              "Central DP σ (0: derive from the target)")] = None,
    central_clip: Annotated[Optional[float], _opt("central-clip", "Norm each client's update is clipped to")] = None,
    central_clip_quantile: Annotated[Optional[float], _opt(
        "central-clip-quantile", "Adapt the clipping norm towards this quantile of update norms (0: fixed)")] = None,
    central_clip_lr: Annotated[Optional[float], _opt("central-clip-lr", "Step of the adaptive clipping norm")] = None,
    distributed_dp: Annotated[Optional[bool], _opt(
        "distributed-dp", "Clients add the central noise in shares under SecAgg+ (no trusted server)",
        "--distributed-dp/--no-distributed-dp")] = None,
    secagg: Annotated[Optional[bool], _opt("secagg", "Secure aggregation (SecAgg+): the server sees only the sum",
                                           "--secagg/--no-secagg")] = None,
    aggregation: Annotated[Optional[str], _opt("aggregation",
                                               "fedavg, median, trimmed-mean, krum, multi-krum or bulyan")] = None,
    byzantine_fraction: Annotated[
        Optional[float], _opt("byzantine-fraction", "Share of a round's clients the defence assumes malicious"),
    ] = None,
    max_update_norm: Annotated[
        Optional[float], _opt("max-update-norm", "Reject longer updates (0: update-norm-factor x the round's median)"),
    ] = None,
    update_norm_factor: Annotated[
        Optional[float], _opt("update-norm-factor", "Norm bound as a multiple of the round's median (0: none)"),
    ] = None,
    attack: Annotated[Optional[str], _opt("attack",
                                          "Simulated attack: scale, sign-flip, random, nan or target")] = None,
    attack_fraction: Annotated[Optional[float], _opt("attack-fraction",
                                                     "Share of the clients that are malicious")] = None,
    attack_scale: Annotated[Optional[float], _opt("attack-scale", "Factor the attackers boost their update by")] = None,
    target_item: Annotated[
        Optional[str], _opt("target-item", "Raw item id the target attack pushes (its exposure is reported)"),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Federated training of many clients in this process (the ServerApp and ClientApp, no Ray)."""
    from simulation.run import simulate

    options = {k: v for k, v in locals().items() if k not in ("out", "quiet", "resume", "simulate", "rounds")}
    if resume is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in {**options, "rounds": rounds}.items() if v is not None]
        if given:
            raise ConfigError(f"--resume continues the run with the settings it started with: drop {', '.join(given)}")
        if not (resume / "config.json").is_file():
            raise DataError(f"cannot resume: {resume / 'config.json'} not found")
        cfg = Config.from_run_config({**read_json(resume / "config.json"), "out-dir": str(resume), "resume": True})
    else:
        cfg = _config(**options, num_server_rounds=rounds, out_dir=str(out))
    summary = simulate(cfg, quiet=quiet)
    _print_summary(summary, Path(cfg.out_dir))


@data_app.command("stats")
def data_stats(
    dataset: Dataset = None,
    data_dir: DataDir = None,
    kcore: Kcore = None,
    min_rating: MinRating = None,
    seed: Seed = None,
) -> None:
    """Users, items, interactions, density, sequence lengths and what cleaning removed."""
    info = stats(load_dataset(_config(**locals())))
    table = Table("statistic", "value", title=f"data set: {info.get('dataset', '')}")
    for key, value in _flatten(info):
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    console.print(table)


@data_app.command("split")
def data_split(
    out: Annotated[Path, typer.Option(help="Folder for server.txt and client-<i>.txt (seq format)")],
    clients: Annotated[int, typer.Option(help="Client files to write", min=1)] = 3,
    holdout_users: Annotated[float, typer.Option(help="Share of users for the server's evaluation file")] = 0.2,
    partition: Annotated[Optional[str], _opt("partition", "iid or skew")] = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    kcore: Kcore = None,
    min_rating: MinRating = None,
    seed: Seed = None,
) -> None:
    """Split a data set into one file per edge device and one for the server, for a trial deployment."""
    from common.federation import write_device_files

    options = {k: v for k, v in locals().items() if k not in ("out", "clients", "write_device_files")}
    for path in write_device_files(_config(**options), out, clients):
        console.print(str(path))


@app.command("recommend")
def recommend_command(
    model: Annotated[Path, typer.Option(help="Folder of a finished run, or a file written by `fedrec export`")],
    history: Annotated[str, typer.Option(help="Comma-separated item ids as in the data set, oldest first")],
    k: Annotated[int, typer.Option("-k", help="How many items", min=1)] = 10,
    explain: Annotated[bool, typer.Option(help="Show the attention each past item received")] = False,
) -> None:
    """Top-k next items for a history, with the model of a finished run or its export."""
    from common.model import recommend

    net, items, max_len = _load_model(model)
    index = {raw: i + 1 for i, raw in enumerate(items["item_ids"])}
    raw_history = [h.strip() for h in history.split(",") if h.strip()]
    unknown = [h for h in raw_history if h not in index]
    if not raw_history or unknown:
        raise DataError(f"unknown item ids in --history: {', '.join(unknown[:5]) or '(none given)'}")
    top, scores, attention = recommend(net, [index[h] for h in raw_history], k, max_len)
    table = Table("rank", "item", "title", "score")
    for rank, (item, score) in enumerate(zip(top, scores, strict=True), start=1):
        table.add_row(str(rank), items["item_ids"][item - 1], items["titles"][item - 1], f"{score:.3f}")
    console.print(table)
    if explain:
        why = Table("history item", "title", "attention", title="attention over the history")
        for raw, weight in zip(raw_history[-max_len:], attention, strict=True):
            why.add_row(raw, items["titles"][index[raw] - 1], f"{weight:.3f}")
        console.print(why)


@app.command("privacy")
def privacy_command(
    run: Annotated[Optional[Path],
                   typer.Option(help="Folder of a finished run (participation.json, privacy.json, ledgers/)")] = None,
    ledger: Annotated[Optional[Path],
                      typer.Option(help="One device's ledger file (its state folder's privacy-ledger.json)")] = None,
    delta: Annotated[Optional[float], _opt("delta", "δ for --ledger")] = None,
    show_all: Annotated[bool, typer.Option("--all",
                                           help="A row for every client, not only problems and the largest ε")] = False,
) -> None:
    """Every ε of a run recomputed from the server's participation record by two accountants, and
    checked against each client's ledger and reported ε; exit 1 on any mismatch."""
    from server.privacy_report import audit_ledger, audit_run

    if (run is None) == (ledger is None):
        raise ConfigError("give --run DIR or --ledger FILE")
    if run is not None:
        clients, central = audit_run(run)
    else:
        clients, central = [audit_ledger(ledger, delta if delta is not None else D["delta"], None)], None
    largest = max(clients, key=lambda c: c.prv or 0.0, default=None)
    rows = [c for c in clients if show_all or c.problem or c is largest] + ([central] if central else [])
    table = Table("ledger", "mechanisms (σ, q, steps)", "reported ε", "ε PRV (Opacus)", "ε PLD (dp-accounting)",
                  "check",
                  title=f"privacy: {len(clients)} client ledgers" + (" and the server's central DP" if central else ""))
    for c in rows:
        mechanisms = "; ".join(f"{s:.3g}, {q:.3g}, {n}" for s, q, n in c.history[:4])
        mechanisms += " …" if len(c.history) > 4 else ""
        table.add_row(c.name, mechanisms, _num(c.reported), _num(c.prv), _num(c.pld), c.problem or "ok")
    console.print(table)
    bad = [c for c in [*clients, *([central] if central else [])] if c.problem]
    if bad:
        err.print(f"error: {len(bad)} ledger(s) failed: {bad[0].name}: {bad[0].problem}", markup=False, highlight=False,
                  soft_wrap=True)
        raise typer.Exit(1)
    if run is not None:
        console.print(f"all {len(clients)} clients' ledgers and reported ε match the server's participation record"
                      + (", and the central guarantee checks out" if central else "") + " (PRV and PLD within 5%)")
    else:
        console.print("the ledger passes its checksum and both accountants agree (PRV and PLD within 5%)")


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


@app.command("export")
def export_command(
    model: Annotated[Path, typer.Option(help="Folder of a finished run (config.json, model.pt, items.json)")],
    out: Annotated[Optional[Path],
                   typer.Option(help="File to write [default: <model>/model.<quantize>.<onnx|torchscript.pt>]")] = None,
    format: Annotated[str, typer.Option(help="onnx (run with onnxruntime) or torchscript (torch.jit.load)")] = "onnx",
    quantize: Annotated[str, typer.Option(help="none or int8 (ONNX: every weight matrix, the embedding included, "
                                               "int8 per row; TorchScript: the linear layers)")] = "none",
) -> None:
    """Write the model as one file an edge device runs: ONNX (onnxruntime alone) or TorchScript."""
    from common import export

    if format not in export.FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(export.FORMATS)}, got {format!r}")
    if quantize not in export.QUANTIZATIONS:
        raise ConfigError(f"--quantize must be one of {', '.join(export.QUANTIZATIONS)}, got {quantize!r}")
    if model.is_file():  # an export holds a traced graph, which cannot be exported again
        raise DataError(f"--model {model} is a file: give the --out folder of a finished run (exports are final)")
    net, items, max_len = _load_model(model)
    target = out or model / f"model.{quantize}.{export.SUFFIX[format]}"
    if target.exists():
        raise OutputExistsError(f"{target} already exists: choose another --out")
    if not target.parent.is_dir():
        raise OutputError(f"--out {target}: folder {target.parent} does not exist: create it, or choose another")
    if not writable(target.parent):
        raise OutputError(f"--out {target}: folder {target.parent} is not writable: choose another")
    export.export(net, target, max_len=max_len, items=items, quantize=quantize, format=format)
    module, _ = export.load(target)
    console.print(f"{target}: {target.stat().st_size / 1024:.0f} KiB, "
                  f"{export.latency_ms(module, max_len):.2f} ms per recommendation (one user, {max_len} items)")


def _load_model(path: Path) -> tuple[Any, dict[str, Any], int]:
    """(model, catalogue, max_len) from a run folder, or from an export (ONNX or TorchScript)."""
    from common import export
    from common.model import build_model

    if path.is_file():
        try:
            module, extra = export.load(path)
        except (RuntimeError, ValueError, EOFError) as e:  # EOFError: an empty file
            raise DataError(f"{path} is not a fedrec export: {first_sentence(e)}") from None
        return module, extra, int(extra["max_len"])
    for name in ("config.json", MODEL, ITEMS):
        if not (path / name).is_file():
            raise DataError(f"{path / name} not found: --model must be the --out folder of a finished run")
    cfg = Config.from_run_config(read_json(path / "config.json"))
    items = read_json(path / ITEMS)
    net = build_model(cfg, len(items["item_ids"]))
    net.load_state_dict(load_tensors(path / MODEL))
    return net, items, cfg.max_len


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    columns = {"accuracy": {"hr@10": "HR@10", "ndcg@10": "NDCG@10", "mrr@10": "MRR@10", "hr@20": "HR@20",
                             "ndcg@20": "NDCG@20"},
               "bias and exposure": {"coverage@10": "coverage@10", "gini@10": "Gini@10",
                                     "head-share@10": "top-20% share@10",
                                     "target-exposure@10": "target exposure@10"}}
    models = (("model", summary["test"]), ("most popular", summary["popularity_test"]))
    for title, names in columns.items():
        keys = [k for k in names if all(k in m for _, m in models)]
        if not keys:
            continue
        table = Table("", *(names[k] for k in keys), title=f"test {title} ({out})")
        for name, m in models:
            table.add_row(name, *(f"{m[k]:.4f}" for k in keys))
        console.print(table)
    dp = summary["dp"]
    if dp["enabled"]:
        epsilon = (f"ε = {dp['epsilon']:.3f}" if "epsilon" in dp else
                   f"ε ≤ {dp['epsilon_max']:.3f} per client (median {dp['epsilon_median']:.3f})")
        console.print(f"DP: {epsilon} at δ = {dp['delta']:g}, protecting {dp['unit']}")


def _flatten(info: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in info.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


deploy.register(app)


class Terminated(SystemExit):
    """SIGTERM, raised where the job is: like Ctrl-C it unwinds `staged_output`, which removes the
    hidden staging folder (a BaseException, so no `except Exception` on the way swallows it)."""


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second `kill` ends the process at once
    raise Terminated(128 + signum)


def main() -> None:
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except USER_ERRORS as e:
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except Terminated as e:
        err.print("error: stopped by SIGTERM (kill), leaving nothing half-written: run the command again "
                  "(or `fedrec simulate --resume` the simulation's folder)",
                  markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(e.code) from None
    finally:
        signal.signal(signal.SIGTERM, previous)  # for callers in this process (the tests)
