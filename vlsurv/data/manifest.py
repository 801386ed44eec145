"""The cohort manifest: one table (CSV or JSONL) that every later step reads.

One row per scan with the columns ``MANIFEST_COLUMNS``:
``patient_id`` (str), ``scan_id`` (str, unique), ``image`` (path of a NIfTI file or DICOM folder,
relative to the manifest's folder or absolute), ``report`` (str, may be empty), ``time`` (float >= 0,
unit given by the data set), ``event`` (int, 1 = event observed, 0 = censored) and ``split``
(one of ``SPLITS``). Any other column is kept as a clinical column.

``load_manifest`` validates every row and raises ``ManifestError`` naming the file, the 1-based data
row number, the ``scan_id`` and the field. With ``require_survival=False`` (stage-1 VQA data such as
CT-RATE) ``time`` and ``event`` may be empty or absent; values that are present are still checked.

Optional per-scan overrides (``OVERRIDE_COLUMNS``, raw CT-RATE volumes read in place): ``spacing_x``,
``spacing_y``, ``spacing_z`` (mm along the image's array axes 0, 1, 2; all three or none) replace the header's
voxel size, and ``rescale_slope``, ``rescale_intercept`` (both or neither) give HU = stored * slope +
intercept. ``scan_overrides(row)`` reads them from a loaded row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from vlsurv.errors import InputError

MANIFEST_COLUMNS = ("patient_id", "scan_id", "image", "report", "time", "event", "split")
SPLITS = ("train", "val", "test")

_ID_COLUMNS = ("patient_id", "scan_id", "image", "split")
_SURVIVAL_COLUMNS = ("time", "event")
_TEXT_COLUMNS = ("patient_id", "scan_id", "image", "report", "split")
SPACING_COLUMNS = ("spacing_x", "spacing_y", "spacing_z")
RESCALE_COLUMNS = ("rescale_slope", "rescale_intercept")
OVERRIDE_COLUMNS = (*SPACING_COLUMNS, *RESCALE_COLUMNS)


class ManifestError(InputError):
    """A manifest file, row or field that does not follow the manifest schema."""


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    suffix = path.suffix.lower()
    text_dtypes = dict.fromkeys(_TEXT_COLUMNS, str)
    try:
        if suffix == ".csv":
            return pd.read_csv(path, dtype=text_dtypes, keep_default_na=False, na_values=[""])
        if suffix in (".jsonl", ".json"):
            table = pd.read_json(path, lines=True, dtype=False)
            for column in _TEXT_COLUMNS:
                if column in table.columns:
                    table[column] = table[column].map(lambda v: None if _is_missing(v) else str(v))
            return table
    except (ValueError, pd.errors.ParserError) as error:
        raise ManifestError(f"{path}: cannot parse the manifest ({error})") from error
    raise ManifestError(f"{path}: unsupported manifest format {suffix!r}; expected .csv or .jsonl")


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _row_error(path: Path, row_number: int, scan_id: object, field: str, message: str) -> ManifestError:
    return ManifestError(f"{path}: row {row_number} (scan_id={scan_id!r}): field {field!r}: {message}")


def _parse_time(value: object) -> float:
    number = float(value)  # raises ValueError / TypeError for text
    if math.isnan(number) or math.isinf(number) or number < 0:
        raise ValueError
    return number


def _parse_event(value: object) -> int:
    number = float(value)
    if number not in (0.0, 1.0):
        raise ValueError
    return int(number)


def _validate_rows(table: pd.DataFrame, path: Path, *, require_survival: bool, check_files: bool) -> None:
    seen: dict[str, int] = {}
    times: list[float] = []
    events: list[float] = []
    images: list[str] = []
    for index, row in enumerate(table.itertuples(index=False), start=1):
        record = row._asdict()
        scan_id = record["scan_id"]
        for column in _ID_COLUMNS:
            if _is_missing(record[column]):
                raise _row_error(path, index, scan_id, column, "is empty; expected a value")
        if scan_id in seen:
            raise _row_error(
                path, index, scan_id, "scan_id", f"duplicate of row {seen[scan_id]}; expected unique ids"
            )
        seen[scan_id] = index
        if record["split"] not in SPLITS:
            raise _row_error(path, index, scan_id, "split", f"{record['split']!r} is not one of {SPLITS}")
        image = Path(str(record["image"])).expanduser()
        image = image if image.is_absolute() else (path.parent / image)
        image = image.resolve()
        if check_files and not image.exists():
            raise _row_error(path, index, scan_id, "image", f"file not found: {image}")
        images.append(str(image))
        time, event = record["time"], record["event"]
        for field, value, parse, expected in (
            ("time", time, _parse_time, "a finite number >= 0"),
            ("event", event, _parse_event, "0 or 1"),
        ):
            if _is_missing(value):
                if require_survival:
                    raise _row_error(path, index, scan_id, field, f"is empty or NaN; expected {expected}")
                continue
            try:
                parse(value)
            except (TypeError, ValueError):
                raise _row_error(path, index, scan_id, field, f"got {value!r}; expected {expected}") from None
        _check_overrides(record, path, index)
        times.append(float("nan") if _is_missing(time) else _parse_time(time))
        events.append(float("nan") if _is_missing(event) else float(_parse_event(event)))
    table["image"] = images
    table["time"] = pd.Series(times, index=table.index, dtype="float64")
    event_series = pd.Series(events, index=table.index, dtype="float64")
    table["event"] = event_series.astype("int64") if not event_series.isna().any() else event_series


def _check_overrides(record: dict, path: Path, row_number: int) -> None:
    """Override columns of one row: each group all set or none; spacings and slope > 0, intercept finite."""
    for group in (SPACING_COLUMNS, RESCALE_COLUMNS):
        present = [c for c in group if c in record and not _is_missing(record[c])]
        if present and len(present) < len(group):
            absent = next(c for c in group if c not in present)
            expected = f"is empty; expected {list(group)} all set or all empty"
            raise _row_error(path, row_number, record["scan_id"], absent, expected)
        for column in present:
            try:
                number = float(record[column])
            except (TypeError, ValueError):
                number = math.nan
            expected = "a finite number" if column == "rescale_intercept" else "a number > 0"
            if not math.isfinite(number) or (column != "rescale_intercept" and number <= 0):
                message = f"got {record[column]!r}; expected {expected}"
                raise _row_error(path, row_number, record["scan_id"], column, message)


def scan_overrides(row: Mapping) -> dict[str, object]:
    """``{"spacing": (x, y, z) | None, "slope": float | None, "intercept": float | None}`` of a loaded row."""

    def present(columns: tuple[str, ...]) -> bool:
        return all(c in row and not _is_missing(row[c]) for c in columns)

    rescale = present(RESCALE_COLUMNS)
    return {
        "spacing": tuple(float(row[c]) for c in SPACING_COLUMNS) if present(SPACING_COLUMNS) else None,
        "slope": float(row["rescale_slope"]) if rescale else None,
        "intercept": float(row["rescale_intercept"]) if rescale else None,
    }


def load_manifest(
    path: str | Path, *, require_survival: bool = True, check_files: bool = True
) -> pd.DataFrame:
    """Read and validate a manifest (CSV or JSONL).

    Returns a DataFrame with ``MANIFEST_COLUMNS`` first (``image`` as an absolute path, ``time`` float64,
    ``event`` int64 or float64 with NaN where survival is absent) followed by the clinical columns.
    """
    path = Path(path).expanduser().resolve()
    table = _read_table(path)
    table.columns = [str(c).strip() for c in table.columns]
    required = _ID_COLUMNS + (_SURVIVAL_COLUMNS if require_survival else ())
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ManifestError(
            f"{path}: missing required column(s) {missing}; expected {list(required)}, found "
            f"{list(table.columns)}"
        )
    if table.empty:
        raise ManifestError(f"{path}: no rows; expected one row per scan below the header")
    for column in ("report", *_SURVIVAL_COLUMNS):
        if column not in table.columns:
            table[column] = "" if column == "report" else float("nan")
    table["report"] = table["report"].map(lambda v: "" if _is_missing(v) else str(v))
    table = table.reset_index(drop=True)
    _validate_rows(table, path, require_survival=require_survival, check_files=check_files)
    extra = [c for c in table.columns if c not in MANIFEST_COLUMNS]
    return table[[*MANIFEST_COLUMNS, *extra]]


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write ``df`` as CSV or JSONL (by suffix); ``MANIFEST_COLUMNS`` first, clinical columns after.

    Images inside the manifest's folder are written relative to it, so the cohort folder can move.
    """
    path = Path(path).expanduser()
    missing = [c for c in _ID_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: cannot write a manifest without column(s) {missing}")
    table = df.copy()
    for column in ("report", *_SURVIVAL_COLUMNS):
        if column not in table.columns:
            table[column] = "" if column == "report" else float("nan")
    folder = path.parent.resolve()
    table["image"] = [_relative_if_inside(Path(str(image)), folder) for image in table["image"]]
    extra = [c for c in table.columns if c not in MANIFEST_COLUMNS]
    table = table[[*MANIFEST_COLUMNS, *extra]]
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        table.to_csv(path, index=False)
    elif suffix in (".jsonl", ".json"):
        table.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        raise ManifestError(f"{path}: unsupported manifest format {suffix!r}; expected .csv or .jsonl")
    return path


def _relative_if_inside(image: Path, folder: Path) -> str:
    if not image.is_absolute():
        return str(image)
    try:
        return str(image.resolve().relative_to(folder))
    except ValueError:
        return str(image)
