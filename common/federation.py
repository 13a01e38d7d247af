"""Who holds which users: the server's held-out users and each client's share of the rest.

The server and every simulated client derive the same answer from the run config alone (data
set, partition scheme, seed), so no user list ever has to travel between them.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from common.config import Config
from common.dataset import SequenceData, eval_examples, load_dataset, training_windows
from common.partition import partition_users, popularity_groups, user_labels


@dataclasses.dataclass(frozen=True)
class Federation:
    data: SequenceData
    holdout: np.ndarray  # users the server keeps out of training (its own evaluation data)
    clients: list[np.ndarray]  # user indices of each client, over the remaining users


@dataclasses.dataclass(frozen=True)
class ClientData:
    """What one client holds: its training windows and its users' validation examples."""

    windows: np.ndarray
    valid: tuple[np.ndarray, np.ndarray, np.ndarray]
    num_items: int


@functools.lru_cache(maxsize=2)
def federation(cfg: Config) -> Federation:
    """Load the data set once per process and split it between the server and the clients."""
    data = load_dataset(cfg)
    users = np.random.default_rng(cfg.seed).permutation(len(data.sequences))
    cut = int(round(cfg.holdout_users * len(users)))
    holdout, training = np.sort(users[:cut]), np.sort(users[cut:])
    labels = None
    if cfg.partition == "skew":
        groups = data.item_groups if data.item_groups is not None else popularity_groups(data.sequences, data.num_items)
        labels = user_labels([data.sequences[u] for u in training], groups)
    parts = partition_users(len(training), cfg.partition, cfg.num_clients, cfg.seed, labels, cfg.skew_alpha)
    return Federation(data, holdout, [training[p] for p in parts])


def client_data(cfg: Config, partition_id: int) -> ClientData:
    fed = federation(cfg)
    if not 0 <= partition_id < len(fed.clients):
        raise ValueError(f"partition-id {partition_id} out of range: the run has {len(fed.clients)} clients")
    sequences = [fed.data.sequences[u] for u in fed.clients[partition_id]]
    return ClientData(training_windows(sequences, cfg.max_len), eval_examples(sequences, "valid", cfg.max_len),
                      fed.data.num_items)


def evaluation_users(cfg: Config) -> np.ndarray:
    """The users the server evaluates on: its held-out users, or everyone's leave-one-out targets."""
    fed = federation(cfg)
    return fed.holdout if len(fed.holdout) else np.arange(len(fed.data.sequences))
