"""Malicious clients for the in-process engine: the threats the robustness defences are measured on.

`attack-fraction` of the clients, drawn from the seed, answer every train message with a poisoned
update u' (u = their honest update, reply minus global weights, λ = `attack-scale`):

- scale: u' = λ·u (model replacement: one boosted client outweighs many);
- sign-flip: u' = -λ·u (pushes the model back up the loss);
- random: Gaussian noise with the norm of λ·u;
- nan: every weight NaN;
- target: trains (without DP) on fake copies of its own windows in which every second item is
  `target-item`, then sends λ times that update, to push the target into everyone's top 10.

They report honest-looking metrics (windows, loss, ε = 0), so only the update can give them away.
Deployed clients run fedrec's ClientApp only: attacks exist in simulation and nowhere else.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp import ClientApp

from client.training import train
from common.config import Config
from common.dataset import item_index
from common.federation import client_data, federation
from common.model import build_model
from common.replies import ARRAYS, TrainMetrics, train_reply

ClientCall = Callable[..., Message]
log = logging.getLogger("fedrec")


def malicious_partitions(cfg: Config, num_clients: int) -> frozenset[int]:
    """Which partitions attack: round(attack-fraction × clients) of them, the same for a seed."""
    if cfg.attack == "none":
        return frozenset()
    count = round(cfg.attack_fraction * num_clients)
    return frozenset(np.random.default_rng([cfg.seed, 6]).permutation(num_clients)[:count].tolist())


def with_attackers(client_app: ClientApp, cfg: Config, num_clients: int) -> ClientCall:
    """The ClientApp as the in-process grid calls it, with the malicious partitions' train replies poisoned."""
    malicious = malicious_partitions(cfg, num_clients)
    if not malicious:
        return client_app
    target = item_index(federation(cfg).data, cfg.target_item) if cfg.attack == "target" else 0
    if cfg.attack == "target":
        log.info("attack simulator: the %d malicious clients train on fake sequences one message at a time, "
                 "outside the batched cohort", len(malicious))

    def call(message: Message, context: Context) -> Message:
        partition = int(context.node_config["partition-id"])
        if partition not in malicious or message.metadata.message_type != MessageType.TRAIN:
            return client_app(message=message, context=context)
        start = {k: message.content[ARRAYS][k].numpy() for k in message.content[ARRAYS].keys()}
        if cfg.attack == "target":
            reply = _fake_training(cfg, message, partition, target)
        else:
            reply = client_app(message=message, context=context)
        if reply.has_error() or ARRAYS not in reply.content:
            return reply
        update = {k: reply.content[ARRAYS][k].numpy() - start[k] for k in start}
        server_round = int(message.content["config"]["server-round"])
        poisoned = _poison(cfg, update, np.random.default_rng([cfg.seed, partition, server_round]))
        reply.content[ARRAYS] = ArrayRecord({k: Array((start[k] + poisoned[k]).astype(start[k].dtype)) for k in start})
        return reply

    return call


def _poison(cfg: Config, update: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    scale = cfg.attack_scale
    if cfg.attack in ("scale", "target"):
        return {k: scale * u for k, u in update.items()}
    if cfg.attack == "sign-flip":
        return {k: -scale * u for k, u in update.items()}
    if cfg.attack == "nan":
        return {k: np.full_like(u, np.nan) for k, u in update.items()}
    noise = {k: rng.standard_normal(u.shape) for k, u in update.items()}  # random
    size = np.sqrt(sum(np.sum(u.astype(np.float64) ** 2) for u in update.values()))
    length = np.sqrt(sum(np.sum(z**2) for z in noise.values()))
    return {k: z * (scale * size / max(length, 1e-12)) for k, z in noise.items()}


def _fake_training(cfg: Config, message: Message, partition: int, target: int) -> Message:
    """Train, without DP, on the client's windows with every second item replaced by `target` (a model id)."""
    data = client_data(cfg, partition)
    windows = data.windows.copy()
    windows[:, 1::2] = np.sign(windows[:, 1::2]) * target  # padding stays 0, history-only items stay negated
    model = build_model(cfg, data.num_items)
    model.load_state_dict(message.content[ARRAYS].to_torch_state_dict())
    result = train(model, windows, dataclasses.replace(cfg, dp=False), epochs=cfg.local_epochs, seed=partition)
    return train_reply(message, ArrayRecord(model.state_dict()),
                       TrainMetrics(num_examples=len(windows), train_loss=result.loss, epsilon=0.0,
                                    dp_units=data.dp_population(cfg)))
