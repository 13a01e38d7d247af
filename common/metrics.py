"""Full-ranking evaluation of next-item prediction, one held-out target per user.

This is RecBole's sequential leave-one-out protocol: each user's target is ranked against all N
items, with no sampled negatives (sampling inflates the numbers and can even reorder models).

Conventions the rest of fedrec relies on:
- Item ids are 1..N. Column 0 of a score matrix is the padding item; it is set to -inf before
  ranking, so it is never recommended whatever score a model gives it.
- Order: score descending, ties broken by item id ascending, i.e. what a stable descending sort
  gives. Each user's top-K list (`top_k_items`, K the largest cut-off) is found in that order and
  the target's rank is its position in that list (a target outside it misses at every K), so a
  hit and the list it is counted in always agree. Serving should rank with `top_k_items` as well
  (after setting column 0 to -inf), so users are shown exactly the lists that were evaluated.
  Breaking ties by id rather than at random keeps every result reproducible.
- A score of -inf means "not recommendable": a target scored -inf is a miss at every K (even
  K >= N), and -inf items never count towards coverage.
- History masking is off by default, as in RecBole's sequential setting, where a user may well
  consume an item again. With it on, the user's history items are scored -inf, so a target that
  is itself in the history becomes a miss.
- Metrics are means over users. With one target per user, recall@K equals HR@K, precision@K is
  HR@K / K and F1@K (2PR / (P + R) on a hit, 0 on a miss) is HR@K * 2 / (K + 1).
- Bias and exposure are read off the top-K lists of all users together, so they are not means over
  users and cannot be averaged across clients (`LIST_METRICS`): coverage@K (share of items in
  anyone's list), gini@K (Gini index of how often each item is listed: 0 = every item equally,
  towards 1 = a few items take every slot), head-share@K (share of all listed slots that go to the
  20% most popular items, given their ids) and target-exposure@K (share of users with one watched
  item, e.g. an attacker's target, in their list). A mean of per-client coverages would understate
  the union under the same name, and the exact figure would need clients to send the items they
  recommend, which leaks their users' tastes: clients leave these out of their evaluation replies,
  and the user-weighted mean of the rest equals the metric over all their users.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

DEFAULT_KS: tuple[int, ...] = (5, 10, 20)
HEAD_SHARE = 0.2  # the "most popular items" of head-share@K: the top 20% by training interactions
LIST_METRICS = ("coverage@", "gini@", "head-share@", "target-exposure@")  # not means over users

_NEG_INF = float("-inf")


class RankingAccumulator:
    """Running counts of ranking metrics, fed one batch of users at a time.

    Only integer counts are kept: how many users' targets came at each rank 1..K (K the largest
    cut-off) and how often each item was listed, per K. So a 22k-user by 12k-item evaluation never
    holds more than one batch of scores, and the result does not depend on how the users were
    batched or in which order they came: the means are computed from the counts at the end.
    """

    def __init__(
        self,
        num_items: int,
        ks: Sequence[int] = DEFAULT_KS,
        mask_history: bool = False,
        *,
        head: torch.Tensor | None = None,
        target: int | None = None,
    ) -> None:
        """`head`: bool (N+1,) marking the most popular items, for head-share@K; `target`: an
        item id whose exposure@K is reported."""
        if num_items < 1:
            raise ValueError(f"num_items must be at least 1, got {num_items}")
        ks = tuple(sorted({int(k) for k in ks}))
        if not ks or ks[0] < 1:
            raise ValueError(f"ks must be positive cut-offs, got {ks}")
        if head is not None and tuple(head.shape) != (num_items + 1,):
            raise ValueError(f"head must have shape ({num_items + 1},), got {tuple(head.shape)}")
        if target is not None and not 1 <= target <= num_items:
            raise ValueError(f"target must be an item id in 1..{num_items}, got {target}")
        self.num_items = num_items
        self.ks = ks
        self.mask_history = mask_history
        self.head = head
        self.target = target
        self._users = 0
        self._at_rank = torch.zeros(ks[-1] + 1, dtype=torch.int64)  # [r]: users whose target came r-th
        # How often each item is listed, per K; on the CPU whatever device the scores are on.
        self._listed = {k: torch.zeros(num_items + 1, dtype=torch.int64) for k in ks}

    def add(
        self, scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None = None
    ) -> None:
        """Add a batch: float scores (B, N+1), targets (B,) in 1..N, history (B, L) padded with 0.

        `history` is only read when masking is on, and is required then. The caller's scores are
        not modified.
        """
        self._add(scores, targets, history, copy=True)

    def _add(
        self, scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor | None, copy: bool
    ) -> None:
        """`add`; with copy=False the scores are overwritten (column 0 and masked items)."""
        if scores.ndim != 2 or scores.shape[1] != self.num_items + 1:
            raise ValueError(
                f"scores must have shape (batch, {self.num_items + 1}), got {tuple(scores.shape)}"
            )
        batch = scores.shape[0]
        targets = torch.as_tensor(targets, dtype=torch.long, device=scores.device)
        if targets.shape != (batch,):
            raise ValueError(f"targets must have shape ({batch},), got {tuple(targets.shape)}")
        if batch == 0:
            return
        if targets.min() < 1 or targets.max() > self.num_items:
            raise ValueError(f"targets must be item ids in 1..{self.num_items}")
        # A NaN compares false with everything, so a NaN target would silently rank first. A sum
        # is NaN whenever a score is (one pass, no temporary); only then (or on inf - inf) look.
        if torch.isnan(scores.sum()) and torch.isnan(scores).any():
            raise ValueError("scores contain NaN (did training diverge?)")

        scores = scores.detach().clone() if copy else scores.detach()
        scores[:, 0] = _NEG_INF
        if self.mask_history:
            if history is None:
                raise ValueError("mask_history=True needs the users' history")
            history = torch.as_tensor(history, dtype=torch.long, device=scores.device)
            if history.ndim != 2 or history.shape[0] != batch:
                raise ValueError(
                    f"history must have shape ({batch}, L), got {tuple(history.shape)}"
                )
            scores.scatter_(1, history, _NEG_INF)  # pad entries hit column 0, already -inf

        top_items = top_k_items(scores, self.ks[-1])
        top_recommendable = scores.gather(1, top_items) > _NEG_INF
        # A -inf target is never recommendable, so it is found nowhere: a miss at every K.
        found = (top_items == targets.unsqueeze(1)) & top_recommendable
        ranks = found.to(torch.uint8).argmax(dim=1)[found.any(dim=1)] + 1
        self._at_rank += torch.bincount(ranks.cpu(), minlength=len(self._at_rank))
        for k in self.ks:
            listed = top_items[:, :k][top_recommendable[:, :k]]
            self._listed[k] += torch.bincount(listed.cpu(), minlength=self.num_items + 1)
        self._users += batch

    def result(self) -> dict[str, float]:
        """Means over all users added so far, plus "users"; raises if no user was added.

        An empty evaluation has no meaningful mean, and returning zeros would read as a model that
        never hits; callers with no users (e.g. a client without test users) should skip it.
        """
        if self._users == 0:
            raise ValueError("no users were added; there is nothing to evaluate")
        users = self._users
        at_rank = self._at_rank.tolist()  # exact counts, so the sums below ignore batching and order
        hr = {k: sum(at_rank[1 : k + 1]) / users for k in self.ks}
        metrics: dict[str, float] = {}
        metrics.update({f"hr@{k}": hr[k] for k in self.ks})
        metrics.update({f"ndcg@{k}": sum(at_rank[r] / math.log2(r + 1) for r in range(1, k + 1)) / users
                        for k in self.ks})
        metrics.update({f"mrr@{k}": sum(at_rank[r] / r for r in range(1, k + 1)) / users for k in self.ks})
        metrics.update({f"precision@{k}": hr[k] / k for k in self.ks})
        metrics.update({f"recall@{k}": hr[k] for k in self.ks})
        metrics.update({f"f1@{k}": hr[k] * 2.0 / (k + 1) for k in self.ks})
        for k in self.ks:
            counts = self._listed[k][1:]
            metrics[f"coverage@{k}"] = (counts > 0).sum().item() / self.num_items
            metrics[f"gini@{k}"] = gini(counts)
            if self.head is not None:
                metrics[f"head-share@{k}"] = counts[self.head[1:]].sum().item() / max(counts.sum().item(), 1)
            if self.target is not None:
                metrics[f"target-exposure@{k}"] = self._listed[k][self.target].item() / users
        metrics["users"] = float(users)
        return metrics


def gini(counts: torch.Tensor) -> float:
    """Gini index of non-negative counts: 0 when all are equal, (n - 1) / n when one has them all."""
    x = torch.sort(counts.to(torch.float64)).values
    n, total = len(x), x.sum().item()
    if n == 0 or total == 0:
        return 0.0
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * ranks - n - 1) * x).sum().item() / (n * total))


def head_items(counts: np.ndarray | torch.Tensor, share: float = HEAD_SHARE) -> torch.Tensor:
    """bool (N+1,): the `share` most popular items by `counts` (N+1,), ties by id; padding excluded."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    size = max(1, round(share * (len(counts) - 1)))
    order = torch.sort(-counts[1:], stable=True).indices[:size] + 1
    head = torch.zeros(len(counts), dtype=torch.bool)
    head[order] = True
    return head


def top_k_items(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ids (B, min(k, N+1)) of each row's k best items, best first, ties by id ascending.

    Exactly `torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]`, but only
    the k best are found and sorted: one `topk` pass over a 12k-item batch. Scores must not
    contain NaN. Entries of -inf (padding, masked items) fill a row that has fewer than k other
    items; they are not recommendations.
    """
    k = min(k, scores.shape[1])
    if k == scores.shape[1]:
        return torch.sort(scores, dim=1, descending=True, stable=True).indices
    # The k + 1 best: where the k-th beats the (k+1)-th, the k best are the same set however
    # topk broke ties, and only their order needs ties by id. Rows tied across the cut (rare
    # for model scores; -inf fill, popularity counts) take the slower exact path.
    values, ids = torch.topk(scores, k + 1, dim=1)
    ids = torch.sort(ids[:, :k], dim=1).values  # by id, so the stable sort below breaks ties by id
    order = torch.sort(scores.gather(1, ids), dim=1, descending=True, stable=True).indices
    ids = ids.gather(1, order)
    tied = (values[:, k - 1] == values[:, k]).nonzero().squeeze(1)
    if len(tied):
        ids[tied] = _top_k_tied(scores[tied], k)
    return ids


def _top_k_tied(scores: torch.Tensor, k: int) -> torch.Tensor:
    """`top_k_items` for rows that may tie at the k-th best value: the items scored above it are
    all in, ties at that value are filled in by id."""
    best = torch.topk(scores, k, dim=1, sorted=False).values
    threshold = best.amin(dim=1, keepdim=True)
    room = (best == threshold).sum(dim=1, keepdim=True)  # tied slots left after the items above
    tied = scores == threshold
    chosen = (scores > threshold) | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= room))
    ids = chosen.nonzero()[:, 1].reshape(scores.shape[0], k)  # exactly k per row, by id
    order = torch.sort(scores.gather(1, ids), dim=1, descending=True, stable=True).indices
    return ids.gather(1, order)


def popularity_scores(counts: np.ndarray | torch.Tensor, batch_size: int) -> torch.Tensor:
    """The most-popular baseline's scores: the count row (N+1,) as a (batch_size, N+1) view.

    The padding entry (counts[0]) is set to -inf so the row is safe to rank on its own. Counts
    are kept in float64, exact for any realistic count. The result is an expanded view of one
    row: read it, do not write to it.
    """
    row = torch.as_tensor(counts, dtype=torch.float64).clone()
    if row.ndim != 1:
        raise ValueError(f"counts must be a vector (N+1,), got shape {tuple(row.shape)}")
    row[0] = _NEG_INF
    return row.unsqueeze(0).expand(batch_size, -1)


def evaluate_popularity(
    counts: np.ndarray | torch.Tensor,
    targets: np.ndarray,
    num_items: int,
    *,
    inputs: np.ndarray | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    mask_history: bool = False,
    batch_size: int = 512,
    head: torch.Tensor | None = None,
    target: int | None = None,
) -> dict[str, float]:
    """Metrics of recommending the same most-popular list to every user.

    `counts` (N+1,) should come from training interactions only, or the baseline sees the
    targets. `inputs` (U, L), the users' right-padded histories, is needed only for masking.
    """
    if mask_history and inputs is None:
        raise ValueError("mask_history=True needs the users' histories (inputs)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    accumulator = RankingAccumulator(num_items, ks, mask_history, head=head, target=target)
    row = popularity_scores(counts, batch_size)
    for start in range(0, len(targets), batch_size):
        batch_targets = torch.as_tensor(targets[start : start + batch_size], dtype=torch.long)
        history = None
        if inputs is not None:
            history = torch.as_tensor(inputs[start : start + batch_size], dtype=torch.long)
        accumulator.add(row[: len(batch_targets)], batch_targets, history)
    return accumulator.result()


def evaluate_model(
    model: nn.Module,
    inputs: np.ndarray,
    lengths: np.ndarray,
    targets: np.ndarray,
    num_items: int,
    *,
    batch_size: int = 512,
    ks: Sequence[int] = DEFAULT_KS,
    mask_history: bool = False,
    device: str | torch.device = "cpu",
    head: torch.Tensor | None = None,
    target: int | None = None,
) -> dict[str, float]:
    """Metrics of a model that has `last_scores(items (B, L), lengths (B,)) -> (B, N+1)`.

    `inputs` (U, L) are right-padded histories, `lengths` (U,) their real lengths (at least 1)
    and `targets` (U,) the held-out next items. The model must already be on `device`; it is
    run in eval mode without gradients, and its previous training mode is restored afterwards
    (even on error), so evaluating in the middle of training is safe.

    Most histories are far shorter than L, so users are taken shortest first and each batch is
    cut to its own longest history: the model never reads a column that is padding for every
    user of the batch, which must not change its scores (true of a model that reads right-padded
    histories causally or masks padding out, as `AttentionLSTM` does). The accumulated metrics
    do not depend on the order of users. The scores `last_scores` returns are overwritten in
    place, so it must return a new tensor on each call (not a view of one it keeps).
    """
    inputs, lengths, targets = np.asarray(inputs), np.asarray(lengths), np.asarray(targets)
    users = len(targets)
    if inputs.ndim != 2 or inputs.shape[0] != users or lengths.shape != (users,):
        raise ValueError(
            f"inputs (U, L), lengths (U,) and targets (U,) disagree: {inputs.shape}, "
            f"{lengths.shape}, {targets.shape}"
        )
    # A length of 0 would make the model read position -1, i.e. the last padding slot.
    if users and (lengths.min() < 1 or lengths.max() > inputs.shape[1]):
        raise ValueError(f"lengths must lie in 1..{inputs.shape[1]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    accumulator = RankingAccumulator(num_items, ks, mask_history, head=head, target=target)
    # Each user's extent: the columns up to the last non-padding item (its length, for
    # right-padded inputs); shortest first, so a batch's extent is that of its last user.
    nonzero = inputs != 0
    last = (np.where(nonzero.any(axis=1), inputs.shape[1] - np.argmax(nonzero[:, ::-1], axis=1), 0)
            if inputs.size else np.zeros(users, dtype=np.int64))
    extent = np.maximum(lengths, last)
    order = np.argsort(extent, kind="stable")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, users, batch_size):
                rows = order[start : start + batch_size]
                width = int(extent[rows[-1]])
                items = torch.as_tensor(inputs[rows, :width], dtype=torch.long, device=device)
                batch_lengths = torch.as_tensor(lengths[rows], dtype=torch.long, device=device)
                batch_targets = torch.as_tensor(targets[rows], dtype=torch.long, device=device)
                # The scores are ours to overwrite (column 0, masked items): no copy of (B, N+1).
                accumulator._add(model.last_scores(items, batch_lengths), batch_targets, items, copy=False)
    finally:
        model.train(was_training)
    return accumulator.result()
