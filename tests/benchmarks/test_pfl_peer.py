"""The pfl peer benchmark: its own window cutting matches fedrec's, and (where the pfl venv was
built) a tiny synthetic run goes end to end. pfl itself is never installed by the tests."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from benchmarks import pfl_peer
from common.dataset import Sequences, training_windows, window_counts

ROOT = Path(__file__).resolve().parents[2]


def test_read_seq_numbers_items_by_first_appearance_and_drops_short_users():
    sequences, num_items = pfl_peer.read_seq(["u1 a b c d", "", "u2 x y", "u3 b e a", "u1 f"])
    assert num_items == 6  # u2's x and y go with u2, who has fewer than 3 items
    assert [s.tolist() for s in sequences] == [[1, 2, 3, 4, 5], [2, 6, 1]]


def test_cut_windows_from_the_end_sharing_one_item():
    assert pfl_peer.cut_windows(np.arange(1, 8), 3).tolist() == [[1, 2, 3, 4], [4, 5, 6, 7]]
    assert pfl_peer.cut_windows(np.arange(1, 9), 3).tolist() == [[1, 2, 0, 0], [2, 3, 4, 5], [5, 6, 7, 8]]
    assert pfl_peer.cut_windows(np.array([7]), 3).shape == (0, 4)


@pytest.mark.parametrize("max_len", [1, 3, 50])
def test_client_windows_equal_fedrecs_training_windows(max_len):
    rng = np.random.default_rng(max_len)
    sequences = [rng.integers(1, 40, size=int(rng.integers(3, 130))) for _ in range(60)]
    ours = pfl_peer.client_windows(sequences, max_len)
    theirs = training_windows(Sequences.of(sequences), max_len)
    assert np.array_equal(np.concatenate(ours), theirs)
    assert [len(w) for w in ours] == [c for c in window_counts(Sequences.of(sequences), max_len) if c]


def test_beauty_windows_match_fedrecs_up_to_item_relabelling(shared_data):
    path = shared_data("seqrec/s3rec/Beauty.txt")
    with path.open() as f:
        sequences, num_items = pfl_peer.read_seq(f)
    ours = pfl_peer.client_windows(sequences, 50)
    theirs, their_items, reader = pfl_peer.load_clients(str(path), 50, synthetic=False)
    assert reader == "common.dataset.training_windows"
    assert (len(ours), num_items) == (len(theirs), their_items)
    mine, fedrec = np.concatenate(ours).ravel(), np.concatenate(theirs).ravel()
    pairs = set(zip(mine.tolist(), fedrec.tolist(), strict=True))  # one item id on each side for every item
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})


@pytest.mark.skipif(not pfl_peer.venv_python().exists(), reason="the pfl venv (.bench-pfl) is not built")
def test_worker_runs_a_tiny_synthetic_simulation_in_the_pfl_venv():
    done = subprocess.run([str(pfl_peer.venv_python()), str(ROOT / "benchmarks" / "pfl_peer.py"), "--worker",
                           "--synthetic", "--cohort", "3", "--rounds", "1", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["pfl_version"] == "0.6.0" and result["cohort"] == 3
    assert len(result["round_seconds"]) == 2 and result["pfl_seconds_per_round"] > 0
    assert "GaussianMechanism" in result["mechanism"]
