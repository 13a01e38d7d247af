"""The centralized baseline: all users' training windows in one place, the same model and
training loop as a federated client, early stopping on validation NDCG@10.

It is the reference every federated number is read against, so it is evaluated by the same
full-ranking evaluator, next to the most-popular baseline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from client.training import dp_unit, train
from common import artifacts
from common.config import Config
from common.dataset import SequenceData, eval_examples, load_dataset, popularity
from common.federation import holder_data
from common.metrics import evaluate_model, evaluate_popularity
from common.model import build_model
from common.privacy import check_plan, noise_multiplier_for
from simulation.allocator import keep_freed_memory


def train_centralized(
    cfg: Config, out: Path, on_epoch: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Train, write config.json, metrics.jsonl, summary.json, model.pt and items.json to `out`."""
    artifacts.check_output_folder(out)  # before the training it would otherwise throw away
    keep_freed_memory()  # as the in-process engine does, so the two compare like for like
    data = load_dataset(cfg)
    held = holder_data(data.sequences, cfg, data.num_items)
    windows, valid = held.windows, held.valid
    test = eval_examples(data.sequences, "test", cfg.max_len)
    torch.manual_seed(cfg.seed)  # the initial weights too: PyTorch seeds each process at random
    model = build_model(cfg, data.num_items)
    units, population = held.dp_units(cfg), held.dp_population(cfg)
    check_plan(cfg, [(population, cfg.epochs)])
    sigma = noise_multiplier_for(cfg, population, cfg.epochs) if cfg.dp else None

    with artifacts.staged_output(out) as stage:
        artifacts.write_json(stage / artifacts.CONFIG, cfg.to_run_config())
        best: dict[str, Any] = {"epoch": 0, "ndcg@10": -1.0}
        train_seconds: list[float] = []
        started = time.perf_counter()
        clock = [started]

        def end_of_epoch(epoch: int, loss: float, epsilon: float | None) -> bool:
            train_seconds.append(time.perf_counter() - clock[0])
            metrics = evaluate_model(model, *valid, data.num_items, mask_history=cfg.mask_history)
            record = {"epoch": epoch, "loss": loss, "seconds": train_seconds[-1], "epsilon": epsilon,
                      **{f"valid_{k}": v for k, v in metrics.items()}}
            artifacts.append_jsonl(stage / artifacts.METRICS, record)
            if on_epoch is not None:
                on_epoch(record)
            if metrics["ndcg@10"] > best["ndcg@10"]:
                best.update(metrics, epoch=epoch, state={k: v.clone() for k, v in model.state_dict().items()},
                            seconds=time.perf_counter() - started)
            clock[0] = time.perf_counter()
            return epoch - best["epoch"] >= cfg.patience

        result = train(model, windows, cfg, epochs=cfg.epochs, noise_multiplier=sigma, seed=cfg.seed, units=units,
                       on_epoch_end=end_of_epoch)
        model.load_state_dict(best.pop("state"))
        scores = popularity(data.sequences, data.num_items)
        protocols = {name: {"model": evaluate_model(model, *test, data.num_items, mask_history=masked),
                            "popularity": evaluate_popularity(scores, test[2], data.num_items, inputs=test[0],
                                                              mask_history=masked)}
                     for name, masked in PROTOCOLS.items()}
        run_protocol = protocols[protocol(cfg.mask_history)]
        summary = {
            "dataset": cfg.dataset,
            **_sizes(data, len(windows)),
            "epochs": result.epochs,
            "best_epoch": best.pop("epoch"),
            "seconds_per_epoch": sum(train_seconds) / len(train_seconds),
            "seconds_to_best": best.pop("seconds"),  # training and validation, up to the best epoch's end
            "valid": best,
            "test": run_protocol["model"],
            "popularity_test": run_protocol["popularity"],
            "mask_history": cfg.mask_history,
            # the same model on the same test targets under both published protocols (selected on
            # validation under the run's own, `mask_history`)
            "test_by_protocol": protocols,
            "dp": _privacy(cfg, sigma, result.epsilon),
        }
        artifacts.write_json(stage / artifacts.SUMMARY, summary)
        artifacts.save_model(stage / artifacts.MODEL, model)
        artifacts.write_items(stage / artifacts.ITEMS, data)
    return summary


PROTOCOLS = {"recbole": False, "s3rec": True}  # full ranking; history masked (S3-Rec) or not (RecBole)


def protocol(mask_history: bool) -> str:
    """The published protocol a `mask-history` setting evaluates under."""
    return "s3rec" if mask_history else "recbole"


def _sizes(data: SequenceData, windows: int) -> dict[str, int]:
    return {"users": len(data.sequences), "items": data.num_items,
            "interactions": len(data.sequences.items), "training_windows": windows}


def _privacy(cfg: Config, sigma: float | None, epsilon: float | None) -> dict[str, Any]:
    if sigma is None:
        return {"enabled": False}
    return {"enabled": True, "epsilon": epsilon, "delta": cfg.delta, "noise_multiplier": sigma,
            "max_grad_norm": cfg.max_grad_norm, "unit": dp_unit(cfg), "accountant": "prv"}
