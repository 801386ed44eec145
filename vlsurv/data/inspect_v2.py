"""INSPECT adapter (v2 layout) -> the manifest schema.

Expected under ``root`` (one file per pattern; column names are matched case- and space-insensitively):

- ``labels_*.tsv``: ``impression_id``, ``tte_mortality``, ``is_censored_mortality`` (+ other labels, kept
  as extra columns). **``tte_mortality`` is in DAYS** from the CTPA study to death or censoring, as all
  of INSPECT's time-to-event labels; ``event = 1 - is_censored_mortality`` (1 = death observed).
  Labels are typed in the manifest (values TRUE/FALSE, True/False or 1/0 are read case-insensitively):
  ``tte_*`` -> float days; ``is_censored_*`` and the PE flags ``pe_positive_nlp``, ``pe_acute``,
  ``pe_subsegmentalonly`` -> 1.0 / 0.0 (NaN when empty); horizon labels ``<n>_month_<outcome>``
  (``1_month_mortality``, ``6_month_mortality``, ``12_month_mortality``, ``*_readmission``, ``12_month_PH``,
  lower-cased as every column) -> 1.0 (TRUE) / 0.0 (FALSE) / NaN (Censored: follow-up ended before the
  horizon, or empty), ready for fixed-horizon metrics. Other label columns are kept as text.
- ``impressions_*.tsv``: ``impression_id`` and the impression text (``impressions``, ``impression``,
  ``report`` or ``text``), which becomes ``report``.
- ``study_mapping_*.tsv``: ``impression_id`` -> ``image_id`` (+ ``person_id``/``patient_id`` when present,
  which becomes ``patient_id``; otherwise the impression id stands for the patient).
- ``splits_*.tsv``: ``split`` per ``impression_id``, ``image_id`` or ``person_id``/``patient_id``;
  values train / valid|validation|val|tune / test map to ``train``, ``val``, ``test``.
- volumes ``CTPA/<image_id>.nii.gz``.

Age, sex and vitals are not in INSPECT's files: they live in the EHR (OMOP ``person`` / ``measurement``,
reached through ``study_mapping``'s ``person_id``). ``inspect_manifest(root, clinical=TABLE)`` joins a CSV or
TSV holding them, keyed by ``impression_id`` (one row per study, e.g. vitals at the study) or by
``person_id`` / ``patient_id`` (one row per patient); its other columns are added to every matching scan.
The ``pe`` clinical template reads ``age``, ``sex`` or ``gender``, ``temperature`` (F), ``respiratory_rate``,
``mean_arterial_pressure`` and ``pulse`` (prompts/clinical/README.md).

``inspect_manifest(root)`` returns one row per image: ``patient_id``, ``scan_id`` (= image_id), ``image``,
``report`` (= impression), ``time`` (days), ``event``, ``split`` plus the extra columns. Studies without
a mortality label are left out unless ``keep_unlabelled=True`` (then time/event are empty).
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import pandas as pd

from vlsurv.data.clinical import DEFAULT_MAX_MISSING_FRACTION, warn_missing_fields
from vlsurv.data.manifest import MANIFEST_COLUMNS, write_manifest
from vlsurv.errors import InputError

LABEL_COLUMNS = ("impression_id", "tte_mortality", "is_censored_mortality")
_IMPRESSION_TEXT_COLUMNS = ("impressions", "impression", "report", "text")
_PATIENT_COLUMNS = ("person_id", "patient_id")
_SPLIT_NAMES = {
    "train": "train",
    "valid": "val",
    "validation": "val",
    "val": "val",
    "tune": "val",
    "test": "test",
}
PE_FLAG_COLUMNS = ("pe_positive_nlp", "pe_acute", "pe_subsegmentalonly")
HORIZON_LABEL = re.compile(r"^\d+_month_\w+$")
CLINICAL_TEMPLATE = "pe"
_TRUE = {"true", "1", "1.0", "yes"}
_FALSE = {"false", "0", "0.0", "no"}
_CENSORED = {"censored"}


class InspectError(InputError):
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
        raise InspectError(
            f"{path}: missing column(s) {missing}; expected {list(required)}, found {list(table.columns)}"
        )
    for column in ("impression_id", "image_id", *_PATIENT_COLUMNS):
        if column in table.columns:
            table[column] = table[column].str.strip()
    return table


def _first_present(table: pd.DataFrame, candidates: tuple[str, ...], path: Path, what: str) -> str:
    for column in candidates:
        if column in table.columns:
            return column
    raise InspectError(
        f"{path}: no {what} column; expected one of {list(candidates)}, found {list(table.columns)}"
    )


def _label_value(text: object, column: str, where: str) -> float:
    """One label cell -> float (days, 1.0 / 0.0, or NaN for empty / Censored); errors name ``where``."""
    if pd.isna(text):
        return math.nan
    key = str(text).strip().lower()
    if column.startswith("tte_"):
        try:
            days = float(key)
        except ValueError:
            days = math.nan
        if not math.isfinite(days) or days < 0:
            raise InspectError(f"{where}: field {column!r}: got {text!r}; expected days >= 0")
        return days
    horizon = HORIZON_LABEL.match(column) is not None
    if key in _TRUE or key in _FALSE:
        return 1.0 if key in _TRUE else 0.0
    if horizon and key in _CENSORED:
        return math.nan
    expected = "TRUE, FALSE or Censored (or 1/0)" if horizon else "0 or 1 (or TRUE/FALSE)"
    raise InspectError(f"{where}: field {column!r}: got {text!r}; expected {expected}")


def _typed_labels(labels: pd.DataFrame, path: Path) -> pd.DataFrame:
    """``tte_*``, ``is_censored_*``, PE flags and horizon labels as float columns (see module docstring)."""
    typed = [
        c
        for c in labels.columns
        if c.startswith(("tte_", "is_censored_")) or c in PE_FLAG_COLUMNS or HORIZON_LABEL.match(c)
    ]
    labels = labels.copy()
    for column in typed:
        labels[column] = [
            _label_value(text, column, f"{path}: row {row_number} (impression_id={impression_id!r})")
            for row_number, (impression_id, text) in enumerate(
                zip(labels["impression_id"], labels[column], strict=True), start=1
            )
        ]
    return labels


def _survival(labels: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Typed labels plus float ``time`` (days) and ``event`` (1 - is_censored); errors name the row."""
    labels = _typed_labels(labels, path)
    for row_number, row in enumerate(labels.itertuples(index=False), start=1):
        if pd.isna(row.tte_mortality) != pd.isna(row.is_censored_mortality):
            empty = "tte_mortality" if pd.isna(row.tte_mortality) else "is_censored_mortality"
            raise InspectError(
                f"{path}: row {row_number} (impression_id={row.impression_id!r}): field {empty!r} "
                f"is empty but its pair is not; expected both or neither"
            )
    return labels.assign(time=labels["tte_mortality"], event=1.0 - labels["is_censored_mortality"])


def _splits(root: Path) -> tuple[str, dict[str, str]]:
    """Return the key column of ``splits_*.tsv`` and a map key -> manifest split."""
    path = _find_table(root, "splits")
    table = _read_tsv(path, ("split",))
    key = _first_present(table, ("impression_id", "image_id", *_PATIENT_COLUMNS), path, "id")
    mapping = {}
    for row_number, (key_value, split) in enumerate(zip(table[key], table["split"], strict=True), start=1):
        name = _SPLIT_NAMES.get(str(split).strip().lower())
        if name is None:
            raise InspectError(
                f"{path}: row {row_number} ({key}={key_value!r}): field 'split': got {split!r}; "
                f"expected one of {sorted(_SPLIT_NAMES)}"
            )
        mapping[str(key_value)] = name
    return key, mapping


def read_clinical_table(path: str | Path) -> tuple[str, pd.DataFrame]:
    """(key column, table) of a clinical CSV/TSV keyed by ``impression_id`` or ``person_id`` / ``patient_id``.

    Column names are stripped and lower-cased; keys are text; a key repeated or empty is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise InspectError(f"{path}: clinical table not found")
    separator = "\t" if path.suffix.lower() in (".tsv", ".tab", ".txt") else ","
    try:
        header = pd.read_csv(path, sep=separator, nrows=0).columns
        keys = {c: str for c in header if str(c).strip().lower() in ("impression_id", *_PATIENT_COLUMNS)}
        table = pd.read_csv(path, sep=separator, dtype=keys)
    except (ValueError, pd.errors.ParserError) as error:
        raise InspectError(f"{path}: cannot parse the clinical table ({error})") from error
    table.columns = [str(c).strip().lower() for c in table.columns]
    key = _first_present(table, ("impression_id", *_PATIENT_COLUMNS), path, "key")
    table[key] = table[key].str.strip()
    empty = table[key].isna() | (table[key] == "")
    if empty.any():
        raise InspectError(
            f"{path}: row {int(empty.to_numpy().argmax()) + 1}: field {key!r} is empty; "
            f"expected an id on every row"
        )
    repeated = table[key].duplicated()
    if repeated.any():
        raise InspectError(
            f"{path}: {key} {table[key][repeated].iloc[0]!r} has several rows; expected one row per {key}"
        )
    other_keys = [c for c in ("impression_id", *_PATIENT_COLUMNS) if c in table.columns and c != key]
    return key, table.drop(columns=other_keys)


def join_clinical(frame: pd.DataFrame, path: str | Path, *, has_person_ids: bool) -> pd.DataFrame:
    """``frame`` (an INSPECT manifest) with the clinical table's columns added, matched by impression or
    person.

    Scans without a clinical row get empty values. ``has_person_ids`` says whether ``patient_id`` holds
    study_mapping's person ids (a person-keyed table needs them).
    """
    key, table = read_clinical_table(path)
    frame_key = "impression_id" if key == "impression_id" else "patient_id"
    if frame_key == "patient_id" and not has_person_ids:
        raise InspectError(
            f"{path}: keyed by {key!r}, but study_mapping has no person_id column; expected a "
            f"table keyed by impression_id"
        )
    clashes = [c for c in table.columns if c != key and c in frame.columns]
    if clashes:
        raise InspectError(
            f"{path}: column(s) {clashes} are already in the manifest; expected only new clinical "
            f"columns besides {key!r}"
        )
    joined = frame.merge(table.rename(columns={key: frame_key}), on=frame_key, how="left")
    return joined


def inspect_manifest(
    root: str | Path, *, keep_unlabelled: bool = False, clinical: str | Path | None = None
) -> pd.DataFrame:
    """Manifest DataFrame (``MANIFEST_COLUMNS`` + extra columns) for an INSPECT v2 folder; time in days.

    ``clinical``: a CSV/TSV of age, sex, vitals, ... keyed by impression_id or person_id (``join_clinical``).
    """
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
    table = mapping.merge(
        labels[["impression_id", "time", "event", *label_extras]],
        on="impression_id",
        how="left",
        suffixes=("", "_label"),
    )
    rows = []
    for row_number, row in enumerate(table.to_dict("records"), start=1):
        impression_id, image_id = row["impression_id"], row["image_id"]
        where = f"{mapping_path}: row {row_number} (image_id={image_id!r})"
        if impression_id not in reports:
            raise InspectError(
                f"{where}: impression_id {impression_id!r} has no row in {impressions_path.name}"
            )
        split = splits.get(str(row.get(split_key)))
        if split is None:
            raise InspectError(f"{where}: {split_key} {row.get(split_key)!r} has no row in splits file")
        if not keep_unlabelled and pd.isna(row["time"]):
            continue
        patient_id = row[patient_column] if patient_column else impression_id
        extras = {
            k: v
            for k, v in row.items()
            if k not in (*MANIFEST_COLUMNS, "image_id", "impression_id", patient_column)
        }
        rows.append(
            {
                "patient_id": patient_id,
                "scan_id": image_id,
                "image": str(root / "CTPA" / f"{image_id}.nii.gz"),
                "report": reports[impression_id],
                "time": row["time"],
                "event": row["event"],
                "split": split,
                "impression_id": impression_id,
                **extras,
            }
        )
    frame = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS, "impression_id", *_extra_columns(rows)])
    if not frame["event"].isna().any():
        frame["event"] = frame["event"].astype("int64")
    if clinical is not None:
        frame = join_clinical(frame, clinical, has_person_ids=patient_column is not None)
    return frame


def _extra_columns(rows: list[dict]) -> list[str]:
    seen = dict.fromkeys(k for row in rows for k in row if k not in (*MANIFEST_COLUMNS, "impression_id"))
    return list(seen)


def main(argv: list[str] | None = None) -> int:
    """``vlsurv inspect``: an INSPECT v2 folder -> the cohort manifest (time in days)."""
    parser = argparse.ArgumentParser(prog="vlsurv inspect", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("--root", required=True, help="INSPECT folder (labels_*.tsv, ..., CTPA/)")
    parser.add_argument("--out", required=True, help="manifest file to write (.csv or .jsonl)")
    parser.add_argument(
        "--keep-unlabelled", action="store_true", help="keep studies without a mortality label"
    )
    parser.add_argument(
        "--clinical",
        help="CSV/TSV of age, sex, vitals keyed by impression_id or person_id "
        "(from the EHR; see prompts/clinical/README.md)",
    )
    parser.add_argument(
        "--max-missing-fraction",
        type=float,
        default=DEFAULT_MAX_MISSING_FRACTION,
        help="warn when more than this fraction of scans lack a field of the pe template",
    )
    args = parser.parse_args(argv)
    try:
        frame = inspect_manifest(args.root, keep_unlabelled=args.keep_unlabelled, clinical=args.clinical)
        warn_missing_fields(
            frame.to_dict("records"),
            CLINICAL_TEMPLATE,
            max_fraction=args.max_missing_fraction,
            where=str(args.out),
            option="--max-missing-fraction",
        )
    except InputError as err:
        parser.error(str(err))
    path = write_manifest(frame, args.out)
    print(
        f"{path}: {len(frame)} INSPECT scans, {int(frame['event'].sum())} deaths; clinical sentences: "
        f"model.clinical_template={CLINICAL_TEMPLATE}"
    )
    return 0
