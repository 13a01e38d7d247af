"""Write one benchmark's section of BENCHMARKS.md, leaving the other sections as they are."""

from __future__ import annotations

import platform
import re
import shlex
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
SHARED_DATA = ROOT.parent / "shared" / "data"


def require_shared(relative: str) -> Path:
    """A file or folder of ../shared/data, or exit with a clear message (the data is not ours to ship)."""
    path = SHARED_DATA / relative
    if not path.exists():
        raise SystemExit(f"skipped: {path} not found (benchmarks read real data from ../shared/data)")
    return path


def machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, Python {platform.python_version()}"


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between this benchmark's markers."""
    module = sys.modules["__main__"].__spec__.name  # benchmarks run as `python -m benchmarks.NAME`
    command = " ".join(["python -m", module, *map(shlex.quote, sys.argv[1:])])
    section = (f"<!-- {name}:start -->\n{body.rstrip()}\n\nProduced by `{command}` on {date.today()} "
               f"({machine()}).\n<!-- {name}:end -->")
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    BENCHMARKS.write_text(text)
