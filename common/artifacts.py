"""The files a run leaves under `--out`, written so that a failed run leaves nothing behind.

Every job writes into a staging folder beside `--out` and moves the files into place only when
it finishes; an existing non-empty `--out` is refused rather than mixed with a new run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

CONFIG, METRICS, SUMMARY, MODEL, ITEMS = "config.json", "metrics.jsonl", "summary.json", "model.pt", "items.json"


class OutputExistsError(FileExistsError):
    """`--out` already holds files of another run."""


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a staging folder; on success its files become `out`'s, on failure it is removed."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"--out {out} already exists and is not empty: choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    out.mkdir(exist_ok=True)
    for path in stage.iterdir():
        os.replace(path, out / path.name)
    stage.rmdir()


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=_plain) + "\n")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, default=_plain) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_model(path: Path, model: torch.nn.Module) -> None:
    """A plain state_dict, loadable with `torch.load(path, weights_only=True)`."""
    torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, path)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
