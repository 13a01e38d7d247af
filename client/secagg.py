"""Secure aggregation on the client: Flower's `secaggplus_mod`, when the server runs SecAgg+.

`secaggplus_mod` speaks flwr 1.42's legacy layout (FitIns in, FitRes out); fedrec's `train`
speaks the Message API. `secure_aggregation_mod` translates between the two around the training
call, and lets every message that is not part of SecAgg+ through untouched, so one ClientApp
serves runs with and without it. It is the one place on the client that uses the legacy API (its
imports live in common/flower_compat.py).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from common.config import Config
from common.flower_compat import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Code,
    FitRes,
    SecAggPlusKey,
    Stage,
    Status,
    arrayrecord_to_parameters,
    fitres_to_recorddict,
    secaggplus_mod,
)
from common.replies import ARRAYS, METRICS, SECAGG_ARRAY_NAMES, TrainMetrics, decline_reason, weight_key


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    stage = msg.content.config_records[RECORD_KEY_CONFIGS][SecAggPlusKey.STAGE]
    weight = weight_key(Config.from_run_config(context.run_config).central_dp)

    def train(ins: Message, ctx: Context) -> Message:
        return _as_fit_res(call_next(_as_train(ins), ctx), weight, _clipping_range(ctx))

    try:
        reply = secaggplus_mod(msg, context, train)
    except Exception:
        _forget_round(context)  # this client dropped out of the round
        raise
    if stage == Stage.UNMASK:
        _forget_round(context)
    return reply


def _forget_round(context: Context) -> None:
    """A round's keys and shares are of no use after it: they are not kept in the node's state."""
    context.state.config_records.pop(RECORD_KEY_STATE, None)


def _as_train(msg: Message) -> Message:
    """Legacy FitIns content -> fedrec's {"arrays", "config"}, parameter names restored."""
    config = ConfigRecord(dict(msg.content.config_records["fitins.config"]))
    names = [str(n) for n in config.pop(SECAGG_ARRAY_NAMES)]
    arrays = msg.content.array_records["fitins.parameters"]
    msg.content = RecordDict({ARRAYS: ArrayRecord(dict(zip(names, arrays.values(), strict=True))),
                              "config": config})
    return msg


def _as_fit_res(reply: Message, weight: str, clipping_range: float) -> Message:
    """fedrec's reply -> legacy FitRes content, weighted as the server's average weighs it."""
    if reply.has_error():
        return reply
    if TrainMetrics.declines(reply):
        raise RuntimeError(decline_reason(reply))  # no update: this client drops out of the round
    metrics = reply.content[METRICS]
    arrays = reply.content[ARRAYS]
    largest = max(float(np.abs(a.numpy()).max(initial=0.0)) for a in arrays.values())
    if not largest <= clipping_range:  # SecAgg+ would clip it silently and corrupt the sum
        raise ValueError(f"a weight of magnitude {largest:.3g} is outside SecAgg+'s range ±{clipping_range:g}")
    fit_res = FitRes(Status(Code.OK, ""), arrayrecord_to_parameters(arrays, keep_input=True), int(metrics[weight]),
                     dict(metrics))
    reply.content = fitres_to_recorddict(fit_res, keep_input=True)
    return reply


def _clipping_range(context: Context) -> float:
    return float(context.state.config_records[RECORD_KEY_STATE]["clipping_range"])
