"""Crash-safe file writes (whole-file replacement by rename, the repair of a torn last line) and YAML reading.

``atomic_write`` never leaves a half-written file under its final name; ``cut_torn_last_line`` drops the
partial line that a killed append (JSONL or CSV) leaves behind, so a resumed run can append after it;
``read_yaml`` turns a syntax error into the caller's error naming the file and line.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from vlsurv.errors import InputError


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def cut_torn_last_line(path: str | Path) -> tuple[bytes, int]:
    """(the file's complete lines, bytes cut): a last line without its newline is truncated off the file."""
    path = Path(path)
    if not path.is_file():
        return b"", 0
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(cut)
    return data[:cut], len(data) - cut


def read_yaml(path: str | Path, error: type[InputError]) -> object:
    """The YAML document in ``path`` (None when empty); ``error`` naming the file and line when it is not
    valid YAML."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise error(f"{path}{line}: not valid YAML ({getattr(err, 'problem', None) or err})") from err
