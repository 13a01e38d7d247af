"""SecAgg+ through fedrec's grid wrapper: the server gets only the weighted mean, dropouts included.

A toy ClientApp behind the real client-side mod: partition i sends w + (i + 1) with weight i + 1,
so the weighted mean the protocol must reveal is known in closed form.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from recipes import LOCAL_DP

from client.secagg import secure_aggregation_mod
from common.config import Config, ConfigError
from server.secagg import CLIPPING_RANGE, QUANTIZATION_RANGE, SecureGrid
from simulation.grid import NODE_ID_OFFSET, InProcessGrid, run_server_app

NODES = 5
STEP = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE  # one quantisation step


def toy_client(out_of_range: int) -> ClientApp:
    app = ClientApp()

    @app.train(mods=[secure_aggregation_mod])
    def train(msg: Message, context: Context) -> Message:
        pid = cast(int, context.node_config["partition-id"])
        w = msg.content["arrays"]["w"].numpy()
        shift = 100.0 if pid == out_of_range else pid + 1.0  # 100 lies outside SecAgg+'s ±8
        metrics = MetricRecord({"num-examples": pid + 1, "train-loss": float(pid)})
        return Message(RecordDict({"arrays": ArrayRecord({"w": Array(w + shift)}), "metrics": metrics}), reply_to=msg)

    return app


def secure_round(out_of_range: int = -1, **settings: Any) -> tuple[list[Message], InProcessGrid]:
    grid = InProcessGrid(toy_client(out_of_range), NODES, dict(LOCAL_DP))
    replies: list[Message] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        arrays = ArrayRecord({"w": Array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4))})
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})})
        messages = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in grid.get_node_ids()]
        cfg = Config.from_run_config({**LOCAL_DP, **settings})
        replies.extend(SecureGrid(grid, cfg, weight=NODES).send_and_receive(messages))

    run_server_app(server, grid)
    return replies, grid


def test_a_sum_of_fewer_clients_than_min_train_nodes_is_never_unmasked():
    """One of five clients fails after the keys are shared: four masked vectors reach the server.
    With min-train-nodes 5 the round ends there, before any mask is removed."""
    replies, _ = secure_round(2, **{"min-train-nodes": 5})
    assert replies == []
    replies, _ = secure_round(2, **{"min-train-nodes": 4})
    assert len(replies) == 4


@pytest.mark.parametrize("out_of_range", [-1, 2])
def test_the_server_gets_only_the_weighted_mean_of_the_clients_that_finished(out_of_range):
    replies, grid = secure_round(out_of_range)
    finished = [p for p in range(NODES) if p != out_of_range]
    assert sorted(r.metadata.src_node_id for r in replies) == [NODE_ID_OFFSET + p for p in finished]
    start = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    expected = start + sum((p + 1) * (p + 1) for p in finished) / sum(p + 1 for p in finished)
    for reply in replies:  # every reply carries the same aggregate, in the model's dtype, and its own metrics
        got = reply.content["arrays"]["w"].numpy()
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=4 * STEP * NODES)
        pid = reply.metadata.src_node_id - NODE_ID_OFFSET
        assert reply.content["metrics"]["num-examples"] == pid + 1
    # A finished round leaves no keys or shares behind on the clients.
    assert all("secaggplus_state" not in state.config_records for state in grid.node_states.values())


def test_secagg_settings_are_checked():
    with pytest.raises(ConfigError, match="secagg-num-shares"):
        Config.from_run_config({**LOCAL_DP, "secagg-num-shares": 2})
    with pytest.raises(ConfigError, match="secagg-reconstruction-threshold"):
        Config.from_run_config({**LOCAL_DP, "secagg-num-shares": 3, "secagg-reconstruction-threshold": 3})
    with pytest.raises(ConfigError, match="secagg-max-weight"):
        Config.from_run_config({**LOCAL_DP, "secagg": True, "partition": "devices"})
