"""Partition of users over clients and the labels used for label skew."""

from __future__ import annotations

import numpy as np
import pytest

from common.dataset import DataError, Sequences
from common.partition import partition_users, popularity_groups, user_labels


def covers_every_user_once(parts: list[np.ndarray], num_users: int) -> bool:
    return sorted(np.concatenate(parts).tolist()) == list(range(num_users))


def test_one_client_per_user():
    parts = partition_users(4, "user", num_clients=99, seed=0)
    assert [p.tolist() for p in parts] == [[0], [1], [2], [3]]


def test_iid_sizes_and_determinism():
    parts = partition_users(23, "iid", 5, seed=3)
    assert sorted(len(p) for p in parts) == [4, 4, 5, 5, 5]
    assert covers_every_user_once(parts, 23)
    again = partition_users(23, "iid", 5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_users(23, "iid", 5, seed=4)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_skew_concentrates_labels_and_fills_every_client():
    labels = np.repeat(np.arange(4), 50)
    parts = partition_users(200, "skew", 10, seed=0, labels=labels, alpha=0.1)
    assert covers_every_user_once(parts, 200)
    assert all(len(p) >= 1 for p in parts)
    labels_per_client = [len(np.unique(labels[p])) for p in parts]
    assert np.mean(labels_per_client) < 3  # iid would give nearly all 4 labels to every client
    again = partition_users(200, "skew", 10, seed=0, labels=labels, alpha=0.1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_skew_fixes_empty_clients():
    labels = np.zeros(12, dtype=int)  # one label, tiny alpha: Dirichlet puts nearly all on one client
    parts = partition_users(12, "skew", 12, seed=1, labels=labels, alpha=0.01)
    assert all(len(p) == 1 for p in parts)
    assert covers_every_user_once(parts, 12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(scheme="iid", num_clients=0), "between 1 and the number of users"),
    (dict(scheme="iid", num_clients=11), "between 1 and the number of users"),
    (dict(scheme="skew", num_clients=2), "needs one label per user"),
    (dict(scheme="skew", num_clients=2, labels=np.zeros(10), alpha=0), "alpha must be positive"),
    (dict(scheme="shards", num_clients=2), "unknown partition scheme"),
])
def test_errors(kwargs, message):
    with pytest.raises(DataError, match=message):
        partition_users(10, seed=0, **kwargs)


def test_user_labels_most_frequent_group_ties_to_smaller():
    groups = np.array([-1, 0, 0, 1, 2])
    labels = user_labels(Sequences.of([[1, 3, 3], [4, 2, 3, 4], [3, 1]]), groups)
    assert labels.tolist() == [1, 2, 0]


def test_popularity_groups_split_interaction_mass():
    # counts: item 1: 6, item 2: 2, item 3: 1, item 4: 1, item 5: 0 (total 10)
    sequences = Sequences.of([[1, 1, 1, 2, 3], [1, 1, 1, 2, 4]])
    groups = popularity_groups(sequences, 5, num_groups=2)
    assert groups.tolist() == [-1, 0, 1, 1, 1, 1]
    groups = popularity_groups(sequences, 5, num_groups=5)
    assert groups.tolist() == [-1, 0, 3, 4, 4, 4]
