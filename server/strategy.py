"""Server strategy: Flower's FedAvg or FedAdam, behind a guard that fedrec adds.

The guard wraps any `flwr.serverapp.strategy.Strategy` and
- samples clients reproducibly (Flower samples with the `random` module; the guard seeds it
  per round from the run's seed, so a resumed run samples the rounds it replays identically),
- counts sampled clients that never replied (timed out) as failed,
- drops, before aggregation, replies that failed, declined (privacy budget spent) or carry
  weights of the wrong shape or dtype or with NaN/Inf, and counts each kind,
- skips aggregation when fewer than `min-train-nodes` usable replies came back,
- keeps per-round bookkeeping (counts, mean train loss, clients' ε) for metrics.jsonl.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, Strategy

from common.config import Config
from common.privacy import weight_key
from server import central_dp


def make_strategy(cfg: Config, num_clients: int) -> Strategy:
    """Flower's own strategy for the run config: FedAvg (weighted by windows) or FedAdam, inside
    Flower's central-DP wrapper when `central-dp` is on (then every client weighs the same)."""
    common = {"fraction_train": cfg.fraction_train, "fraction_evaluate": cfg.fraction_evaluate,
              "min_train_nodes": cfg.min_train_nodes, "min_evaluate_nodes": 1,
              "min_available_nodes": cfg.min_train_nodes,  # deployed: wait until that many nodes joined
              "weighted_by_key": weight_key(cfg.central_dp)}
    inner = FedAdam(eta=cfg.server_lr, **common) if cfg.server_strategy == "fedadam" else FedAvg(**common)
    return central_dp.wrap(inner, cfg, num_clients) if cfg.central_dp else inner


class GuardedStrategy(Strategy):
    def __init__(self, inner: Strategy, *, seed: int, min_train_nodes: int, round_offset: int = 0) -> None:
        self.inner = inner
        self.seed = seed
        self.min_train_nodes = min_train_nodes
        self.round_offset = round_offset  # rounds done before a resume
        self.reference: ArrayRecord | None = None
        self.rounds: dict[int, dict[str, Any]] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        random.seed(f"{self.seed}/train/{server_round}")
        self.reference = arrays
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.rounds[server_round] = {"sampled": len(messages)}
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        book = self.rounds.setdefault(server_round, {"sampled": 0})
        usable, counts, epsilons, losses = [], dict.fromkeys(("failed", "declined", "rejected"), 0), {}, []
        replies = list(replies)
        counts["failed"] = max(book["sampled"] - len(replies), 0)  # no reply within the round's timeout
        for reply in replies:
            kind = self._triage(reply)
            if kind != "trained":
                counts[kind] += 1
            else:
                usable.append(reply)
            if kind in ("trained", "declined") and "epsilon" in reply.content["metrics"]:
                epsilons[reply.metadata.src_node_id] = float(reply.content["metrics"]["epsilon"])
            if kind == "trained":
                losses.append(float(reply.content["metrics"]["train-loss"]))
        book.update(counts, trained=len(usable), replied=len(usable) + counts["declined"] + counts["rejected"],
                    train_loss=statistics.fmean(losses) if losses else None,
                    epsilons=epsilons, epsilon_max=max(epsilons.values(), default=None),
                    epsilon_median=statistics.median(epsilons.values()) if epsilons else None)
        if len(usable) < self.min_train_nodes:
            book["aggregated"] = False
            return None, None
        book["aggregated"] = True
        arrays, metrics = self.inner.aggregate_train(server_round, usable)
        return _cast_like(arrays, self.reference), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        random.seed(f"{self.seed}/evaluate/{server_round}")
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        metrics = self.inner.aggregate_evaluate(server_round, [r for r in replies if not r.has_error()])
        if metrics is not None:
            self.rounds.setdefault(server_round, {})["federated"] = dict(metrics)
        return metrics

    def _triage(self, reply: Message) -> str:
        """trained, failed (error reply), declined (budget) or rejected (malformed weights)."""
        if reply.has_error():
            return "failed"
        content = reply.content
        if "metrics" in content and int(content["metrics"].get("declined", 0)) == 1:
            return "declined"
        if not _matches(content.array_records.get("arrays"), self.reference):
            return "rejected"
        if "metrics" not in content or not all(k in content["metrics"] for k in ("num-examples", "train-loss", "epsilon")):
            return "rejected"
        return "trained"


def _cast_like(arrays: ArrayRecord | None, reference: ArrayRecord) -> ArrayRecord | None:
    """The aggregate in the global model's dtypes: flwr 1.42's FedAdam returns float64 (NumPy
    promotes its float64 step size), which the next round's replies, float32, would not match."""
    if arrays is None or all(arrays[k].dtype == reference[k].dtype for k in reference.keys()):
        return arrays
    return ArrayRecord({k: Array(arrays[k].numpy().astype(reference[k].numpy().dtype)) for k in arrays.keys()})


def _matches(arrays: ArrayRecord | None, reference: ArrayRecord | None) -> bool:
    """Same keys, shapes and dtypes as the global model, and every value finite."""
    if arrays is None or reference is None or list(arrays.keys()) != list(reference.keys()):
        return False
    for key, ref in reference.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            return False
        if not np.isfinite(got.numpy()).all():
            return False
    return True
