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
    return (f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def write_section(name: str, body: str, *, kept: list[str] = ()) -> None:
    """Replace (or append) the section between this benchmark's markers.

    `kept` are the earlier "Produced by" lines of table rows this command did not re-run (see `merge_rows`).
    """
    module = sys.modules["__main__"].__spec__.name  # benchmarks run as `python -m benchmarks.NAME`
    command = " ".join(["python -m", module, *map(shlex.quote, sys.argv[1:])])
    produced = [f"Produced by `{command}` on {date.today()} ({machine()}).", *kept]
    section = f"<!-- {name}:start -->\n{body.rstrip()}\n\n" + "\n".join(produced) + f"\n<!-- {name}:end -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    pattern = _section(name)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    BENCHMARKS.write_text(text)


def merge_rows(name: str, rows: dict[str, str], order: list[str], *,
               cells_kept: bool = False) -> tuple[list[str], list[str]]:
    """This command's table rows (by setting name) in `order`, with the rows of settings it did not
    run kept from the section already written, so `--only` can refresh one row of a long table.
    Returns the rows and, when any rows (or, `cells_kept`, cells of rows) were kept, the earlier
    "Produced by" lines to keep with them."""
    match = _section(name).search(BENCHMARKS.read_text()) if BENCHMARKS.exists() else None
    earlier = {}
    for line in (match.group(0).splitlines() if match else []):
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 2 and cells[1] in order:
            earlier[cells[1]] = line
    merged = [rows.get(setting) or earlier.get(setting) for setting in order]
    kept = [s for s in order if s not in rows and s in earlier]
    notes = []
    if (kept or cells_kept) and match:
        lines = match.group(0).splitlines()
        what = ", ".join(kept) if kept else "the other cells"
        notes = [f"Kept from before ({what}): {line}" for line in lines if line.startswith("Produced by")]
        notes += [line for line in lines if line.startswith("Kept from before")]
    return [row for row in merged if row], notes


def table_cells(name: str) -> dict[str, list[str]]:
    """The cells of each row of the table in section `name`, by the row's first cell."""
    match = _section(name).search(BENCHMARKS.read_text()) if BENCHMARKS.exists() else None
    rows = {}
    for line in (match.group(0).splitlines() if match else []):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 1 and not set(cells[1]) <= set("-"):
            rows[cells[0]] = cells[1:]
    return rows


def _section(name: str) -> re.Pattern[str]:
    return re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
