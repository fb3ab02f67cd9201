"""Read records from local files (JSONL, JSON, CSV, Parquet), hub datasets or built-in tasks.

Every record carries its origin (``file:line``) so that any later error can point at it. Text
files are UTF-8, with or without the byte-order mark Windows tools write; a byte that is not
UTF-8 is reported with the line it is on.
"""

from __future__ import annotations

import csv
import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.records import Record
from tunesmith.errors import DataError
from tunesmith.paths import looks_local
from tunesmith.textfiles import bad_utf8, text_encoding

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


# A JSON \uXXXX escape of half a UTF-16 surrogate pair; alone it is not a character.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _lone_surrogate(value: Any) -> str | None:
    """The first string inside ``value`` holding a lone surrogate (no tokenizer can encode it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"\\u{ord(value[e.start]):04x}"
        return None
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        found = _lone_surrogate(item)
        if found:
            return found
    return None


def _parse_json(text: str) -> Any:
    """``json.loads`` with every way it fails turned into a ValueError carrying a short reason."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        msg = e.msg.removesuffix(" at")  # "Invalid control character at"
        raise ValueError(f"{msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise ValueError(_reason(e)) from None


def _reason(e: ValueError) -> str:
    """The first clause of a parser's complaint (Python's own advice after ';' is for coders)."""
    return str(e).splitlines()[0].split(";")[0]


def _record(obj: Any, origin: str, report: ReadReport, skip: bool) -> Record | None:
    """``obj`` as a record, or None (after reporting) when it is not an object of text."""
    if not isinstance(obj, dict):
        _bad(report, skip, f"{origin}: expected a JSON object, got {type(obj).__name__}.")
        return None
    bad = _lone_surrogate(obj)
    if bad:
        _bad(
            report,
            skip,
            f"{origin}: the escape {bad} is half of a UTF-16 surrogate pair, not a character.",
        )
        return None
    return Record(obj, origin)


def _read_jsonl(path: Path, skip: bool, report: ReadReport) -> list[Record]:
    out = []
    with path.open(encoding=text_encoding(path)) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                msg = e.msg.removesuffix(" at")  # "Invalid control character at"
                _bad(report, skip, f"{path}:{lineno}: not valid JSON ({msg} at column {e.colno}).")
                continue
            except (ValueError, RecursionError) as e:
                why = "nested too deeply" if isinstance(e, RecursionError) else _reason(e)
                _bad(report, skip, f"{path}:{lineno}: not valid JSON ({why}).")
                continue
            if _SURROGATE_ESCAPE.search(line) is None and isinstance(obj, dict):
                out.append(Record(obj, f"{path}:{lineno}"))  # the common case: nothing to check
                continue
            record = _record(obj, f"{path}:{lineno}", report, skip)
            if record is not None:
                out.append(record)
    return out


def _read_json(path: Path, skip: bool, report: ReadReport) -> list[Record]:
    text = path.read_text(encoding=text_encoding(path))  # the caller reports a decoding error
    try:
        data = _parse_json(text)
    except ValueError as e:
        if str(e).startswith("Extra data"):  # one object per line: JSON Lines named .json
            return _read_jsonl(path, skip, report)
        where = re.search(r" at line (\d+) column \d+$", str(e))
        line = f":{where.group(1)}" if where else ""
        raise DataError(f"{path}{line}: not valid JSON ({str(e)}).") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or use .jsonl, one per line).")
    out = []
    for i, obj in enumerate(data):
        record = _record(obj, f"{path}: record {i}", report, skip)
        if record is not None:
            out.append(record)
    return out


# Long documents make long CSV fields; the csv module stops at 128 KiB by default.
CSV_FIELD_LIMIT = 2**31 - 1


def csv_delimiter(header: str) -> str:
    """',' unless the header line is clearly separated by ';' (spreadsheets in many locales) or tabs."""
    for sep in (",", ";", "\t"):
        if sep in header:
            return sep
    return ","


def _read_csv(path: Path, skip: bool, report: ReadReport) -> list[Record]:
    out = []
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    with path.open(encoding=text_encoding(path), newline="") as f:
        reader = csv.DictReader(f, delimiter=csv_delimiter(f.readline()))
        f.seek(0)
        try:
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
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e}).") from None
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
    ".tsv": _read_csv,  # the separator is read from the header line (tabs here)
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


def _read_local(path: Path, skip: bool, report: ReadReport) -> list[Record] | None:
    """Records of a local file, or None when there is no such file."""
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give a data file ({', '.join(FILE_SUFFIXES)}).")
    if not path.exists():
        return None
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unknown file type '{path.suffix}'; use one of {', '.join(FILE_SUFFIXES)}."
        )
    try:
        return reader(path, skip, report)
    except UnicodeDecodeError:
        raise DataError(bad_utf8(path) + ".") from None


SOURCES: dict[str, Callable[[str], list[Record]]] = {}
"""Named data sources by prefix (``builtin:``), registered by the modules that provide them."""
SOURCE_MODULES = ("tunesmith.builtin.tasks",)
"""The modules that register sources, imported before the first lookup."""


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
    for module in SOURCE_MODULES:
        importlib.import_module(module)
    for prefix, reader in SOURCES.items():
        if source.startswith(prefix):
            return reader(source), report
    if "\x00" in source:
        raise DataError(f"{source!r}: a file name cannot contain a NUL character.")
    path = Path(source).expanduser()
    try:
        records = _read_local(path, skip_bad_rows, report)
    except PermissionError:
        raise DataError(
            f"{path}: permission denied; make it readable (chmod u+r) or run as its owner."
        ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}).") from None
    if records is None:
        if path.suffix.lower() in (*FILE_SUFFIXES, ".txt") or looks_local(source):
            raise DataError(f"{path}: file not found.")
        records = _read_hub(source, split)
    if not records:
        raise DataError(
            f"{source}: no records (the dataset is empty{' after skipping bad rows' if report.skipped else ''})."
        )
    return records, report
