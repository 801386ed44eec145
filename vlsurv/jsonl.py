"""JSON-lines files (one JSON object per line): one parser whose errors name the file, the line and the field.

Used for the VQA training file, ``answers.jsonl``, the extraction output and the review output.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from vlsurv.files import atomic_write

Check = Callable[[dict], "str | None"]


def to_line(row: dict) -> str:
    """One JSON-lines line (UTF-8 text kept as is), newline included."""
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Replace ``path`` with ``rows``, one per line, atomically."""
    atomic_write(path, "".join(map(to_line, rows)).encode("utf-8"))


def parse_jsonl(
    lines: Iterable[str | bytes],
    source: str | Path,
    required: tuple[str, ...] = (),
    error: type[Exception] = ValueError,
    check: Check | None = None,
) -> list[dict]:
    """Objects of ``lines`` (blank lines skipped); each must carry ``required`` and pass ``check``.

    ``check(row)`` returns None or a message; any problem raises ``error("<source> line <n>: <message>")``.
    """
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise error(
                f"{source} line {number}: not valid JSON ({err.__class__.__name__}); "
                "expected one JSON object per line"
            ) from err
        if not isinstance(row, dict):
            raise error(f"{source} line {number}: expected a JSON object with keys {list(required)}")
        absent = [key for key in required if key not in row]
        if absent:
            raise error(f"{source} line {number}: missing field(s) {absent}; expected keys {list(required)}")
        problem = check(row) if check else None
        if problem:
            raise error(f"{source} line {number}: {problem}")
        rows.append(row)
    return rows


def read_jsonl(
    path: str | Path,
    required: tuple[str, ...] = (),
    error: type[Exception] = ValueError,
    check: Check | None = None,
) -> list[dict]:
    """Every object of the JSON-lines file at ``path``; see `parse_jsonl` for the checks."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} does not exist; expected a JSON-lines file")
    return parse_jsonl(path.read_text(encoding="utf-8").splitlines(), path, required, error, check)
