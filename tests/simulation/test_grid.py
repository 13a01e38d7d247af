"""The in-process Grid runs a real Flower ServerApp (FedAvg) and ClientApp without Ray.

The toy ClientApp's 'model' is one array; training on partition ``i`` adds ``step * (i + 1)``
to it with weight ``num-examples = i + 1``, so FedAvg's result is known in closed form:
each round adds ``step * sum((i + 1)^2) / sum(i + 1)`` over the nodes that replied.
"""

from __future__ import annotations

import time
from typing import Any, cast

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from common.flower_compat import SUPERLINK_NODE_ID, ErrorCode, server_task_identity
from simulation.grid import NODE_ID_OFFSET, InProcessGrid, run_in_process, run_server_app

STEP = 2.0
RUN_CONFIG: dict[str, int | float] = {"num-rounds": 3, "step": STEP}


def make_client_app(fail_partition: int = -1, slow_partition: int = -1) -> ClientApp:
    """Toy ClientApp; ``fail_partition`` raises in train, ``slow_partition`` sleeps 0.3 s."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = cast(int, context.node_config["partition-id"])
        if pid == fail_partition:
            raise RuntimeError(f"boom on partition {pid}")
        if pid == slow_partition:
            time.sleep(0.3)
        counters = context.state.config_records
        trained = cast(int, counters["counter"]["trained"]) + 1 if "counter" in counters else 1
        counters["counter"] = ConfigRecord({"trained": trained})
        msg.content.config_records["config"]["touched-by-client"] = True  # must not leak
        w = msg.content.array_records["arrays"]["w"].numpy()
        step = cast(float, context.run_config["step"])
        content = RecordDict({
            "arrays": ArrayRecord({"w": Array(w + step * (pid + 1))}),
            "metrics": MetricRecord({"num-examples": pid + 1, "trained": trained}),
        })
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        pid = cast(int, context.node_config["partition-id"])
        metrics = MetricRecord({"num-examples": 1, "partition": pid})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def make_server_app(fraction_train: float = 1.0, fraction_evaluate: float = 1.0) -> ServerApp:
    """FedAvg for ``run_config["num-rounds"]`` rounds; final arrays land in context.state."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        num_rounds = int(context.run_config["num-rounds"])
        strategy = FedAvg(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate)
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({"w": Array(np.zeros(3))}),
            num_rounds=num_rounds,
        )
        context.state["final"] = result.arrays
        context.state["train-metrics"] = result.train_metrics_clientapp[num_rounds]

    return app


def fedavg_expected(partitions: list[int], rounds: int = 3) -> np.ndarray:
    """Closed-form FedAvg result of the toy apps over the partitions that replied."""
    weights = np.array(partitions) + 1.0
    return np.full(3, rounds * STEP * (weights**2).sum() / weights.sum())


def final_w(context: Context) -> np.ndarray:
    return context.state.array_records["final"]["w"].numpy()


def node_ids(n: int) -> list[int]:
    return [NODE_ID_OFFSET + i for i in range(n)]


@pytest.mark.parametrize("cohort_size", [1, 4])
def test_fedavg_matches_hand_computation_and_state_persists(cohort_size: int) -> None:
    grid = InProcessGrid(make_client_app(), 10, RUN_CONFIG, cohort_size=cohort_size)
    context = run_server_app(make_server_app(), grid)

    np.testing.assert_allclose(final_w(context), fedavg_expected(list(range(10))))  # 42.0
    assert context.run_config == RUN_CONFIG  # the server got the run config
    # Context.state persisted across the 3 rounds on every node
    assert sorted(grid.node_states) == node_ids(10)
    assert all(state["counter"]["trained"] == 3 for state in grid.node_states.values())
    assert context.state["train-metrics"]["trained"] == pytest.approx(3.0)


def test_run_in_process_returns_server_context() -> None:
    context = run_in_process(make_server_app(), make_client_app(), num_nodes=4,
                             run_config=RUN_CONFIG)
    np.testing.assert_allclose(final_w(context), fedavg_expected([0, 1, 2, 3]))


def test_failing_node_becomes_error_reply_and_round_continues() -> None:
    grid = InProcessGrid(make_client_app(fail_partition=3), 10, RUN_CONFIG)
    context = run_server_app(make_server_app(), grid)  # no exception escapes

    others = [i for i in range(10) if i != 3]
    np.testing.assert_allclose(final_w(context), fedavg_expected(others))
    assert "counter" not in grid.node_states[NODE_ID_OFFSET + 3]
    assert all(grid.node_states[n]["counter"]["trained"] == 3 for n in node_ids(10)
               if n != NODE_ID_OFFSET + 3)


def test_replies_look_like_supernode_replies() -> None:
    """Metadata, errors, refused messages, push/pull, timeout and content isolation."""
    grid = InProcessGrid(make_client_app(fail_partition=1, slow_partition=2), 5, RUN_CONFIG)
    seen: dict[str, Any] = {}
    app = ServerApp()

    @app.main()
    def main(g: Grid, context: Context) -> None:
        content = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(3))}),
                              "config": ConfigRecord({"x": 1})})
        ok = Message(content, NODE_ID_OFFSET + 0, MessageType.TRAIN, group_id="g7")
        bad = Message(content, NODE_ID_OFFSET + 1, MessageType.TRAIN, group_id="g7")
        seen["replies"] = {r.metadata.reply_to_message_id: r
                           for r in g.send_and_receive([ok, bad], timeout=None)}
        seen["ok"], seen["bad"], seen["run_id"] = ok, bad, context.run_id
        seen["content-after"] = content

        unknown = Message(content, NODE_ID_OFFSET + 99, MessageType.TRAIN)
        seen["pushed-unknown"] = list(g.push_messages([unknown]))

        ids = list(g.push_messages([Message(content, NODE_ID_OFFSET + 4, MessageType.TRAIN)]))
        seen["pulled"] = list(g.pull_messages(ids))
        seen["pulled-again"] = list(g.pull_messages(ids))

        slow = Message(content, NODE_ID_OFFSET + 2, MessageType.TRAIN)
        fast = Message(content, NODE_ID_OFFSET + 3, MessageType.TRAIN)
        seen["timed"] = list(g.send_and_receive([slow, fast], timeout=0.15))
        seen["fast"] = fast

        evals = [Message(RecordDict(), n, MessageType.EVALUATE) for n in g.get_node_ids()]
        seen["evals"] = list(g.send_and_receive(evals))

    run_server_app(app, grid)

    ok, bad, replies = seen["ok"], seen["bad"], seen["replies"]
    reply = replies[ok.metadata.message_id]
    meta = reply.metadata
    assert not reply.has_error()
    assert meta.message_id and meta.message_id != ok.metadata.message_id
    assert meta.src_node_id == NODE_ID_OFFSET + 0
    assert meta.dst_node_id == SUPERLINK_NODE_ID
    assert (meta.run_id, meta.group_id, meta.message_type) == (seen["run_id"], "g7", "train")
    assert "touched-by-client" not in seen["content-after"]["config"]  # client got a copy

    error = replies[bad.metadata.message_id]
    assert error.has_error() and not error.has_content()
    assert error.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "boom on partition 1" in (error.error.reason or "")
    assert error.metadata.src_node_id == NODE_ID_OFFSET + 1

    assert seen["pushed-unknown"] == []  # the SuperLink would refuse it too
    assert len(seen["pulled"]) == 1 and seen["pulled-again"] == []
    # the slow node (0.3 s > timeout 0.15 s) is dropped, the fast one arrives
    assert [r.metadata.reply_to_message_id for r in seen["timed"]] == [
        seen["fast"].metadata.message_id]

    # node ids map back to partitions, both ways
    assert len(seen["evals"]) == 5
    for r in seen["evals"]:
        pid = int(r.content["metrics"]["partition"])
        assert grid.partition_id_of(r.metadata.src_node_id) == pid
        assert grid.node_id_of(pid) == r.metadata.src_node_id


def test_many_nodes_are_lazy() -> None:
    """2,000 nodes, 10 sampled per round: only the sampled nodes ever get a Context."""
    grid = InProcessGrid(make_client_app(), 2_000, RUN_CONFIG)
    started = time.perf_counter()
    context = run_server_app(make_server_app(fraction_train=0.005, fraction_evaluate=0.0), grid)
    elapsed = time.perf_counter() - started

    assert 10 <= len(grid.node_states) <= 30
    trained = [cast(int, s.config_records["counter"]["trained"]) for s in grid.node_states.values()]
    assert sum(trained) == 30  # 10 nodes x 3 rounds
    assert final_w(context).shape == (3,)
    assert elapsed < 5.0


def test_grid_contract() -> None:
    """Fails loudly if a flwr upgrade adds to the Grid contract (the private pieces the grid uses are
    pinned in tests/common/test_flower_compat.py)."""
    missing = Grid.__abstractmethods__ - set(vars(InProcessGrid))  # else it cannot be instantiated
    assert not missing, f"flwr's Grid has new abstract methods: {missing}"
    assert SUPERLINK_NODE_ID < NODE_ID_OFFSET  # node ids must not collide with the SuperLink's


def test_reply_that_answers_nothing_becomes_error_reply() -> None:
    """A ClientApp returning something that is not a reply to its message fails visibly."""
    echo = ClientApp()

    @echo.train()
    def train(msg: Message, context: Context) -> Message:
        return msg  # the instruction itself, not Message(..., reply_to=msg)

    replies: list[Message] = []
    app = ServerApp()

    @app.main()
    def main(g: Grid, context: Context) -> None:
        replies.extend(g.send_and_receive([Message(RecordDict(), NODE_ID_OFFSET, "train")]))

    run_server_app(app, InProcessGrid(echo, 1, RUN_CONFIG))
    assert len(replies) == 1 and replies[0].has_error()
    assert "reply_to" in (replies[0].error.reason or "")


def test_replies_are_computed_as_they_are_taken():
    """send_and_receive is lazy: a strategy that aggregates as it goes holds one cohort's replies at a time."""
    calls: list[int] = []
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        calls.append(context.node_id)
        return Message(RecordDict(), reply_to=msg)

    grid = InProcessGrid(app, 3, {}, cohort_size=2)
    with server_task_identity(grid.run.run_id):
        replies = grid.send_and_receive([Message(RecordDict(), NODE_ID_OFFSET + i, "train") for i in range(3)])
        assert calls == []
        first = next(iter(replies))
        assert sorted(calls) == [NODE_ID_OFFSET, NODE_ID_OFFSET + 1] and first.metadata.src_node_id == NODE_ID_OFFSET
        assert len(list(replies)) == 2 and sorted(calls) == [NODE_ID_OFFSET + i for i in range(3)]
