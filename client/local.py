"""What a fedrec client does with one message: local DP-SGD on its own users, weights out,
nothing else; or the global model scored on its own validation targets.

`train` loads the global weights, checks that the round fits the client's privacy budget,
trains for `local-epochs` with DP-SGD (or without, when `dp = false`), records the spent
privacy in the client's ledger and replies with the new weights, the number of training
windows, the train loss and the cumulative ε. `evaluate` scores the client's own validation
targets, so the server can aggregate metrics it never sees the data of.

This module holds the heavy imports (torch, Opacus, the data stack); `client.client_app` loads it
with the first message, so that importing the ClientApp stays cheap.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

from client import cohort
from client.training import ClientJob
from common.config import Config
from common.federation import ClientData, client_data, local_client_data
from common.flower_compat import array_of, array_view
from common.memo import cached
from common.metrics import LIST_METRICS, evaluate_model
from common.model import build_model
from common.privacy import Ledger, noise_multiplier_for, round_mechanism
from common.replies import (
    ARRAYS,
    METRICS,
    NOISE_STD,
    NUM_EXAMPLES,
    UNIT_WEIGHT,
    TrainMetrics,
    declined_reply,
    train_reply,
)

LEDGER = "privacy-ledger"  # key in Context.state, and file name under a node's state-dir
NOISE = "noise-multiplier"  # key in Context.state: σ per plan


def train(msg: Message, context: Context) -> Message:
    """One train message: the budget check, local training (clipped under central DP) and the reply."""
    cfg = Config.from_run_config(context.run_config)
    server_round = int(msg.content["config"]["server-round"])
    data = _data(cfg, msg, context)
    ledger = load_ledger(context)
    sigma = None
    population = data.dp_population(cfg)
    if cfg.dp:
        sigma, rate, steps = round_mechanism(cfg, population, _noise_multiplier(cfg, population, context))
        after = ledger.planned(sigma, rate, steps).epsilon(cfg.delta)
        if after > cfg.target_epsilon * (1 + 1e-9):
            spent = ledger.epsilon(cfg.delta)
            return declined_reply(msg, spent, f"privacy budget: ε would reach {after:.3f} > target "
                                              f"{cfg.target_epsilon:g} (spent {spent:.3f})")

    def local_training(msg: Message, context: Context) -> Message:
        job = ClientJob(data.windows, _seed(cfg.seed, server_round, _client_key(context)), sigma, ledger.history,
                        data.dp_units(cfg))
        result, arrays = cohort.train(msg.content[ARRAYS], job, cfg, epochs=cfg.local_epochs,
                                      model_of=lambda arrays: _global_model(arrays, cfg, data.num_items),
                                      encode=lambda weights: _arrays(weights, cfg, data.num_items))
        if cfg.dp:
            save_ledger(context, ledger.extended(result.history))
        metrics = TrainMetrics(num_examples=len(data.windows), train_loss=result.loss,
                               epsilon=result.epsilon if cfg.dp else 0.0, dp_units=population)
        return train_reply(msg, arrays, metrics)

    # Central DP: Flower's mod clips the whole update on the device, before it is sent (the adaptive
    # one also reports whether it clipped, from which the server moves the norm).
    if not cfg.central_dp:
        return local_training(msg, context)
    clip = adaptiveclipping_mod if cfg.central_clip_quantile > 0 else fixedclipping_mod
    reply = clip(msg, context, local_training)
    if cfg.distributed_dp and not reply.has_error():
        reply = _with_noise_share(reply, float(msg.content["config"][NOISE_STD]),
                                  _noise_generator(cfg, server_round, context))
    return reply


def evaluate(msg: Message, context: Context) -> Message:
    """One evaluate message: the global model scored on this client's own validation targets."""
    cfg = Config.from_run_config(context.run_config)
    data = _data(cfg, msg, context)
    metrics = evaluate_model(_global_model(msg.content[ARRAYS], cfg, data.num_items), *data.valid, data.num_items,
                             ks=(10,), mask_history=cfg.mask_history)
    users = metrics.pop("users")
    metrics = {k: v for k, v in metrics.items() if not k.startswith(LIST_METRICS)}  # not averageable
    return Message(content=RecordDict({METRICS: MetricRecord({**metrics, NUM_EXAMPLES: int(users), UNIT_WEIGHT: 1})}),
                   reply_to=msg)


def load_ledger(context: Context) -> Ledger:
    """From the node's state folder in deployment (survives restarts), else from Context.state."""
    if "state-dir" in context.node_config:
        return Ledger.load(Path(str(context.node_config["state-dir"])) / f"{LEDGER}.json")
    record = context.state.config_records.get(LEDGER)
    return Ledger.from_json(str(record["ledger"])) if record is not None else Ledger()


def save_ledger(context: Context, ledger: Ledger) -> None:
    if "state-dir" in context.node_config:
        ledger.save(Path(str(context.node_config["state-dir"])) / f"{LEDGER}.json")
    else:
        context.state.config_records[LEDGER] = ConfigRecord({"ledger": ledger.to_json()})


def _noise_multiplier(cfg: Config, units: int, context: Context) -> float:
    """σ for this client's plan, searched once per run and kept in Context.state: deployed,
    every message runs in a fresh process, and the accountant's search takes seconds."""
    epochs = cfg.num_server_rounds * cfg.local_epochs
    key = f"{cfg.dp_unit}/{units}/{epochs}/{cfg.batch_size}/{cfg.target_epsilon}/{cfg.delta}/{cfg.noise_multiplier}"
    record = context.state.config_records.setdefault(NOISE, ConfigRecord())
    if key not in record:
        record[key] = noise_multiplier_for(cfg, units, epochs)
    return float(record[key])


def _data(cfg: Config, msg: Message, context: Context) -> ClientData:
    """This node's own file in deployment (`data-path` in its node config), else its simulated partition."""
    node = context.node_config
    if "data-path" in node:
        items = [str(i) for i in msg.content["config"]["items"]]
        return local_client_data(cfg, str(node["data-path"]), str(node.get("data-format", "seq")), items)
    return client_data(cfg, int(node["partition-id"]))


def _global_model(arrays: ArrayRecord, cfg: Config, num_items: int) -> torch.nn.Module:
    model = copy.deepcopy(_blank_model(cfg, num_items))  # copying keeps the tied weights tied
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def _arrays(weights: dict[str, torch.Tensor], cfg: Config, num_items: int) -> ArrayRecord:
    """Trained parameters (by parameter name) as the reply's arrays, keyed as the model's state dict."""
    keys = _state_keys(cfg, num_items)
    return ArrayRecord({key: array_of(weights[name].detach().numpy()) for key, name in keys.items()})


@cached(1)
def _state_keys(cfg: Config, num_items: int) -> dict[str, str]:
    """State-dict key -> parameter name: DPLSTM names its weights in its state dict as nn.LSTM does."""
    model = _blank_model(cfg, num_items)
    names = {p.data_ptr(): name for name, p in model.named_parameters()}
    return {key: names[t.data_ptr()] for key, t in model.state_dict().items()}


@cached(1)
def _blank_model(cfg: Config, num_items: int) -> torch.nn.Module:
    """Built once per process: a random initialisation costs more than a client's DP step on a
    large catalogue, and the global weights overwrite it anyway."""
    return build_model(cfg, num_items)


def _with_noise_share(reply: Message, std: float, generator: torch.Generator) -> Message:
    """Distributed DP: the clipped weights with this client's share of the Gaussian noise on every
    weight, added before SecAgg+ masks them (`server.central_dp.client_noise_std`)."""
    arrays = reply.content[ARRAYS]
    noised = {}
    for key in arrays.keys():
        values = torch.from_numpy(array_view(arrays[key]).copy())
        values += torch.normal(0.0, std, size=values.shape, generator=generator, dtype=values.dtype)
        noised[key] = array_of(values.numpy())
    reply.content[ARRAYS] = ArrayRecord(noised)
    return reply


def _noise_generator(cfg: Config, server_round: int, context: Context) -> torch.Generator:
    """Seeded in simulation (runs replay exactly); from the OS on a device, where the server,
    which knows the run's seed, must not be able to draw the same noise and subtract it."""
    if "data-path" in context.node_config:
        return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    return torch.Generator().manual_seed(_seed(cfg.seed, server_round, _client_key(context), "noise"))


def _client_key(context: Context) -> int:
    """What names this client across restarts: its partition in simulation, its node id deployed."""
    return int(context.node_config.get("partition-id", context.node_id))


def _seed(seed: int, server_round: int, client: int, purpose: str = "") -> int:
    """A distinct, reproducible seed per (run, round, client, purpose): resumed runs replay exactly."""
    digest = hashlib.sha256(f"{seed}/{server_round}/{client}{'/' + purpose if purpose else ''}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
