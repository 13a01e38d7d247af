"""load_dataset (inputs, titles, cache), the leave-one-out split, training windows and stats."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

import common.dataset as dataset
from common.config import Config
from common.dataset import (
    DataError,
    SequenceData,
    Sequences,
    eval_examples,
    load_dataset,
    popularity,
    stats,
    train_part,
    training_windows,
    window_counts,
    window_inputs,
    window_targets,
    window_users,
)

U_DATA = "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in [
    (2, 20, 5, 300), (1, 10, 4, 100), (1, 30, 3, 300), (2, 10, 1, 100), (1, 20, 5, 200), (2, 30, 4, 200),
])


def config(dataset_name: str, data_dir: Path | str = "", **settings) -> Config:
    return Config.from_run_config({"dataset": dataset_name, "data-dir": str(data_dir), **settings})


def sequences(data: SequenceData) -> list[list[int]]:
    return [s.tolist() for s in data.sequences]


# --------------------------------------------------------------------------- load_dataset


def test_ml100k_folder_with_titles(write, tmp_path):
    write("ml-100k/u.data", U_DATA)
    write("ml-100k/u.item", "10|Ten (1990)|x\n20|Vingt (1991)|x\n", encoding="latin-1")
    data = load_dataset(config("ml-100k", tmp_path / "ml-100k"))
    assert sequences(data) == [[1, 2, 3], [1, 3, 2]]
    assert list(data.item_ids) == ["10", "20", "30"] and list(data.user_ids) == ["1", "2"]
    assert list(data.titles) == ["Ten (1990)", "Vingt (1991)", ""]
    assert data.item_groups is None
    assert data.report["source"] == str(tmp_path / "ml-100k" / "u.data")
    assert data.report["dataset"] == "ml-100k" and stats(data)["dataset"] == "ml-100k"


def test_ml100k_min_rating(write, tmp_path):
    write("ml-100k/u.data", U_DATA + "1\t40\t5\t400\n")
    data = load_dataset(config("ml-100k", tmp_path / "ml-100k", **{"min-rating": 4}))
    assert data.report["removed"]["below_min_rating"] == 2
    assert data.report["removed"]["short_users"] == 2  # user 2 is left with 2 items
    assert list(data.user_ids) == ["1"]


def test_ml1m_falls_back_to_partial_file(write, tmp_path):
    text = U_DATA.replace("\t", "::")
    write("ml-1m/partial/ratings_users_1-2.dat.gz", gzip.compress(text.encode()))
    write("ml-1m/movies.dat", "10::Ten (1990)::Drama\n", encoding="latin-1")
    data = load_dataset(config("ml-1m", tmp_path / "ml-1m"))
    assert data.report["source"].endswith("partial/ratings_users_1-2.dat.gz")
    assert sequences(data) == [[1, 2, 3], [1, 3, 2]]
    assert list(data.titles) == ["Ten (1990)", "", ""]


def test_ml1m_prefers_full_ratings_file(write, tmp_path):
    write("ml-1m/partial/ratings_users_1-2.dat.gz", gzip.compress(b"9::9::9::9\n"))
    write("ml-1m/ratings.dat", U_DATA.replace("\t", "::"))
    assert load_dataset(config("ml-1m", tmp_path / "ml-1m")).report["source"].endswith("ml-1m/ratings.dat")


def test_ml_latest_small_file_path_and_titles(write, tmp_path):
    ratings = write("ml/ratings.csv", "userId,movieId,rating,timestamp\r\n"
                    + U_DATA.replace("\t", ",").replace("\n", "\r\n"))
    write("ml/movies.csv", 'movieId,title,genres\r\n30,"Thirty, The (1930)",Drama\r\n')
    data = load_dataset(config("ml-latest-small", ratings))
    assert sequences(data) == [[1, 2, 3], [1, 3, 2]]
    assert list(data.titles) == ["", "", "Thirty, The (1930)"]


def test_csv_dataset(write):
    path = write("log.csv", "who,what,when\nb,x,2\na,y,1\nb,y,1\na,x,2\na,z,3\nb,z,3\n")
    data = load_dataset(config("csv", path, **{"csv-user-col": "who", "csv-item-col": "what",
                                               "csv-time-col": "when"}))
    assert list(data.user_ids) == ["a", "b"] and list(data.item_ids) == ["x", "y", "z"]
    assert sequences(data) == [[2, 1, 3], [2, 1, 3]]
    assert data.titles is None


def test_seq_and_inter_datasets(write):
    seq = load_dataset(config("seq", write("beauty.txt", "1 1 2 3\n2 3 2 1 4\n")))
    assert sequences(seq) == [[1, 2, 3], [3, 2, 1, 4]]
    inter = load_dataset(config("inter", write("inter.txt", "1 5\n2 6\n1 6\n1 7\n2 5\n2 7\n")))
    assert sequences(inter) == [[1, 2, 3], [2, 1, 3]]


def test_file_datasets_need_the_file(tmp_path):
    with pytest.raises(DataError, match="needs --data-dir pointing at the file"):
        load_dataset(config("seq"))
    with pytest.raises(DataError, match="is a folder: for dataset 'inter' pass the file itself"):
        load_dataset(config("inter", tmp_path))
    with pytest.raises(DataError, match="nope.txt: file not found"):
        load_dataset(config("csv", tmp_path / "nope.txt"))


def test_movielens_folder_errors(tmp_path):
    with pytest.raises(DataError, match="data dir not found"):
        load_dataset(config("ml-100k", tmp_path / "missing"))
    with pytest.raises(DataError, match="no ratings.dat or ratings.dat.gz found"):
        load_dataset(config("ml-1m", tmp_path))


def test_synthetic_dataset_and_cache_roundtrip():
    cfg = config("synthetic", **{"synthetic-users": 30, "synthetic-items": 40, "synthetic-groups": 4})
    first, second = load_dataset(cfg), load_dataset(cfg)
    assert len(first.sequences) == 30 and first.num_items == 40
    assert first.report["source"] == "synthetic: 30 users, 40 items, 4 groups, seed 0"
    assert sequences(first) == sequences(second)
    np.testing.assert_array_equal(first.item_groups, second.item_groups)
    assert list(second.item_ids[:3]) == ["1", "2", "3"]


# --------------------------------------------------------------------------- cache


def test_cache_hit_does_not_read_the_file_again(write, tmp_path, monkeypatch, isolated_cache):
    write("ml-100k/u.data", U_DATA)
    write("ml-100k/u.item", "10|Ten (1990)|x\n", encoding="latin-1")
    cfg = config("ml-100k", tmp_path / "ml-100k")
    first = load_dataset(cfg)
    assert len(list((isolated_cache / "datasets").glob("*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(dataset, "read_interactions", fail)
    second = load_dataset(cfg)
    assert sequences(second) == sequences(first)
    assert second.report == first.report
    assert list(second.titles) == list(first.titles)
    assert list(second.user_ids) == list(first.user_ids) and second.num_items == first.num_items


def test_cache_invalidated_by_file_change_and_settings(write, tmp_path):
    path = write("ml-100k/u.data", U_DATA)
    cfg = config("ml-100k", tmp_path / "ml-100k")
    assert load_dataset(cfg).report["kept"] == 6
    path.write_text(U_DATA + "1\t40\t5\t400\n")
    assert load_dataset(cfg).report["kept"] == 7
    assert load_dataset(config("ml-100k", tmp_path / "ml-100k", kcore=2)).report["kept"] == 6


def test_corrupt_cache_entry_is_rebuilt(write, isolated_cache):
    cfg = config("seq", write("seq.txt", "1 1 2 3\n"))
    expected = sequences(load_dataset(cfg))
    [entry] = (isolated_cache / "datasets").glob("*.npz")
    entry.write_bytes(b"not a zip")
    assert sequences(load_dataset(cfg)) == expected
    assert entry.read_bytes()[:2] == b"PK"


# --------------------------------------------------------------------------- split and model inputs


def test_leave_one_out_split():
    seqs = [np.array([1, 2, 3, 4, 5]), np.array([7, 8, 9])]
    assert train_part(seqs[0]).tolist() == [1, 2, 3]
    inputs, lengths, targets = eval_examples(Sequences.of(seqs), "valid", 2)
    assert inputs.tolist() == [[2, 3], [7, 0]] and lengths.tolist() == [2, 1] and targets.tolist() == [4, 8]
    inputs, lengths, targets = eval_examples(Sequences.of(seqs), "test", 3)
    assert inputs.tolist() == [[2, 3, 4], [7, 8, 0]] and lengths.tolist() == [3, 2] and targets.tolist() == [5, 9]
    assert inputs.dtype == lengths.dtype == targets.dtype == np.int64


def test_eval_examples_errors():
    with pytest.raises(DataError, match="split must be"):
        eval_examples(Sequences.of([[1, 2, 3]]), "train", 5)
    with pytest.raises(DataError, match="at least 3 items"):
        eval_examples(Sequences.of([[1, 2]]), "valid", 5)


def test_training_windows_exact():
    # training parts: [1..7], [1..8], [5, 6], [9]
    seqs = [np.arange(1, 10), np.arange(1, 11), np.array([5, 6, 0, 0]), np.array([9, 1, 2])]
    windows = training_windows(Sequences.of(seqs), 3)
    assert windows.dtype == np.int64
    assert windows.tolist() == [
        [1, 2, 3, 4], [4, 5, 6, 7],
        [1, 2, 0, 0], [2, 3, 4, 5], [5, 6, 7, 8],
        [5, 6, 0, 0],
    ]


def test_training_windows_predict_every_item_but_the_first_once():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 50, size=n) for n in rng.integers(3, 40, size=30)]
    for max_len in (1, 4, 10, 50):
        windows = training_windows(Sequences.of(seqs), max_len)
        assert windows.shape[1] == max_len + 1
        assert ((windows != 0).sum(axis=1) >= 2).all()
        targets = windows[:, 1:][windows[:, 1:] != 0]
        expected = np.concatenate([train_part(s)[1:] for s in seqs])
        assert sorted(targets.tolist()) == sorted(expected.tolist())


def test_strided_windows_exact():
    windows = training_windows(Sequences.of([np.arange(1, 10)]), 3, stride=2)  # training part 1..7
    assert windows.tolist() == [[1, 2, 3, 0], [2, -3, 4, 5], [4, -5, 6, 7]]
    assert window_inputs(windows).tolist() == [[1, 2, 3], [2, 3, 4], [4, 5, 6]]
    assert window_targets(windows).tolist() == [[2, 3, 0], [0, 4, 5], [0, 6, 7]]


@pytest.mark.parametrize("max_len,stride", [(1, 1), (4, 1), (4, 3), (10, 3), (10, 10), (50, 7)])
def test_strided_windows_count_every_target_once_with_its_history(max_len, stride):
    """Each training item but the first is a counted target exactly once, read after every
    item before it up to max_len - stride of them (all of them near the part's start)."""
    rng = np.random.default_rng(stride)
    seqs = [rng.permutation(200)[:n] + 1 for n in rng.integers(4, 80, size=30)]  # distinct items; each has a window
    sequences = Sequences.of(seqs)
    windows = training_windows(sequences, max_len, stride)
    users = window_users(sequences, max_len, stride)
    assert len(windows) == len(users) == window_counts(sequences, max_len, stride).sum()
    assert ((windows != 0).sum(axis=1) >= 2).all()
    for user, seq in enumerate(seqs):
        part = train_part(seq).tolist()
        seen = []  # (position in the training part, history length) of every counted target
        own = windows[users == user]
        for window in own:
            inputs, targets = window_inputs(window[None])[0], window_targets(window[None])[0]
            start = part.index(inputs[0])
            real = int((window != 0).sum())
            assert inputs[:real - 1].tolist() == part[start:start + real - 1]
            seen += [(start + j + 1, j + 1) for j in np.flatnonzero(targets)]
        assert sorted(p for p, _ in seen) == list(range(1, len(part)))
        assert all(h >= min(p, max_len - stride + 1) for p, h in seen)


def test_strided_windows_at_max_len_are_the_non_overlapping_ones():
    sequences = Sequences.of([np.arange(1, n) for n in range(3, 40)])
    assert np.array_equal(training_windows(sequences, 5, 5), training_windows(sequences, 5))


def test_popularity_counts_training_parts_only():
    counts = popularity(Sequences.of([[1, 2, 1, 3, 3], [2, 3, 1]]), 4)
    assert counts.tolist() == [0, 2, 2, 0, 0]


def _per_user_windows(seq: np.ndarray, max_len: int) -> list[list[int]]:
    """The straightforward reading of `training_windows`' docstring, one user at a time."""
    part, windows = train_part(seq).tolist(), []
    end = len(part)
    while end >= 2:
        windows.insert(0, part[max(end - max_len - 1, 0):end])
        end -= max_len
    return [w + [0] * (max_len + 1 - len(w)) for w in windows]


@pytest.mark.parametrize("max_len", [1, 2, 5, 50])
def test_flat_sequences_give_what_the_per_user_computation_gives(max_len):
    rng = np.random.default_rng(max_len)
    lists = [rng.integers(1, 30, size=n) for n in rng.integers(3, 25, size=40)]
    flat = Sequences.of(lists)
    assert [s.tolist() for s in flat] == [s.tolist() for s in lists] == [flat[u].tolist() for u in range(40)]
    assert training_windows(flat, max_len).tolist() == [w for s in lists for w in _per_user_windows(s, max_len)]
    assert window_counts(flat, max_len).tolist() == [len(_per_user_windows(s, max_len)) for s in lists]
    for split, cut in (("valid", 2), ("test", 1)):
        inputs, lengths, targets = eval_examples(flat, split, max_len)
        history = [s[:-cut][-max_len:].tolist() for s in lists]
        assert inputs.tolist() == [h + [0] * (max_len - len(h)) for h in history]
        assert lengths.tolist() == [len(h) for h in history]
        assert targets.tolist() == [s[-cut] for s in lists]
    expected = np.bincount(np.concatenate([train_part(s) for s in lists]), minlength=31)
    assert popularity(flat, 30).tolist() == expected.tolist()
    users = rng.permutation(40)[:15]
    assert [s.tolist() for s in flat.subset(users)] == [lists[u].tolist() for u in users]
    assert [s.tolist() for s in flat.select(flat.items % 2 == 0)] == [s[s % 2 == 0].tolist() for s in lists]
    assert len(flat.subset(np.zeros(0, np.int64))) == 0


def test_stats():
    data = SequenceData(Sequences.of([np.arange(1, n + 1) for n in (3, 4, 5, 8)]), 10, np.array(list("abcd")),
                        np.arange(1, 11).astype(str), None, {"source": "x"})
    result = stats(data)
    assert (result["users"], result["items"], result["interactions"]) == (4, 10, 20)
    assert result["density"] == pytest.approx(0.5)
    assert result["length"] == pytest.approx({"min": 3, "25%": 3.75, "50%": 4.5, "75%": 5.75, "90%": 7.1, "max": 8,
                                              "mean": 5.0})
    assert result["report"] == {"source": "x"}


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_ml100k(shared_data):
    data = load_dataset(config("ml-100k", shared_data("ml-100k"), kcore=0))
    summary = stats(data)
    assert (summary["users"], summary["items"], summary["interactions"]) == (943, 1682, 100000)
    assert data.titles[0] == "Toy Story (1995)"


@pytest.mark.slow
def test_real_beauty(shared_data):
    data = load_dataset(config("seq", shared_data("seqrec/s3rec/Beauty.txt"), kcore=0))
    summary = stats(data)
    assert (summary["users"], summary["items"], summary["interactions"]) == (22363, 12101, 198502)
