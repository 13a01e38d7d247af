"""Who holds which users: the server's held-out users and each client's share of the rest.

The server and every simulated client derive the same answer from the run config alone (data
set, partition scheme, seed), so no user list ever has to travel between them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from common.artifacts import staged_output
from common.config import Config
from common.dataset import (
    MIN_SEQUENCE,
    SequenceData,
    Sequences,
    eval_examples,
    load_dataset,
    training_windows,
    window_counts,
    window_users,
)
from common.errors import DataError
from common.memo import cached
from common.partition import partition_users, popularity_groups, user_labels


@dataclasses.dataclass(frozen=True)
class Federation:
    data: SequenceData
    holdout: np.ndarray  # users the server keeps out of training (its own evaluation data)
    clients: list[np.ndarray]  # user indices of each client, over the remaining users


@dataclasses.dataclass(frozen=True)
class ClientData:
    """What one client holds: its training windows, the user of each (0..U-1, the users that
    have a window) and its users' validation examples."""

    windows: np.ndarray
    users: np.ndarray  # (W,)
    valid: tuple[np.ndarray, np.ndarray, np.ndarray]
    num_items: int

    def dp_units(self, cfg: Config) -> np.ndarray | None:
        """What local DP-SGD samples and clips: each window's user (`dp-unit = user`), or None
        (each window is its own unit)."""
        return self.users if cfg.dp_unit == "user" else None

    def dp_population(self, cfg: Config) -> int:
        """How many units local DP-SGD samples from: the client's users, or its windows."""
        return int(self.users[-1]) + 1 if cfg.dp_unit == "user" and len(self.users) else len(self.windows)


@cached(2)
def federation(cfg: Config) -> Federation:
    """Load the data set once per process and split it between the server and the clients."""
    data = load_dataset(cfg)
    if cfg.partition == "devices":  # deployment: the server's data is all held out, clients hold their own
        return Federation(data, np.arange(len(data.sequences)), [])
    users = np.random.default_rng(cfg.seed).permutation(len(data.sequences))
    cut = int(round(cfg.holdout_users * len(users)))
    holdout, training = np.sort(users[:cut]), np.sort(users[cut:])
    labels = None
    if cfg.partition == "skew":
        groups = data.item_groups if data.item_groups is not None else popularity_groups(data.sequences, data.num_items)
        labels = user_labels(data.sequences.subset(training), groups)
    parts = partition_users(len(training), cfg.partition, cfg.num_clients, cfg.seed, labels, cfg.skew_alpha)
    return Federation(data, holdout, [training[p] for p in parts])


def catalogue(cfg: Config) -> list[str]:
    """The raw item ids the model scores, in model order: the server's data set defines them."""
    return [str(i) for i in federation(cfg).data.item_ids.tolist()]


def local_client_data(cfg: Config, path: str, fmt: str, items: list[str]) -> ClientData:
    """A deployed client's own file, in the server's item order (items it does not know are dropped).

    The file is read with the foundation's loaders (`fmt` is a `dataset` value) and cleaned with the
    run's settings, except k-core, which is a property of a whole data set, not of one device's.
    """
    local = load_dataset(dataclasses.replace(cfg, dataset=fmt, data_dir=path, kcore=0))
    index = {raw: i + 1 for i, raw in enumerate(items)}
    to_global = np.array([0] + [index.get(str(raw), 0) for raw in local.item_ids.tolist()], dtype=np.int64)
    mapped = Sequences(to_global[local.sequences.items], local.sequences.offsets)
    known = mapped.select(mapped.items > 0)
    sequences = known.subset(np.flatnonzero(known.lengths >= MIN_SEQUENCE))
    if not sequences:
        raise DataError(f"{path}: no user has 3 or more interactions with items the server knows")
    return holder_data(sequences, cfg, len(items))


def write_device_files(cfg: Config, out: Path, clients: int) -> list[Path]:
    """One `seq` file per client (`client-<i>.txt`) and the server's held-out users (`server.txt`),
    with raw user and item ids: the files a trial deployment hands to `fedrec client` and `fedrec run`.

    Users are dealt as the run config's `partition` says (`iid` or `skew` over `clients`) after
    `holdout-users` of them are set aside for the server; nothing is written unless all is.
    """
    partition = cfg.partition if cfg.partition in ("iid", "skew") else "iid"
    cfg = dataclasses.replace(cfg, num_clients=clients, partition=partition)
    if cfg.holdout_users <= 0:
        raise DataError("the server needs held-out users for its evaluation: set holdout-users > 0")
    fed = federation(cfg)
    names = {"server.txt": fed.holdout, **{f"client-{i + 1}.txt": users for i, users in enumerate(fed.clients)}}
    with staged_output(out) as stage:
        for name, users in names.items():
            lines = (" ".join([str(fed.data.user_ids[u]),
                               *(str(fed.data.item_ids[i - 1]) for i in fed.data.sequences[u])])
                     for u in users)
            (stage / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [out / name for name in names]


@cached(2**16)
def client_data(cfg: Config, partition_id: int) -> ClientData:
    """A simulated client's data, derived once per process: its train and evaluate messages, in
    every round, reuse it. Bounded, so that a process running many configurations stays small."""
    fed = federation(cfg)
    if not 0 <= partition_id < len(fed.clients):
        raise ValueError(f"partition-id {partition_id} out of range: the run has {len(fed.clients)} clients")
    return holder_data(fed.data.sequences.subset(fed.clients[partition_id]), cfg, fed.data.num_items)


def holder_data(sequences: Sequences, cfg: Config, num_items: int) -> ClientData:
    """What whoever holds `sequences` trains on and validates with: a client, or the
    centralized baseline holding everyone."""
    return ClientData(training_windows(sequences, cfg.max_len, cfg.stride),
                      window_users(sequences, cfg.max_len, cfg.stride),
                      eval_examples(sequences, "valid", cfg.max_len), num_items)


def client_windows(fed: Federation, cfg: Config) -> list[int]:
    """Each simulated client's number of training windows, counted without cutting them: what
    the server knows of the clients' sizes before any round (SecAgg+'s weight bound, the DP plan)."""
    counts = window_counts(fed.data.sequences, cfg.max_len, cfg.stride)
    return [int(counts[users].sum()) for users in fed.clients]


def client_dp_populations(fed: Federation, cfg: Config) -> list[int]:
    """Each simulated client's number of DP units (`ClientData.dp_population`), without cutting windows."""
    if cfg.dp_unit == "window":
        return client_windows(fed, cfg)
    counts = window_counts(fed.data.sequences, cfg.max_len, cfg.stride)
    return [int((counts[users] > 0).sum()) for users in fed.clients]


def evaluation_users(cfg: Config) -> np.ndarray:
    """The users the server evaluates on: its held-out users, or everyone's leave-one-out targets."""
    fed = federation(cfg)
    return fed.holdout if len(fed.holdout) else np.arange(len(fed.data.sequences))
