"""Ranking metrics against values computed by hand on tiny score matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from common.metrics import (
    RankingAccumulator,
    evaluate_model,
    evaluate_popularity,
    gini,
    head_items,
    popularity_scores,
    top_k_items,
)

N = 30


def ranked_by_id(batch: int, num_items: int = N) -> torch.Tensor:
    """Scores under which item i has rank i (item 1 best), padding scored highest of all."""
    row = torch.cat([torch.tensor([1000.0]), torch.arange(num_items, 0, -1, dtype=torch.float32)])
    return row.repeat(batch, 1)


def metrics_for(scores, targets, ks=(5, 10, 20), history=None, mask_history=False, num_items=N):
    accumulator = RankingAccumulator(num_items, ks, mask_history)
    accumulator.add(scores, torch.tensor(targets), history)
    return accumulator.result()


# Targets at ranks 1, 3, 11 and 25 among N = 30 items.
RANKS = [1, 3, 11, 25]


@pytest.fixture
def ranked() -> dict[str, float]:
    return metrics_for(ranked_by_id(4), RANKS, ks=(5, 10, 20, 25))


def test_hit_ratio(ranked):
    assert ranked["hr@5"] == 2 / 4
    assert ranked["hr@10"] == 2 / 4
    assert ranked["hr@20"] == 3 / 4
    assert ranked["hr@25"] == 4 / 4
    assert ranked["users"] == 4


def test_ndcg(ranked):
    assert ranked["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert ranked["ndcg@10"] == pytest.approx(0.375)
    assert ranked["ndcg@20"] == pytest.approx((1 + 0.5 + 1 / math.log2(12)) / 4)
    assert ranked["ndcg@25"] == pytest.approx((1 + 0.5 + 1 / math.log2(12) + 1 / math.log2(26)) / 4)


def test_mrr(ranked):
    assert ranked["mrr@10"] == pytest.approx((1 + 1 / 3) / 4)
    assert ranked["mrr@20"] == pytest.approx((1 + 1 / 3 + 1 / 11) / 4)
    assert ranked["mrr@25"] == pytest.approx((1 + 1 / 3 + 1 / 11 + 1 / 25) / 4)


def test_precision_recall_f1(ranked):
    assert ranked["precision@10"] == pytest.approx(0.5 / 10)
    assert ranked["recall@10"] == 0.5
    # One hit: P = 1/10, R = 1, F1 = 2PR / (P + R) = 2/11; averaged with a miss (F1 0) and so on.
    assert ranked["f1@10"] == pytest.approx((2 / 11 + 2 / 11 + 0 + 0) / 4)
    assert ranked["f1@20"] == pytest.approx(3 * (2 * (1 / 20) / (1 / 20 + 1)) / 4)


def test_padding_is_never_recommended(ranked):
    # Padding scored 1000 in every row, yet the target item 1 is still rank 1 and the
    # top-10 lists are items 1..10 only.
    assert ranked["mrr@5"] == pytest.approx((1 + 1 / 3) / 4)
    assert ranked["coverage@10"] == pytest.approx(10 / N)


def test_ties_rank_lower_ids_first():
    # Items 2, 3, 4 tie on score 2; item 4 follows 2 and 3, item 1 (score 1) follows all three.
    scores = torch.tensor([[5.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    result = metrics_for(scores, [4], ks=(1, 2, 3), num_items=5)
    assert (result["hr@2"], result["hr@3"]) == (0.0, 1.0)
    assert result["mrr@3"] == pytest.approx(1 / 3)
    assert result["coverage@1"] == pytest.approx(1 / 5)  # the list is [2], not [3] or [4]

    all_equal = metrics_for(torch.zeros(3, 6), [1, 3, 5], ks=(1, 3), num_items=5)
    assert all_equal["hr@1"] == pytest.approx(1 / 3)
    assert all_equal["hr@3"] == pytest.approx(2 / 3)


def test_ranks_agree_with_the_top_k_lists():
    """Hit by closed-form rank <=> target in the stable-sorted top-K list, on heavy ties."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 13), generator=generator).float()
    targets = torch.randint(1, 13, (50,), generator=generator)
    masked = scores.clone()
    masked[:, 0] = float("-inf")
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    for k in (1, 2, 5, 12):
        expected = (order[:, :k] == targets.unsqueeze(1)).any(dim=1).float().mean().item()
        assert metrics_for(scores, targets.tolist(), ks=(k,), num_items=12)[f"hr@{k}"] == (
            pytest.approx(expected)
        )


def test_top_k_items_is_the_stable_sort():
    generator = torch.Generator().manual_seed(3)
    for columns in (1, 2, 7, 40):
        scores = torch.randint(0, 4, (20, columns), generator=generator).float()
        scores[scores == 0] = float("-inf")  # masked items tie at -inf too
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        for k in (1, 3, 10, 50):
            assert torch.equal(top_k_items(scores, k), order[:, :k])


def test_history_masking():
    scores = ranked_by_id(1, num_items=6)
    history = torch.tensor([[1, 2, 0]])
    assert metrics_for(scores, [3], (1,), history, num_items=6)["hr@1"] == 0.0  # off by default
    assert metrics_for(scores, [3], (1,), history, mask_history=True, num_items=6)["hr@1"] == 1.0


def test_target_in_history_is_a_miss_at_every_k():
    scores = ranked_by_id(1, num_items=3)
    result = metrics_for(scores, [3], (1, 3, 10), torch.tensor([[3, 0]]), True, num_items=3)
    assert result["hr@10"] == result["ndcg@10"] == result["mrr@10"] == 0.0
    assert result["coverage@10"] == pytest.approx(2 / 3)  # masked item 3 is not recommended


def test_masking_needs_history():
    with pytest.raises(ValueError, match="history"):
        metrics_for(ranked_by_id(1), [1], mask_history=True)


def test_coverage_counts_distinct_recommended_items():
    scores = torch.tensor(
        [
            [0.0, 3.0, 2.0, 1.0, 0.0, 0.0],  # top-2 [1, 2]
            [0.0, 0.0, 1.0, 3.0, 0.0, 0.0],  # top-2 [3, 2]
        ]
    )
    result = metrics_for(scores, [1, 1], ks=(1, 2, 5), num_items=5)
    assert result["coverage@1"] == pytest.approx(2 / 5)
    assert result["coverage@2"] == pytest.approx(3 / 5)
    assert result["coverage@5"] == pytest.approx(5 / 5)

    # Masked (-inf) items fill the tail of a short list but are not recommendations.
    masked = metrics_for(scores[:1], [3], (5,), torch.tensor([[1, 2]]), True, num_items=5)
    assert masked["coverage@5"] == pytest.approx(3 / 5)


def test_batches_accumulate_to_the_one_shot_result():
    generator = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 50, (21,), generator=generator).numpy()
    targets = torch.randint(1, 21, (10,), generator=generator).numpy()
    history = torch.randint(0, 21, (10, 4), generator=generator).numpy()
    one_shot = evaluate_popularity(counts, targets, 20, inputs=history, mask_history=True, batch_size=10)
    assert evaluate_popularity(counts, targets, 20, inputs=history, mask_history=True, batch_size=3) == one_shot


def test_caller_scores_are_not_modified():
    scores = ranked_by_id(1, num_items=4)
    before = scores.clone()
    metrics_for(scores, [2], (1,), torch.tensor([[1]]), True, num_items=4)
    assert torch.equal(scores, before)


def test_bad_inputs_are_rejected():
    accumulator = RankingAccumulator(5)
    with pytest.raises(ValueError, match="shape"):
        accumulator.add(torch.zeros(2, 5), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="1..5"):
        accumulator.add(torch.zeros(2, 6), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="NaN"):
        accumulator.add(torch.full((1, 6), float("nan")), torch.tensor([1]))
    with pytest.raises(ValueError, match="no users"):
        accumulator.result()


COUNTS = np.array([99, 5, 9, 9, 1])  # padding, then items 1..4: order 2, 3, 1, 4


def test_popularity_scores():
    scores = popularity_scores(COUNTS, 2)
    assert scores.shape == (2, 5)
    assert scores[0, 0] == float("-inf")
    assert scores[1, 1:].tolist() == [5.0, 9.0, 9.0, 1.0]


def test_popularity_baseline():
    targets = np.array([3, 1, 4])  # ranks 2, 3, 4
    result = evaluate_popularity(COUNTS, targets, 4, ks=(1, 2, 3), batch_size=2)
    assert [result["hr@1"], result["hr@2"], result["hr@3"]] == pytest.approx([0, 1 / 3, 2 / 3])
    assert result["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert result["coverage@3"] == pytest.approx(3 / 4)

    # Masking lifts users 1 and 2 to rank 1: their more popular items are in their history.
    inputs = np.array([[2, 0], [2, 3], [0, 0]])
    masked = evaluate_popularity(COUNTS, targets, 4, inputs=inputs, ks=(1,), mask_history=True)
    assert masked["hr@1"] == pytest.approx(2 / 3)


class NextIdModel(nn.Module):
    """Scores item (last item + 1, wrapping) highest and all others equally; records its calls."""

    def __init__(self, num_items: int) -> None:
        super().__init__()
        self.num_items = num_items
        self.bias = nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[bool, bool, int]] = []

    def last_scores(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled(), items.shape[0]))
        rows = torch.arange(items.shape[0])
        scores = torch.zeros(items.shape[0], self.num_items + 1) + self.bias
        scores[rows, items[rows, lengths - 1] % self.num_items + 1] = 1.0
        return scores


def test_evaluate_model():
    model = NextIdModel(5)
    model.train()
    inputs = np.array([[1, 2, 0], [4, 0, 0], [3, 1, 5]])
    lengths = np.array([2, 1, 3])
    targets = np.array([3, 5, 2])  # ranks 1, 1 and 2 (after the predicted item 1)

    result = evaluate_model(model, inputs, lengths, targets, 5, batch_size=2, ks=(1, 2))
    assert result["hr@1"] == pytest.approx(2 / 3)
    assert result["hr@2"] == 1.0
    assert model.calls == [(False, False, 2), (False, False, 1)]
    assert model.training  # restored

    # The third user's history holds item 1, so masking it lifts the target to rank 1.
    masked = evaluate_model(model, inputs, lengths, targets, 5, ks=(1,), mask_history=True)
    assert masked["hr@1"] == 1.0


def test_evaluate_model_rejects_empty_histories():
    with pytest.raises(ValueError, match="lengths"):
        evaluate_model(NextIdModel(5), np.array([[0, 0]]), np.array([0]), np.array([1]), 5)


def test_list_metrics_read_the_top_k_lists_of_all_users():
    # 4 users, 6 items; scores make item 1 everyone's first and items 2..5 each one user's second.
    scores = torch.full((4, 7), -1.0)
    scores[:, 1] = 10.0
    for user in range(4):
        scores[user, 2 + user] = 5.0
    targets = torch.tensor([1, 2, 3, 6])
    head = head_items(torch.tensor([0, 50, 40, 1, 1, 1, 1]))  # 20% of 6 items: the single most popular, item 1
    accumulator = RankingAccumulator(6, ks=(1, 2), head=head, target=3)
    accumulator.add(scores, targets)
    m = accumulator.result()
    assert m["coverage@1"] == pytest.approx(1 / 6) and m["coverage@2"] == pytest.approx(5 / 6)
    assert m["head-share@1"] == 1.0 and m["head-share@2"] == pytest.approx(4 / 8)
    assert m["target-exposure@1"] == 0.0 and m["target-exposure@2"] == pytest.approx(1 / 4)
    assert m["gini@1"] == pytest.approx(5 / 6)  # one item takes every slot: (n - 1) / n
    assert m["gini@2"] == pytest.approx(gini(torch.tensor([4, 1, 1, 1, 1, 0])))


def test_gini_and_head_items():
    assert gini(torch.tensor([3, 3, 3])) == 0.0
    assert gini(torch.tensor([0, 0, 9])) == pytest.approx(2 / 3)
    assert gini(torch.zeros(4)) == 0.0
    head = head_items(np.array([0, 5, 9, 9, 1, 0, 2, 3, 4, 0, 7]))  # 10 items: the 2 most popular, ties by id
    assert head.nonzero().flatten().tolist() == [2, 3]


def test_popularity_baseline_puts_every_slot_on_the_head():
    counts = np.array([0, 9, 8, 7, 1, 1, 1, 1, 1, 1, 1])
    m = evaluate_popularity(counts, np.array([1, 5, 6]), 10, ks=(2,), head=head_items(counts))
    assert m["head-share@2"] == 1.0 and m["coverage@2"] == pytest.approx(0.2)


def reference_evaluation(model, inputs, lengths, targets, num_items, ks, mask_history, head, target):
    """The metrics computed the plain way: one user at a time, padded to the full width, each
    user's whole catalogue stable-sorted, every metric from its definition."""
    ranks, lists = [], []
    model.eval()
    for user in range(len(targets)):
        with torch.no_grad():
            scores = model.last_scores(torch.as_tensor(inputs[user : user + 1]),
                                       torch.as_tensor(lengths[user : user + 1]))[0].clone()
        scores[0] = float("-inf")
        if mask_history:
            scores[torch.as_tensor(inputs[user][inputs[user] > 0])] = float("-inf")
        order = torch.sort(scores, descending=True, stable=True).indices.tolist()
        recommendable = [item for item in order if scores[item] > float("-inf")]
        ranks.append(recommendable.index(targets[user]) + 1 if targets[user] in recommendable else math.inf)
        lists.append(recommendable)
    users, expected = len(targets), {}
    for k in ks:
        hits = [rank <= k for rank in ranks]
        expected[f"hr@{k}"] = sum(hits) / users
        expected[f"ndcg@{k}"] = sum(1 / math.log2(r + 1) for r in ranks if r <= k) / users
        expected[f"mrr@{k}"] = sum(1 / r for r in ranks if r <= k) / users
        expected[f"precision@{k}"] = sum(hit / k for hit in hits) / users
        expected[f"recall@{k}"] = sum(hits) / users
        expected[f"f1@{k}"] = sum(2 * (1 / k) / (1 / k + 1) for hit in hits if hit) / users
        counts = [0] * (num_items + 1)
        for listed in lists:
            for item in listed[:k]:
                counts[item] += 1
        counts, slots = counts[1:], sum(counts)
        expected[f"coverage@{k}"] = sum(c > 0 for c in counts) / num_items
        # Gini as the mean absolute difference over all pairs, over twice the mean.
        expected[f"gini@{k}"] = sum(abs(a - b) for a in counts for b in counts) / (2 * num_items * slots)
        expected[f"head-share@{k}"] = sum(c for c, h in zip(counts, head[1:].tolist(), strict=True) if h) / slots
        expected[f"target-exposure@{k}"] = sum(target in listed[:k] for listed in lists) / users
    expected["users"] = float(users)
    return expected


def random_histories(users, num_items, max_len, seed):
    """Right-padded histories of every length from 1 to max_len, in random order, and targets
    (some of them also in their user's history)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, users)
    lengths[:3] = [1, max_len, max_len]
    rng.shuffle(lengths)
    inputs = np.zeros((users, max_len), dtype=np.int64)
    for user, length in enumerate(lengths):
        inputs[user, :length] = rng.integers(1, num_items + 1, length)
    targets = rng.integers(1, num_items + 1, users)
    repeat = rng.random(users) < 0.2
    targets[repeat] = inputs[repeat, 0]
    return inputs, lengths, targets


@pytest.mark.parametrize("mask_history", [False, True])
@pytest.mark.parametrize("ks", [(1, 3, 10), (2, 50)])  # 50: longer than the whole catalogue
def test_evaluate_model_equals_the_reference_user_by_user(mask_history, ks):
    """Batched, shortest first and cut to each batch's longest history, the evaluation still
    gives exactly the metrics of scoring users one at a time at full width."""
    from common.model import AttentionLSTM

    num_items, max_len = 40, 12
    torch.manual_seed(0)
    model = AttentionLSTM(num_items, embedding_dim=8, hidden_dim=8)
    inputs, lengths, targets = random_histories(70, num_items, max_len, seed=1)
    head = head_items(torch.arange(num_items + 1) % 7)
    lists = {"head": head, "target": int(targets[0])}
    expected = reference_evaluation(model, inputs, lengths, targets, num_items, ks, mask_history, **lists)
    for batch_size in (1, 9, 512):
        result = evaluate_model(model, inputs, lengths, targets, num_items, batch_size=batch_size, ks=ks,
                                mask_history=mask_history, **lists)
        assert result.keys() == expected.keys()
        assert result == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert any(0 < expected[f"hr@{k}"] < 1 for k in ks)  # neither all hits nor all misses


@pytest.mark.parametrize("mask_history", [False, True])
def test_evaluate_model_on_tied_scores_equals_the_reference(mask_history):
    # NextIdModel ties every item but one, so every top-K list is cut inside a tie.
    inputs, lengths, targets = random_histories(50, 12, 6, seed=2)
    head = head_items(torch.arange(13))
    expected = reference_evaluation(NextIdModel(12), inputs, lengths, targets, 12, (1, 5, 10), mask_history, head, 3)
    result = evaluate_model(NextIdModel(12), inputs, lengths, targets, 12, batch_size=8, ks=(1, 5, 10),
                            mask_history=mask_history, head=head, target=3)
    assert result == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_accumulated_metrics_do_not_depend_on_the_order_of_users():
    generator = torch.Generator().manual_seed(4)
    scores = torch.randn(40, 26, generator=generator).round(decimals=1)  # many ties
    targets = torch.randint(1, 26, (40,), generator=generator)
    history = torch.randint(0, 26, (40, 5), generator=generator)
    head = head_items(torch.arange(26))

    def evaluate(order, size):
        accumulator = RankingAccumulator(25, (1, 5, 10), True, head=head, target=7)
        for start in range(0, 40, size):
            rows = order[start : start + size]
            accumulator.add(scores[rows], targets[rows], history[rows])
        return accumulator.result()

    in_order = evaluate(torch.arange(40), 40)
    assert evaluate(torch.randperm(40, generator=generator), 7) == in_order  # exactly, not approximately
