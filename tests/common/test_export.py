import subprocess
import sys

import torch

from common import export
from common.model import AttentionLSTM


def _model() -> AttentionLSTM:
    torch.manual_seed(0)
    return AttentionLSTM(30, 8, 8, dropout=0.3).eval()


def test_export_scores_like_the_model_and_carries_its_catalogue(tmp_path):
    model, path = _model(), tmp_path / "m.pt"
    items = {"item_ids": [str(i) for i in range(30)], "titles": [""] * 30}
    export.export(model, path, max_len=6, items=items)
    module, extra = export.load(path)
    assert extra["max_len"] == 6 and extra["item_ids"] == items["item_ids"]
    history = torch.tensor([[4, 9, 2, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
    lengths = torch.tensor([3, 6])
    expected, attention = model.last_scores(history, lengths, return_attention=True)
    got, got_attention = module(history, lengths)  # another batch size and length than traced
    assert torch.allclose(got, expected, atol=1e-5) and torch.allclose(got_attention, attention, atol=1e-6)
    short = torch.tensor([[7, 8]])
    assert torch.allclose(module(short, torch.tensor([2]))[0], model.last_scores(short, torch.tensor([2])), atol=1e-5)


def test_export_runs_with_plain_torch_and_no_fedrec(tmp_path):
    path = tmp_path / "m.pt"
    export.export(_model(), path, max_len=6, items={"item_ids": [], "titles": []}, quantize="int8")
    code = ("import sys, torch; m = torch.jit.load(sys.argv[1]); s, a = m(torch.tensor([[3, 5]]), torch.tensor([2]));"
            "assert not any(n.split('.')[0] in ('common', 'client', 'server') for n in sys.modules);"
            "print(s.shape[1], a.shape[1])")
    done = subprocess.run([sys.executable, "-I", "-c", code, str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["31", "2"]
    assert export.load(path)[1]["quantize"] == "int8"
