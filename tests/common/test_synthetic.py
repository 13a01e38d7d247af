"""The synthetic generator: determinism, shapes, and a planted signal that beats popularity."""

from __future__ import annotations

import numpy as np
import pytest

from common.dataset import DataError, Sequences, eval_examples, popularity, train_part
from common.synthetic import generate


def test_shapes_ranges_and_groups():
    sequences, groups = generate(50, 30, 5, 4, 9, seed=1)
    assert len(sequences) == 50
    assert all(s.dtype == np.int64 and 4 <= len(s) <= 9 for s in sequences)
    flat = np.concatenate(sequences)
    assert flat.min() >= 1 and flat.max() <= 30
    assert groups.shape == (31,) and groups[0] == -1
    assert sorted(np.bincount(groups[1:]).tolist()) == [6] * 5


def test_same_seed_same_output_other_seed_differs():
    first, second, other = (generate(40, 30, 3, 5, 10, seed) for seed in (7, 7, 8))
    assert all(np.array_equal(a, b) for a, b in zip(first[0], second[0], strict=True))
    np.testing.assert_array_equal(first[1], second[1])
    assert any(len(a) != len(b) or not np.array_equal(a, b) for a, b in zip(first[0], other[0], strict=True))


def test_bad_arguments():
    with pytest.raises(DataError):
        generate(10, 5, 6, 3, 5, seed=0)


def test_previous_item_beats_popularity():
    """The bigram baseline (most frequent successors of the last input item, from the training
    parts) must clearly beat popularity on the test targets, yet not be perfect."""
    generated, _ = generate(600, 400, 20, 20, 60, seed=0)
    sequences = Sequences.of(generated)
    counts = popularity(sequences, 400)
    top10 = np.argsort(-counts, kind="stable")[:10]
    inputs, lengths, targets = eval_examples(sequences, "test", 60)
    last = inputs[np.arange(len(inputs)), lengths - 1]
    successors = np.zeros((401, 401))
    for s in sequences:
        part = train_part(s)
        np.add.at(successors, (part[:-1], part[1:]), 1)
    scores = successors[last] + counts / (counts.max() + 1)  # popularity breaks ties
    scores[:, 0] = -1
    bigram_top10 = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    popularity_hit = np.isin(targets, top10).mean()
    bigram_hit = (bigram_top10 == targets[:, None]).any(axis=1).mean()
    assert bigram_hit >= 2 * popularity_hit
    assert bigram_hit < 0.9
