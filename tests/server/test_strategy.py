"""GuardedStrategy around Flower's FedAvg: bad replies are dropped and counted, sampling reproduces.

A toy ClientApp stands in for the recommender. Its 'model' is one float64 array ``w``; a good
node ``p`` replies ``w + (p + 1)`` with ``num-examples = p + 1``, so FedAvg over the good nodes
G adds ``sum((p + 1)^2) / sum(p + 1)`` per round. The first partitions misbehave:

    0: NaN weights   1: wrong shape   2: raises   3: an extra key   4: declines (budget)
    5: an update 100 times too long (rejected by the norm bound when one is set)
"""

from __future__ import annotations

import random
import time
from typing import Any, cast

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from recipes import LOCAL_DP

from common.replies import TrainMetrics, declined_reply
from server.strategy import GuardedStrategy, make_strategy
from simulation.grid import NODE_ID_OFFSET, InProcessGrid, run_server_app

NAN, SHAPE, RAISES, EXTRA, DECLINES, BOOSTED = range(6)
BAD = (NAN, SHAPE, RAISES, EXTRA, DECLINES, BOOSTED)


def make_client_app(bad: tuple[int, ...] = BAD, *, declined_metrics: dict[str, Any] | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = cast(int, context.node_config["partition-id"])
        w = msg.content["arrays"]["w"].numpy()
        metrics = TrainMetrics(num_examples=pid + 1, train_loss=0.1 * pid, epsilon=0.5 * pid).to_record()
        arrays = {"w": Array(w + (pid + 1))}
        if pid in bad:
            if pid == NAN:
                arrays = {"w": Array(np.full_like(w, np.nan))}
            elif pid == SHAPE:
                arrays = {"w": Array(np.zeros(len(w) + 1))}
            elif pid == RAISES:
                raise RuntimeError("client crashed")
            elif pid == EXTRA:
                arrays = {**arrays, "extra": Array(np.zeros(2))}
            elif pid == BOOSTED:
                arrays = {"w": Array(w + 100.0 * (pid + 1))}
            elif pid == DECLINES:
                if declined_metrics is None:
                    return declined_reply(msg, 7.5, "privacy budget")
                return Message(RecordDict({"metrics": MetricRecord(declined_metrics),
                                           "config": ConfigRecord({"reason": "privacy budget"})}), reply_to=msg)
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)

    return app


class RecordingGrid(InProcessGrid):
    """Remembers which nodes each batch of train instructions went to."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_batches: list[list[int]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.train_batches.append(sorted(m.metadata.dst_node_id for m in messages))
        return super().send_and_receive(messages, timeout=timeout)


INITIAL = np.zeros(3)


def run(strategy: GuardedStrategy, grid: InProcessGrid, num_rounds: int = 2, timeout: float = 3600) -> dict[str, Any]:
    """Run ``strategy.start`` as a ServerApp would (inside the server's task identity)."""
    out: dict[str, Any] = {}
    app = ServerApp()

    @app.main()
    def main(g: Grid, context: Context) -> None:
        out["result"] = strategy.start(grid=g, initial_arrays=ArrayRecord({"w": Array(INITIAL.copy())}),
                                       num_rounds=num_rounds, timeout=timeout)

    run_server_app(app, grid)
    return out


def guarded(seed: int = 0, min_train_nodes: int = 1, fraction_train: float = 1.0, **kwargs: Any) -> GuardedStrategy:
    inner = FedAvg(fraction_train=fraction_train, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    return GuardedStrategy(inner, seed=seed, min_train_nodes=min_train_nodes, **kwargs)


def fedavg_step(good: list[int]) -> float:
    weights = np.array(good) + 1.0
    return float((weights**2).sum() / weights.sum())


@pytest.mark.parametrize("streaming", [False, True])
def test_only_good_replies_are_averaged_and_each_bad_kind_is_counted(streaming):
    """The same result whether the guard keeps the round's replies (median-derived bound) or
    folds them into a running sum as they arrive (the same bound, given beforehand)."""
    n = 9
    good = [p for p in range(n) if p not in BAD]  # 6, 7, 8
    norms = sorted(np.sqrt(3) * np.array([7.0, 8.0, 9.0, 600.0]))
    strategy = guarded(max_update_norm=3 * (norms[1] + norms[2]) / 2) if streaming else guarded(update_norm_factor=3.0)
    assert strategy.streams() is streaming
    out = run(strategy, InProcessGrid(make_client_app(), n, {}), num_rounds=2)

    final = out["result"].arrays["w"].numpy()
    assert np.isfinite(final).all()
    np.testing.assert_allclose(final, np.full(3, 2 * fedavg_step(good)))
    assert sorted(strategy.rounds) == [1, 2]
    for r in (1, 2):
        book = strategy.rounds[r]
        assert {k: book[k] for k in ("sampled", "failed", "declined", "rejected", "trained", "replied")} == {
            "sampled": n, "failed": 1, "declined": 1, "rejected": 4, "trained": len(good),
            "replied": n - 1}
        assert book["rejected_by"] == {"nonfinite": 1, "shape": 1, "keys": 1, "norm": 1}
        assert book["aggregated"] is True
        assert book["train_loss"] == pytest.approx(np.mean([0.1 * p for p in good]))
        # the bound is 3 x the median update norm of the structurally valid replies (6, 7, 8 and the boosted one)
        assert book["update_norm_bound"] == pytest.approx(3 * (norms[1] + norms[2]) / 2)
        # ε of every node that replied: a declined or rejected node still spent what it reports
        assert book["epsilons"] == ({NODE_ID_OFFSET + p: 0.5 * p for p in (NAN, SHAPE, EXTRA, BOOSTED, *good)}
                                    | {NODE_ID_OFFSET + DECLINES: 7.5})
        assert book["epsilon_max"] == 7.5
    # FedAvg's aggregated train metrics come from the good replies only
    metrics = out["result"].train_metrics_clientapp[2]
    weights = np.array(good) + 1.0
    assert metrics["epsilon"] == pytest.approx(float((weights * 0.5 * np.array(good)).sum() / weights.sum()))


def test_a_client_that_does_not_reply_in_time_counts_as_failed():
    slow_app = ClientApp()

    @slow_app.train()
    def train(msg: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) == 0:
            time.sleep(0.5)
        arrays = {"w": Array(msg.content["arrays"]["w"].numpy() + 1.0)}
        metrics = TrainMetrics(num_examples=1, train_loss=0.1, epsilon=0.0).to_record()
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)

    strategy = guarded()
    run(strategy, InProcessGrid(slow_app, 3, {}), num_rounds=1, timeout=0.3)
    book = strategy.rounds[1]
    assert (book["sampled"], book["trained"], book["failed"], book["aggregated"]) == (3, 2, 1, True)


@pytest.mark.parametrize("min_train_nodes, aggregated", [(3, True), (4, False)])
def test_too_few_usable_replies_skip_aggregation(min_train_nodes, aggregated):
    n = 8  # 3 good replies per round (5, 6, 7: with no norm bound the boosted reply is one of them)
    strategy = guarded(min_train_nodes=min_train_nodes)
    out = run(strategy, InProcessGrid(make_client_app(), n, {}), num_rounds=2)

    assert [strategy.rounds[r]["aggregated"] for r in (1, 2)] == [aggregated] * 2
    assert strategy.rounds[2]["trained"] == 3
    sent_in_round_2 = strategy.reference["w"].numpy()  # the global arrays round 2 started from
    if aggregated:
        np.testing.assert_allclose(sent_in_round_2, np.full(3, (6 * 600 + 7 * 7 + 8 * 8) / (6 + 7 + 8)))
    else:
        np.testing.assert_array_equal(sent_in_round_2, INITIAL)  # unchanged
        assert len(out["result"].arrays) == 0  # never replaced by an aggregate
        assert out["result"].train_metrics_clientapp == {}


def test_all_good_replies_are_all_used():
    n = 4
    strategy = guarded()
    out = run(strategy, InProcessGrid(make_client_app(bad=()), n, {}), num_rounds=1)
    np.testing.assert_allclose(out["result"].arrays["w"].numpy(), np.full(3, fedavg_step(list(range(n)))))
    book = strategy.rounds[1]
    assert (book["sampled"], book["trained"], book["failed"], book["declined"], book["rejected"]) == (n, n, 0, 0, 0)


def test_dtype_mismatch_and_missing_metrics_are_rejected():
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = cast(int, context.node_config["partition-id"])
        w = msg.content["arrays"]["w"].numpy()
        metrics = dict(TrainMetrics(num_examples=1, train_loss=0.0, epsilon=0.0).to_record())
        if pid == 0:
            w = w.astype(np.float32)  # right shape, wrong dtype
        if pid == 1:
            del metrics["epsilon"]  # a trained reply must say what it spent
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w + 1)}), "metrics": MetricRecord(metrics)}),
                       reply_to=msg)

    strategy = guarded()
    out = run(strategy, InProcessGrid(app, 3, {}), num_rounds=1)
    assert (strategy.rounds[1]["rejected"], strategy.rounds[1]["trained"]) == (2, 1)
    assert strategy.rounds[1]["rejected_by"] == {"dtype": 1, "metrics": 1}
    np.testing.assert_allclose(out["result"].arrays["w"].numpy(), INITIAL + 1)


def test_declined_reply_without_epsilon_does_not_crash_the_round():
    n = 6
    strategy = guarded()
    out = run(strategy, InProcessGrid(make_client_app(bad=(DECLINES,), declined_metrics={"declined": 1}), n, {}),
              num_rounds=1)
    assert strategy.rounds[1]["declined"] == 1
    assert strategy.rounds[1]["trained"] == n - 1
    assert np.isfinite(out["result"].arrays["w"].numpy()).all()


def sampled(seed: int, n: int = 10, num_rounds: int = 3, **kwargs: Any) -> tuple[GuardedStrategy, list[list[int]]]:
    grid = RecordingGrid(make_client_app(bad=()), n, {})
    strategy = guarded(seed=seed, fraction_train=0.5, **kwargs)
    run(strategy, grid, num_rounds=num_rounds)
    return strategy, grid.train_batches


def test_sampling_is_reproducible_per_seed():
    _, first = sampled(seed=7)
    random.seed(12345)  # the process-wide random state must not matter
    random.random()
    _, again = sampled(seed=7)
    _, other = sampled(seed=8)

    assert [len(batch) for batch in first] == [5, 5, 5]
    assert first == again
    assert other != first
    assert len({tuple(batch) for batch in first}) > 1  # rounds sample afresh


def test_resumed_strategy_samples_the_rounds_it_replays():
    _, full = sampled(seed=3, num_rounds=3)
    strategy, resumed = sampled(seed=3, num_rounds=2, round_offset=1)
    assert resumed == full[1:]
    assert sorted(strategy.rounds) == [2, 3]


def test_make_strategy_follows_the_config():
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAdam

    from common.config import Config, ConfigError

    with pytest.raises(ConfigError, match="aggregation = krum needs"):
        Config.from_run_config({**LOCAL_DP, "aggregation": "krum", "central-dp": True})
    cfg = Config.from_run_config({**LOCAL_DP, "fraction-train": 0.3, "min-train-nodes": 3})
    strategy = make_strategy(cfg, 20)
    assert type(strategy) is FedAvg
    assert (strategy.fraction_train, strategy.min_train_nodes, strategy.weighted_by_key) == (0.3, 3, "num-examples")
    adam = make_strategy(Config.from_run_config({**LOCAL_DP, "server-strategy": "fedadam", "server-lr": 0.05}), 20)
    assert isinstance(adam, FedAdam) and adam.eta == 0.05
    central = make_strategy(Config.from_run_config({**LOCAL_DP, "central-dp": True, "central-clip": 0.5,
                                                    "fraction-train": 0.3, "central-noise-multiplier": 1.2}), 20)
    assert isinstance(central, DifferentialPrivacyClientSideFixedClipping)
    assert (central.clipping_norm, central.noise_multiplier, central.num_sampled_clients) == (0.5, 1.2, 6)
    assert central.strategy.weighted_by_key == "unit-weight"  # a uniform average: what the noise is calibrated to
    adam_after_noise = make_strategy(Config.from_run_config({**LOCAL_DP, "central-dp": True,
                                                             "server-strategy": "fedadam",
                                                             "central-noise-multiplier": 1.2}), 20)
    assert isinstance(adam_after_noise, FedAdam)
    assert isinstance(adam_after_noise.dp, DifferentialPrivacyClientSideFixedClipping)
    assert adam_after_noise.dp.strategy.weighted_by_key == "unit-weight"


def test_a_fixed_norm_bound_overrides_the_median_rule():
    strategy = guarded(max_update_norm=np.sqrt(3) * 2.5, update_norm_factor=3.0)  # keeps updates of 1 and 2
    out = run(strategy, InProcessGrid(make_client_app(bad=()), 4, {}), num_rounds=1)
    np.testing.assert_allclose(out["result"].arrays["w"].numpy(), np.full(3, fedavg_step([0, 1])))
    assert strategy.rounds[1]["rejected_by"] == {"norm": 2}


@pytest.mark.parametrize("aggregation", ["median", "trimmed-mean", "krum", "multi-krum", "bulyan"])
def test_every_robust_aggregation_runs_and_resists_one_outlier(aggregation):
    """Flower's robust strategy from the run config, behind the guard; no norm bound, so only the
    aggregation stands between the model and partition 0's update of +1000."""
    from common.config import Config

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = cast(int, context.node_config["partition-id"])
        w = msg.content["arrays"]["w"].numpy()
        shift = 1000.0 if pid == 0 else 1.0 + 0.01 * pid
        metrics = TrainMetrics(num_examples=1, train_loss=0.0, epsilon=0.0).to_record()
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w + shift)}), "metrics": metrics}), reply_to=msg)

    cfg = Config.from_run_config({**LOCAL_DP, "aggregation": aggregation, "byzantine-fraction": 0.1,
                                  "fraction-train": 1.0, "fraction-evaluate": 0.0, "min-train-nodes": 1})
    strategy = GuardedStrategy(make_strategy(cfg, 10), seed=0, min_train_nodes=1)
    out = run(strategy, InProcessGrid(app, 10, {}), num_rounds=1)
    w = out["result"].arrays["w"].numpy()
    assert np.all((w > 1.0) & (w < 1.1)), w  # FedAvg would give about 101


def test_a_finite_reply_whose_update_overflows_float32_is_not_called_nonfinite():
    """Finiteness is checked on the weights themselves, not inferred from the update's norm."""
    from common.flower_compat import server_task_identity
    from common.replies import train_reply
    from server.strategy import _inspect

    reference = ArrayRecord({"w": Array(np.full(3, -3e38, dtype=np.float32))})
    huge = Array(np.full(3, 3e38, dtype=np.float32))  # finite, but huge - reference overflows float32
    nan = Array(np.array([0.0, np.nan, 0.0], dtype=np.float32))
    with server_task_identity(1):
        instruction = Message(RecordDict({"arrays": reference}), dst_node_id=NODE_ID_OFFSET, message_type="train")
    metrics = TrainMetrics(num_examples=1, train_loss=0.0, epsilon=0.0)
    replies = [train_reply(instruction, ArrayRecord({"w": a}), metrics)
               for a in (huge, nan)]
    _, finite, norms = _inspect(replies, {"w": torch.from_numpy(reference["w"].numpy()).reshape(1, -1)})
    assert finite.tolist() == [True, False]
    assert np.isinf(norms).all()  # the overflowing update has no finite norm either, so any bound rejects it
