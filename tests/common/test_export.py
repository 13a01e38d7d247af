import subprocess
import sys

import pytest
import torch

from common import export
from common.model import AttentionLSTM, recommend

N = 100  # the embedded data set's catalogue, at the run config's width: what the quickstart exports
ITEMS = {"item_ids": [str(i) for i in range(N)], "titles": [""] * N}


def _model() -> AttentionLSTM:
    torch.manual_seed(0)
    return AttentionLSTM(N, 64, 64, dropout=0.3).eval()


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory) -> dict[str, object]:
    """The same model exported to ONNX, float and int8 (each export traces for a few seconds)."""
    folder = tmp_path_factory.mktemp("onnx")
    files = {q: folder / f"m.{q}.onnx" for q in export.QUANTIZATIONS}
    for q, path in files.items():
        export.export(_model(), path, max_len=6, items=ITEMS, quantize=q)
    return files


@pytest.mark.parametrize("format", export.FORMATS)
def test_export_scores_like_the_model_and_carries_its_catalogue(tmp_path, onnx_files, format):
    model = _model()
    path = onnx_files["none"] if format == "onnx" else tmp_path / "m.pt"
    if format == "torchscript":
        export.export(model, path, max_len=6, items=ITEMS, format=format)
    module, extra = export.load(path)
    assert extra["max_len"] == 6 and extra["item_ids"] == ITEMS["item_ids"] and extra["format"] == format
    history = torch.tensor([[4, 9, 2, 0, 0, 0], [1, 2, 3, 4, 5, 6], [5, 0, 0, 0, 0, 0]])
    lengths = torch.tensor([3, 6, 1])
    expected, attention = model.last_scores(history, lengths, return_attention=True)
    got, got_attention = module(history, lengths)  # another batch size than traced
    assert torch.allclose(got, expected, atol=1e-5) and torch.allclose(got_attention, attention, atol=1e-6)
    for short in (torch.tensor([[7, 8]]), torch.tensor([[7]])):  # shorter than traced, one user
        lengths = torch.tensor([short.shape[1]])
        assert torch.allclose(module(short, lengths)[0], model.last_scores(short, lengths), atol=1e-5)


def test_int8_onnx_is_a_quarter_of_the_float_file_and_recommends_the_same(onnx_files):
    """Every matrix, the tied embedding included, in int8 rows: the file shrinks to about a quarter
    (biases and the per-row scales stay float), and the top 10 stay the float model's, up to
    near-ties (an untrained model's scores lie close together: a trained one's are measured in
    benchmarks/deploy_loopback.py)."""
    sizes = {q: path.stat().st_size for q, path in onnx_files.items()}
    assert sizes["int8"] < 0.4 * sizes["none"], sizes
    float_model, _ = export.load(onnx_files["none"])
    int8_model, extra = export.load(onnx_files["int8"])
    assert extra["quantize"] == "int8"
    torch.manual_seed(1)
    shared = []
    for _ in range(50):
        history = torch.randint(1, N + 1, (6,)).tolist()
        top, top_float = recommend(int8_model, history, 10, 6)[0], recommend(float_model, history, 10, 6)[0]
        assert top[0] == top_float[0]
        shared.append(len(set(top) & set(top_float)))
    assert min(shared) >= 8 and sum(shared) / len(shared) >= 9.5, shared


def test_onnx_export_runs_with_onnxruntime_alone(onnx_files):
    code = ("import json, sys, onnxruntime as ort; s = ort.InferenceSession(sys.argv[1]);"
            "scores, attention = s.run(None, {'items': [[3, 5, 0, 0, 0, 0]], 'lengths': [2]});"
            "assert not any(n.split('.')[0] in ('torch', 'common', 'client', 'server') for n in sys.modules);"
            "print(len(scores[0]), len(attention[0]), json.loads(s.get_modelmeta().custom_metadata_map['fedrec'])"
            "['max_len'])")
    done = subprocess.run([sys.executable, "-I", "-c", code, str(onnx_files["int8"])], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(N + 1), "6", "6"]  # attention over max_len positions


def test_torchscript_export_runs_with_plain_torch_and_no_fedrec(tmp_path):
    path = tmp_path / "m.pt"
    export.export(_model(), path, max_len=6, items=ITEMS, quantize="int8", format="torchscript")
    code = ("import sys, torch; m = torch.jit.load(sys.argv[1]); s, a = m(torch.tensor([[3, 5]]), torch.tensor([2]));"
            "assert not any(n.split('.')[0] in ('common', 'client', 'server') for n in sys.modules);"
            "print(s.shape[1], a.shape[1])")
    done = subprocess.run([sys.executable, "-I", "-c", code, str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(N + 1), "2"]
    assert export.load(path)[1]["quantize"] == "int8"


@pytest.mark.parametrize("content, message", [(b"garbage", "not an ONNX model"), (b"", "not an ONNX model")])
def test_a_file_that_is_not_an_export_is_refused_in_one_line(tmp_path, content, message):
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        export.load(path)
