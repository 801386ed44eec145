"""Reading reports and the resumable, append-only extraction file.

Reports come from a CSV or JSONL table: ``read_reports(path, id_column, text_columns)`` joins the text
columns (blank line between them) and checks the columns exist, ids are unique and no report is empty.

The extraction file is JSONL, one row per (report_id, question_id)::

    {"report_id", "question_id", "question", "answer", "status", "backend", "model", ...}

``ExtractionFile.open_for_append()`` first repairs the file: a last line without its newline is a write
that a killed run left half done, so it is cut off (and redone); every other line must be valid JSON.
Rows are then appended one ``write`` per line and flushed, so a kill loses at most the line being
written, and ``done_pairs()`` tells a rerun which pairs to skip.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vlsurv.errors import InputError
from vlsurv.files import cut_torn_last_line
from vlsurv.jsonl import parse_jsonl, to_line, write_jsonl

log = logging.getLogger("qa_extraction")

STATUSES = ("present", "absent", "not_mentioned", "error")
ROW_KEYS = ("report_id", "question_id", "question", "answer", "status", "backend", "model")


class ExtractionInputError(InputError):
    """A reports table, extraction file or labels table that is not in the expected form."""


@dataclass(frozen=True)
class Report:
    id: str
    text: str


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV (``.csv``, ``.tsv``) or JSON-lines (``.jsonl``, ``.json``) table, every cell as text."""
    path = Path(path)
    if not path.is_file():
        raise ExtractionInputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=True, dtype=False).astype(object)
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    except ValueError as err:
        raise ExtractionInputError(f"{path}: cannot be read as {suffix[1:].upper()} ({err})") from err
    raise ExtractionInputError(f"{path}: unknown table type {suffix!r}; expected .csv, .tsv or .jsonl")


def require_columns(table: pd.DataFrame, columns: Iterable[str], path: str | Path, flag: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ExtractionInputError(
            f"{path}: no column {missing[0]!r} (given by {flag}); columns are {list(table.columns)}"
        )


def cell_text(value) -> str:
    return "" if value is None or (isinstance(value, float) and value != value) else str(value).strip()


def read_reports(path: str | Path, id_column: str, text_columns: Sequence[str]) -> list[Report]:
    """Reports with unique, non-empty ids and non-empty text; several text columns are joined."""
    table = read_table(path)
    require_columns(table, [id_column], path, "--id-column")
    require_columns(table, text_columns, path, "--text-column")
    reports, first_row = [], {}
    for row_number, row in enumerate(table.itertuples(index=False, name=None), start=1):
        values = dict(zip(table.columns, row))
        report_id = cell_text(values[id_column])
        if not report_id:
            raise ExtractionInputError(
                f"{path}: row {row_number} has an empty {id_column!r}; every report needs an id"
            )
        if report_id in first_row:
            raise ExtractionInputError(
                f"{path}: duplicate report id {report_id!r} in rows {first_row[report_id]} "
                f"and {row_number} of column {id_column!r}; ids must be unique"
            )
        first_row[report_id] = row_number
        text = "\n\n".join(part for part in (cell_text(values[c]) for c in text_columns) if part)
        if not text:
            raise ExtractionInputError(
                f"{path}: row {row_number} (id {report_id!r}) has an empty report in "
                f"{list(text_columns)}; remove the row or fill the text"
            )
        reports.append(Report(report_id, text))
    if not reports:
        raise ExtractionInputError(f"{path}: no reports; expected at least one row")
    return reports


def make_row(
    report_id: str,
    question_id: str,
    question: str,
    status: str,
    answer: str,
    backend: str,
    model: str,
    **extra,
) -> dict:
    """One extraction row in the documented key order (extra keys such as ``raw`` follow)."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {STATUSES}")
    return {
        "report_id": report_id,
        "question_id": question_id,
        "question": question,
        "answer": answer,
        "status": status,
        "backend": backend,
        "model": model,
        **extra,
    }


def _status_problem(row: dict) -> str | None:
    return None if row["status"] in STATUSES else f"has status {row['status']!r}; expected one of {STATUSES}"


def _parse(data: bytes, path: Path) -> list[dict]:
    return parse_jsonl(data.splitlines(), path, ROW_KEYS, ExtractionInputError, _status_problem)


def read_extractions(path: str | Path) -> list[dict]:
    """Every row of a finished extraction file (a torn last line is an error here: resume the run first)."""
    path = Path(path)
    if not path.is_file():
        raise ExtractionInputError(f"{path}: extraction file not found")
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        raise ExtractionInputError(
            f"{path}: the last line is incomplete (an interrupted run); rerun "
            "`python -m qa_extraction extract` with the same --out to finish it"
        )
    return _parse(data, path)


class ExtractionFile:
    """The append-only JSONL output of an extraction run."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def repair(self) -> list[dict]:
        """Cut a torn last line off the file and return the complete rows (none when there is no file)."""
        data, dropped = cut_torn_last_line(self.path)
        if dropped:
            log.warning(
                "%s: dropped an incomplete last line (%d bytes) left by an interrupted run",
                self.path,
                dropped,
            )
        return _parse(data, self.path)

    def drop_errors(self) -> int:
        """Rewrite the file without its ``error`` rows (atomically); return how many were dropped."""
        rows = self.repair()
        kept = [row for row in rows if row["status"] != "error"]
        if len(kept) < len(rows):
            write_jsonl(self.path, kept)
        return len(rows) - len(kept)

    def done_pairs(self) -> set[tuple[str, str]]:
        return {(row["report_id"], row["question_id"]) for row in self.repair()}

    def open_for_append(self):
        self.repair()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return _Appender(self.path)


class _Appender:
    """Appends rows, one ``os.write`` of a whole line each, to a file opened with O_APPEND."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, row: dict) -> None:
        data = to_line(row).encode("utf-8")
        written = os.write(self._fd, data)
        while written < len(data):
            written += os.write(self._fd, data[written:])

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
