"""The model as an edge device runs it: one file holding the scoring function (history in, scores
and attention out), the catalogue and the settings `fedrec recommend` needs, so a device needs
neither fedrec nor the run folder.

Two formats:

- **ONNX** (the default): `torch.export`, then `torch.onnx`; a device runs it with onnxruntime
  alone (no torch). `quantize="int8"` stores every weight matrix, the tied item embedding
  included, as int8 with one float scale per row (symmetric), dequantized in the graph: about a
  quarter of the float file. The catalogue and settings are the model's `fedrec` metadata.

      import json, onnxruntime as ort
      s = ort.InferenceSession("model.none.onnx")
      items = json.loads(s.get_modelmeta().custom_metadata_map["fedrec"])  # catalogue, max_len
      history = [3, 17, 42]  # item ids 1..N, oldest first, right-padded with 0 to max_len
      feed = {"items": [history + [0] * (items["max_len"] - len(history))], "lengths": [len(history)]}
      scores, attention = s.run(None, feed)

- **TorchScript**, loadable with `torch.jit.load` alone; PyTorch 2.13 deprecates `torch.jit` and
  quantized tensors, so it stays only while it works. Its int8 is PyTorch's dynamic quantization
  of the linear layers; the tied embedding stays float32, so it is no smaller.
"""

from __future__ import annotations

import copy
import json
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from common.artifacts import replace_atomically
from common.model import AttentionLSTM

EXTRA = "fedrec.json"  # TorchScript: catalogue and settings, an extra file inside the archive
METADATA = "fedrec"  # ONNX: the same, as a metadata entry
FORMATS = ("onnx", "torchscript")
QUANTIZATIONS = ("none", "int8")
SUFFIX = {"onnx": "onnx", "torchscript": "torchscript.pt"}


class _Serving(nn.Module):
    """The model's scoring of the item after each history's last real position."""

    def __init__(self, model: AttentionLSTM) -> None:
        super().__init__()
        self.model = model

    def forward(self, items: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, attention = self.model.last_scores(items, lengths, return_attention=True)
        return scores, attention


class _Int8Serving(nn.Module):
    """`_Serving` with every weight matrix held as int8 rows and a float scale per row: the
    matrices are dequantized at each call and put in place of the model's (`functional_call`), so
    the graph holds the int8 tensors only. A tied head reads the same dequantized embedding."""

    def __init__(self, model: AttentionLSTM) -> None:
        super().__init__()
        self.serving = _Serving(copy.deepcopy(model))
        self.names = [name for name, p in self.serving.named_parameters() if p.dim() == 2]  # tied: named once
        self.tied = model.head.weight is model.item_embedding.weight
        for i, name in enumerate(self.names):
            weight = self.serving.get_parameter(name).detach()
            scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127  # (rows, 1)
            self.register_buffer(f"q{i}", torch.round(weight / scale).to(torch.int8))
            self.register_buffer(f"scale{i}", scale)
            owner, _, attr = name.rpartition(".")
            setattr(self.serving.get_submodule(owner), attr, nn.Parameter(torch.empty(0), requires_grad=False))

    def forward(self, items: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = {name: getattr(self, f"q{i}").to(torch.float32) * getattr(self, f"scale{i}")
                   for i, name in enumerate(self.names)}
        if self.tied:
            weights["model.head.weight"] = weights["model.item_embedding.weight"]
        return functional_call(self.serving, weights, (items, lengths))


def export(model: AttentionLSTM, path: Path, *, max_len: int, items: dict[str, Any], quantize: str = "none",
           format: str = "onnx") -> None:
    """Write `model` for serving, with `items` (ids, titles) and `max_len`, to `path`."""
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    model = copy.deepcopy(model).eval()
    model.private = False  # the fused LSTM: what serving runs
    extra = json.dumps({"max_len": max_len, "quantize": quantize, "format": format, **items})
    # Two users of full length: torch.export would fix a dimension traced at size 1.
    example = (torch.ones(2, max_len, dtype=torch.long), torch.tensor([max_len, max_len]))
    if format == "onnx":
        serving: nn.Module = (_Int8Serving(model) if quantize == "int8" else _Serving(model)).eval()
        _write_onnx(serving, path, example, extra)
        return
    serving = _Serving(model)
    if quantize == "int8":
        serving = torch.ao.quantization.quantize_dynamic(serving, {nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        traced = torch.jit.trace(serving, example, check_trace=False)
    replace_atomically(path, lambda tmp: torch.jit.save(traced, str(tmp), _extra_files={EXTRA: extra}))


def _write_onnx(serving: nn.Module, path: Path, example: tuple[torch.Tensor, torch.Tensor], extra: str) -> None:
    import onnx

    # Histories are right-padded to max_len (padding changes no score): a dynamic length would make
    # torch.export decompose the LSTM of the int8 graph, whose weights are computed, into fixed steps.
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        # Not optimized: the optimizer folds the int8 weights' dequantization into float constants.
        program = torch.onnx.export(serving, example, dynamo=True, verbose=False, optimize=False,
                                    input_names=["items", "lengths"], output_names=["scores", "attention"],
                                    dynamic_shapes=({0: batch}, {0: batch}))
    proto = program.model_proto
    for node in proto.graph.node:  # the exporter's debugging notes (stack traces) are a third of a small file
        node.ClearField("metadata_props")
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA, extra
    replace_atomically(path, lambda tmp: onnx.save_model(proto, str(tmp)))


class OnnxModel:
    """An ONNX export behind the TorchScript export's call: (items, lengths) tensors in, (scores,
    attention) tensors out, so `common.model.recommend` takes either."""

    def __init__(self, path: Path) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # one user at a time, as on a device
        options.log_severity_level = 3
        try:  # onnxruntime's errors derive from Exception only
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ValueError(f"not an ONNX model ({str(e).split(':')[-1].strip()})") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        if METADATA not in metadata:
            raise ValueError("an ONNX model without fedrec's catalogue (not written by `fedrec export`)")
        self.metadata = json.loads(metadata[METADATA])

    def eval(self) -> OnnxModel:
        return self

    def __call__(self, items: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        width = items.shape[1]
        padded = torch.nn.functional.pad(items, (0, self.metadata["max_len"] - width))  # (B, max_len)
        scores, attention = self.session.run(None, {"items": padded.numpy(), "lengths": lengths.numpy()})
        return torch.from_numpy(scores), torch.from_numpy(attention[:, :width])


def load(path: Path) -> tuple[torch.jit.ScriptModule | OnnxModel, dict[str, Any]]:
    """The exported model (either format: a TorchScript file is a zip archive) and its
    catalogue/settings."""
    if not zipfile.is_zipfile(path):
        model = OnnxModel(path)
        return model, model.metadata
    extra = {EXTRA: ""}
    module = torch.jit.load(str(path), _extra_files=extra)
    return module, json.loads(extra[EXTRA])


def latency_ms(module: torch.jit.ScriptModule | OnnxModel, max_len: int, repeats: int = 200) -> float:
    """Median milliseconds to score one user's full-length history (after warm-up)."""
    items, lengths = torch.randint(1, 2, (1, max_len)), torch.tensor([max_len])
    times = []
    with torch.no_grad():
        for i in range(repeats + 10):
            start = time.perf_counter()
            module(items, lengths)
            if i >= 10:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000
