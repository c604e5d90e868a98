"""What is wrong with a local data file that 🤗 datasets failed to read: one line, with the line number.

datasets' own errors come from deep inside its builders (a `DatasetGenerationError` from pyarrow's
JSON or CSV reader, on every rank); they rarely say which line. Only after such a failure is the
file scanned here (a valid file never pays for it), to name the first line that does not parse.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path


def file_problem(path: Path) -> str | None:
    """The first problem found in `path` ("line 3: ..."), or None when this scan finds none."""
    checks = {".jsonl": _jsonl_problem, ".json": _json_problem, ".csv": _csv_problem, ".txt": _text_problem,
              ".parquet": _parquet_problem}
    check = checks.get(path.suffix)
    return check(path) if check else None


def _jsonl_problem(path: Path) -> str | None:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {number} is not UTF-8 text (byte {err.start + 1})"
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number} is not valid JSON ({err.msg} at column {err.colno})"
            if not isinstance(value, dict):
                return f"line {number} is a JSON {type(value).__name__}, not an object with one example's columns"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        return f"byte {err.start + 1} is not UTF-8 text"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("{") and "\n" in text.strip():  # JSON lines in a .json file
            return _jsonl_problem(path) or f"line {err.lineno} is not valid JSON ({err.msg} at column {err.colno})"
        return f"line {err.lineno} is not valid JSON ({err.msg} at column {err.colno})"
    records = value if isinstance(value, list) else None
    if records is None:
        return None  # an object: datasets reads a field of it; nothing line-wise to report
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            return f"element {index} of the top-level list is a JSON {type(record).__name__}, not an object"
    return None


def _csv_problem(path: Path) -> str | None:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                return "the file is empty (no header line)"
            for row in reader:
                if row and len(row) != len(header):
                    return (f"line {reader.line_num} has {len(row)} fields, the header has {len(header)} "
                            f"({', '.join(header)})")
    except UnicodeDecodeError as err:
        return f"byte {err.start + 1} is not UTF-8 text"
    except csv.Error as err:
        return f"line {reader.line_num}: {err}"
    return None


def _text_problem(path: Path) -> str | None:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {number} is not UTF-8 text (byte {err.start + 1} of the line)"
    return None


def _parquet_problem(path: Path) -> str | None:
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(path).metadata  # noqa: B018 - reading the footer is the check
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a broken file
        return f"not a readable Parquet file ({str(err).strip().splitlines()[0] if str(err).strip() else err})"
    return None
