"""Local training of the attention-LSTM, with or without DP-SGD (Opacus).

One function serves a federated client's round and the centralized baseline: both train a model
on a set of training windows for some epochs. Under DP the privacy unit is one window (see
`common.dataset.training_windows`): Poisson sampling picks windows, Opacus clips each window's
gradient to `max_grad_norm` and adds Gaussian noise of std `noise_multiplier * max_grad_norm`.

`grad_sample_mode="hooks"`: it computes exact per-sample gradients for DPLSTM and for the item
embedding shared with the output layer. Opacus's faster "ghost" clipping refuses tied weights
and failed on DPLSTM in our trials.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader, TensorDataset

from common.config import Config
from common.model import window_loss
from common.privacy import Ledger, quiet_opacus

ACCOUNTANT = "prv"

# Adam suits long runs (centralized training); plain SGD suits a federated client's few steps
# from a fresh optimizer, where Adam's first steps are sign-like and would amplify DP noise.
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}

# (noise multiplier, sample rate, steps): Opacus's accountant history, the privacy ledger's unit
MechanismHistory = list[tuple[float, float, int]]


@dataclasses.dataclass
class TrainResult:
    loss: float  # mean window loss of the last epoch trained
    epochs: int
    steps: int
    history: MechanismHistory  # all mechanisms applied so far, the ones given included
    epsilon: float | None  # cumulative ε at the config's δ, None without DP


def train(
    model: torch.nn.Module,
    windows: np.ndarray,
    cfg: Config,
    *,
    epochs: int,
    noise_multiplier: float | None = None,
    history: Sequence[tuple[float, float, int]] = (),
    seed: int = 0,
    on_epoch_end: Callable[[int, float, float | None], bool] | None = None,
) -> TrainResult:
    """Train `model` in place on `windows` (W, max_len+1).

    `noise_multiplier=None` trains without DP, through the same loop. `history` is the privacy
    spent before this call; the result's history and ε include it. `on_epoch_end(epoch, loss, ε)`
    may return True to stop early (the centralized baseline's early stopping).
    """
    with quiet_opacus():
        return _train(model, windows, cfg, epochs, noise_multiplier, history, seed, on_epoch_end)


def _train(model, windows, cfg, epochs, noise_multiplier, history, seed, on_epoch_end) -> TrainResult:
    torch.manual_seed(seed)  # batch order, dropout, Poisson sampling and DP noise
    data = DataLoader(TensorDataset(torch.from_numpy(windows)), batch_size=cfg.batch_size, shuffle=True)
    optimizer = OPTIMIZERS[cfg.optimizer](model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine = None
    net: torch.nn.Module = model
    if noise_multiplier is not None:
        model.private = True  # per-window gradients need DPLSTM's hookable forward
        engine = PrivacyEngine(accountant=ACCOUNTANT)
        engine.accountant.history = [tuple(h) for h in history]
        net, optimizer, data = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=data,
            noise_multiplier=noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode="hooks",
        )
    net.train()
    steps, loss, epoch = 0, math.nan, 0
    try:
        for epoch in range(1, epochs + 1):
            total, batches = 0.0, 0
            for (batch,) in data:
                optimizer.zero_grad(set_to_none=True)
                if len(batch) == 0:  # Poisson sampling can draw an empty batch: still a DP step
                    optimizer.step()
                    steps += 1
                    continue
                batch_loss = window_loss(net, batch)
                batch_loss.backward()
                optimizer.step()
                total += batch_loss.item()
                batches += 1
                steps += 1
            loss = total / max(batches, 1)
            if on_epoch_end is not None and on_epoch_end(epoch, loss, _epsilon(engine, cfg.delta)):
                break
    finally:
        if engine is not None:
            net.to_standard_module()  # drop hooks and grad samples: `model` can be wrapped again
            model.private = False
    new_history = [tuple(h) for h in engine.accountant.history] if engine else list(history)
    return TrainResult(loss, epoch, steps, new_history, _epsilon(engine, cfg.delta))


def _epsilon(engine: PrivacyEngine | None, delta: float) -> float | None:
    """Through the ledger's cache: in a simulation many clients share one history."""
    return Ledger(tuple(tuple(h) for h in engine.accountant.history)).epsilon(delta) if engine else None


@functools.lru_cache(maxsize=1024)
def noise_multiplier_for(cfg: Config, num_windows: int, epochs: int) -> float:
    """σ from the config: given outright, or the smallest that keeps `epochs` under target ε.

    The sample rate is the one Opacus's Poisson loader uses (1 / batches per epoch). Cached:
    clients with as many windows share one search.
    """
    if cfg.noise_multiplier > 0:
        return cfg.noise_multiplier
    sample_rate = 1 / batches_per_epoch(num_windows, cfg.batch_size)
    with quiet_opacus():
        return get_noise_multiplier(
            target_epsilon=cfg.target_epsilon,
            target_delta=cfg.delta,
            sample_rate=sample_rate,
            steps=epochs * batches_per_epoch(num_windows, cfg.batch_size),
            accountant=ACCOUNTANT,
            epsilon_tolerance=0.05,  # each PRV evaluation is slow; ε ends within 0.05 below target
        )


def batches_per_epoch(num_windows: int, batch_size: int) -> int:
    """Steps in one epoch; under Poisson sampling each window is drawn with rate 1 / this."""
    return math.ceil(num_windows / batch_size)


def dp_unit(max_len: int) -> str:
    """What DP-SGD protects here, stated in README and in every summary.json."""
    return (f"one training window: at most {max_len + 1} consecutive interactions of one user "
            f"(the model reads {max_len} and predicts each next one)")
