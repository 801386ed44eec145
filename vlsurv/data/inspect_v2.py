"""INSPECT adapter (v2 layout) -> the manifest schema.

Expected under ``root`` (one file per pattern; column names are matched case- and space-insensitively):

- ``labels_*.tsv``: ``impression_id``, ``tte_mortality``, ``is_censored_mortality`` (+ other labels, kept
  as extra columns). **``tte_mortality`` is in DAYS** from the CTPA study to death or censoring, as all
  of INSPECT's time-to-event labels; ``event = 1 - is_censored_mortality`` (1 = death observed).
- ``impressions_*.tsv``: ``impression_id`` and the impression text (``impressions``, ``impression``,
  ``report`` or ``text``), which becomes ``report``.
- ``study_mapping_*.tsv``: ``impression_id`` -> ``image_id`` (+ ``person_id``/``patient_id`` when present,
  which becomes ``patient_id``; otherwise the impression id stands for the patient).
- ``splits_*.tsv``: ``split`` per ``impression_id``, ``image_id`` or ``person_id``/``patient_id``;
  values train / valid|validation|val|tune / test map to ``train``, ``val``, ``test``.
- volumes ``CTPA/<image_id>.nii.gz``.

``inspect_manifest(root)`` returns one row per image: ``patient_id``, ``scan_id`` (= image_id), ``image``,
``report`` (= impression), ``time`` (days), ``event``, ``split`` plus the extra columns. Studies without
a mortality label are left out unless ``keep_unlabelled=True`` (then time/event are empty).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from vlsurv.data.manifest import MANIFEST_COLUMNS

LABEL_COLUMNS = ("impression_id", "tte_mortality", "is_censored_mortality")
_IMPRESSION_TEXT_COLUMNS = ("impressions", "impression", "report", "text")
_PATIENT_COLUMNS = ("person_id", "patient_id")
_SPLIT_NAMES = {"train": "train", "valid": "val", "validation": "val", "val": "val", "tune": "val",
                "test": "test"}


class InspectError(ValueError):
    """An INSPECT file, column or row that does not follow the v2 layout."""


def _find_table(root: Path, prefix: str) -> Path:
    matches = sorted(root.glob(f"{prefix}_*.tsv")) + sorted(root.glob(f"{prefix}.tsv"))
    if not matches:
        raise InspectError(f"{root}: no {prefix}_*.tsv file found (INSPECT v2 layout)")
    if len(matches) > 1:
        raise InspectError(f"{root}: several {prefix}_*.tsv files {[p.name for p in matches]}; expected one")
    return matches[0]


def _read_tsv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=[""])
    except (ValueError, pd.errors.ParserError) as error:
        raise InspectError(f"{path}: cannot parse the TSV file ({error})") from error
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InspectError(f"{path}: missing column(s) {missing}; expected {list(required)}, "
                           f"found {list(table.columns)}")
    for column in ("impression_id", "image_id", *_PATIENT_COLUMNS):
        if column in table.columns:
            table[column] = table[column].str.strip()
    return table


def _first_present(table: pd.DataFrame, candidates: tuple[str, ...], path: Path, what: str) -> str:
    for column in candidates:
        if column in table.columns:
            return column
    raise InspectError(f"{path}: no {what} column; expected one of {list(candidates)}, found {list(table.columns)}")


def _survival(labels: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Add float ``time`` (days) and ``event`` (1 - is_censored) to ``labels``; errors name the row."""
    times, events = [], []
    for row_number, row in enumerate(labels.itertuples(index=False), start=1):
        tte, censored = row.tte_mortality, row.is_censored_mortality
        if pd.isna(tte) and pd.isna(censored):
            times.append(math.nan)
            events.append(math.nan)
            continue
        where = f"{path}: row {row_number} (impression_id={row.impression_id!r})"
        try:
            time = float(tte)
        except (TypeError, ValueError):
            time = math.nan
        if not math.isfinite(time) or time < 0:
            raise InspectError(f"{where}: field 'tte_mortality': got {tte!r}; expected days >= 0")
        try:
            censored_value = float(censored)
        except (TypeError, ValueError):
            censored_value = math.nan
        if censored_value not in (0.0, 1.0):
            raise InspectError(f"{where}: field 'is_censored_mortality': got {censored!r}; expected 0 or 1")
        times.append(time)
        events.append(1.0 - censored_value)
    return labels.assign(time=times, event=events)


def _splits(root: Path) -> tuple[str, dict[str, str]]:
    """Return the key column of ``splits_*.tsv`` and a map key -> manifest split."""
    path = _find_table(root, "splits")
    table = _read_tsv(path, ("split",))
    key = _first_present(table, ("impression_id", "image_id", *_PATIENT_COLUMNS), path, "id")
    mapping = {}
    for row_number, (key_value, split) in enumerate(zip(table[key], table["split"], strict=True), start=1):
        name = _SPLIT_NAMES.get(str(split).strip().lower())
        if name is None:
            raise InspectError(f"{path}: row {row_number} ({key}={key_value!r}): field 'split': got {split!r}; "
                               f"expected one of {sorted(_SPLIT_NAMES)}")
        mapping[str(key_value)] = name
    return key, mapping


def inspect_manifest(root: str | Path, *, keep_unlabelled: bool = False) -> pd.DataFrame:
    """Manifest DataFrame (``MANIFEST_COLUMNS`` + extra columns) for an INSPECT v2 folder; time in days."""
    root = Path(root)
    if not root.is_dir():
        raise InspectError(f"{root}: INSPECT folder not found")
    labels_path = _find_table(root, "labels")
    labels = _survival(_read_tsv(labels_path, LABEL_COLUMNS), labels_path)
    impressions_path = _find_table(root, "impressions")
    impressions = _read_tsv(impressions_path, ("impression_id",))
    text_column = _first_present(impressions, _IMPRESSION_TEXT_COLUMNS, impressions_path, "impression text")
    reports = dict(zip(impressions["impression_id"], impressions[text_column].fillna(""), strict=True))
    mapping_path = _find_table(root, "study_mapping")
    mapping = _read_tsv(mapping_path, ("impression_id", "image_id"))
    split_key, splits = _splits(root)

    patient_column = next((c for c in _PATIENT_COLUMNS if c in mapping.columns), None)
    label_extras = [c for c in labels.columns if c not in (*LABEL_COLUMNS, "time", "event")]
    table = mapping.merge(labels[["impression_id", "time", "event", *label_extras]], on="impression_id",
                          how="left", suffixes=("", "_label"))
    rows = []
    for row_number, row in enumerate(table.to_dict("records"), start=1):
        impression_id, image_id = row["impression_id"], row["image_id"]
        where = f"{mapping_path}: row {row_number} (image_id={image_id!r})"
        if impression_id not in reports:
            raise InspectError(f"{where}: impression_id {impression_id!r} has no row in {impressions_path.name}")
        split = splits.get(str(row.get(split_key)))
        if split is None:
            raise InspectError(f"{where}: {split_key} {row.get(split_key)!r} has no row in splits file")
        if not keep_unlabelled and pd.isna(row["time"]):
            continue
        patient_id = row[patient_column] if patient_column else impression_id
        extras = {k: v for k, v in row.items()
                  if k not in (*MANIFEST_COLUMNS, "image_id", "impression_id", patient_column)}
        rows.append({"patient_id": patient_id, "scan_id": image_id, "image": str(root / "CTPA" / f"{image_id}.nii.gz"),
                     "report": reports[impression_id], "time": row["time"], "event": row["event"], "split": split,
                     "impression_id": impression_id, **extras})
    frame = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, "impression_id", *_extra_columns(rows)])
    if not frame["event"].isna().any():
        frame["event"] = frame["event"].astype("int64")
    return frame


def _extra_columns(rows: list[dict]) -> list[str]:
    seen = dict.fromkeys(k for row in rows for k in row if k not in (*MANIFEST_COLUMNS, "impression_id"))
    return list(seen)


def main(argv: list[str] | None = None) -> int:
    """``vlsurv inspect``: an INSPECT v2 folder -> the cohort manifest (time in days)."""
    import argparse

    from vlsurv.data.manifest import write_manifest

    parser = argparse.ArgumentParser(prog="vlsurv inspect", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("--root", required=True, help="INSPECT folder (labels_*.tsv, ..., CTPA/)")
    parser.add_argument("--out", required=True, help="manifest file to write (.csv or .jsonl)")
    parser.add_argument("--keep-unlabelled", action="store_true", help="keep studies without a mortality label")
    args = parser.parse_args(argv)
    try:
        frame = inspect_manifest(args.root, keep_unlabelled=args.keep_unlabelled)
    except InspectError as err:
        parser.error(str(err))
    path = write_manifest(frame, args.out)
    print(f"{path}: {len(frame)} INSPECT scans, {int(frame['event'].sum())} deaths")
    return 0
