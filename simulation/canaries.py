"""The empirical side of the privacy claims: plant rare canary sequences, train, measure exposure.

A canary is a short sequence of items drawn at random from the catalogue: nothing in real data
predicts it. Some canaries are planted in a few users' histories (just before their
validation and test items, so they land in training windows); as many are held out and never
seen. A model that memorised a planted canary ranks each of its items, given the canary's
prefix, far above where chance would put it. Exposure (Carlini et al., "The Secret Sharer",
2019) turns the rank into bits: log2(N) − log2(rank), averaged over the canary's positions;
a held-out canary scores about 1 bit. The membership-inference advantage is 2·AUC − 1 of
"planted" against "held out" by exposure: 0 when the model tells them apart no better than
chance, 1 when it always can.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from common.artifacts import staged_output
from common.dataset import SequenceData
from common.model import AttentionLSTM


def plant(data: SequenceData, out: Path, *, count: int, length: int, repeats: int,
          seed: int) -> tuple[list[list[str]], list[list[str]]]:
    """Write `out/data.txt` (seq format, raw ids): `data` with `count` canaries of `length` items
    each planted in `repeats` random users. Returns (planted, held out) canaries as raw item
    ids; the held-out ones are drawn the same way and planted nowhere."""
    rng = np.random.default_rng(seed)
    canaries = [rng.choice(np.arange(1, data.num_items + 1), size=length, replace=False).tolist()
                for _ in range(2 * count)]
    hosts = rng.choice(len(data.sequences), size=(count, repeats), replace=False)
    sequences = [s.tolist() for s in data.sequences]
    for canary, users in zip(canaries[:count], hosts, strict=True):
        for u in users:
            sequences[u] = sequences[u][:-2] + canary + sequences[u][-2:]
    with staged_output(out) as stage:
        lines = (" ".join([str(data.user_ids[u]), *(str(data.item_ids[i - 1]) for i in seq)])
                 for u, seq in enumerate(sequences))
        (stage / "data.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    raw = [[str(data.item_ids[i - 1]) for i in canary] for canary in canaries]
    return raw[:count], raw[count:]


@torch.no_grad()
def exposure(model: AttentionLSTM, canary: list[str], item_ids: list[str]) -> float:
    """Mean over positions 2.. of log2(N / rank of the canary's next item given its prefix);
    `item_ids` is the model's catalogue (a run's items.json), raw ids in model order."""
    model.eval()
    index = {raw: i + 1 for i, raw in enumerate(item_ids)}
    ids = [index[raw] for raw in canary]
    items = torch.tensor([ids[:-1]])
    scores = model(items)[0, :, 1:]  # (positions, N): item i is column i - 1, padding excluded
    targets = torch.tensor(ids[1:]) - 1
    ranks = (scores > scores.gather(1, targets[:, None])).sum(1) + 1
    n = scores.shape[1]
    return float(np.mean([math.log2(n) - math.log2(int(r)) for r in ranks[1:]]))


def advantage(planted: list[float], held_out: list[float]) -> float:
    """Membership-inference advantage 2·AUC − 1 of telling planted from held-out canaries by exposure."""
    a, b = np.asarray(planted)[:, None], np.asarray(held_out)[None, :]
    auc = float(((a > b) + 0.5 * (a == b)).mean())
    return 2 * auc - 1
