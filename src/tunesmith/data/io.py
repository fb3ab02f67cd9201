"""Read records from local files (JSONL, JSON, CSV, Parquet), hub datasets or built-in tasks.

Every record carries its origin (``file:line``) so that any later error can point at it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunesmith.data.records import Record
from tunesmith.errors import DataError

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


@dataclass
class ReadReport:
    """What reading skipped (only when ``skip_bad_rows`` is on)."""

    skipped: int = 0
    first_problem: str | None = None

    def skip(self, message: str) -> None:
        self.skipped += 1
        if self.first_problem is None:
            self.first_problem = message


def _bad(report: ReadReport, skip: bool, message: str) -> None:
    if not skip:
        raise DataError(message + " Fix it, or set data.skip_bad_rows=true to skip such rows.")
    report.skip(message)


def _read_jsonl(path: Path, skip: bool, report: ReadReport) -> list[Record]:
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                _bad(
                    report, skip, f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})."
                )
                continue
            if not isinstance(obj, dict):
                _bad(
                    report,
                    skip,
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}.",
                )
                continue
            out.append(Record(obj, f"{path}:{lineno}"))
    return out


def _read_json(path: Path, skip: bool, report: ReadReport) -> list[Record]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}).") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or use .jsonl, one per line).")
    out = []
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            _bad(report, skip, f"{path}: record {i}: expected an object, got {type(obj).__name__}.")
            continue
        out.append(Record(obj, f"{path}: record {i}"))
    return out


def _read_csv(path: Path, skip: bool, report: ReadReport, delimiter: str = ",") -> list[Record]:
    out = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:
            lineno = reader.line_num
            if None in row or any(v is None for v in row.values()):
                _bad(
                    report,
                    skip,
                    f"{path}:{lineno}: wrong number of columns for header {reader.fieldnames}.",
                )
                continue
            out.append(Record(dict(row), f"{path}:{lineno}"))
    return out


def _read_parquet(path: Path, skip: bool, report: ReadReport) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read as Parquet ({e}).") from None
    return [Record(r, f"{path}: row {i}") for i, r in enumerate(rows)]


_READERS = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".tsv": lambda path, skip, report: _read_csv(path, skip, report, "\t"),
    ".parquet": _read_parquet,
}


def _read_hub(name: str, split: str) -> list[Record]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"'{name}' is not a local file, and reading hub datasets needs the 'datasets' "
            "package: pip install 'tunesmith[hub]'."
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DataError(
            f"'{name}': not a local file, and loading it as a hub dataset failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Check the path or your network."
        ) from None
    return [Record(dict(r), f"{name}[{split}] row {i}") for i, r in enumerate(ds)]


SOURCES: dict[str, Callable[[str], list[Record]]] = {}
"""Named data sources by prefix (``builtin:``), registered by the modules that provide them."""


def register_source(prefix: str, reader: Callable[[str], list[Record]]) -> None:
    """Read every data source whose name starts with ``prefix`` with ``reader(name)``."""
    SOURCES[prefix] = reader


def read_records(
    source: str, split: str = "train", skip_bad_rows: bool = False
) -> tuple[list[Record], ReadReport]:
    """All records of a data source, with a report of skipped rows.

    ``source`` is a local file, ``builtin:NAME[:SPLIT]`` or a hub dataset id.
    """
    report = ReadReport()
    for prefix, reader in SOURCES.items():
        if source.startswith(prefix):
            return reader(source), report
    path = Path(source).expanduser()
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give a data file ({', '.join(FILE_SUFFIXES)}).")
    if path.exists():
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(
                f"{path}: unknown file type '{path.suffix}'; use one of {', '.join(FILE_SUFFIXES)}."
            )
        try:
            records = reader(path, skip_bad_rows, report)
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text.") from None
        except PermissionError:
            raise DataError(f"{path}: permission denied.") from None
    elif path.suffix.lower() in FILE_SUFFIXES or source.startswith((".", "/", "~")):
        raise DataError(f"{path}: file not found.")
    else:
        records = _read_hub(source, split)
    if not records:
        raise DataError(
            f"{source}: no records (the dataset is empty{' after skipping bad rows' if report.skipped else ''})."
        )
    return records, report
