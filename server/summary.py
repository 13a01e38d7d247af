"""summary.json: what a finished federated run was, how well its model does, and what it protected."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from typing import Any

import torch

from client.training import dp_unit
from common.config import Config
from server import central_dp, secagg
from server.evaluation import HeldOut
from server.strategy import GuardedStrategy


def build(cfg: Config, clients: int, held_out: HeldOut, model: torch.nn.Module, strategy: GuardedStrategy,
          epsilons: dict[int, float], started: float) -> dict[str, Any]:
    """The summary of a run that started at `started` (`time.perf_counter`), its final `model`
    evaluated on the held-out test examples."""
    test = held_out.evaluate(model, "test")
    popularity_test = held_out.popularity("test")
    return {
        "dataset": cfg.dataset,
        "setting": {"partition": cfg.partition, "clients": clients, "rounds": cfg.num_server_rounds,
                    "fraction-train": cfg.fraction_train, "local-epochs": cfg.local_epochs,
                    "strategy": cfg.server_strategy, "evaluation-users": held_out.num_users,
                    "holdout-users": cfg.holdout_users},
        "test": test,
        "popularity_test": popularity_test,
        "robustness": _robustness(cfg, strategy.rounds.values()),
        "attack": ({"kind": cfg.attack, "fraction": cfg.attack_fraction, "scale": cfg.attack_scale,
                    "target_item": cfg.target_item} if cfg.attack != "none" else {"kind": "none"}),
        "seconds": time.perf_counter() - started,
        "dp": _local_dp(cfg, list(epsilons.values())),
        "central_dp": (central_dp.guarantee(cfg, clients, cfg.num_server_rounds) if cfg.central_dp
                       else {"enabled": False}),
        "secure_aggregation": secagg.summary(cfg),
    }


def _robustness(cfg: Config, books: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The defence against malicious clients, and how many replies it rejected over the run, by reason."""
    rejected: dict[str, int] = {}
    for book in books:
        for reason, count in book.get("rejected_by", {}).items():
            rejected[reason] = rejected.get(reason, 0) + count
    bound = (f"{cfg.max_update_norm:g}" if cfg.max_update_norm > 0 else
             f"{cfg.update_norm_factor:g} x the round's median" if cfg.update_norm_factor > 0 else "none")
    return {"aggregation": cfg.aggregation, "byzantine_fraction": cfg.byzantine_fraction,
            "update_norm_bound": bound, "rejected": rejected}


def _local_dp(cfg: Config, epsilons: list[float]) -> dict[str, Any]:
    """The clients' local DP-SGD guarantee: the largest and median ε any client reported."""
    if not cfg.dp:
        return {"enabled": False}
    return {"enabled": True, "epsilon_max": max(epsilons, default=0.0),
            "epsilon_median": statistics.median(epsilons) if epsilons else 0.0,
            "clients_accounted": len(epsilons), "delta": cfg.delta, "target_epsilon": cfg.target_epsilon,
            "unit": dp_unit(cfg), "scope": f"local DP-SGD on each client (per client, per {cfg.dp_unit})",
            "protects_against": "everyone, the server included: each client adds its own noise",
            "accountant": "prv"}
