"""Local training of the attention-LSTM, with or without DP-SGD: one implementation for a
deployed client, a cohort of simulated clients trained at once, and the centralized baseline.

Under DP the privacy unit is one user (`dp-unit`; or one window, see
`common.dataset.training_windows`): Poisson sampling picks units, the summed gradient of each
unit's windows is clipped to `max_grad_norm`, and Gaussian noise of std `noise_multiplier *
max_grad_norm` is added to the sum, as Opacus's `DPOptimizer` does per sample
(`tests/client/test_training.py` checks the per-window case against Opacus's hooks and optimizer,
and the per-user case against plain autograd, user by user).

A DP step runs in named stages, as Opacus's optimizer does: sample (`_sample`), per-window
gradients and clipping (`_clipped_sum`), noise and scaling (`_noise`), then the optimizer step.
Per-window gradients come from `torch.func` (`vmap` of `grad`), in parts of similar length
that are cut to their own longest window, so padding costs little; the output layer, most of the
cost on a large catalogue, scores only real targets where no `vmap` is involved. Many clients
train at once as stacked parameters, each window under its own client's weights. Opacus's
accountant counts the privacy spent; its "ghost" clipping refuses tied weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from opacus.accountants import PRVAccountant
from torch.func import functional_call, grad, vmap

from common.config import Config
from common.dataset import window_inputs, window_targets
from common.privacy import Ledger, Mechanism, batches_per_epoch, quiet_opacus, sample_rate

# Adam suits long runs (centralized training); plain SGD suits a federated client's few steps
# from a fresh optimizer, where Adam's first steps are sign-like and would amplify DP noise.
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclasses.dataclass(frozen=True)
class ClientJob:
    """One client's share of a cohort: its windows, its seed, and its DP mechanism so far."""

    windows: np.ndarray  # (W, max_len+1)
    seed: int
    noise_multiplier: float | None = None  # None: no DP
    history: tuple[Mechanism, ...] = ()
    units: np.ndarray | None = None  # (W,) each window's DP unit (its user, 0..U-1, ordered); None: each window

    def population(self) -> int:
        """How many units DP-SGD samples from (`batch-size` counts these); windows without DP."""
        if self.noise_multiplier is None or self.units is None or not len(self.units):
            return len(self.windows)
        return int(self.units[-1]) + 1


@dataclasses.dataclass
class TrainResult:
    loss: float  # mean window loss of the last epoch trained
    epochs: int
    steps: int
    history: list[Mechanism]  # Opacus's accountant history: all mechanisms so far, the ones given included
    epsilon: float | None  # cumulative ε at the config's δ, None without DP
    weights: dict[str, torch.Tensor]  # the trained parameters, by name (tied weights once)


def train(
    model: torch.nn.Module,
    windows: np.ndarray,
    cfg: Config,
    *,
    epochs: int,
    noise_multiplier: float | None = None,
    history: Sequence[Mechanism] = (),
    seed: int = 0,
    units: np.ndarray | None = None,
    on_epoch_end: Callable[[int, float, float | None], bool] | None = None,
) -> TrainResult:
    """Train `model` in place on `windows` (W, max_len+1): one client, or the centralized baseline.

    `noise_multiplier=None` trains without DP, through the same loop; `units` are the DP units
    of the windows (`ClientJob.units`). `history` is the privacy spent before this call; the
    result's history and ε include it. `on_epoch_end(epoch, loss, ε)` sees the model as trained
    so far and may return True to stop early.
    """
    job = ClientJob(windows, seed, noise_multiplier, tuple(tuple(h) for h in history), units)
    with quiet_opacus():
        result = _Cohort(model, [job], cfg).train(epochs, on_epoch_end)[0]
    _load(model, result.weights)
    return result


def train_clients(model: torch.nn.Module, jobs: Sequence[ClientJob], cfg: Config, *, epochs: int) -> list[TrainResult]:
    """Train one copy of `model` per job, many at once; the results are each job's own.

    Each client has its own parameters (stacked, and run through `torch.func.functional_call`
    and `vmap`), its own optimizer state, and its own generator for Poisson sampling, dropout
    and noise, so a client's result does not depend on which others share its cohort: training
    it alone (the deployed ClientApp) gives the same weights, within float tolerance.
    `model` only supplies the architecture and the starting weights; it is not changed.
    """
    results: list[TrainResult | None] = [None] * len(jobs)
    with quiet_opacus():
        for chunk in _chunks(model, jobs, cfg):
            for index, result in zip(chunk, _Cohort(model, [jobs[i] for i in chunk], cfg).train(epochs), strict=True):
                results[index] = result
    return results  # type: ignore[return-value]


COHORT_BYTES = 2**27  # stacked parameters, gradients and optimizer state of one cohort chunk
PER_SAMPLE_BYTES = 2**26  # per-window gradients and scores held at once


def _chunks(model: torch.nn.Module, jobs: Sequence[ClientJob], cfg: Config) -> list[list[int]]:
    """Clients that can step together (as many steps per epoch), in memory-bounded chunks,
    each chunk of similar window lengths so that little of its padding is computed.

    Without DP, a client of several batches trains alone: after the first step each client's
    weights are its own, and `vmap` over per-client weights costs more than the fused kernel
    on one client's full batches (ml-100k's 10 silos: 4.2 s a round alone against 11.6 s together)."""
    size = 4 * sum(p.numel() for p in model.parameters()) * (4 if cfg.optimizer == "adam" else 2)
    per_chunk = max(1, COHORT_BYTES // size)
    groups: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(batches_per_epoch(job.population(), cfg.batch_size), []).append(i)
    longest = [int((job.windows != 0).sum(1).max(initial=0)) for job in jobs]
    chunks = []
    for steps, members in groups.items():
        members.sort(key=lambda i: longest[i])
        size = 1 if steps > 1 and jobs[members[0]].noise_multiplier is None else per_chunk
        chunks += [members[s:s + size] for s in range(0, len(members), size)]
    return chunks


class _Cohort:
    """Clients training together: stacked parameters (C, *shape), one optimizer over them.

    SGD and Adam update each element on its own, and every client of a cohort takes the same
    number of steps, so one optimizer over stacked parameters is exactly one optimizer per client.
    """

    def __init__(self, model: torch.nn.Module, jobs: list[ClientJob], cfg: Config) -> None:
        self.model, self.jobs, self.cfg = model, jobs, cfg
        self.names = [name for name, _ in model.named_parameters()]  # tied weights appear once
        self.params = {name: p.detach().unsqueeze(0).repeat(len(jobs), *([1] * p.dim())).requires_grad_()
                       for name, p in model.named_parameters()}
        self.optimizer = OPTIMIZERS[cfg.optimizer](self.params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generators = [torch.Generator().manual_seed(job.seed) for job in jobs]
        self.steps = batches_per_epoch(jobs[0].population(), cfg.batch_size)  # the same for every job (`_chunks`)
        self.rate = sample_rate(jobs[0].population(), cfg.batch_size)
        self.dp = jobs[0].noise_multiplier is not None
        self.windows = [torch.from_numpy(job.windows) for job in jobs]
        # Per-user DP: each window's unit (`units`), and numbered apart across the cohort's clients (`owners`).
        self.units = None if not self.dp or jobs[0].units is None else [
            torch.from_numpy(job.units.astype(np.int64)) for job in jobs]
        offsets = np.cumsum([0] + [job.population() for job in jobs])[:-1].tolist()
        self.owners = None if self.units is None else [u + o for u, o in zip(self.units, offsets, strict=True)]
        self.head = OUTER[1] if OUTER[1] in self.params else OUTER[0]  # the output layer's table (tied: the embedding)

    def train(self, epochs: int, on_epoch_end: Callable[[int, float, float | None], bool] | None = None
              ) -> list[TrainResult]:
        accountants = [self._accountant(job) for job in self.jobs]
        self.model.train()
        losses, epoch = [math.nan] * len(self.jobs), 0
        for epoch in range(1, epochs + 1):
            orders = [None if self.dp else torch.randperm(len(w), generator=g)
                      for w, g in zip(self.windows, self.generators, strict=True)]
            totals, batches = [0.0] * len(self.jobs), [0] * len(self.jobs)
            for step in range(self.steps):
                picks = [self._sample(c, orders[c], step) for c in range(len(self.jobs))]
                self.optimizer.zero_grad(set_to_none=True)
                step_losses = self._step(picks, shared=epoch == 1 and step == 0)
                self._schedule(((epoch - 1) * self.steps + step) / (epochs * self.steps))
                self.optimizer.step()
                for c, (pick, accountant) in enumerate(zip(picks, accountants, strict=True)):
                    if accountant is not None:
                        accountant.step(noise_multiplier=self.jobs[c].noise_multiplier, sample_rate=self.rate)
                    if len(pick):  # Poisson sampling can draw an empty batch: still a DP step
                        totals[c] += step_losses[c]
                        batches[c] += 1
            losses = [t / max(b, 1) for t, b in zip(totals, batches, strict=True)]
            if on_epoch_end is not None:
                _load(self.model, self._weights(0))
                if on_epoch_end(epoch, losses[0], _epsilon(accountants[0], self.cfg.delta)):
                    break
        return [TrainResult(losses[c], epoch, epoch * self.steps,
                            [tuple(h) for h in accountants[c].history] if accountants[c] else list(job.history),
                            _epsilon(accountants[c], self.cfg.delta), self._weights(c))
                for c, job in enumerate(self.jobs)]

    def _schedule(self, done: float) -> None:
        """The learning rate for the step at fraction `done` of training (`lr-schedule`)."""
        if self.cfg.lr_schedule == "cosine":
            for group in self.optimizer.param_groups:
                group["lr"] = self.cfg.lr * 0.5 * (1 + math.cos(math.pi * done))

    def _accountant(self, job: ClientJob) -> PRVAccountant | None:
        if job.noise_multiplier is None:
            return None
        accountant = PRVAccountant()
        accountant.history = [tuple(h) for h in job.history]
        return accountant

    def _sample(self, c: int, order: torch.Tensor | None, step: int) -> torch.Tensor:
        """The window indices of client c's batch: Poisson under DP (Opacus's
        `UniformWithReplacementSampler`: each unit with probability `sample_rate`, a user with
        all of its windows), else shuffled."""
        if self.dp and self.units is not None:
            chosen = torch.rand(self.jobs[c].population(), generator=self.generators[c]) < self.rate
            return chosen[self.units[c]].nonzero().flatten()
        if self.dp:
            return (torch.rand(len(self.windows[c]), generator=self.generators[c]) < self.rate).nonzero().flatten()
        return order[step * self.cfg.batch_size:(step + 1) * self.cfg.batch_size]

    def _weights(self, c: int) -> dict[str, torch.Tensor]:
        return {name: self.params[name][c].detach() for name in self.names}  # views: the cohort is done with them

    def _step(self, picks: list[torch.Tensor], shared: bool) -> list[float]:
        """Set every client's gradient for one step; return each client's mean batch loss.

        `shared`: every client still holds the starting weights (the first step), so all windows
        run under one set of weights and nothing is gathered per client.
        """
        slots = torch.cat([torch.full((len(p),), c) for c, p in enumerate(picks)])
        windows = torch.cat([w[p] for w, p in zip(self.windows, picks, strict=True)])
        owners = None if self.owners is None else torch.cat([u[p] for u, p in zip(self.owners, picks, strict=True)])
        masks = self._dropout_masks(picks)
        sizes = torch.tensor([len(p) for p in picks])
        alone = len(self.jobs) == 1
        # Per-window gradients summed per client: DP-SGD's clipped sum, or, without DP, a cohort's
        # first step, where every client still holds the same weights: the fused LSTM kernel then
        # runs the forward for all, instead of `vmap` over per-client weights (a cross-device
        # client's one local step is always this one).
        per_window = self.dp or (shared and not alone)
        shared = shared or alone
        losses = torch.zeros(len(windows))
        summed = {name: torch.zeros_like(p) for name, p in self.params.items()} if per_window else None
        for part in self._parts(windows, owners):
            width = max(int((windows[part] != 0).sum(1).max()), 2)  # the part's longest window, not max-len
            part_masks = None if masks is None else masks[part, :, : width - 1]
            batch = _Part(windows[part, :width], slots[part], part_masks, None if owners is None else owners[part])
            if summed is not None:
                losses[part] = self._clipped_sum(summed, batch, shared, clip=self.dp)
            else:
                part_losses = self._losses(batch, shared=alone)
                (part_losses / sizes[batch.slots]).sum().backward()
                losses[part] = part_losses.detach()
        if summed is not None:
            if self.dp:
                self._noise(summed)
            # DP-SGD's scaling by the expected batch (Opacus: len(data) x rate, in units); without
            # DP each client's mean window loss, as the loss the other route backpropagates
            scale = torch.tensor([float(int(job.population() / self.steps)) for job in self.jobs]) if self.dp \
                else sizes.clamp(min=1)
            for name in self.names:
                shape = (-1, *([1] * (summed[name].dim() - 1)))
                self.params[name].grad = summed[name].div_(scale.view(shape))
        return (torch.zeros(len(self.jobs)).index_add(0, slots, losses) / sizes.clamp(min=1)).tolist()

    def _parts(self, windows: torch.Tensor, owners: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Index sets of windows of similar length, each part as large as `PER_SAMPLE_BYTES`
        allows for what a window holds: its (L, N+1) scores, its per-window gradients of the
        small layers and its (L, L, H) attention energies (a few copies through the backward
        pass). A part's cost is mostly per time step (the LSTM under `vmap`), so short windows
        go in large parts. With `owners` (per-user DP) a part holds whole users, users of as many
        windows together, and a user's scores are held twice more (laid end to end, `_unit_norms`)."""
        small = sum(p[0].numel() for name, p in self.params.items() if name not in OUTER)
        hidden = self.model.lstm.hidden_size
        lengths = (windows != 0).sum(1)
        if not len(windows):
            return []
        if owners is None:
            order, first = torch.argsort(lengths, stable=True), None
        else:
            _, unit, counts = torch.unique(owners, return_inverse=True, return_counts=True)
            longest = torch.zeros(len(counts), dtype=lengths.dtype).scatter_reduce(0, unit, lengths, "amax")
            key = (counts[unit] * (lengths.max() + 1) + longest[unit]) * len(counts) + unit
            order = torch.argsort(key, stable=True)
            first = torch.ones(len(order), dtype=torch.bool)
            first[1:] = owners[order][1:] != owners[order][:-1]  # where a user's windows begin
        copies = 1 if owners is None else 3
        parts, start, widest = [], 0, 0
        for end, length in enumerate(lengths[order].tolist(), start=1):
            widest = max(widest, length)
            per_window = 4 * (small + copies * widest * (self.model.num_items + 1) + 4 * widest * widest * hidden)
            if (end - start) * per_window > PER_SAMPLE_BYTES and end - 1 > start and (first is None or first[end - 1]):
                parts.append(order[start:end - 1])
                start, widest = end - 1, length
        return [*parts, order[start:]]

    def _dropout_masks(self, picks: list[torch.Tensor]) -> torch.Tensor | None:
        """(W, 2, max_len, E) masks for the two dropout layers, each client's from its own generator."""
        p = self.cfg.dropout
        if p == 0:
            return None
        shape = (2, self.cfg.max_len, self.cfg.embedding_dim)
        masks = [torch.empty(len(pick), *shape).bernoulli_(1 - p, generator=g) / (1 - p)
                 for pick, g in zip(picks, self.generators, strict=True)]
        return torch.cat(masks)

    # The stages of a step. Parameters split in two: the item embedding and the output layer
    # (tied, or not), (N+1, E) each and most of the model, whose per-window gradients are never
    # materialised; and the small layers between them, whose per-window gradients `vmap` gives.

    def _small(self, batch: _Part, shared: bool, detach: bool) -> tuple[dict[str, torch.Tensor], int | None]:
        """The small layers' weights of each window's client (in_dims 0), or the one set all share."""
        weights = {name: (p[0] if shared else p[batch.slots]) for name, p in self.params.items() if name not in OUTER}
        return ({k: v.detach() for k, v in weights.items()} if detach else weights), (None if shared else 0)

    def _features(self, small: dict[str, torch.Tensor], dim: int | None, batch: _Part, embedded: torch.Tensor
                  ) -> torch.Tensor:
        """(W, L, E) features the output layer scores, each window under its client's weights."""
        model, masks = self.model, batch.masks
        if dim is None:  # one set of weights: a plain batch through the fused LSTM kernel
            return functional_call(model, small, (batch.inputs, None if masks is None else masks.transpose(0, 1),
                                                  None, embedded))
        model.private = True  # DPLSTM's step-by-step forward, which vmap batches
        try:
            return vmap(_one_window(model), in_dims=(0, 0, 0, None if masks is None else 0))(
                small, batch.inputs, embedded, masks)
        finally:
            model.private = False

    def _scores(self, batch: _Part, features: torch.Tensor, shared: bool, detach: bool) -> _Scores:
        """Log-probabilities of every item at each real target, rows grouped by client."""
        rows = _Rows(batch)
        head = self.params[self.head]
        head = head.detach() if detach else head
        weights = head[0] if shared else head[rows.clients]  # (N+1, E) or (P, N+1, E)
        grouped = features.new_zeros(len(rows.clients), rows.longest, features.shape[-1])
        grouped[rows.group, rows.rank] = features[rows.window, rows.position]
        return _Scores(rows, torch.log_softmax(grouped @ weights.transpose(-1, -2), dim=-1), weights, grouped)

    def _embedded(self, batch: _Part, detach: bool) -> torch.Tensor:
        """(W, L, E) item embeddings of each window's inputs, from its client's embedding."""
        table = self.params[OUTER[0]]
        table = (table.detach() if detach else table).flatten(0, 1)  # (C·(N+1), E)
        return table[batch.slots.unsqueeze(1) * (self.model.num_items + 1) + batch.inputs]

    def _losses(self, batch: _Part, shared: bool) -> torch.Tensor:
        """Each window's loss under its client's parameters, differentiable: the non-DP step."""
        small, dim = self._small(batch, shared, detach=False)
        scores = self._scores(batch, self._features(small, dim, batch, self._embedded(batch, detach=False)),
                              shared, detach=False)
        return scores.window_losses()

    def _clipped_sum(self, summed: dict[str, torch.Tensor], batch: _Part, shared: bool, clip: bool = True
                     ) -> torch.Tensor:
        """Add each window's gradient, clipped to `max_grad_norm` (`clip`), to its client's sum;
        return the windows' losses.

        The output layer's and the embedding's per-window gradients are (N+1, E) each; their norms
        come from (L, L) Gram matrices of the per-position terms instead ("ghost" norms, exact),
        and the clipped sum from one matrix product per client.
        """
        small, dim = self._small(batch, shared, detach=True)
        embedded = self._embedded(batch, detach=True)
        with torch.no_grad():
            features = self._features(small, dim, batch, embedded)
            scores = self._scores(batch, features, shared, detach=True)
            losses = scores.window_losses()
            upstream = scores.output_gradient()  # (P, R, N+1): d loss / d logits, per row
            feature_grads = features.new_zeros(features.shape)  # (W, L, E)
            rows = scores.rows
            feature_grads[rows.window, rows.position] = (upstream @ scores.weights)[rows.group, rows.rank]
        model = self.model

        def backward(w, items, x, masks, grads):
            return (_one_window(model)(w, items, x, masks) * grads).sum()

        model.private = True
        try:
            small_grads, embedded_grads = vmap(grad(backward, argnums=(0, 2)),
                                               in_dims=(dim, 0, 0, None if batch.masks is None else 0, 0))(
                small, batch.inputs, embedded, batch.masks, feature_grads)
        finally:
            model.private = False
        embedded_grads = embedded_grads * (batch.inputs != 0).unsqueeze(-1)  # the padding row learns nothing
        with torch.no_grad():
            factors = self._clip_factors(scores, small_grads, upstream, features, embedded_grads, batch) if clip \
                else torch.ones(len(batch.windows))
            for name, g in small_grads.items():
                summed[name].index_add_(0, batch.slots, g * factors.view(-1, *([1] * (g.dim() - 1))))
            weighted = upstream.mul_(factors[rows.window_of_group].unsqueeze(-1))  # (P, R, N+1)
            summed[self.head].index_add_(0, rows.clients, weighted.transpose(1, 2) @ scores.features)
            table = summed[OUTER[0]].view(-1, features.shape[-1])
            index = batch.slots.unsqueeze(1) * (self.model.num_items + 1) + batch.inputs
            table.index_add_(0, index.flatten(), (embedded_grads * factors.view(-1, 1, 1)).flatten(0, 1))
        return losses

    def _clip_factors(self, scores: _Scores, small_grads: dict[str, torch.Tensor], upstream: torch.Tensor,
                      features: torch.Tensor, embedded_grads: torch.Tensor, batch: _Part) -> torch.Tensor:
        """Opacus's clip factor of each window's gradient, from its unit's exact norm: the
        window's own, or (per-user DP) that of the sum over its user's windows."""
        tied = self.head == OUTER[0]
        if batch.owners is None:
            unit = torch.arange(len(batch.windows))
            squared = sum(g.flatten(1).pow(2).sum(1) for g in small_grads.values())
            squared = squared + scores.outer_squared_norms(upstream, features, embedded_grads, batch.inputs, tied)
        else:
            _, unit = torch.unique(batch.owners, return_inverse=True)
            squared = _unit_norms(unit, small_grads, scores.by_window(upstream), features, embedded_grads,
                                  batch.inputs, tied)
        return (self.cfg.max_grad_norm / (squared.sqrt() + 1e-6)).clamp(max=1.0)[unit]

    def _noise(self, summed: dict[str, torch.Tensor]) -> None:
        """Each client's Gaussian noise (std σ·C, from its own generator), added to its clipped sum."""
        stds = [job.noise_multiplier * self.cfg.max_grad_norm for job in self.jobs]

        def draw(clients: range) -> None:
            buffers = {name: torch.empty(summed[name].shape[1:]) for name in self.names}
            for c in clients:
                for name in self.names:  # each client's draws in parameter order, as Opacus draws them
                    if stds[c] > 0:
                        summed[name][c] += torch.normal(0.0, stds[c], size=buffers[name].shape,
                                                        generator=self.generators[c], out=buffers[name])

        # Drawing is serial per generator and most of a cross-device client's step: the clients
        # are split over torch's threads (each generator stays on one thread, in order).
        workers = min(torch.get_num_threads(), len(self.jobs))
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(draw, [range(w, len(self.jobs), workers) for w in range(workers)]))


OUTER = ("item_embedding.weight", "head.weight")  # the (N+1, E) tables; head.weight only when untied


@dataclasses.dataclass
class _Part:
    """Windows of one step, cut to the part's longest, with their clients' slots and dropout masks."""

    windows: torch.Tensor  # (W, L+1)
    slots: torch.Tensor  # (W,)
    masks: torch.Tensor | None  # (W, 2, L, E)
    owners: torch.Tensor | None = None  # (W,) each window's DP unit, numbered across the cohort; None: itself

    @functools.cached_property
    def inputs(self) -> torch.Tensor:
        return window_inputs(self.windows)

    @functools.cached_property
    def targets(self) -> torch.Tensor:
        return window_targets(self.windows)


class _Rows:
    """The part's real targets, as rows grouped by client: group g (client `clients[g]`), rank r."""

    def __init__(self, batch: _Part) -> None:
        real = batch.targets != 0
        self.window, self.position = real.nonzero(as_tuple=True)  # (R,) each, in window order
        self.clients, self.group = torch.unique(batch.slots[self.window], return_inverse=True)
        order = torch.argsort(self.group, stable=True)
        per_group = torch.bincount(self.group, minlength=len(self.clients))
        starts = torch.cumsum(per_group, 0) - per_group
        self.rank = torch.empty_like(self.group)
        self.rank[order] = torch.arange(len(order)) - starts[self.group[order]]
        self.longest = int(per_group.max()) if len(per_group) else 0
        self.targets = batch.targets[self.window, self.position]
        self.counts = real.sum(1).clamp(min=1)  # targets per window
        self.num_windows, self.num_positions = real.shape
        self.window_of_group = torch.zeros(len(self.clients), self.longest, dtype=torch.long)
        self.window_of_group[self.group, self.rank] = self.window


@dataclasses.dataclass
class _Scores:
    rows: _Rows
    log_probs: torch.Tensor  # (P, R, N+1), padding rows included
    weights: torch.Tensor  # the output layer's weights: (N+1, E), or (P, N+1, E) per client
    features: torch.Tensor  # (P, R, E): what the output layer scored, rows grouped as log_probs

    def window_losses(self) -> torch.Tensor:
        """Each window's mean cross-entropy over its real targets (W,)."""
        rows = self.rows
        token = -self.log_probs[rows.group, rows.rank, rows.targets]
        return torch.zeros(rows.num_windows, dtype=token.dtype).index_add(0, rows.window, token) / rows.counts

    def output_gradient(self) -> torch.Tensor:
        """d window loss / d logits (P, R, N+1): (softmax - one-hot) / targets in the window; 0 on
        padding. Computed in place of the log-probabilities (the largest tensor of a step), so
        `window_losses` must come first."""
        rows = self.rows
        upstream = self.log_probs.exp_()
        upstream[rows.group, rows.rank, rows.targets] -= 1
        scale = torch.zeros(upstream.shape[:2])
        scale[rows.group, rows.rank] = 1 / rows.counts[rows.window].to(upstream.dtype)
        return upstream.mul_(scale.unsqueeze(-1))

    def outer_squared_norms(self, upstream: torch.Tensor, features: torch.Tensor, embedded_grads: torch.Tensor,
                            inputs: torch.Tensor, tied: bool) -> torch.Tensor:
        """Per window, the squared norm of the output layer's and the embedding's gradients
        (one table when tied: their sum), from Gram matrices over the window's positions;
        `upstream` is `output_gradient()`."""
        rows = self.rows
        if len(rows.clients) == rows.num_windows:  # one window per client: row r of a group is position r
            order = rows.window_of_group[:, 0]  # each group's window
            squared = _table_norms(upstream, self.features, inputs[order], embedded_grads[order], tied)
            return torch.zeros_like(squared).index_copy(0, order, squared)
        return _table_norms(self.by_window(upstream), features, inputs, embedded_grads, tied)

    def by_window(self, upstream: torch.Tensor) -> torch.Tensor:
        """`upstream` (P, R, N+1) laid out by window and position (W, L, N+1), zero where no target is."""
        rows = self.rows
        by_window = upstream.new_zeros(rows.num_windows, rows.num_positions, upstream.shape[-1])
        by_window[rows.window, rows.position] = upstream[rows.group, rows.rank]
        return by_window


def _table_norms(by_window: torch.Tensor, scored: torch.Tensor, inputs: torch.Tensor, embedded_grads: torch.Tensor,
                 tied: bool) -> torch.Tensor:
    """Per window (first dimension), the squared norm of the gradient of the output layer
    (d loss / d logits `by_window` (W, R, N+1) at features `scored` (W, R, E)) and of the
    embedding (`embedded_grads` (W, L, E) at items `inputs` (W, L)): Gram matrices over its positions."""
    same_item = (inputs.unsqueeze(2) == inputs.unsqueeze(1)) & (inputs != 0).unsqueeze(2)
    squared = ((embedded_grads @ embedded_grads.transpose(1, 2)) * same_item).sum((1, 2))
    squared = squared + ((by_window @ by_window.transpose(1, 2)) * (scored @ scored.transpose(1, 2))).sum((1, 2))
    if tied:  # the cross term between the two uses of one table
        at_inputs = torch.gather(by_window, 2, inputs.unsqueeze(1).expand(-1, by_window.shape[1], -1))
        squared = squared + 2 * (at_inputs * (scored @ embedded_grads.transpose(1, 2))).sum((1, 2))
    return squared


def _unit_norms(unit: torch.Tensor, small_grads: dict[str, torch.Tensor], by_window: torch.Tensor,
                features: torch.Tensor, embedded_grads: torch.Tensor, inputs: torch.Tensor, tied: bool
                ) -> torch.Tensor:
    """Per unit (`unit` (W,): each window's, 0..K-1), the squared norm of its windows' summed
    gradient. The small layers' gradients are summed per unit; for the two tables, a unit's
    windows are laid end to end as one long window, whose Gram matrices hold every pair of
    positions across them."""
    count = int(unit.max()) + 1
    squared = sum(torch.zeros(count, *g.shape[1:]).index_add_(0, unit, g).flatten(1).pow(2).sum(1)
                  for g in small_grads.values())
    order = torch.argsort(unit, stable=True)
    per_unit = torch.bincount(unit, minlength=count)
    rank = torch.empty_like(unit)
    rank[order] = torch.arange(len(unit)) - (torch.cumsum(per_unit, 0) - per_unit)[unit[order]]
    longest = int(per_unit.max())

    def end_to_end(x: torch.Tensor) -> torch.Tensor:  # (W, L, ...) -> (K, longest·L, ...)
        laid = x.new_zeros(count, longest, *x.shape[1:])
        laid[unit, rank] = x
        return laid.flatten(1, 2)

    return squared + _table_norms(end_to_end(by_window), end_to_end(features), end_to_end(inputs),
                                  end_to_end(embedded_grads), tied)


def _one_window(model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """Features (L, E) of one window under weights `w`: the function `vmap` maps over windows."""

    def features(w: dict[str, torch.Tensor], items: torch.Tensor, embedded: torch.Tensor,
                 masks: torch.Tensor | None) -> torch.Tensor:
        masks = None if masks is None else masks.unsqueeze(1)  # (2, 1, L, E)
        return functional_call(model, w, (items.unsqueeze(0), masks, None, embedded.unsqueeze(0)))[0]

    return features


def _load(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])


def _epsilon(accountant: PRVAccountant | None, delta: float) -> float | None:
    """Through the ledger's cache: in a simulation many clients share one history."""
    return Ledger(tuple(tuple(h) for h in accountant.history)).epsilon(delta) if accountant else None


def dp_unit(cfg: Config) -> str:
    """What DP-SGD protects here, stated in README and in every summary.json."""
    if cfg.dp_unit == "user":
        return "one user's whole history (every training window of the user, clipped together)"
    return (f"one training window: at most {cfg.max_len + 1} consecutive interactions of one user "
            f"(the model reads {cfg.max_len} and predicts each next one)")
