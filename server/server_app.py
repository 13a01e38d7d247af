"""The fedrec ServerApp: FedAvg rounds over the clients, central evaluation, run artefacts.

Each round: sample clients, collect their DP-trained weights, drop unusable replies, average
(weighted by training windows), evaluate the global model on the server's held-out users with
the full-ranking metrics, write one line to metrics.jsonl and a checkpoint. At the end: test
metrics, summary.json, model.pt and items.json under the run config's `out-dir`. Evaluation
(server/evaluation.py), checkpoints (server/checkpoint.py) and the summary (server/summary.py)
live in modules of their own; this one runs the rounds.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common import artifacts
from common.config import Config
from common.errors import NoProgressError
from common.federation import Federation, catalogue, federation
from common.flower_compat import sleeps_between_pulls
from common.model import build_model
from common.replies import NOISE_STD
from server import central_dp, checkpoint, preflight, secagg, summary
from server.evaluation import HeldOut
from server.grids import PromptGrid
from server.strategy import GuardedStrategy, make_strategy

app = ServerApp()
log = logging.getLogger("fedrec")


@app.main()
def main(grid: Grid, context: Context) -> None:
    if not log.handlers:  # under `flwr run` nothing else shows fedrec's round lines
        show_progress(True)
    if sleeps_between_pulls(grid):  # deployed: collect replies as they come, not every 3 s
        grid = PromptGrid(grid)
    run_federated(grid, Config.from_run_config(context.run_config))


def show_progress(enabled: bool) -> None:
    """Print fedrec's one line per round (once: Flower configures the root logger too)."""
    if not log.handlers:
        log.addHandler(logging.StreamHandler(sys.stdout))
        log.propagate = False
    log.setLevel(logging.INFO if enabled else logging.WARNING)


def run_federated(grid: Grid, cfg: Config) -> dict[str, Any]:
    """Run the federation `cfg` describes (or resume it); return summary.json's content."""
    out = Path(cfg.out_dir) if cfg.out_dir else None
    fed = federation(cfg)
    held_out = HeldOut(cfg, fed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, fed.data.num_items)
    if cfg.secagg:
        grid = secagg.SecureGrid(grid, cfg, secagg.max_weight(cfg, fed))
    clients = len(fed.clients) if cfg.partition != "devices" else len(list(grid.get_node_ids()))
    preflight.check(cfg, fed, clients)
    strategy = GuardedStrategy(make_strategy(cfg, clients), seed=cfg.seed, min_train_nodes=cfg.min_train_nodes,
                               max_update_norm=cfg.max_update_norm, update_norm_factor=cfg.update_norm_factor)
    origin = checkpoint.origin(cfg, fed.data)
    state = _start(out, cfg, strategy, grid, model, origin)
    # Deployed clients read their own files: they learn the model's item order from the server.
    catalogue_config = ConfigRecord({"items": catalogue(cfg)} if cfg.partition == "devices" else {})
    shares = {NOISE_STD: central_dp.client_noise_std(cfg, clients)} if cfg.distributed_dp else {}
    train_config = ConfigRecord({**catalogue_config, **shares})  # distributed DP: each client's noise
    log.info("fedrec: %d clients, %d evaluation users, %d items; most-popular validation NDCG@10 %.4f",
             clients, held_out.num_users, fed.data.num_items, held_out.popularity("valid")["ndcg@10"])
    end_of_round = _RoundEnd(cfg, out, model, held_out, strategy, grid, state, origin)

    result = strategy.start(grid=grid, initial_arrays=state["arrays"],
                            num_rounds=cfg.num_server_rounds - state["round"], timeout=cfg.round_timeout,
                            train_config=train_config, evaluate_config=catalogue_config, evaluate_fn=end_of_round)
    if state["round"] == 0 and not any(book.get("aggregated") for book in strategy.rounds.values()):
        raise NoProgressError("no round was aggregated: every sampled client declined, failed or was rejected "
                              f"(see {out / artifacts.METRICS if out else 'the round lines'}); the model is untrained, "
                              "so no model.pt or summary.json was written")
    final = result.arrays if len(result.arrays.keys()) else state["arrays"]
    model.load_state_dict(final.to_torch_state_dict())
    run_summary = summary.build(cfg, clients, held_out, model, strategy, state["epsilons"], end_of_round.started)
    if out is not None:
        _write_outputs(out, cfg, run_summary, state["epsilons"], strategy.participation, model, fed)
    return run_summary


def _start(out: Path | None, cfg: Config, strategy: GuardedStrategy, grid: Grid,
           model: torch.nn.Module, origin: dict[str, Any]) -> dict[str, Any]:
    """The run's state before its first round: a new run's, or the checkpoint's when resuming."""
    if cfg.resume:
        state = checkpoint.restore(out, strategy, grid, model, origin)
        strategy.round_offset = state["round"]
        return state
    if out is not None:
        _start_output(out, cfg)
    return {"round": 0, "elapsed": 0.0, "epsilons": {}, "arrays": ArrayRecord(model.state_dict())}


class _RoundEnd:
    """Flower's `evaluate_fn`, called before the first round and after each: evaluate the global
    model (every `eval-every` rounds, and the last), log the round's line, append it to
    metrics.jsonl and checkpoint."""

    def __init__(self, cfg: Config, out: Path | None, model: torch.nn.Module, held_out: HeldOut,
                 strategy: GuardedStrategy, grid: Grid, state: dict[str, Any], origin: dict[str, Any]) -> None:
        self.cfg, self.out, self.model, self.held_out, self.origin = cfg, out, model, held_out, origin
        self.strategy, self.grid = strategy, grid
        self.epsilons: dict[int, float] = state["epsilons"]  # each client's latest ε, filled in round by round
        self.started = time.perf_counter() - state["elapsed"]  # a resumed run counts the interrupted one's time
        self.last = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        done = server_round + self.strategy.round_offset
        if server_round == 0 and done > 0:
            return None  # resumed: round `done` was evaluated before the interruption
        metrics = self._evaluate(done, arrays)
        book = self.strategy.rounds.get(done, {})
        self.epsilons.update(book.get("epsilons", {}))
        now = time.perf_counter()
        record = _round_record(done, now - self.last, book, metrics)
        self.last = now
        log.info(_round_line(record, self.cfg.num_server_rounds, now - self.started))
        if self.out is not None:
            artifacts.append_jsonl(self.out / artifacts.METRICS, record)
            checkpoint.save(self.out, done, arrays, self.strategy, self.grid, now - self.started, self.epsilons,
                            self.origin)
        return MetricRecord({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def _evaluate(self, done: int, arrays: ArrayRecord) -> dict[str, float] | None:
        """Validation metrics of the global model, or None on a round `eval-every` skips."""
        if done % self.cfg.eval_every and done != self.cfg.num_server_rounds and done != 0:
            return None
        self.model.load_state_dict(arrays.to_torch_state_dict())
        return self.held_out.evaluate(self.model, "valid")


ROUND_METRICS = ("hr@10", "ndcg@10", "mrr@10", "coverage@10", "gini@10", "head-share@10", "target-exposure@10")


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
    artifacts.check_output_folder(out, hint="choose a new folder, or --resume it")
    out.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(out / artifacts.CONFIG, cfg.to_run_config())


def _write_outputs(out: Path, cfg: Config, run_summary: dict[str, Any], epsilons: dict[int, float],
                   participation: dict[int, list[list[int]]], model: torch.nn.Module, fed: Federation) -> None:
    """The files of a finished run: summary.json, privacy.json, model.pt and items.json."""
    artifacts.write_json(out / artifacts.SUMMARY, run_summary)
    # What each client reported spending, by node: `fedrec privacy` checks it against the ledgers.
    artifacts.write_json(out / artifacts.PRIVACY, {"delta": cfg.delta, "reported_epsilon": epsilons,
                                                   "central": run_summary["central_dp"]})
    # Who trained in which round, on how many windows: the audit's evidence, kept by the server itself.
    artifacts.write_json(out / artifacts.PARTICIPATION, participation)
    artifacts.save_model(out / artifacts.MODEL, model)
    artifacts.write_items(out / artifacts.ITEMS, fed.data)
