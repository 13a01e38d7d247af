"""Readers of the real interaction formats into one table, and of item titles.

Every reader returns a `Loaded`: a DataFrame with columns `user` (str), `item` (str), `rating`
(float, NaN when the format has none), `timestamp` (float; the position in the user's sequence or
in the file when the format has no time) and `line` (1-based line in the source file), plus the
count and first line numbers of the rows it dropped as malformed. Bad rows are dropped rather than
fatal because real dumps carry a few; a file that is unusable as a whole raises `DataError`.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import DataError

COLUMNS = ["user", "item", "rating", "timestamp", "line"]
MALFORMED_SAMPLE = 5  # line numbers of malformed rows kept for the report
MAX_ID_CHARS = 1024  # ids become fixed-width numpy strings: one huge id would size every id's slot
MAX_TITLE_CHARS = 1024  # titles only label recommendations: longer ones are cut, for the same reason
SNIFF_LINES = 1000  # lines a reader looks at to recognise a file written in another format
# A ratings line is `user item rating timestamp`: a rating on a small scale, then a Unix time (>= 1973).
RATING_SCALE, MIN_UNIX_TIME = 10, 1e8
_RATINGS_FORMATS = (("\t", "ml-100k"), ("::", "ml-1m"), (",", "ml-latest"))
FORMATS = ("ml-100k", "ml-1m", "ml-latest", "seq", "inter", "csv")

_SEP_NAMES = {"\t": "tab", ",": "comma", "::": "'::'", r"\s+": "whitespace", "|": "'|'", ";": "';'"}


@dataclasses.dataclass(frozen=True)
class Loaded:
    """Valid interactions of one file and what was dropped on the way."""

    frame: pd.DataFrame
    malformed: int = 0
    malformed_lines: tuple[int, ...] = ()
    source: str = ""


def read_interactions(fmt: str, path: Path, *, sep: str = ",", user_col: str = "user",
                      item_col: str = "item", time_col: str = "", rating_col: str = "") -> Loaded:
    """Read `path` in format `fmt` (one of FORMATS); the csv_* arguments only matter for `csv`."""
    path = Path(path)
    if fmt == "ml-100k":
        return _read_movielens(path, "\t")
    if fmt == "ml-1m":
        return _read_movielens(path, "::")
    if fmt == "ml-latest":
        return _read_movielens(path, ",", header=["userId", "movieId", "rating", "timestamp"])
    if fmt == "seq":
        return _read_seq(path)
    if fmt == "inter":
        return _read_inter(path)
    if fmt == "csv":
        return _read_csv(path, sep, user_col, item_col, time_col, rating_col)
    raise DataError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")


def read_titles(fmt: str, path: Path) -> pd.Series:
    """Titles by raw item id (str index) from u.item, movies.dat or movies.csv.

    Titles only label recommendations, so unparsable lines are skipped without counting.
    """
    path = Path(path)
    if fmt == "ml-100k":
        table = _read_fields(path, "|", 2, encoding="latin-1", quoting=csv.QUOTE_NONE)
    elif fmt == "ml-1m":
        table = _read_fields(path, "::", 2, encoding="latin-1", quoting=csv.QUOTE_NONE)
    elif fmt == "ml-latest":
        table = _read_fields(path, ",", 2, encoding="utf-8-sig").iloc[1:]  # header movieId,title,genres
    else:
        raise DataError(f"format {fmt!r} has no titles file")
    table = table.dropna(subset=[0, 1])
    return pd.Series(table[1].str.slice(0, MAX_TITLE_CHARS).to_numpy(dtype=str), index=table[0].to_numpy(dtype=str))


def _read_movielens(path: Path, sep: str, header: list[str] | None = None) -> Loaded:
    """`user item rating timestamp` lines with numeric fields (u.data, ratings.dat, ratings.csv)."""
    table = _read_fields(path, sep, 4, encoding="latin-1")
    if header is not None:
        found = table.iloc[0, :4].fillna("").tolist()
        if found != header:
            raise DataError(f"{path}: expected the header {','.join(header)}, found {','.join(found)}")
        table = table.iloc[1:]
    frame = pd.DataFrame({
        "user": table[0], "item": table[1],
        "rating": pd.to_numeric(table[2], errors="coerce"),
        "timestamp": pd.to_numeric(table[3], errors="coerce"),
        "line": table["line"],
    })
    valid = (table[4].isna() & table[0].str.fullmatch(r"\d+").fillna(False)
             & table[1].str.fullmatch(r"\d+").fillna(False)
             & np.isfinite(frame.rating) & np.isfinite(frame.timestamp))
    return _finish(path, frame, valid, "numeric user id, item id, rating and timestamp")


def _read_inter(path: Path) -> Loaded:
    """SASRec-style `user item` lines; the file order is the time order."""
    _refuse_ratings(path, _head_lines(path), "inter")
    table = _read_fields(path, r"\s+", 2, encoding="utf-8")
    frame = pd.DataFrame({"user": table[0], "item": table[1], "rating": np.nan,
                          "timestamp": np.arange(len(table), dtype=float), "line": table["line"]})
    valid = table[0].notna() & table[1].notna() & table[2].isna()
    return _finish(path, frame, valid, "a user and an item per line")


def _read_seq(path: Path) -> Loaded:
    """S3-Rec-style `user item1 item2 ...` lines, items in time order.

    Read line by line because each line holds a whole sequence rather than one record.
    """
    lines = _read_lines(path)
    _refuse_ratings(path, lines, "seq")
    tokens = lines.str.split()
    tokens = tokens[tokens.str.len() > 0]  # blank lines are not records
    has_items = tokens.str.len() > 1
    items = tokens[has_items].str[1:].explode()
    users = tokens[has_items].str[0].reindex(items.index)
    frame = pd.DataFrame({
        "user": users.astype(str).to_numpy(), "item": items.astype(str).to_numpy(), "rating": np.nan,
        "line": items.index.to_numpy() + 1,
    })
    frame["timestamp"] = frame.groupby("user", sort=False).cumcount().astype(float)
    bad_lines = tokens.index[~has_items].to_numpy() + 1
    if frame.empty:
        raise DataError(f"{path}: no valid row: every line is a user without items")
    _check_ids(path, frame)
    return Loaded(frame[COLUMNS], malformed=len(bad_lines),
                  malformed_lines=tuple(int(n) for n in bad_lines[:MALFORMED_SAMPLE]), source=str(path))


def _read_csv(path: Path, sep: str, user_col: str, item_col: str, time_col: str, rating_col: str) -> Loaded:
    """A CSV/TSV with a header row; an empty time column name means file order, an empty rating
    column name means no ratings. Times may be numbers or ISO 8601 dates."""
    sep = {"\\t": "\t", "tab": "\t"}.get(sep, sep)
    if not sep:
        raise DataError("csv-sep is empty: give the column separator, e.g. ',' or '\\t'")
    _require_file(path)
    try:
        header = list(pd.read_csv(path, sep=sep, nrows=0, encoding="utf-8-sig",
                                  engine="c" if len(sep) == 1 else "python").columns)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the header: {_first_line(e)}") from None
    wanted = {"user": user_col, "item": item_col, "timestamp": time_col, "rating": rating_col}
    for role, name in wanted.items():
        if name and name not in header:
            hint = f" (wrong csv-sep {sep!r}?)" if len(header) == 1 else ""
            raise DataError(f"{path}: no {role} column {name!r}; columns found: {', '.join(map(str, header))}{hint}")
    table = _read_fields(path, sep, len(header), encoding="utf-8-sig").iloc[1:]
    column = {name: table[header.index(name)] for name in wanted.values() if name}
    frame = pd.DataFrame({
        "user": column[user_col], "item": column[item_col],
        "rating": pd.to_numeric(column[rating_col], errors="coerce") if rating_col else np.nan,
        "timestamp": _to_time(column[time_col]) if time_col else np.arange(len(table), dtype=float),
        "line": table["line"],
    })
    valid = frame.user.notna() & frame.item.notna() & table[len(header)].isna() & np.isfinite(frame.timestamp)
    if rating_col:
        valid &= np.isfinite(frame.rating)
    return _finish(path, frame, valid, "a user, an item" + (", a numeric rating" if rating_col else "")
                   + (", a numeric or ISO 8601 time" if time_col else ""))


def _read_fields(path: Path, sep: str, width: int, *, encoding: str,
                 quoting: int = csv.QUOTE_MINIMAL) -> pd.DataFrame:
    """Every non-blank line as a row of `width` str fields (NaN where missing), plus column `width`
    holding the first surplus field and `line`, its 1-based line number.

    One row per line keeps line numbers exact and lets short and long lines be counted as malformed
    instead of aborting. The C engine is used where it can be, for speed; the python engine is
    needed for a multi-character separator and for a line with two or more surplus fields, which
    the C engine can only reject or skip silently.
    """
    _require_file(path)
    options = dict(sep=sep, header=None, names=range(width + 1), index_col=False, dtype=str,
                   skip_blank_lines=False, encoding=encoding, quoting=quoting)
    fast = len(sep) == 1 or sep == r"\s+"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.ParserWarning)  # surplus fields are cut on purpose
            try:
                table = pd.read_csv(path, engine="c" if fast else "python", **options)
            except pd.errors.ParserError:  # a line with two or more surplus fields
                table = pd.read_csv(path, engine="python", on_bad_lines=lambda fields: fields[: width + 1],
                                    **options)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError) as e:
        raise DataError(f"{path}: cannot read: {_first_line(e)}") from None
    table["line"] = np.arange(1, len(table) + 1)
    table = table[table[list(range(width + 1))].notna().any(axis=1)]
    if table.empty:
        raise DataError(f"{path}: file is empty")
    if width > 1 and table[1].isna().all():
        first = table.iloc[0]
        raise DataError(f"{path}: expected {width} {_SEP_NAMES.get(sep, repr(sep))}-separated fields per line, "
                        f"line {first['line']} has 1 ({str(first[0])[:40]!r}); wrong delimiter?")
    return table


def _read_lines(path: Path) -> pd.Series:
    """Text lines of a plain or gzipped UTF-8 file, LF or CRLF."""
    _require_file(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8", newline=None) as f:
            text = f.read()
    except (UnicodeDecodeError, EOFError, OSError) as e:
        raise DataError(f"{path}: cannot read: {_first_line(e)}") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return pd.Series(text.removesuffix("\n").split("\n"), dtype=str)


def _head_lines(path: Path) -> pd.Series:
    """The first SNIFF_LINES lines of a plain or gzipped file (undecodable bytes replaced)."""
    _require_file(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8", errors="replace") as f:
            # the first SNIFF_LINES lines only: zip stops at the shorter
            return pd.Series([line for _, line in zip(range(SNIFF_LINES), f, strict=False)], dtype=str)
    except (EOFError, OSError) as e:
        raise DataError(f"{path}: cannot read: {_first_line(e)}") from None


def _refuse_ratings(path: Path, lines: pd.Series, fmt: str) -> None:
    """Refuse a MovieLens-style ratings file given as `fmt`: read as a sequence, its ratings and
    timestamps would become items and the model would train on noise without any error.

    The rule: every one of the first SNIFF_LINES non-blank lines (after a header line, if any)
    splits on the format's separator into exactly 4 numbers, the third a rating in
    [0, RATING_SCALE] and the fourth a Unix time >= MIN_UNIX_TIME. A sequence file whose users all
    hold exactly three items, the second a small number and the third a large one, is not a
    real data set; S3-Rec's and SASRec's files never match.
    """
    head = lines.head(SNIFF_LINES).str.strip()
    head = head[head != ""]
    for sep, name in _RATINGS_FORMATS:
        fields = head.str.split(sep, regex=False)
        if len(fields) > 1 and not _is_number(fields.iloc[0][0]):
            fields = fields.iloc[1:]  # a header row, as ratings.csv has
        if len(fields) and _ratings_rows(fields):
            raise DataError(f"{path} holds `user item rating timestamp` ratings ({name}'s format), not {fmt}: "
                            f"give the format {name} (`fedrec client --data-format {name}`, "
                            f"or `--dataset {name}`)")


def _ratings_rows(fields: pd.Series) -> bool:
    """Whether every row is [number, number, rating, Unix time]."""
    if not (fields.str.len() == 4).all():
        return False
    table = pd.DataFrame(fields.tolist()).apply(pd.to_numeric, errors="coerce")
    return bool(table.notna().all().all() and table[2].between(0, RATING_SCALE).all()
                and (table[3] >= MIN_UNIX_TIME).all())


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_ids(path: Path, frame: pd.DataFrame) -> None:
    """Refuse ids longer than MAX_ID_CHARS: a corrupt file or a wrong format, never a real id."""
    for role in ("user", "item"):
        lengths = frame[role].astype(str).str.len()
        if len(lengths) and lengths.max() > MAX_ID_CHARS:
            row = frame.iloc[int(lengths.to_numpy().argmax())]
            raise DataError(f"{path}: line {row['line']}: {role} id of {int(lengths.max()):,} characters "
                            f"(ids have at most {MAX_ID_CHARS:,}): is the file corrupt, or in another format?")


def _finish(path: Path, frame: pd.DataFrame, valid: pd.Series, expected: str) -> Loaded:
    """Keep the valid rows; fail when none is left, since then the whole file is in the wrong shape."""
    if frame.empty:
        raise DataError(f"{path}: no data rows after the header")
    bad_lines = frame.line[~valid].to_numpy()
    if not valid.any():
        raise DataError(f"{path}: no valid row among {len(frame)} lines (expected {expected}); "
                        f"first bad lines: {', '.join(map(str, bad_lines[:MALFORMED_SAMPLE]))}")
    frame = frame[valid].reset_index(drop=True)
    _check_ids(path, frame)
    frame = frame.astype({"user": str, "item": str, "rating": float, "timestamp": float, "line": np.int64})
    return Loaded(frame[COLUMNS], malformed=len(bad_lines),
                  malformed_lines=tuple(int(n) for n in bad_lines[:MALFORMED_SAMPLE]), source=str(path))


def _to_time(values: pd.Series) -> pd.Series:
    """Seconds from numbers, or from ISO 8601 dates when no value is a number."""
    seconds = pd.to_numeric(values, errors="coerce")
    if seconds.notna().any() or values.isna().all():
        return seconds
    dates = pd.to_datetime(values, errors="coerce", format="ISO8601", utc=True)
    return (dates - pd.Timestamp(0, tz="UTC")).dt.total_seconds()


def _require_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
