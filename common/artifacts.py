"""The files a run leaves under `--out`, written so that a failed run leaves nothing behind.

Every job writes into a staging folder beside `--out` and moves the files into place only when
it finishes; an existing non-empty `--out` is refused rather than mixed with a new run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

CONFIG, METRICS, SUMMARY, MODEL, ITEMS = "config.json", "metrics.jsonl", "summary.json", "model.pt", "items.json"
PRIVACY, LEDGERS = "privacy.json", "ledgers"  # clients' reported ε; copies of simulated clients' ledgers
PARTICIPATION = "participation.json"  # the server's record of who trained in which round


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
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=_plain) + "\n"))


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, default=_plain) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_model(path: Path, model: torch.nn.Module) -> None:
    """A plain state_dict, loadable with `torch.load(path, weights_only=True)`."""
    save_tensors(path, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})


def save_tensors(path: Path, data: Any) -> None:
    """`torch.save` of plain containers of tensors and numbers (weights_only-loadable)."""
    replace_atomically(path, lambda tmp: torch.save(data, tmp))


def replace_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Write beside `path`, then rename over it: readers see the old file or the new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_items(path: Path, data: Any) -> None:
    """The catalogue of a `SequenceData` (raw ids and titles, no user data), for `fedrec recommend`."""
    titles = data.titles.tolist() if data.titles is not None else [""] * data.num_items
    write_json(path, {"item_ids": data.item_ids.tolist(), "titles": titles})


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
