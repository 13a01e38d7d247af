"""The fedrec ServerApp: FedAvg rounds over the clients, central evaluation, run artefacts.

Each round: sample clients, collect their DP-trained weights, drop unusable replies, average
(weighted by training windows), evaluate the global model on the server's held-out users with
the full-ranking metrics, write one line to metrics.jsonl and a checkpoint. At the end: test
metrics, summary.json, model.pt and items.json under the run config's `out-dir`.

The held-out users are, by default in simulation, every user's leave-one-out targets (numbers
then compare with the centralized model); with `holdout-users` > 0 a fraction of users is kept
out of training entirely and only they are evaluated, the honest choice in a deployment.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from client.training import dp_unit
from common import artifacts
from common.config import Config
from common.dataset import eval_examples, item_index, popularity
from common.federation import catalogue, evaluation_users, federation
from common.metrics import evaluate_model, evaluate_popularity, head_items
from common.model import build_model
from server import central_dp, secagg
from server.strategy import GuardedStrategy, make_strategy

app = ServerApp()
log = logging.getLogger("fedrec")
CHECKPOINT = "checkpoint.pt"


@app.main()
def main(grid: Grid, context: Context) -> None:
    if not log.handlers:  # under `flwr run` nothing else shows fedrec's round lines
        show_progress(True)
    run_federated(grid, Config.from_run_config(context.run_config))


def show_progress(enabled: bool) -> None:
    """Print fedrec's one line per round (once: Flower configures the root logger too)."""
    if not log.handlers:
        log.addHandler(logging.StreamHandler(sys.stdout))
        log.propagate = False
    log.setLevel(logging.INFO if enabled else logging.WARNING)


def run_federated(grid: Grid, cfg: Config) -> dict[str, Any]:
    out = Path(cfg.out_dir) if cfg.out_dir else None
    fed = federation(cfg)
    sequences = [fed.data.sequences[u] for u in evaluation_users(cfg)]
    valid = eval_examples(sequences, "valid", cfg.max_len)
    test = eval_examples(sequences, "test", cfg.max_len)
    counts = popularity(sequences, fed.data.num_items)
    # Bias and exposure figures ride along with every evaluation (common/metrics.py).
    lists = {"head": head_items(counts), "target": item_index(fed.data, cfg.target_item) if cfg.target_item else None}
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, fed.data.num_items)
    if cfg.secagg:
        grid = secagg.SecureGrid(grid, cfg, secagg.max_weight(cfg, fed))
    clients = len(fed.clients) if cfg.partition != "devices" else len(list(grid.get_node_ids()))
    strategy = GuardedStrategy(make_strategy(cfg, clients), seed=cfg.seed, min_train_nodes=cfg.min_train_nodes,
                               max_update_norm=cfg.max_update_norm, update_norm_factor=cfg.update_norm_factor)
    state = {"round": 0, "elapsed": 0.0, "epsilons": {}, "arrays": ArrayRecord(model.state_dict())}
    if cfg.resume:
        state = _restore(out, strategy, grid, model)
        strategy.round_offset = state["round"]
    elif out is not None:
        _start_output(out, cfg)

    # Deployed clients read their own files: they learn the model's item order from the server.
    catalogue_config = ConfigRecord({"items": catalogue(cfg)} if cfg.partition == "devices" else {})
    popular = evaluate_popularity(counts, valid[2], fed.data.num_items, inputs=valid[0], mask_history=cfg.mask_history,
                                  **lists)
    log.info("fedrec: %d clients, %d evaluation users, %d items; most-popular validation NDCG@10 %.4f",
             clients, len(sequences), fed.data.num_items, popular["ndcg@10"])
    clock = [time.perf_counter() - state["elapsed"], time.perf_counter()]

    def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        done = server_round + strategy.round_offset
        if server_round == 0 and done > 0:
            return None  # resumed: round `done` was evaluated before the interruption
        if done % cfg.eval_every and done != cfg.num_server_rounds and done != 0:
            metrics = None
        else:
            model.load_state_dict(arrays.to_torch_state_dict())
            metrics = evaluate_model(model, *valid, fed.data.num_items, mask_history=cfg.mask_history, **lists)
        book = strategy.rounds.get(done, {})
        state["epsilons"].update(book.get("epsilons", {}))
        now = time.perf_counter()
        record = _round_record(done, now - clock[1], book, metrics)
        clock[1] = now
        log.info(_round_line(record, cfg.num_server_rounds, now - clock[0]))
        if out is not None:
            artifacts.append_jsonl(out / artifacts.METRICS, record)
            _checkpoint(out, done, arrays, strategy, grid, now - clock[0], state["epsilons"])
        return MetricRecord({k: v for k, v in record.items() if isinstance(v, (int, float))})

    result = strategy.start(grid=grid, initial_arrays=state["arrays"], num_rounds=cfg.num_server_rounds - state["round"],
                            timeout=cfg.round_timeout,
                            train_config=catalogue_config, evaluate_config=catalogue_config, evaluate_fn=end_of_round)
    final = result.arrays if len(result.arrays.keys()) else state["arrays"]
    model.load_state_dict(final.to_torch_state_dict())
    epsilons = list(state["epsilons"].values())
    summary = {
        "dataset": cfg.dataset,
        "setting": {"partition": cfg.partition, "clients": clients, "rounds": cfg.num_server_rounds,
                    "fraction-train": cfg.fraction_train, "local-epochs": cfg.local_epochs,
                    "strategy": cfg.server_strategy, "evaluation-users": len(sequences),
                    "holdout-users": cfg.holdout_users},
        "test": evaluate_model(model, *test, fed.data.num_items, mask_history=cfg.mask_history, **lists),
        "popularity_test": evaluate_popularity(counts, test[2], fed.data.num_items, inputs=test[0],
                                               mask_history=cfg.mask_history, **lists),
        "robustness": {"aggregation": cfg.aggregation, "byzantine_fraction": cfg.byzantine_fraction,
                       "update_norm_bound": (f"{cfg.max_update_norm:g}" if cfg.max_update_norm > 0 else
                                             f"{cfg.update_norm_factor:g} x the round's median" if cfg.update_norm_factor > 0
                                             else "none"),
                       "rejected": _rejections(strategy.rounds.values())},
        "attack": ({"kind": cfg.attack, "fraction": cfg.attack_fraction, "scale": cfg.attack_scale,
                    "target_item": cfg.target_item} if cfg.attack != "none" else {"kind": "none"}),
        "seconds": time.perf_counter() - clock[0],
        "dp": ({"enabled": True, "epsilon_max": max(epsilons, default=0.0),
                "epsilon_median": statistics.median(epsilons) if epsilons else 0.0,
                "clients_accounted": len(epsilons), "delta": cfg.delta, "target_epsilon": cfg.target_epsilon,
                "unit": dp_unit(cfg.max_len), "scope": "local DP-SGD on each client (per client, per window)",
                "protects_against": "everyone, the server included: each client adds its own noise",
                "accountant": "prv"} if cfg.dp else {"enabled": False}),
        "central_dp": central_dp.guarantee(cfg, clients, cfg.num_server_rounds) if cfg.central_dp else {"enabled": False},
        "secure_aggregation": secagg.summary(cfg),
    }
    if out is not None:
        artifacts.write_json(out / artifacts.SUMMARY, summary)
        # What each client reported spending, by node: `fedrec privacy` checks it against the ledgers.
        artifacts.write_json(out / artifacts.PRIVACY, {"delta": cfg.delta, "reported_epsilon": state["epsilons"],
                                                       "central": summary["central_dp"]})
        artifacts.save_model(out / artifacts.MODEL, model)
        artifacts.write_items(out / artifacts.ITEMS, fed.data)
    return summary


ROUND_METRICS = ("hr@10", "ndcg@10", "mrr@10", "coverage@10", "gini@10", "head-share@10", "target-exposure@10")


def _rejections(books: Any) -> dict[str, int]:
    """Rejected replies over the whole run, by reason."""
    total: dict[str, int] = {}
    for book in books:
        for reason, count in book.get("rejected_by", {}).items():
            total[reason] = total.get(reason, 0) + count
    return total


def _round_record(done: int, seconds: float, book: dict[str, Any], metrics: dict[str, float] | None) -> dict[str, Any]:
    record: dict[str, Any] = {"round": done, "seconds": seconds}
    record.update({k: book.get(k, 0) for k in ("sampled", "trained", "declined", "failed", "rejected")})
    record["rejected_by"] = book.get("rejected_by", {})
    record.update({k: book.get(k) for k in ("train_loss", "epsilon_max", "epsilon_median", "update_norm_median",
                                            "update_norm_bound")})
    if metrics is not None:
        record.update({k: metrics[k] for k in ROUND_METRICS if k in metrics})
    record.update({f"federated_{k}": v for k, v in book.get("federated", {}).items()})
    return record


def _round_line(r: dict[str, Any], rounds: int, elapsed: float) -> str:
    parts = [f"round {r['round']:3d}/{rounds}", f"clients {r['trained']}/{r['sampled']}"]
    problems = ", ".join(f"{r[k]} {k}" for k in ("declined", "failed", "rejected") if r[k])
    if problems:
        parts.append(f"({problems})")
    if r["train_loss"] is not None:
        parts.append(f"loss {r['train_loss']:.4f}")
    if "ndcg@10" in r:
        parts.append(f"NDCG@10 {r['ndcg@10']:.4f}")
    if r["epsilon_max"]:
        parts.append(f"ε max {r['epsilon_max']:.2f}")
    parts.append(f"{elapsed:.1f}s")
    return "  ".join(parts)


def _start_output(out: Path, cfg: Config) -> None:
    if out.exists() and any(out.iterdir()):
        raise artifacts.OutputExistsError(
            f"--out {out} already exists and is not empty: choose a new folder, or --resume it")
    out.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(out / artifacts.CONFIG, cfg.to_run_config())


def _checkpoint(out: Path, done: int, arrays: ArrayRecord, strategy: GuardedStrategy, grid: Grid,
                elapsed: float, epsilons: dict[int, float]) -> None:
    """Everything a resumed run needs to replay the remaining rounds exactly.

    The in-process grid also hands over its clients' Flower state (their privacy ledgers); a
    deployed client keeps its ledger on its own device instead.
    """
    inner = strategy.inner
    artifacts.save_tensors(out / CHECKPOINT, {
        "round": done,
        "elapsed": elapsed,
        "arrays": arrays.to_torch_state_dict(),
        "optimizer": {name: {k: torch.from_numpy(np.asarray(v)) for k, v in getattr(inner, name).items()}
                      for name in ("m_t", "v_t") if getattr(inner, name, None)},
        "epsilons": json.dumps(epsilons),
        "clients": json.dumps(grid.snapshot()) if hasattr(grid, "snapshot") else "",
    })


def _restore(out: Path | None, strategy: GuardedStrategy, grid: Grid, model: torch.nn.Module) -> dict[str, Any]:
    if out is None or not (out / CHECKPOINT).is_file():
        raise artifacts.OutputExistsError(f"cannot resume: no {CHECKPOINT} under out-dir {out}")
    saved = torch.load(out / CHECKPOINT, weights_only=True)
    inner = strategy.inner
    for name, values in saved["optimizer"].items():
        setattr(inner, name, {k: v.numpy() for k, v in values.items()})
    if saved["clients"] and hasattr(grid, "restore"):
        grid.restore(json.loads(saved["clients"]))
    lines = (out / artifacts.METRICS).read_text().splitlines() if (out / artifacts.METRICS).exists() else []
    kept = [line for line in lines if json.loads(line)["round"] <= saved["round"]]
    artifacts.replace_atomically(out / artifacts.METRICS, lambda tmp: tmp.write_text("".join(f"{k}\n" for k in kept)))
    return {"round": int(saved["round"]), "elapsed": float(saved["elapsed"]),
            "epsilons": {int(k): v for k, v in json.loads(saved["epsilons"]).items()},
            "arrays": ArrayRecord(saved["arrays"])}
