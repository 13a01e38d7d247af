"""From raw files (or the synthetic generator) to per-user item sequences and model inputs.

`load_dataset` finds and reads the input, `clean` turns interactions into chronological
sequences with every removal counted, results are cached on disk, and the split helpers build
the chronological leave-one-out examples: for a sequence s, training uses s[:-2], validation
predicts s[-2] from s[:-2] and test predicts s[-1] from s[:-1].
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from common.config import Config
from common.download import fetch_movielens
from common.errors import DataError
from common.loaders import Loaded, read_interactions, read_titles
from common.synthetic import generate

if TYPE_CHECKING:
    import torch

__all__ = ["DataError", "Sequences", "SequenceData", "clean", "load_dataset", "train_part", "eval_examples",
           "training_windows", "window_inputs", "window_targets", "window_counts", "window_users", "item_index",
           "popularity", "stats", "cache_root"]

MIN_SEQUENCE = 3       # leave-one-out needs one training item, a validation and a test target
CACHE_VERSION = 1      # bump when cleaning changes, so old cache entries are not reused
RATINGS_FILES = {"ml-100k": ("u.data",), "ml-1m": ("ratings.dat", "ratings.dat.gz"),
                 "ml-latest-small": ("ratings.csv",), "ml-latest": ("ratings.csv",)}
_TITLE_FILES = {"ml-100k": "u.item", "ml-1m": "movies.dat", "ml-latest": "movies.csv"}


@dataclasses.dataclass(frozen=True)
class Sequences:
    """Users' item sequences, stored once as one flat array: user u's sequence is
    `items[offsets[u]:offsets[u + 1]]`. Cleaning, the disk cache and every split helper use this
    form as it is, so a data set is never copied into one array per user.
    """

    items: np.ndarray  # int64, every user's items in time order, user after user
    offsets: np.ndarray  # int64 (U + 1,), from 0 to len(items)

    @classmethod
    def of(cls, sequences: Iterable[Iterable[int]]) -> Sequences:
        """From one sequence per user (a generator's or a test's lists)."""
        arrays = [np.asarray(s, dtype=np.int64) for s in sequences]
        return cls.from_lengths(np.concatenate(arrays) if arrays else np.zeros(0, np.int64),
                                np.array([len(a) for a in arrays], dtype=np.int64))

    @classmethod
    def from_lengths(cls, items: np.ndarray, lengths: np.ndarray) -> Sequences:
        """From the flat items and each user's number of them."""
        return cls(items.astype(np.int64, copy=False), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, user: int) -> np.ndarray:
        """One user's sequence: a view, not a copy."""
        if not 0 <= user < len(self):
            raise IndexError(f"user {user} out of range for {len(self)} users")
        return self.items[self.offsets[user]:self.offsets[user + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.items[a:b] for a, b in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist(), strict=True))

    def subset(self, users: np.ndarray) -> Sequences:
        """The sequences of `users`, in that order (one gather: a client's or the server's share)."""
        users = np.asarray(users, dtype=np.int64)
        lengths = self.lengths[users]
        # where each output item sits in `items`: its user's start there, plus its place in the output
        shift = np.repeat(self.offsets[:-1][users] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return Sequences.from_lengths(self.items[shift + np.arange(len(shift))], lengths)

    def select(self, keep: np.ndarray) -> Sequences:
        """Only the items where `keep` (bool, one per item) holds; every user stays, maybe shorter."""
        owner = np.repeat(np.arange(len(self)), self.lengths)
        return Sequences.from_lengths(self.items[keep], np.bincount(owner[keep], minlength=len(self)))


@dataclasses.dataclass(frozen=True)
class SequenceData:
    """Cleaned per-user sequences.

    Item ids run 1..num_items (0 is padding); user u is `sequences[u]`. `item_ids[i - 1]` and
    `titles[i - 1]` are the raw id and title ("" when unknown) of item i. `item_groups[i]` is the
    latent group of item i, for synthetic data only (index 0 holds -1).
    """

    sequences: Sequences
    num_items: int
    user_ids: np.ndarray
    item_ids: np.ndarray
    titles: np.ndarray | None
    report: dict
    item_groups: np.ndarray | None = None


# --------------------------------------------------------------------------- loading


def load_dataset(cfg: Config) -> SequenceData:
    """The dataset named by `cfg`, from the disk cache when the inputs and settings are unchanged."""
    if cfg.dataset == "synthetic":
        files: dict[str, Path] = {}
    else:
        files = _input_files(cfg)
    entry = cache_root() / "datasets" / f"{cfg.dataset}-{_cache_key(cfg, files)[:24]}.npz"
    data = _read_cache(entry)
    if data is None:
        data = _synthetic(cfg) if cfg.dataset == "synthetic" else _from_files(cfg, files)
        data = dataclasses.replace(data, report={"dataset": cfg.dataset, **data.report})
        _write_cache(entry, data)
    return data


def cache_root() -> Path:
    """`$FEDREC_CACHE`, else ~/.cache/fedrec: cleaned datasets and downloads live below it."""
    return Path(os.environ.get("FEDREC_CACHE") or Path.home() / ".cache" / "fedrec").expanduser()


def _input_files(cfg: Config) -> dict[str, Path]:
    """The ratings file (key "ratings") and, where the dataset has one, the titles file."""
    if cfg.dataset in RATINGS_FILES:
        return _movielens_files(cfg)
    if not cfg.data_dir:
        raise DataError(f"dataset {cfg.dataset!r} needs --data-dir pointing at the file")
    path = Path(cfg.data_dir).expanduser()
    if path.is_dir():
        raise DataError(f"{path} is a folder: for dataset {cfg.dataset!r} pass the file itself as --data-dir")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return {"ratings": path}


def _movielens_files(cfg: Config) -> dict[str, Path]:
    """MovieLens inputs from --data-dir (the dataset's folder or its ratings file), else downloaded."""
    if not cfg.data_dir:
        folder, ratings = fetch_movielens(cfg.dataset, cache_root() / "downloads"), None
    else:
        given = Path(cfg.data_dir).expanduser()
        if not given.exists():
            raise DataError(f"{given}: data dir not found")
        folder, ratings = (given.parent, given) if given.is_file() else (given, None)
    files = {"ratings": ratings or _find_ratings(cfg.dataset, folder)}
    titles = folder / _TITLE_FILES[_format(cfg.dataset)]
    if titles.is_file():
        files["titles"] = titles
    return files


def _find_ratings(dataset: str, folder: Path) -> Path:
    """The ratings file in `folder`; for ml-1m the partial file (partial/*.dat.gz, as kept in the
    shared data) is accepted when the full one is absent, and the report's source names it."""
    names = RATINGS_FILES[dataset]
    candidates = [folder / name for name in names]
    if dataset == "ml-1m":
        candidates += sorted(folder.glob("partial/*.dat.gz"))
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"{folder}: no {' or '.join(names)} found; pass the {dataset} folder as --data-dir")


def _format(dataset: str) -> str:
    """The loader format of a dataset name."""
    return "ml-latest" if dataset.startswith("ml-latest") else dataset


def _from_files(cfg: Config, files: dict[str, Path]) -> SequenceData:
    loaded = read_interactions(_format(cfg.dataset), files["ratings"], sep=cfg.csv_sep,
                               user_col=cfg.csv_user_col, item_col=cfg.csv_item_col,
                               time_col=cfg.csv_time_col, rating_col=cfg.csv_rating_col)
    data = clean(loaded, min_rating=cfg.min_rating, kcore=cfg.kcore)
    if "titles" not in files:
        return data
    titles = read_titles(_format(cfg.dataset), files["titles"])
    titles = titles[~titles.index.duplicated()]
    return dataclasses.replace(data, titles=titles.reindex(data.item_ids).fillna("").to_numpy(dtype=str))


def _synthetic(cfg: Config) -> SequenceData:
    generated, item_groups = generate(cfg.synthetic_users, cfg.synthetic_items, cfg.synthetic_groups,
                                      cfg.synthetic_min_len, cfg.synthetic_max_len, cfg.seed)
    sequences = Sequences.of(generated)
    interactions = len(sequences.items)
    report = {"source": f"synthetic: {cfg.synthetic_users} users, {cfg.synthetic_items} items, "
                        f"{cfg.synthetic_groups} groups, seed {cfg.seed}",
              "rows_read": interactions, "removed": {}, "malformed_lines": [], "kept": interactions}
    return SequenceData(sequences, cfg.synthetic_items, np.arange(len(sequences)).astype(str),
                        np.arange(1, cfg.synthetic_items + 1).astype(str), None, report, item_groups)


# --------------------------------------------------------------------------- cleaning


def clean(loaded: Loaded, *, min_rating: float, kcore: int) -> SequenceData:
    """Chronological sequences from a loader's output (table of user, item, rating, timestamp).

    Steps, each counted in `report["removed"]` (rows removed): malformed rows (already dropped by
    the loader), exact duplicates (same user, item, rating and timestamp), ratings below
    `min_rating` (when > 0 and the format has ratings), the k-core repeated until stable (every
    user and item keeps >= kcore interactions; 0 disables), then users with fewer than
    MIN_SEQUENCE interactions (and the k-core again if that broke it). Each user's items are
    ordered by time, ties kept in file order. Items are numbered 1..N and users 0..U-1 in order of
    their raw ids (numeric when all ids are numbers).
    """
    df = loaded.frame
    rows_read = len(df) + loaded.malformed
    removed = {"malformed": loaded.malformed}
    unique = ~df.duplicated(["user", "item", "rating", "timestamp"])
    removed["duplicates"] = int((~unique).sum())
    df = df[unique]
    if min_rating > 0 and df["rating"].notna().any():
        liked = df["rating"].to_numpy() >= min_rating
        removed["below_min_rating"] = int((~liked).sum())
        df = df[liked]
    else:
        removed["below_min_rating"] = 0

    users, user_raw = pd.factorize(df["user"])
    items, item_raw = pd.factorize(df["item"])
    keep = np.ones(len(df), dtype=bool)
    removed["kcore"] = removed["short_users"] = 0
    while True:
        rare = _rare(users, keep, kcore) | _rare(items, keep, kcore)
        if rare.any():
            keep &= ~rare
            removed["kcore"] += int(rare.sum())
            continue
        short = _rare(users, keep, MIN_SEQUENCE)
        if not short.any():
            break
        keep &= ~short
        removed["short_users"] += int(short.sum())
    if not keep.any():
        raise DataError(f"no interactions left after cleaning (kcore={kcore}, min_rating={min_rating}); "
                        f"removed: {', '.join(f'{k} {v}' for k, v in removed.items())}")

    user_rank, user_ids = _ranks(users[keep], np.asarray(user_raw, dtype=str))
    item_rank, item_ids = _ranks(items[keep], np.asarray(item_raw, dtype=str))
    user = user_rank[users[keep]]
    order = np.lexsort((np.arange(len(user)), df["timestamp"].to_numpy()[keep], user))
    sequences = Sequences.from_lengths(item_rank[items[keep]][order] + 1, np.bincount(user, minlength=len(user_ids)))
    report = {"source": loaded.source, "rows_read": rows_read, "removed": removed,
              "malformed_lines": list(loaded.malformed_lines), "kept": len(sequences.items)}
    return SequenceData(sequences, len(item_ids), user_ids, item_ids, None, report)


def _rare(codes: np.ndarray, keep: np.ndarray, minimum: int) -> np.ndarray:
    """Kept rows whose code occurs fewer than `minimum` times among the kept rows."""
    counts = np.bincount(codes[keep], minlength=codes.max() + 1 if len(codes) else 0)
    return keep & (counts[codes] < minimum)


def _ranks(codes: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense 0-based rank of each used code in raw-id order, and the used raw ids in that order.

    Raw ids sort as numbers when all are numbers (so "10" follows "9"), else as strings; a fixed
    order makes ids independent of file order.
    """
    used = np.unique(codes)
    ids = raw[used]
    numbers = pd.to_numeric(pd.Series(ids), errors="coerce").to_numpy(dtype=float)
    order = np.lexsort((ids, numbers)) if not np.isnan(numbers).any() else np.argsort(ids, kind="stable")
    rank = np.full(len(raw), -1, dtype=np.int64)
    rank[used[order]] = np.arange(len(used))
    return rank, ids[order]


# --------------------------------------------------------------------------- cache


def _cache_key(cfg: Config, files: dict[str, Path]) -> str:
    """Hash of the input bytes and of every setting that changes the result."""
    settings: dict[str, object] = {"version": CACHE_VERSION, "dataset": cfg.dataset}
    if cfg.dataset == "synthetic":
        settings.update(users=cfg.synthetic_users, items=cfg.synthetic_items, groups=cfg.synthetic_groups,
                        min_len=cfg.synthetic_min_len, max_len=cfg.synthetic_max_len, seed=cfg.seed)
    else:
        settings.update(kcore=cfg.kcore, min_rating=cfg.min_rating)
        for role, path in sorted(files.items()):  # the path too, so that the report names it
            settings[role] = [str(path.resolve()), _file_digest(path)]
    if cfg.dataset == "csv":
        settings.update(sep=cfg.csv_sep, user=cfg.csv_user_col, item=cfg.csv_item_col,
                        time=cfg.csv_time_col, rating=cfg.csv_rating_col)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_cache(entry: Path, data: SequenceData) -> None:
    """Save as npz (the sequences' items and offsets as stored, ids, titles, report as JSON) via a
    temp file and an atomic rename, so a crash never leaves a half-written entry under the final name."""
    arrays = {
        "items": data.sequences.items, "offsets": data.sequences.offsets,
        "num_items": np.array(data.num_items),
        "user_ids": data.user_ids, "item_ids": data.item_ids,
        "report": np.array(json.dumps(data.report)),
    }
    if data.titles is not None:
        arrays["titles"] = data.titles
    if data.item_groups is not None:
        arrays["item_groups"] = data.item_groups
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=entry.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, entry)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError:
        pass  # an unwritable cache only costs a rebuild next time


def _read_cache(entry: Path) -> SequenceData | None:
    """The cached dataset, or None when absent or unreadable (a corrupt entry is just rebuilt)."""
    try:
        with np.load(entry, allow_pickle=False) as z:
            sequences = Sequences(z["items"].astype(np.int64, copy=False), z["offsets"].astype(np.int64, copy=False))
            if (len(sequences) != len(z["user_ids"]) or sequences.offsets[0] != 0
                    or sequences.offsets[-1] != len(sequences.items) or (sequences.lengths < 0).any()):
                return None
            return SequenceData(sequences, int(z["num_items"]), z["user_ids"],
                                z["item_ids"], z["titles"] if "titles" in z else None,
                                json.loads(str(z["report"])), z["item_groups"] if "item_groups" in z else None)
    except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile):
        return None


# --------------------------------------------------------------------------- split and model inputs


def train_part(seq: np.ndarray) -> np.ndarray:
    """The items a model may train on: all but the validation and test targets."""
    return seq[:-2]


def eval_examples(sequences: Sequences, split: Literal["valid", "test"],
                  max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One example per user: (inputs, lengths, targets).

    Validation reads s[:-2] and predicts s[-2]; test reads s[:-1] and predicts s[-1]. `inputs` is
    int64 (U, max_len) holding the last max_len input items left-aligned, right-padded with 0;
    `lengths` counts the real items.
    """
    if split not in ("valid", "test"):
        raise DataError(f"split must be 'valid' or 'test', got {split!r}")
    sizes = sequences.lengths - (2 if split == "valid" else 1)  # input length per user
    if len(sizes) and sizes.min() < 1:
        raise DataError(f"every sequence needs at least {MIN_SEQUENCE} items for leave-one-out")
    lengths = np.minimum(sizes, max_len)
    starts = sequences.offsets[:-1] + sizes - lengths
    return (_gather(sequences.items, starts, lengths, max_len), lengths,
            sequences.items[sequences.offsets[:-1] + sizes])


def training_windows(sequences: Sequences, max_len: int, stride: int | None = None) -> np.ndarray:
    """Training examples: int64 (W, max_len + 1), right-padded with 0.

    One window is up to max_len + 1 consecutive items of one user's training part (`train_part`).
    The model reads window[:-1] (`window_inputs`) and predicts window[1:] (`window_targets`) at
    every position whose target counts. Windows end at the END of the training part and every
    `stride` items before it (default max_len), the oldest starting at the part's first item;
    each window counts only its last `stride` targets (the oldest all of its own), so every
    training item but the first is a target exactly once, and with a stride below max_len it
    sees at least max_len - stride items of history (RecBole's every-prefix training, paid once
    per target at the output layer). A target that does not count is stored negated: the item is
    still read as an input. Windows with fewer than 2 items are dropped; rows are ordered by
    user, then oldest window first. E.g. training part 1..7 with max_len 3 gives [1,2,3,4],
    [4,5,6,7]; with stride 2 it gives [1,2,3,0], [2,-3,4,5], [4,-5,6,7].
    """
    stride = max_len if stride is None else stride
    sizes = _train_sizes(sequences)
    counts = _window_counts(sizes, max_len, stride)
    user = np.repeat(np.arange(len(sizes)), counts)
    oldest_first = np.arange(len(user)) - np.repeat(np.cumsum(counts) - counts, counts)
    ends = sizes[user] - (counts[user] - 1 - oldest_first) * stride
    starts = np.maximum(ends - (max_len + 1), 0)
    windows = _gather(sequences.items, sequences.offsets[user] + starts, ends - starts, max_len + 1)
    counted_from = np.where(oldest_first == 0, 0, ends - stride) - starts  # first counted target's column
    context = (np.arange(max_len + 1)[None, :] < counted_from[:, None])
    context[:, 0] = False  # the first column is never a target
    return np.where(context, -windows, windows)


def window_inputs(windows: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """What the model reads of `training_windows`' rows: (W, L+1) -> (W, L) item ids."""
    return abs(windows[:, :-1])


def window_targets(windows: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """The targets that count, 0 elsewhere (padding, and the history a later stride re-reads)."""
    targets = windows[:, 1:]
    return targets * (targets > 0)


def item_index(data: SequenceData, raw_id: str) -> int:
    """The model's id (1..N) of the item the data set calls `raw_id`."""
    matches = np.flatnonzero(data.item_ids.astype(str) == str(raw_id))
    if not len(matches):
        raise DataError(f"item {raw_id!r} is not an item of the data set")
    return int(matches[0]) + 1


def window_users(sequences: Sequences, max_len: int, stride: int | None = None) -> np.ndarray:
    """The user of each of `training_windows`' rows, numbered 0..U-1 over the users that have a
    window: the DP unit of user-level DP-SGD."""
    counts = window_counts(sequences, max_len, stride)
    return np.repeat(np.cumsum(counts > 0) - 1, counts)


def window_counts(sequences: Sequences, max_len: int, stride: int | None = None) -> np.ndarray:
    """How many windows `training_windows` cuts from each user, without cutting them."""
    return _window_counts(_train_sizes(sequences), max_len, max_len if stride is None else stride)


def _window_counts(sizes: np.ndarray, max_len: int, stride: int) -> np.ndarray:
    # windows end at n, n - stride, ... down to the first that starts at the part's first item
    beyond = np.maximum(sizes - max_len - 1, 0)
    return np.where(sizes >= 2, 1 + (beyond + stride - 1) // stride, 0)


def popularity(sequences: Sequences, num_items: int) -> np.ndarray:
    """Interaction count of every item over the training parts only (index 0 = padding = 0)."""
    position = np.arange(len(sequences.items)) - np.repeat(sequences.offsets[:-1], sequences.lengths)
    in_train_part = position < np.repeat(_train_sizes(sequences), sequences.lengths)
    return np.bincount(sequences.items[in_train_part], minlength=num_items + 1)


def _train_sizes(sequences: Sequences) -> np.ndarray:
    """len(train_part(s)) of every user's s: each training part starts where its sequence does."""
    return np.maximum(sequences.lengths - 2, 0)


def _gather(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """Rows flat[start : start + length], left-aligned in a zero matrix of the given width."""
    columns = np.arange(width)
    inside = columns[None, :] < lengths[:, None]
    index = np.where(inside, starts[:, None] + columns[None, :], 0)
    return np.where(inside, flat[index] if len(flat) else 0, 0).astype(np.int64)


# --------------------------------------------------------------------------- statistics


def stats(data: SequenceData) -> dict:
    """Size, density and sequence-length distribution, with the cleaning report (`fedrec data stats`)."""
    lengths = data.sequences.lengths
    users, interactions = len(lengths), int(lengths.sum())
    quantiles = {f"{int(q * 100)}%": float(np.percentile(lengths, q * 100)) for q in (0.25, 0.5, 0.75, 0.9)}
    return {
        "dataset": data.report.get("dataset", ""),
        "users": users, "items": data.num_items, "interactions": interactions,
        "density": interactions / (users * data.num_items) if users and data.num_items else 0.0,
        "length": {"min": int(lengths.min()), **quantiles, "max": int(lengths.max()),
                   "mean": float(lengths.mean())},
        "report": data.report,
    }
