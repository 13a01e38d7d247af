"""Run artefacts: written with the mode a plain write would get, staged so a failure leaves nothing."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from common import artifacts
from common.errors import DataError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_get_the_mode_a_plain_write_gets(tmp_path):
    (tmp_path / "plain.txt").write_text("x")  # open() applies the umask to 0o666
    artifacts.write_json(tmp_path / "a.json", {"a": 1})
    artifacts.save_tensors(tmp_path / "t.pt", {"w": torch.zeros(2)})
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "t.pt") == _mode(tmp_path / "plain.txt")
    assert _mode(tmp_path / "plain.txt") == 0o666 & ~artifacts.UMASK


def test_stage_folder_gets_the_mode_a_plain_mkdir_gets(tmp_path):
    (tmp_path / "plain").mkdir()
    with artifacts.staged_output(tmp_path / "out") as stage:
        assert _mode(stage) == _mode(tmp_path / "plain")
        artifacts.write_json(stage / "x.json", [])
    assert _mode(tmp_path / "out" / "x.json") == 0o666 & ~artifacts.UMASK


def test_failed_job_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), artifacts.staged_output(tmp_path / "out") as stage:
        artifacts.write_json(stage / "x.json", [])
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("data, expected", [(b"", r"\(EOFError\)"), (b"PK\x03\x04 cut", r"\(PytorchStreamReader")])
def test_truncated_tensors_are_a_data_error(tmp_path, data, expected):
    (tmp_path / "model.pt").write_bytes(data)
    with pytest.raises(DataError, match=r"model.pt is truncated or not a fedrec file " + expected):
        artifacts.load_tensors(tmp_path / "model.pt")


def test_truncated_json_is_a_data_error(tmp_path):
    (tmp_path / "items.json").write_text('{"item_ids": ["1", "2"')
    with pytest.raises(DataError, match=r"items.json is not valid JSON \(truncated or corrupt\?\)"):
        artifacts.read_json(tmp_path / "items.json")


def test_umask_is_the_process_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    assert artifacts.UMASK == mask
