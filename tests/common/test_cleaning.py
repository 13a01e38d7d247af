"""Each cleaning step with exact counts, ordering and id remapping."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from common.dataset import DataError, clean
from common.loaders import Loaded


def loaded(rows: list[tuple], **kwargs) -> Loaded:
    """A loader result from (user, item, rating, timestamp) rows; lines follow the row order."""
    frame = pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"]).astype(
        {"user": str, "item": str, "rating": float, "timestamp": float})
    frame["line"] = np.arange(1, len(frame) + 1)
    return Loaded(frame, **kwargs)


def as_raw(data) -> dict[str, list[str]]:
    """Sequences as raw user id -> raw item ids, independent of the numbering."""
    return {data.user_ids[u]: [data.item_ids[i - 1] for i in seq] for u, seq in enumerate(data.sequences)}


def test_duplicates_and_min_rating_counts():
    data = clean(loaded([("u", "a", 5, 1), ("u", "a", 5, 1), ("u", "b", 2, 2), ("u", "c", 4, 3),
                         ("u", "d", 4, 4), ("u", "a", 4, 1)],
                        malformed=2, malformed_lines=(7, 9), source="f.csv"),
                 min_rating=4, kcore=0)
    assert data.report == {
        "source": "f.csv", "rows_read": 8,
        "removed": {"malformed": 2, "duplicates": 1, "below_min_rating": 1, "kcore": 0, "short_users": 0},
        "malformed_lines": [7, 9], "kept": 4,
    }
    assert as_raw(data) == {"u": ["a", "a", "c", "d"]}  # same item at the same time but another rating stays


def test_min_rating_ignored_without_ratings():
    data = clean(loaded([("u", "a", np.nan, 0), ("u", "b", np.nan, 1), ("u", "c", np.nan, 2)]),
                 min_rating=4, kcore=0)
    assert data.report["removed"]["below_min_rating"] == 0
    assert data.report["kept"] == 3


def test_kcore_iterates_until_stable():
    # a, b, c x i1..i3 is a stable 3-core. Round 1 drops d (2 items) with i5; then i4 (left with
    # e and a) falls below 3; then e (left with i1, i2) falls below 3.
    core = [(u, i, 1, 0) for u in "abc" for i in ("i1", "i2", "i3")]
    extra = [("a", "i4", 1, 1), ("d", "i4", 1, 0), ("d", "i5", 1, 1),
             ("e", "i4", 1, 0), ("e", "i1", 1, 1), ("e", "i2", 1, 2)]
    data = clean(loaded(core + extra), min_rating=0, kcore=3)
    assert data.report["removed"] == {"malformed": 0, "duplicates": 0, "below_min_rating": 0,
                                      "kcore": 6, "short_users": 0}
    assert as_raw(data) == {u: ["i1", "i2", "i3"] for u in "abc"}


def test_short_users_removal_feeds_back_into_kcore():
    # s passes the 2-core but has only 2 items; removing it leaves item p with one user (a).
    rows = [(u, i, 1, t) for u in "ab" for t, i in enumerate(("i1", "i2", "i3"))]
    rows += [("s", "p", 1, 0), ("s", "i1", 1, 1), ("a", "p", 1, 9)]
    data = clean(loaded(rows), min_rating=0, kcore=2)
    assert data.report["removed"]["short_users"] == 2
    assert data.report["removed"]["kcore"] == 1
    assert as_raw(data) == {"a": ["i1", "i2", "i3"], "b": ["i1", "i2", "i3"]}


def test_short_users_dropped_without_kcore():
    data = clean(loaded([("u", "a", 1, 0), ("u", "b", 1, 1), ("v", "a", 1, 0), ("v", "b", 1, 1),
                         ("v", "c", 1, 2)]), min_rating=0, kcore=0)
    assert data.report["removed"]["short_users"] == 2
    assert as_raw(data) == {"v": ["a", "b", "c"]}


def test_chronological_with_stable_tie_break():
    data = clean(loaded([("u", "a", 1, 5), ("u", "b", 1, 1), ("u", "c", 1, 5), ("u", "d", 1, 3),
                         ("u", "e", 1, 5)]), min_rating=0, kcore=0)
    assert as_raw(data) == {"u": ["b", "d", "a", "c", "e"]}


def test_numeric_ids_are_numbered_in_numeric_order():
    rows = [("10", "100", 1, 0), ("10", "9", 1, 1), ("10", "10", 1, 2),
            ("9", "10", 1, 0), ("9", "9", 1, 1), ("9", "100", 1, 2)]
    data = clean(loaded(rows), min_rating=0, kcore=0)
    assert list(data.item_ids) == ["9", "10", "100"]
    assert list(data.user_ids) == ["9", "10"]
    assert data.num_items == 3
    assert [s.tolist() for s in data.sequences] == [[2, 1, 3], [3, 1, 2]]
    assert all(s.dtype == np.int64 for s in data.sequences)


def test_string_ids_are_numbered_lexicographically():
    data = clean(loaded([("u", "b", 1, 0), ("u", "10", 1, 1), ("u", "a", 1, 2)]), min_rating=0, kcore=0)
    assert list(data.item_ids) == ["10", "a", "b"]
    assert data.sequences[0].tolist() == [3, 1, 2]


def test_numbering_does_not_depend_on_file_order():
    rows = [("u", "b", 1, 0), ("v", "a", 1, 0), ("u", "a", 1, 1), ("v", "c", 1, 1), ("u", "c", 1, 2),
            ("v", "b", 1, 2)]
    first, second = (clean(loaded(r), min_rating=0, kcore=0) for r in (rows, rows[::-1]))
    assert [s.tolist() for s in first.sequences] == [s.tolist() for s in second.sequences]


def test_nothing_left_is_an_error():
    with pytest.raises(DataError, match=r"no interactions left after cleaning \(kcore=5"):
        clean(loaded([("u", "a", 1, 0), ("u", "b", 1, 1), ("u", "c", 1, 2)]), min_rating=0, kcore=5)
