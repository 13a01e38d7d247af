"""The fields of a training reply, defined once for the client that writes them and the server,
the attack simulator and SecAgg+ that read them.

A reply to a train message holds the new weights (`arrays`), a `MetricRecord` of `TrainMetrics`
(`metrics`) and, when the client declined the round, the reason (`config`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"  # the reply's records
NUM_EXAMPLES = "num-examples"  # training windows: what FedAvg weighs a client by
UNIT_WEIGHT = "unit-weight"  # 1 for every client: under central DP FedAvg averages uniformly by it
DP_UNITS = "dp-units"
NOISE_STD = "dp-noise-std"  # train config under distributed DP: the std of each client's share of the noise
SECAGG_ARRAY_NAMES = "array-names"  # train config under SecAgg+: its legacy message layout drops the parameter names

Record = TypeVar("Record", ArrayRecord, MetricRecord, ConfigRecord)


def record_of(message: Message, name: str, kind: type[Record]) -> Record | None:
    """`message.content[name]` if it is a `kind`, else None. Flower's typed views
    (`content.metric_records` and the like) rebuild themselves and write every record back on
    each access, which the server paid several times per reply."""
    record = message.content.get(name)
    return record if isinstance(record, kind) else None


def weight_key(central_dp: bool) -> str:
    """The reply metric the average weighs clients by: their training windows, or the same for
    every client under central DP (its noise is calibrated to a uniform average)."""
    return UNIT_WEIGHT if central_dp else NUM_EXAMPLES


@dataclasses.dataclass(frozen=True)
class TrainMetrics:
    """What a client reports about its round; ε is its cumulative spend (0 without DP)."""

    num_examples: int
    train_loss: float
    epsilon: float
    declined: bool = False
    unit_weight: int = 1
    dp_units: int = 0  # the units local DP-SGD sampled from (users or windows): what the server audits ε by

    def to_record(self) -> MetricRecord:
        return MetricRecord({NUM_EXAMPLES: self.num_examples, "train-loss": self.train_loss,
                             "epsilon": self.epsilon, "declined": int(self.declined), UNIT_WEIGHT: self.unit_weight,
                             DP_UNITS: self.dp_units})

    @classmethod
    def from_record(cls, record: MetricRecord) -> TrainMetrics:
        """Raises KeyError for a missing field, ValueError/TypeError for one of the wrong type."""
        return cls(int(record[NUM_EXAMPLES]), float(record["train-loss"]), float(record["epsilon"]),
                   bool(int(record["declined"])), int(record[UNIT_WEIGHT]), int(record[DP_UNITS]))

    @staticmethod
    def declines(reply: Message) -> bool:
        """Whether a reply says it declined, however malformed the rest of its metrics."""
        record = record_of(reply, METRICS, MetricRecord) or {}
        try:
            return int(record.get("declined", 0)) == 1
        except (TypeError, ValueError):
            return False

    @classmethod
    def of(cls, reply: Message) -> TrainMetrics | None:
        """The metrics of a reply, or None when they are missing or malformed."""
        record = record_of(reply, METRICS, MetricRecord)
        try:
            return None if record is None else cls.from_record(record)
        except (KeyError, TypeError, ValueError):
            return None


def train_reply(msg: Message, arrays: ArrayRecord, metrics: TrainMetrics) -> Message:
    return Message(RecordDict({ARRAYS: arrays, METRICS: metrics.to_record()}), reply_to=msg)


def declined_reply(msg: Message, spent: float, reason: str) -> Message:
    """A reply without weights: training would take the client past its budget."""
    metrics = TrainMetrics(num_examples=0, train_loss=math.nan, epsilon=spent, declined=True)
    return Message(RecordDict({METRICS: metrics.to_record(), CONFIG: ConfigRecord({"reason": reason})}), reply_to=msg)


def decline_reason(reply: Message) -> str:
    return str(reply.content.config_records[CONFIG]["reason"])
