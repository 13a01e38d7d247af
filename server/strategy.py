"""Server strategy: one of Flower's strategies, behind a guard that fedrec adds.

`aggregation` picks Flower's FedAvg (or FedAdam, `server-strategy`) or one of its robust
strategies: coordinate-wise median, trimmed mean, Krum, Multi-Krum, Bulyan. The guard wraps any
`flwr.serverapp.strategy.Strategy` and
- samples clients reproducibly (Flower samples with the `random` module; the guard seeds it
  per round from the run's seed, so a resumed run samples the rounds it replays identically),
- counts sampled clients that never replied (timed out) as failed,
- validates every reply before aggregation and drops, counting each reason: failed, declined
  (privacy budget spent), and rejected for other keys than the global model's, another shape or
  dtype, NaN/Inf, missing metrics, or an update (reply minus global weights) longer than the
  round's norm bound (`max-update-norm`, or `update-norm-factor` times the round's median norm),
- skips aggregation when fewer than `min-train-nodes` usable replies came back,
- keeps per-round bookkeeping (counts, mean train loss, clients' ε, norms) for metrics.jsonl, and
  the participation record (who trained in which round, on how many DP units) for the privacy audit.

Flower's strategies aggregate a list of every reply of the round: memory grows with the clients
(22,000 Beauty clients would hold about 36 GB of weights). When the aggregation is plain FedAvg
and the norm bound is known before the replies (`max-update-norm`, or no bound), the guard
instead folds each reply into a running weighted sum as the grid hands it over, so memory stays
flat however many clients a round samples. The median-derived bound needs every update of the
round before it can judge any, so it keeps the list, and then folds the replies within the bound
the same way (Flower's FedAvg would parse each array's `.npy` header again).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Bulyan, FedAdam, FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy

from common.config import Config
from common.flower_compat import array_view, cast_like, seed_flower_sampler
from common.replies import ARRAYS, TrainMetrics, record_of, weight_key
from server import central_dp


def make_strategy(cfg: Config, num_clients: int) -> Strategy:
    """Flower's own strategy for the run config: FedAvg (weighted by windows) or FedAdam, inside
    Flower's central-DP wrapper when `central-dp` is on (then every client weighs the same)."""
    common = {"fraction_train": cfg.fraction_train, "fraction_evaluate": cfg.fraction_evaluate,
              "min_train_nodes": cfg.min_train_nodes, "min_evaluate_nodes": 1,
              "min_available_nodes": cfg.min_train_nodes,  # deployed: wait until that many nodes joined
              "weighted_by_key": weight_key(cfg.central_dp)}
    sampled = central_dp.sampled_per_round(cfg, num_clients)
    byzantine = int(cfg.byzantine_fraction * sampled)  # f: the malicious clients a round is assumed to hold
    if cfg.aggregation == "median":
        inner = FedMedian(**common)
    elif cfg.aggregation == "trimmed-mean":
        inner = FedTrimmedAvg(beta=cfg.byzantine_fraction, **common)
    elif cfg.aggregation == "krum":
        inner = Krum(num_malicious_nodes=byzantine, **common)
    elif cfg.aggregation == "multi-krum":
        inner = MultiKrum(num_malicious_nodes=byzantine, num_nodes_to_select=sampled - byzantine, **common)
    elif cfg.aggregation == "bulyan":
        inner = Bulyan(num_malicious_nodes=byzantine, **common)
    elif cfg.server_strategy == "fedadam" and cfg.central_dp:
        return central_dp.with_server_adam(cfg, num_clients, **common)  # Adam after the noise, not before
    elif cfg.server_strategy == "fedadam":
        inner = FedAdam(eta=cfg.server_lr, **common)
    else:
        inner = FedAvg(**common)
    return central_dp.wrap(inner, cfg, num_clients) if cfg.central_dp else inner


REJECTIONS = ("keys", "shape", "dtype", "nonfinite", "metrics", "norm")  # why a reply was rejected


class GuardedStrategy(Strategy):
    def __init__(self, inner: Strategy, *, seed: int, min_train_nodes: int, round_offset: int = 0,
                 max_update_norm: float = 0.0, update_norm_factor: float = 0.0) -> None:
        self.inner = inner
        self.seed = seed
        self.min_train_nodes = min_train_nodes
        self.round_offset = round_offset  # rounds done before a resume
        self.max_update_norm = max_update_norm
        self.update_norm_factor = update_norm_factor
        self.reference: ArrayRecord | None = None
        self.global_flat: dict[str, torch.Tensor] = {}  # the reference's values, flat, deserialised once a round
        self.rounds: dict[int, dict[str, Any]] = {}
        # The server's own participation record: node id -> [round, DP units] of every round it
        # trained in (declined rounds spend nothing). The privacy audit recomputes each client's
        # ε from it, independently of the ledgers the clients keep.
        self.participation: dict[int, list[list[int]]] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        seed_flower_sampler(f"{self.seed}/train/{server_round}")
        self.reference = arrays
        self.global_flat = {key: torch.from_numpy(array_view(a).copy()).reshape(1, -1) for key, a in arrays.items()}
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.rounds[server_round] = {"sampled": len(messages)}
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        book = self.rounds.setdefault(server_round, {"sampled": 0})
        streaming = self.streams()
        bound = self._norm_bound([]) if streaming else None
        total = _WeightedSum(self.inner.weighted_by_key) if streaming else None
        replied, failed, declined, rejected, epsilons = 0, 0, 0, dict.fromkeys(REJECTIONS, 0), {}
        norms: list[float] = []
        valid: list[Message] = []  # list path: checked, awaiting the round's bound
        losses: list[float] = []  # streamed path: of the replies folded (the replies themselves are not kept)
        pending: list[tuple[Message, TrainMetrics]] = []  # passed the cheap checks, not yet deserialised

        def inspect(checked: list[tuple[Message, TrainMetrics]]) -> None:
            batch = [reply for reply, _ in checked]
            stacks, finite, batch_norms = _inspect(batch, self.global_flat)
            rejected["nonfinite"] += int((~finite).sum())
            kept = [i for i in range(len(batch)) if finite[i]]
            norms.extend(batch_norms[kept].tolist())
            if total is None:
                valid.extend(batch[i] for i in kept)
                return
            within = [i for i in kept if batch_norms[i] <= bound]
            rejected["norm"] += len(kept) - len(within)
            metrics = [checked[i][1] for i in within]
            total.add(stacks, metrics, within)
            losses.extend(m.train_loss for m in metrics)

        for reply in replies:
            replied += 1
            metrics = None if reply.has_error() else TrainMetrics.of(reply)
            kind = self._triage(reply, metrics)
            if kind == "failed":
                failed += 1
                continue
            if metrics is not None:  # spent whatever happens to the update next
                epsilons[reply.metadata.src_node_id] = metrics.epsilon
                if kind != "declined":
                    self.participation.setdefault(reply.metadata.src_node_id, []).append(
                        [server_round, metrics.dp_units])
            if kind == "declined":
                declined += 1
            elif kind in rejected:
                rejected[kind] += 1
            else:
                pending.append((reply, metrics))
                if len(pending) == FOLD_BATCH:
                    inspect(pending)
                    pending = []
        if pending:
            inspect(pending)
        failed += max(book["sampled"] - replied, 0)  # no reply within the round's timeout
        usable = valid  # the streamed path keeps none: its replies are in `total`
        if total is None:
            bound = self._norm_bound(norms)
            usable = [r for r, n in zip(valid, norms, strict=True) if n <= bound]
            rejected["norm"] = len(valid) - len(usable)
            losses = [TrainMetrics.of(r).train_loss for r in usable]
        book.update(failed=failed, declined=declined, rejected=sum(rejected.values()),
                    rejected_by={k: v for k, v in rejected.items() if v},
                    trained=len(losses), replied=len(losses) + declined + sum(rejected.values()),
                    train_loss=statistics.fmean(losses) if losses else None,
                    update_norm_median=statistics.median(norms) if norms else None,
                    update_norm_bound=bound if bound < float("inf") else None,
                    epsilons=epsilons, epsilon_max=max(epsilons.values(), default=None),
                    epsilon_median=statistics.median(epsilons.values()) if epsilons else None)
        if len(losses) < self.min_train_nodes:
            book["aggregated"] = False
            return None, None
        book["aggregated"] = True
        if total is None and type(self.inner) is FedAvg:  # the bound needed the round: fold what passed it now
            total = _WeightedSum(self.inner.weighted_by_key)
            for start in range(0, len(usable), FOLD_BATCH):
                batch = usable[start:start + FOLD_BATCH]
                total.add(_inspect(batch, self.global_flat)[0], [TrainMetrics.of(r) for r in batch], range(len(batch)))
        arrays, metrics = total.result() if total is not None else self.inner.aggregate_train(server_round, usable)
        return cast_like(arrays, self.reference), metrics

    def streams(self) -> bool:
        """Whether replies are aggregated as they arrive (plain FedAvg, bound known beforehand)."""
        return type(self.inner) is FedAvg and bool(self.max_update_norm > 0 or self.update_norm_factor <= 0)

    def _norm_bound(self, norms: list[float]) -> float:
        """`max-update-norm` if set, else `update-norm-factor` times the round's median (0: no bound)."""
        if self.max_update_norm > 0:
            return self.max_update_norm
        if self.update_norm_factor > 0 and norms:
            return self.update_norm_factor * statistics.median(norms)
        return float("inf")

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        seed_flower_sampler(f"{self.seed}/evaluate/{server_round}")
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        metrics = self.inner.aggregate_evaluate(server_round, [r for r in replies if not r.has_error()])
        if metrics is not None:
            self.rounds.setdefault(server_round, {})["federated"] = dict(metrics)
        return metrics

    def _triage(self, reply: Message, metrics: TrainMetrics | None) -> str:
        """failed (error reply), declined (budget), valid, or the reason it is rejected (`REJECTIONS`);
        `metrics` is the reply's, parsed once by the caller. Only what needs no deserialising:
        finite values and norms are `_inspect`'s, in batches."""
        if reply.has_error():
            return "failed"
        if TrainMetrics.declines(reply):
            return "declined"
        problem = _mismatch(record_of(reply, ARRAYS, ArrayRecord), self.reference)
        if problem:
            return problem
        return "metrics" if metrics is None else "valid"


FOLD_BATCH = 32  # replies deserialised, checked and folded together


def _inspect(batch: list[Message], start: dict[str, torch.Tensor]
             ) -> tuple[dict[str, torch.Tensor], np.ndarray, np.ndarray]:
    """Each key's arrays of the batch stacked (K, *shape), deserialised once; whether each reply
    is finite everywhere; each update's L2 norm over all weights (summed in float64; inf where
    the reply is not finite). `start`: the global weights, flat (1, size), by key."""
    records = [reply.content[ARRAYS] for reply in batch]
    arrays = {key: np.stack([array_view(record[key]) for record in records]) for key in start}
    finite = np.ones(len(batch), dtype=bool)
    squared = torch.zeros(len(batch), dtype=torch.float64)
    for key, stack in arrays.items():
        finite &= np.isfinite(stack.reshape(len(batch), -1)).all(1)  # NumPy's: torch's cost 8× more here (measured)
        update = torch.from_numpy(stack).reshape(len(batch), -1) - start[key]
        squared += torch.linalg.vector_norm(update, dim=1, dtype=torch.float64).square()
    stacks = {key: torch.from_numpy(stack) for key, stack in arrays.items()}
    return stacks, finite, np.where(finite, squared.sqrt().numpy(), np.inf)


class _WeightedSum:
    """FedAvg's weighted mean of the replies' arrays and metrics, a batch of replies at a time:
    one matrix-vector product over the stacked batch per array, added up across batches in float64."""

    def __init__(self, weight_key: str) -> None:
        self.weight_key = weight_key
        self.weight = 0.0
        self.arrays: dict[str, torch.Tensor] = {}
        self.metrics: dict[str, float] = {}

    def add(self, stacks: dict[str, torch.Tensor], metrics: list[TrainMetrics], rows: Sequence[int]) -> None:
        """Fold rows `rows` of the stacked batch, whose replies' metrics are `metrics`."""
        if not rows:
            return
        records = [m.to_record() for m in metrics]
        weights = torch.tensor([float(r[self.weight_key]) for r in records], dtype=torch.float64)
        self.weight += float(weights.sum())
        picked = torch.tensor(list(rows))
        for key, stack in stacks.items():
            chosen = stack[picked] if len(rows) < len(stack) else stack
            # (K,) @ (K, size)
            part = (weights.to(stack.dtype) @ chosen.reshape(len(rows), -1)).reshape(stack.shape[1:])
            self.arrays.setdefault(key, torch.zeros(part.shape, dtype=torch.float64))
            self.arrays[key] += part
        for record, weight in zip(records, weights.tolist(), strict=True):
            for key, value in record.items():
                self.metrics[key] = self.metrics.get(key, 0.0) + float(value) * weight

    def result(self) -> tuple[ArrayRecord, MetricRecord]:
        # cast to the global model's dtypes by the caller
        arrays = ArrayRecord({k: Array((v / self.weight).numpy()) for k, v in self.arrays.items()})
        return arrays, MetricRecord({k: v / self.weight for k, v in self.metrics.items()})


def _mismatch(arrays: ArrayRecord | None, reference: ArrayRecord | None) -> str:
    """Why `arrays` cannot be averaged into the global model ('' if it can)."""
    if arrays is None or reference is None or list(arrays.keys()) != list(reference.keys()):
        return "keys"
    for key, ref in reference.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(ref.shape):
            return "shape"
        if got.dtype != ref.dtype:
            return "dtype"
    return ""
