"""Secure aggregation with Flower's SecAgg+: the server learns only the weighted sum of the updates.

flwr 1.42 ships SecAgg+ for its legacy API only: `SecAggPlusWorkflow` drives a legacy `Strategy`
through a `LegacyContext`. This module is the one place on the server that uses that API (its
imports live in common/flower_compat.py).
`SecureGrid` wraps the run's Grid; when the message-API strategy sends a round's train messages,
it runs the four SecAgg+ stages (setup, share keys, collect masked vectors, unmask) in their
place. Every reply it hands back carries the securely aggregated weights and that client's own
metrics (loss, ε, windows: metrics are not masked), so the strategy above it (FedAvg, FedAdam,
central DP's noise) averages identical arrays into the aggregate and carries on unchanged.

What the server gives up: it never sees one client's weights, so fedrec's guard can check only
the aggregate (shapes, finite values). A client that sends NaN spoils the sum of its round.
Weights are clipped to ±`CLIPPING_RANGE` and quantised to 2**22 levels: the clients check the
range (see `client/secagg.py`), and the sum of at most `MAX_CLIENTS` fits SecAgg+'s 2**32 modulus.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from common.config import Config, ConfigError
from common.federation import Federation, client_windows
from common.flower_compat import (
    MAIN_CONFIGS_RECORD,
    MAIN_PARAMS_RECORD,
    FitIns,
    FitRes,
    FlooredSecAggPlusWorkflow,
    GridClientProxy,
    LegacyContext,
    LegacyStrategy,
    WorkflowKey,
    arrayrecord_to_parameters,
    parameters_to_ndarrays,
)
from common.replies import SECAGG_ARRAY_NAMES
from server.grids import WrappedGrid

CLIPPING_RANGE = 8.0  # SecAgg+'s default: weights are clipped to ±8 before quantisation
QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32
MAX_CLIENTS = MODULUS_RANGE // QUANTIZATION_RANGE - 1  # more would overflow the masked sum


def max_weight(cfg: Config, fed: Federation) -> float:
    """The largest weight a client may bring: SecAgg+ scales each update by weight / max_weight
    before quantising, so a loose bound costs precision and a tight one overflows."""
    if cfg.secagg_max_weight > 0:
        return cfg.secagg_max_weight
    if cfg.central_dp:
        return 1.0  # every client weighs the same
    return float(max(client_windows(fed, cfg)))


def summary(cfg: Config) -> dict[str, Any]:
    """What summary.json says about secure aggregation."""
    if not cfg.secagg:
        return {"enabled": False, "server_sees": "every client's weights"}
    return {"enabled": True, "protocol": "SecAgg+ (Flower)", "num_shares": cfg.secagg_num_shares,
            "reconstruction_threshold": cfg.secagg_reconstruction_threshold,
            "server_sees": "only the weighted sum of the sampled clients' weights, and their metrics",
            "assumes": "an honest-but-curious server that does not collude with "
                       f"{cfg.secagg_reconstruction_threshold} or more of a client's neighbours",
            "quantisation": f"weights clipped to ±{CLIPPING_RANGE:g}, {QUANTIZATION_RANGE} levels"}


class SecureGrid(WrappedGrid):
    """The run's Grid, with each round's train messages answered through SecAgg+."""

    def __init__(self, grid: Grid, cfg: Config, weight: float) -> None:
        super().__init__(grid)
        self._cfg = cfg
        self._weight = weight
        self._in_workflow = False

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if self._in_workflow or not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            # A list: Flower's legacy workflow reads a stage's replies more than once.
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        if len(messages) > MAX_CLIENTS:
            raise ConfigError(f"SecAgg+ sums at most {MAX_CLIENTS} clients per round, the round sampled "
                              f"{len(messages)}: lower fraction-train")
        # Never unmask a sum of fewer clients than a round aggregates with (distributed DP's floor).
        workflow = FlooredSecAggPlusWorkflow(self._cfg.secagg_num_shares, self._cfg.secagg_reconstruction_threshold,
                                             max_weight=self._weight, clipping_range=CLIPPING_RANGE,
                                             quantization_range=QUANTIZATION_RANGE, modulus_range=MODULUS_RANGE,
                                             timeout=timeout, floor=self._cfg.min_train_nodes)
        relay = _Relay(self._grid, messages)
        context = LegacyContext(Context(run_id=self._grid.run.run_id, node_id=0, node_config={},
                                        state=RecordDict(), run_config={}), strategy=relay)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: int(messages[0].content["config"]["server-round"])})
        context.state.array_records[MAIN_PARAMS_RECORD] = messages[0].content["arrays"]
        self._in_workflow = True  # the workflow's own train messages (its four stages) go straight through
        try:
            workflow(self, context)
        finally:
            self._in_workflow = False
        return relay.replies


class _Relay(LegacyStrategy):
    """A legacy strategy that only relays: it hands the workflow the round's train messages as
    FitIns, and turns what the workflow aggregated back into message-API replies."""

    def __init__(self, grid: Grid, messages: list[Message]) -> None:
        self.grid = grid
        self.messages = {m.metadata.dst_node_id: m for m in messages}
        self.replies: list[Message] = []

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, FitIns]]:
        instructions = []
        for node_id, message in self.messages.items():
            arrays = message.content["arrays"]
            config = {**dict(message.content["config"]), SECAGG_ARRAY_NAMES: list(arrays.keys())}
            instructions.append((GridClientProxy(node_id, self.grid, self.grid.run.run_id),
                                 FitIns(arrayrecord_to_parameters(arrays, keep_input=True), config)))
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, FitRes]],
                      failures: list[Any]) -> tuple[None, dict[str, Any]]:
        if results:  # every result carries the same aggregate: convert it once
            reference = next(iter(self.messages.values())).content["arrays"]
            values = parameters_to_ndarrays(results[0][1].parameters)
            aggregate = ArrayRecord({name: Array(value.astype(reference[name].numpy().dtype))
                                     for name, value in zip(reference.keys(), values, strict=True)})
        for proxy, fit_res in results:
            content = RecordDict({"arrays": aggregate, "metrics": MetricRecord(dict(fit_res.metrics))})
            self.replies.append(Message(content, reply_to=self.messages[proxy.node_id]))
        return None, {}

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> None:
        return None

