"""Local training of the attention-LSTM, with or without DP-SGD (Opacus).

One function serves a federated client's round and the centralized baseline: both train a model
on a set of training windows for some epochs. Under DP the privacy unit is one window (see
`common.dataset.training_windows`): Poisson sampling picks windows, Opacus clips each window's
gradient to `max_grad_norm` and adds Gaussian noise of std `noise_multiplier * max_grad_norm`.

Per-window gradients come from `torch.func` (`vmap` of `grad` over the windows of a batch), not
from Opacus's module hooks: the same exact per-sample gradients (tied embedding and output
layer included; `tests/client/test_training.py` checks them, clipped and noised, against
Opacus's `DPOptimizer`) at half the cost of a step for the small batches of a cross-device
client, and in chunks, so a batch never holds more than `PER_SAMPLE_CHUNK` per-window copies of
the model. Opacus still does what it is the reference for: Poisson sampling
(`DPDataLoader`) and the accountant. Opacus's "ghost" clipping refuses tied weights and failed
on DPLSTM in our trials.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from opacus.accountants import PRVAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from torch.func import functional_call, grad, vmap
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
    accountant = None
    if noise_multiplier is not None:
        data = DPDataLoader.from_data_loader(data)  # Poisson sampling at rate 1 / batches per epoch
        accountant = PRVAccountant()
        accountant.history = [tuple(h) for h in history]
        expected_batch = int(len(windows) * data.sample_rate)  # Opacus's normaliser of the noised sum
    model.train()
    steps, loss, epoch = 0, math.nan, 0
    for epoch in range(1, epochs + 1):
        total, batches = 0.0, 0
        for (batch,) in data:
            optimizer.zero_grad(set_to_none=True)
            if accountant is None:
                batch_loss = window_loss(model, batch)
                batch_loss.backward()
            else:
                batch_loss = private_gradients(model, batch, cfg.max_grad_norm, noise_multiplier, expected_batch)
                accountant.step(noise_multiplier=noise_multiplier, sample_rate=data.sample_rate)
            optimizer.step()
            steps += 1
            if len(batch):  # Poisson sampling can draw an empty batch: still a DP step
                total += batch_loss.item()
                batches += 1
        loss = total / max(batches, 1)
        if on_epoch_end is not None and on_epoch_end(epoch, loss, _epsilon(accountant, cfg.delta)):
            break
    new_history = [tuple(h) for h in accountant.history] if accountant else list(history)
    return TrainResult(loss, epoch, steps, new_history, _epsilon(accountant, cfg.delta))


PER_SAMPLE_CHUNK = 32  # windows whose per-sample gradients are held at once
ONE_BY_ONE = 8  # up to this many windows, per-window gradients come from plain autograd, one by one


def private_gradients(
    model: torch.nn.Module,
    batch: torch.Tensor,
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Set every parameter's `.grad` to the DP-SGD gradient of `batch`; return the batch's mean loss.

    Exactly Opacus's `DPOptimizer` arithmetic: each window's gradient (over all parameters at
    once) is clipped to `max_grad_norm`, the clipped gradients are summed, Gaussian noise of std
    `noise_multiplier * max_grad_norm` is added, and the result is divided by `expected_batch`.
    """
    params = dict(model.named_parameters())  # tied weights appear once
    summed = {name: torch.zeros_like(p) for name, p in params.items()}
    losses = []
    for chunk in batch.split(PER_SAMPLE_CHUNK) if len(batch) else ():
        grads, chunk_losses = _per_window_gradients(model, params, chunk)
        norms = torch.stack([g.flatten(1).norm(2, dim=1) for g in grads.values()], dim=1).norm(2, dim=1)
        factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for name, g in grads.items():
            summed[name] += torch.einsum("i,i...", factors, g)
        losses.append(chunk_losses)
    std = noise_multiplier * max_grad_norm
    for name, p in model.named_parameters():
        noise = torch.normal(0.0, std, size=p.shape, generator=generator) if std > 0 else 0.0
        p.grad = (summed[name] + noise) / expected_batch
    return torch.cat(losses).mean() if losses else torch.tensor(math.nan)


def _per_window_gradients(
    model: torch.nn.Module, params: dict[str, torch.Tensor], windows: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each window's loss gradient (W, *shape) per parameter, and each window's loss (W,).

    One window's gradient is an ordinary gradient, and plain autograd through the fused LSTM
    kernel is the fastest way to it: a few windows (a cross-device client's batch) go one by one.
    More go through `vmap`, with DPLSTM's step-by-step forward (plain tensor ops that vmap
    batches), whose fixed cost pays off from about `ONE_BY_ONE` windows (benchmarks/speed.py).
    """
    if len(windows) <= ONE_BY_ONE:
        losses = [window_loss(model, window.unsqueeze(0)) for window in windows]
        grads = [torch.autograd.grad(loss, list(params.values())) for loss in losses]
        return ({name: torch.stack([g[i] for g in grads]) for i, name in enumerate(params)},
                torch.stack(losses).detach())

    def loss_of(weights: dict[str, torch.Tensor], window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = window_loss(lambda items: functional_call(model, weights, (items,)), window.unsqueeze(0))
        return loss, loss.detach()

    model.private = True
    try:
        detached = {name: p.detach() for name, p in params.items()}
        return vmap(grad(loss_of, has_aux=True), in_dims=(None, 0), randomness="different")(detached, windows)
    finally:
        model.private = False


def _epsilon(accountant: PRVAccountant | None, delta: float) -> float | None:
    """Through the ledger's cache: in a simulation many clients share one history."""
    return Ledger(tuple(tuple(h) for h in accountant.history)).epsilon(delta) if accountant else None


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
