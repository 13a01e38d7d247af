"""Assignment of users to federated clients, and the user labels that label-skew needs."""

from __future__ import annotations

import numpy as np

from common.dataset import Sequences
from common.errors import DataError

SCHEMES = ("user", "iid", "skew")


def partition_users(num_users: int, scheme: str, num_clients: int, seed: int,
                    labels: np.ndarray | None = None, alpha: float = 0.5) -> list[np.ndarray]:
    """User indices of each client (sorted int64 arrays), deterministic under `seed`.

    `user`: one client per user, the cross-device setting (num_clients is ignored). `iid`: users
    shuffled and dealt over num_clients (sizes differ by at most one). `skew`: label skew as in
    Hsu et al. 2019: the users of each label are split over the clients in proportions drawn from
    Dirichlet(alpha), so small alpha gives each client few labels; clients left empty then take
    one user from the largest client, so every client trains.
    """
    if scheme not in SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")
    if scheme == "user":
        return [np.array([u], dtype=np.int64) for u in range(num_users)]
    if not 1 <= num_clients <= num_users:
        raise DataError(f"num-clients must be between 1 and the number of users ({num_users}), got {num_clients}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        shuffled = rng.permutation(num_users)
        return [np.sort(shuffled[c::num_clients]).astype(np.int64) for c in range(num_clients)]
    if labels is None or len(labels) != num_users:
        raise DataError("the skew partition needs one label per user")
    if alpha <= 0:
        raise DataError(f"alpha must be positive, got {alpha}")
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        users = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(users)).astype(int)
        for client, part in enumerate(np.split(users, cuts)):
            clients[client].extend(part.tolist())
    for client in range(num_clients):
        if not clients[client]:
            donor = max(range(num_clients), key=lambda c: len(clients[c]))
            clients[client].append(clients[donor].pop())
    return [np.sort(np.array(c, dtype=np.int64)) for c in clients]


def user_labels(sequences: Sequences, item_groups: np.ndarray) -> np.ndarray:
    """Each user's label: the most frequent group among their items (ties to the smaller group)."""
    groups = item_groups[sequences.items]
    users = np.repeat(np.arange(len(sequences)), sequences.lengths)
    num_groups = int(item_groups.max()) + 1
    counts = np.bincount(users * num_groups + groups, minlength=len(sequences) * num_groups)
    return counts.reshape(len(sequences), num_groups).argmax(axis=1)


def popularity_groups(sequences: Sequences, num_items: int, num_groups: int = 10) -> np.ndarray:
    """Item groups for real data, which has no latent groups: popularity bands.

    Items are ranked by count (ties by id) and cut into `num_groups` bands holding equal shares
    of the interactions (band 0 = most popular). Equal shares rather than equal item counts,
    because with equal item counts nearly every user's most frequent band would be the head band
    and label skew would have a single label. Index 0 (padding) holds -1; unseen items go last.
    """
    counts = np.bincount(sequences.items, minlength=num_items + 1)[1:].astype(float)
    order = np.argsort(-counts, kind="stable")
    mass_before = np.cumsum(counts[order]) - counts[order]
    bands = np.minimum((mass_before / max(counts.sum(), 1) * num_groups).astype(np.int64), num_groups - 1)
    groups = np.full(num_items + 1, -1, dtype=np.int64)
    groups[order + 1] = bands
    groups[1:][counts == 0] = num_groups - 1
    return groups
