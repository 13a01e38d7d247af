"""The model as an edge device runs it: one TorchScript file, loadable with `torch.jit.load` alone.

The file holds the traced scoring function (history in, scores and attention out; the LSTM is
PyTorch's fused one) and, as extra files, the catalogue and the settings `fedrec recommend`
needs, so a device needs neither fedrec nor the run folder:

    m = torch.jit.load("model.torchscript.pt")
    scores, attention = m(torch.tensor([[3, 17, 42]]), torch.tensor([3]))  # item ids 1..N, oldest first

`quantize="int8"` applies PyTorch's dynamic int8 quantization to the linear layers.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.artifacts import replace_atomically
from common.model import AttentionLSTM

EXTRA = "fedrec.json"  # catalogue and settings inside the TorchScript file
QUANTIZATIONS = ("none", "int8")


class _Serving(nn.Module):
    def __init__(self, model: AttentionLSTM) -> None:
        super().__init__()
        self.model = model

    def forward(self, items: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, attention = self.model.last_scores(items, lengths, return_attention=True)
        return scores, attention


def export(model: AttentionLSTM, path: Path, *, max_len: int, items: dict[str, Any], quantize: str = "none") -> None:
    """Trace `model` for serving and write it, with `items` (ids, titles) and `max_len`, to `path`."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    model = copy.deepcopy(model).eval()
    model.private = False
    serving: nn.Module = _Serving(model)
    if quantize == "int8":
        serving = torch.ao.quantization.quantize_dynamic(serving, {nn.Linear}, dtype=torch.qint8)
    example = (torch.ones(1, max_len, dtype=torch.long), torch.tensor([max_len]))
    with torch.no_grad():
        traced = torch.jit.trace(serving, example, check_trace=False)
    extra = {EXTRA: json.dumps({"max_len": max_len, "quantize": quantize, **items})}
    replace_atomically(path, lambda tmp: torch.jit.save(traced, str(tmp), _extra_files=extra))


def load(path: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The traced model and its catalogue/settings."""
    extra = {EXTRA: ""}
    module = torch.jit.load(str(path), _extra_files=extra)
    return module, json.loads(extra[EXTRA])


def latency_ms(module: torch.jit.ScriptModule, max_len: int, repeats: int = 200) -> float:
    """Median milliseconds to score one user's full-length history (one thread, after warm-up)."""
    items, lengths = torch.randint(1, 2, (1, max_len)), torch.tensor([max_len])
    times = []
    with torch.no_grad():
        for i in range(repeats + 10):
            start = time.perf_counter()
            module(items, lengths)
            if i >= 10:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000
