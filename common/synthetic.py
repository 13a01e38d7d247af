"""Synthetic interaction sequences with planted sequential structure.

Used for tests and for runs without real data, so it must be learnable by a sequence model and
clearly not by popularity alone, yet not trivial. Items fall into latent groups; users walk a
sparse Markov chain over groups (each group moves to itself or to one or two successor groups)
and draw items within a group with a Zipf-like popularity skew. On top, every item has one fixed
successor item that follows it with probability FOLLOW, which makes the previous item the
strongest single cue.
"""

from __future__ import annotations

import numpy as np

from common.errors import DataError

STAY = 0.5     # probability the group chain stays in the current group
FOLLOW = 0.3   # probability the next item is the current item's fixed successor
ZIPF = 1.0     # exponent of the within-group popularity: the r-th item has weight r**-ZIPF


def generate(num_users: int, num_items: int, num_groups: int, min_len: int, max_len: int,
             seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-user item sequences (ids 1..num_items, int64, lengths uniform in [min_len, max_len])
    and the latent group of every item (index 0 is padding and holds -1).

    Fully determined by the arguments: the same seed gives the same output.
    """
    if not 1 <= num_groups <= num_items or not 1 <= min_len <= max_len or num_users < 1:
        raise DataError("synthetic data needs num_users >= 1, 1 <= num_groups <= num_items and 1 <= min_len <= max_len")
    rng = np.random.default_rng(seed)
    members = np.array_split(rng.permutation(num_items) + 1, num_groups)
    item_groups = np.full(num_items + 1, -1, dtype=np.int64)
    for group, items in enumerate(members):
        item_groups[items] = group

    next_group = _group_cycle(rng, num_groups)
    group_cdf = _group_transitions(rng, next_group)
    item_table, item_cdf = _popularity_tables(members)
    successor = _item_successors(rng, members, item_groups, next_group)

    lengths = rng.integers(min_len, max_len + 1, size=num_users)
    walks = np.zeros((num_users, max_len), dtype=np.int64)
    group_table = np.tile(np.arange(num_groups), (num_groups, 1))
    group = rng.integers(num_groups, size=num_users)
    walks[:, 0] = _draw(rng, item_table, item_cdf, group)
    for t in range(1, max_len):
        group = _draw(rng, group_table, group_cdf, item_groups[walks[:, t - 1]])
        fresh = _draw(rng, item_table, item_cdf, group)
        follow = rng.random(num_users) < FOLLOW
        walks[:, t] = np.where(follow, successor[walks[:, t - 1]], fresh)
    return [walks[u, :n].copy() for u, n in enumerate(lengths)], item_groups


def _group_cycle(rng: np.random.Generator, num_groups: int) -> np.ndarray:
    """A random cyclic order of the groups: group g's first successor is next_group[g].

    A single cycle keeps the chain irreducible, so every group (and item) keeps being visited.
    """
    order = rng.permutation(num_groups)
    next_group = np.empty(num_groups, dtype=np.int64)
    next_group[order] = np.roll(order, -1)
    return next_group


def _group_transitions(rng: np.random.Generator, next_group: np.ndarray) -> np.ndarray:
    """Cumulative transition matrix: stay with STAY, else move to the cycle successor or, for
    about half the groups, to a second random successor (weights split at random)."""
    num_groups = len(next_group)
    matrix = np.zeros((num_groups, num_groups))
    for group in range(num_groups):
        matrix[group, group] += STAY
        others = np.setdiff1d(np.arange(num_groups), [group, next_group[group]])
        if len(others) and rng.random() < 0.5:
            share = rng.uniform(0.5, 0.8)
            matrix[group, next_group[group]] += (1 - STAY) * share
            matrix[group, rng.choice(others)] += (1 - STAY) * (1 - share)
        else:
            matrix[group, next_group[group]] += 1 - STAY
    cdf = np.cumsum(matrix, axis=1)
    cdf[:, -1] = 1.0
    return cdf


def _popularity_tables(members: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Items of each group (padded with 0) and their cumulative Zipf weights (padded with 1)."""
    width = max(len(items) for items in members)
    table = np.zeros((len(members), width), dtype=np.int64)
    cdf = np.ones((len(members), width))
    for group, items in enumerate(members):
        weights = np.arange(1, len(items) + 1, dtype=float) ** -ZIPF
        table[group, : len(items)] = items
        cdf[group, : len(items)] = np.cumsum(weights) / weights.sum()
        cdf[group, len(items) - 1:] = 1.0
    return table, cdf


def _item_successors(rng: np.random.Generator, members: list[np.ndarray], item_groups: np.ndarray,
                     next_group: np.ndarray) -> np.ndarray:
    """A fixed successor for every item, from its own group or its group's cycle successor,
    never itself where the group has another item (index 0 unused)."""
    successor = np.zeros(len(item_groups), dtype=np.int64)
    for item in range(1, len(item_groups)):
        group = item_groups[item]
        pool = members[next_group[group] if rng.random() < 0.5 else group]
        pool = pool[pool != item] if len(pool) > 1 else pool
        successor[item] = rng.choice(pool)
    return successor


def _draw(rng: np.random.Generator, table: np.ndarray, cdf: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One draw per entry of `rows` from the categorical distribution in that row (inverse CDF)."""
    u = rng.random(len(rows))
    return table[rows, (cdf[rows] < u[:, None]).sum(axis=1)]
