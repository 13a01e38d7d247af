"""The files a run leaves under `--out`, written so that a failed run leaves nothing behind.

Every job writes into a staging folder beside `--out` and moves the files into place only when
it finishes; an existing non-empty `--out` is refused rather than mixed with a new run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import DataError

CONFIG, METRICS, SUMMARY, MODEL, ITEMS = "config.json", "metrics.jsonl", "summary.json", "model.pt", "items.json"
PRIVACY, LEDGERS = "privacy.json", "ledgers"  # clients' reported ε; copies of simulated clients' ledgers
PARTICIPATION = "participation.json"  # the server's record of who trained in which round


class OutputError(OSError):
    """`--out` cannot take a run's files: a file, under a file, or not writable."""


class OutputExistsError(OutputError, FileExistsError):
    """`--out` already holds files of another run."""


def _current_umask() -> int:
    """Read once, at import: setting it to read it back is not safe once threads write files."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _current_umask()


def check_output_folder(out: Path, hint: str = "choose a new folder") -> None:
    """Refuse an `--out` that could not take the run's files, before any work is done: a run
    that fails only when it writes its results has wasted its training, or spent privacy budget."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file: give a folder")
    if out.is_dir() and any(out.iterdir()):
        raise OutputExistsError(f"--out {out} already exists and is not empty: {hint}")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"--out {out}: {existing} is a file, not a folder: give a folder path")
    if not writable(existing):
        raise OutputError(f"--out {out}: {existing} is not writable: choose a folder you can write to")


def writable(folder: Path) -> bool:
    """Whether files can be created in `folder`: its permission bits, then a probe file written
    and removed, since the bits alone miss read-only mounts and the kernel's own folders, which
    even root cannot write."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fedrec-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a staging folder; on success its files become `out`'s, on failure it is removed."""
    out = Path(out)
    check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(stage, 0o777 & ~UMASK)  # what a plain mkdir gives, not mkdtemp's 0700, like the files inside
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
    """A run's JSON file; a truncated or corrupt one is a DataError, not a decoder traceback."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON (truncated or corrupt?): {e}: "
                        "use an intact copy of the run folder") from None


def load_tensors(path: Path) -> Any:
    """What `save_tensors` wrote. torch.load raises EOFError on an empty file, which the command
    line's framework would turn into a bare "Aborted.", and RuntimeError on a truncated one."""
    try:
        return torch.load(path, weights_only=True)
    except (EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise DataError(f"{path} is truncated or not a fedrec file ({first_sentence(e)}): "
                        "use an intact copy of the run folder") from None


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
        os.chmod(tmp, 0o666 & ~UMASK)  # the mode a plain open() gives, not mkstemp's 0600
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def first_sentence(error: BaseException) -> str:
    """The gist of a library's error: torch's go on for several sentences of advice."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]


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
