"""CT-RATE adapter: raw volumes + metadata + reports -> HU volumes and the manifest schema.

CT-RATE's raw ``.nii.gz`` volumes hold stored pixel values and their header spacing is not
trustworthy. The metadata CSV (``VolumeName``, ``XYSpacing`` as a string such as
"[0.341796875, 0.341796875]", ``ZSpacing``, ``RescaleSlope``, ``RescaleIntercept``) gives the truth:
``load_ctrate_volume`` returns HU = stored * slope + intercept with an affine whose voxel size comes
from the metadata (axis 0 = DICOM columns -> ``XYSpacing[1]``, axis 1 = rows -> ``XYSpacing[0]``,
axis 2 -> ``ZSpacing``) and whose axis directions and origin are the header's.
The reports CSV (``VolumeName``, ``Findings_EN``, ``Impressions_EN``) becomes
"FINDINGS: ...\\n\\nIMPRESSION: ...".

Names follow ``<split>_<patient>_<reconstruction letter>_<n>.nii.gz``: "valid_1_a_1.nii.gz" is
patient "valid_1", scan "valid_1_a_1", split "val" ("train" stays "train"). Volumes are found in the
CT-RATE layout ``<root>/<split>/<patient>/<patient>_<a>/<name>.nii.gz`` or in a flat folder.
CT-RATE has no survival labels: manifests leave ``time`` and ``event`` empty.

``ctrate_inplace_manifest`` (what ``vlsurv ctrate`` writes by default) points at the raw volumes and carries
the metadata as the manifest's override columns (``spacing_x/y/z``, ``rescale_slope``, ``rescale_intercept``;
see ``vlsurv.data.manifest``), which ``load_ct`` applies: no volume is copied, and HU and spacing equal
those of the rewritten volumes (``convert_ctrate``, ``vlsurv ctrate --rewrite``; these round HU to int16).

Demographics: the metadata's ``PatientAge`` (DICOM age string "036Y"; D/W/M/Y units) becomes ``age`` in
years and ``PatientSex`` ("M"/"F"; "O" or empty stays empty) becomes ``sex`` (male/female) in the manifest.
Their clinical sentence comes from the ``chest_ct`` template (``CLINICAL_TEMPLATE``), e.g. "A 36-year-old
male patient undergoing chest CT." (not the lung template's "lung cancer patient").
"""

from __future__ import annotations

import argparse
import ast
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from vlsurv.data.clinical import DEFAULT_MAX_MISSING_FRACTION, check_max_missing_fraction, warn_missing_fields
from vlsurv.data.ct import CTError, CTVolume, ScanOverrides, load_ct
from vlsurv.data.manifest import MANIFEST_COLUMNS, write_manifest
from vlsurv.errors import InputError

_NAME_PATTERN = re.compile(
    r"^(?P<split>train|valid)_(?P<number>[0-9]+)_(?P<letter>[a-z]+)_(?P<index>[0-9]+)$"
)
_SPLIT_NAMES = {"train": "train", "valid": "val"}
_METADATA_COLUMNS = ("VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept")
_REPORT_COLUMNS = ("VolumeName", "Findings_EN", "Impressions_EN")
_DICOM_AGE = re.compile(r"^(?P<number>[0-9]{1,3})\s*(?P<unit>[DWMY])$")
_UNITS_PER_YEAR = {"D": 365.25, "W": 365.25 / 7.0, "M": 12.0, "Y": 1.0}
_SEXES = {"M": "male", "F": "female", "O": None}
DEMOGRAPHIC_COLUMNS = ("age", "sex")
CLINICAL_TEMPLATE = "chest_ct"


class CTRateError(InputError):
    """A CT-RATE file, row or volume name that does not follow CT-RATE's layout."""


@dataclass(frozen=True)
class CTRateGeometry:
    """Per-volume metadata: pixel spacing (row, column) mm, slice spacing mm, rescale slope and intercept."""

    xy_spacing: tuple[float, float]
    z_spacing: float
    slope: float
    intercept: float

    @property
    def overrides(self) -> ScanOverrides:
        """Spacing along array axes (0 = columns -> ``xy_spacing[1]``, 1 = rows, 2 = slices) and rescale."""
        spacing = (self.xy_spacing[1], self.xy_spacing[0], self.z_spacing)
        return ScanOverrides(spacing=spacing, slope=self.slope, intercept=self.intercept)

    @property
    def columns(self) -> dict[str, float]:
        """The manifest's override columns (``spacing_x/y/z``, ``rescale_slope``, ``rescale_intercept``)."""
        spacing = dict(zip(("spacing_x", "spacing_y", "spacing_z"), self.overrides.spacing))
        return {**spacing, "rescale_slope": self.slope, "rescale_intercept": self.intercept}


@dataclass
class CTRateSample:
    """One CT-RATE scan: ids, split, HU volume (X, Y, Z) and report text."""

    patient_id: str
    scan_id: str
    split: str
    volume: CTVolume
    report: str


def scan_id_of(path_or_name: str | Path) -> str:
    """'.../valid_1_a_1.nii.gz' -> 'valid_1_a_1'."""
    name = Path(str(path_or_name)).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def parse_volume_name(path_or_name: str | Path) -> tuple[str, str, str]:
    """Return (patient_id, scan_id, split) of a CT-RATE volume name, e.g. ('valid_1', 'valid_1_a_1',
    'val')."""
    scan_id = scan_id_of(path_or_name)
    match = _NAME_PATTERN.match(scan_id)
    if match is None:
        raise CTRateError(f"{path_or_name}: not a CT-RATE volume name; expected e.g. 'valid_1_a_1.nii.gz'")
    return f"{match['split']}_{match['number']}", scan_id, _SPLIT_NAMES[match["split"]]


def _read_csv(path: str | Path, required: tuple[str, ...]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise CTRateError(f"{path}: file not found")
    table = pd.read_csv(path, dtype={"VolumeName": str}, keep_default_na=False, na_values=[""])
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise CTRateError(f"{path}: missing column(s) {missing}; expected {list(required)}")
    return table


def parse_xy_spacing(text: object, where: str = "XYSpacing") -> tuple[float, float]:
    """'[0.341796875, 0.341796875]' -> (0.341796875, 0.341796875); raises CTRateError naming ``where``."""
    try:
        values = ast.literal_eval(str(text).strip())
        row, column = (float(v) for v in values)
    except (ValueError, TypeError, SyntaxError):
        raise CTRateError(f"{where}: got {text!r}; expected two spacings such as '[0.7, 0.7]'") from None
    if not (row > 0 and column > 0):
        raise CTRateError(f"{where}: got {text!r}; expected positive spacings")
    return row, column


def read_ctrate_metadata(path: str | Path) -> dict[str, CTRateGeometry]:
    """Map scan_id -> CTRateGeometry from CT-RATE's metadata CSV; errors name the row and field."""
    table = _read_csv(path, _METADATA_COLUMNS)
    geometry = {}
    for row_number, row in enumerate(table.itertuples(index=False), start=1):
        where = f"{path}: row {row_number} ({row.VolumeName})"
        numbers = {}
        for field in ("ZSpacing", "RescaleSlope", "RescaleIntercept"):
            try:
                numbers[field] = float(getattr(row, field))
            except (TypeError, ValueError):
                numbers[field] = math.nan
            if not math.isfinite(numbers[field]) or (field != "RescaleIntercept" and numbers[field] <= 0):
                raise CTRateError(
                    f"{where}: field {field!r}: got {getattr(row, field)!r}; expected a "
                    f"{'finite' if field == 'RescaleIntercept' else 'positive'} number"
                )
        geometry[scan_id_of(row.VolumeName)] = CTRateGeometry(
            xy_spacing=parse_xy_spacing(row.XYSpacing, f"{where}: field 'XYSpacing'"),
            z_spacing=numbers["ZSpacing"],
            slope=numbers["RescaleSlope"],
            intercept=numbers["RescaleIntercept"],
        )
    return geometry


def parse_dicom_age(text: object, where: str = "PatientAge") -> float:
    """DICOM age string -> years: '036Y' -> 36.0, '006M' -> 0.5; empty -> NaN; CTRateError naming
    ``where``."""
    if text is None or (isinstance(text, float) and math.isnan(text)) or not str(text).strip():
        return math.nan
    match = _DICOM_AGE.match(str(text).strip().upper())
    if match is None:
        raise CTRateError(
            f"{where}: got {text!r}; expected a DICOM age such as '036Y' (number + D, W, M or Y)"
        )
    return int(match["number"]) / _UNITS_PER_YEAR[match["unit"]]


def _sex(text: object, where: str) -> str | None:
    if text is None or (isinstance(text, float) and math.isnan(text)) or not str(text).strip():
        return None
    key = str(text).strip().upper()
    if key not in _SEXES:
        raise CTRateError(f"{where}: got {text!r}; expected M, F or O")
    return _SEXES[key]


def read_ctrate_demographics(path: str | Path) -> dict[str, dict[str, float | str | None]]:
    """Map scan_id -> {"age": years or NaN, "sex": "male" / "female" / None} from the metadata CSV.

    A metadata file without ``PatientAge`` / ``PatientSex`` gives empty values; a bad value is an error.
    """
    table = _read_csv(path, ("VolumeName",))
    demographics = {}
    for row_number, row in enumerate(table.to_dict("records"), start=1):
        where = f"{path}: row {row_number} ({row['VolumeName']}): field"
        demographics[scan_id_of(row["VolumeName"])] = {
            "age": parse_dicom_age(row.get("PatientAge"), f"{where} 'PatientAge'"),
            "sex": _sex(row.get("PatientSex"), f"{where} 'PatientSex'"),
        }
    return demographics


def format_report(findings: object, impression: object) -> str:
    """'FINDINGS: ...\\n\\nIMPRESSION: ...', leaving out an empty part."""
    parts = [
        f"{title}: {str(text).strip()}"
        for title, text in (("FINDINGS", findings), ("IMPRESSION", impression))
        if isinstance(text, str) and text.strip()
    ]
    return "\n\n".join(parts)


def read_ctrate_reports(path: str | Path) -> dict[str, str]:
    """Map scan_id -> report text from CT-RATE's reports CSV."""
    table = _read_csv(path, _REPORT_COLUMNS)
    return {
        scan_id_of(row.VolumeName): format_report(row.Findings_EN, row.Impressions_EN)
        for row in table.itertuples(index=False)
    }


def load_ctrate_volume(path: str | Path, geometry: CTRateGeometry) -> CTVolume:
    """Raw CT-RATE volume -> HU CTVolume (X, Y, Z) with the metadata spacing (``load_ct`` with overrides)."""
    try:
        return load_ct(path, geometry.overrides)
    except CTError as error:
        raise CTRateError(str(error)) from error


def find_ctrate_volumes(root: str | Path) -> list[Path]:
    """All CT-RATE volumes under ``root`` (nested CT-RATE layout or flat folder), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise CTRateError(f"{root}: CT-RATE volume folder not found")
    volumes = sorted(
        (p for p in root.rglob("*.nii*") if p.name.endswith((".nii.gz", ".nii"))), key=lambda p: scan_id_of(p)
    )
    for path in volumes:
        parse_volume_name(path)
    if not volumes:
        raise CTRateError(f"{root}: no .nii.gz volumes found")
    return volumes


def ctrate_manifest(
    volumes: str | Path | Iterable[Path],
    reports_csv: str | Path | None = None,
    metadata_csv: str | Path | None = None,
) -> pd.DataFrame:
    """Manifest rows (``MANIFEST_COLUMNS``, time/event empty) for volumes used as they are on disk.

    ``volumes`` is a folder (searched with ``find_ctrate_volumes``) or a list of paths. Use this for
    volumes that already hold HU with correct headers; for raw volumes use ``ctrate_inplace_manifest``.
    With ``metadata_csv`` the ``age`` (years) and ``sex`` columns are added (``read_ctrate_demographics``).
    """
    paths = find_ctrate_volumes(volumes) if isinstance(volumes, (str, Path)) else [Path(p) for p in volumes]
    reports = read_ctrate_reports(reports_csv) if reports_csv is not None else {}
    rows = []
    for path in paths:
        patient_id, scan_id, split = parse_volume_name(path)
        if reports_csv is not None and scan_id not in reports:
            raise CTRateError(f"{reports_csv}: no report for volume {scan_id}")
        rows.append(
            {
                "patient_id": patient_id,
                "scan_id": scan_id,
                "image": str(path.resolve()),
                "report": reports.get(scan_id, ""),
                "time": math.nan,
                "event": math.nan,
                "split": split,
            }
        )
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    return (
        frame if metadata_csv is None else _with_demographics(frame, read_ctrate_demographics(metadata_csv))
    )


def _with_demographics(frame: pd.DataFrame, demographics: dict[str, dict]) -> pd.DataFrame:
    """``frame`` plus ``age`` (float years, NaN when unknown) and ``sex`` (male / female / empty)."""
    known = [demographics.get(scan_id, {}) for scan_id in frame["scan_id"]]
    return frame.assign(age=[d.get("age", math.nan) for d in known], sex=[d.get("sex") for d in known])


def iter_ctrate(
    root: str | Path, metadata_csv: str | Path, reports_csv: str | Path
) -> Iterator[CTRateSample]:
    """Yield every raw volume under ``root`` as a CTRateSample in HU with metadata spacing and its report."""
    geometry = read_ctrate_metadata(metadata_csv)
    reports = read_ctrate_reports(reports_csv)
    for path in find_ctrate_volumes(root):
        patient_id, scan_id, split = parse_volume_name(path)
        if scan_id not in geometry:
            raise CTRateError(f"{metadata_csv}: no metadata row for volume {path}")
        if scan_id not in reports:
            raise CTRateError(f"{reports_csv}: no report for volume {path}")
        yield CTRateSample(
            patient_id, scan_id, split, load_ctrate_volume(path, geometry[scan_id]), reports[scan_id]
        )


def _checked_inputs(
    root: str | Path, metadata_csv: str | Path, reports_csv: str | Path
) -> tuple[list[Path], dict[str, CTRateGeometry], dict[str, str]]:
    """(volumes, geometry, reports); every volume has a report and a metadata row."""
    geometry = read_ctrate_metadata(metadata_csv)
    reports = read_ctrate_reports(reports_csv)
    volumes = find_ctrate_volumes(root)
    missing = [scan_id_of(p) for p in volumes if scan_id_of(p) not in reports]
    if missing:
        raise CTRateError(f"{reports_csv}: no report for volume(s) {missing[:5]}")
    unknown = [scan_id_of(p) for p in volumes if scan_id_of(p) not in geometry]
    if unknown:
        raise CTRateError(f"{metadata_csv}: no metadata row for volume(s) {unknown[:5]}")
    return volumes, geometry, reports


def _manifest_row(path: Path, image: Path, report: str) -> dict[str, object]:
    patient_id, scan_id, split = parse_volume_name(path)
    return {
        "patient_id": patient_id,
        "scan_id": scan_id,
        "image": str(image.resolve()),
        "report": report,
        "time": math.nan,
        "event": math.nan,
        "split": split,
    }


def ctrate_inplace_manifest(
    root: str | Path, metadata_csv: str | Path, reports_csv: str | Path, out_dir: str | Path
) -> Path:
    """Write ``out_dir/manifest.csv`` pointing at the raw volumes, with the override columns
    (``CTRateGeometry.columns``) that make ``load_ct`` read them in HU with the metadata spacing; time/event
    empty, ``age`` and ``sex`` from the metadata. Nothing is copied; returns the manifest path."""
    volumes, geometry, reports = _checked_inputs(root, metadata_csv, reports_csv)
    rows = []
    for path in volumes:
        scan_id = scan_id_of(path)
        rows.append({**_manifest_row(path, path, reports[scan_id]), **geometry[scan_id].columns})
    frame = _with_demographics(pd.DataFrame(rows), read_ctrate_demographics(metadata_csv))
    return write_manifest(frame, Path(out_dir) / "manifest.csv")


def convert_ctrate(
    root: str | Path, metadata_csv: str | Path, reports_csv: str | Path, out_dir: str | Path
) -> Path:
    """Write HU volumes (int16, corrected affine) to ``out_dir/images/<scan_id>.nii.gz`` and
    ``out_dir/manifest.csv`` (time/event empty; ``age``, ``sex`` from the metadata); return the manifest path.
    Existing volumes are kept."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    volumes, geometry, reports = _checked_inputs(root, metadata_csv, reports_csv)
    rows = []
    for path in volumes:
        scan_id = scan_id_of(path)
        target = out_dir / "images" / f"{scan_id}.nii.gz"
        if not target.exists():
            volume = load_ctrate_volume(path, geometry[scan_id])
            hu = np.clip(np.rint(volume.array), np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(
                np.int16
            )
            partial = target.with_name(f".{scan_id}.partial.nii.gz")
            nib.save(nib.Nifti1Image(hu, volume.affine), str(partial))
            partial.replace(target)
        rows.append(_manifest_row(path, target, reports[scan_id]))
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    frame = _with_demographics(frame, read_ctrate_demographics(metadata_csv))
    return write_manifest(frame, out_dir / "manifest.csv")


def main(argv: list[str] | None = None) -> int:
    """``vlsurv ctrate``: raw CT-RATE volumes + metadata + reports -> a manifest reading them in place (or,
    with --rewrite, HU NIfTI copies)."""
    parser = argparse.ArgumentParser(prog="vlsurv ctrate", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("--volumes", required=True, help="folder searched for CT-RATE .nii.gz volumes")
    parser.add_argument("--metadata", required=True, help="metadata CSV (XYSpacing, ZSpacing, Rescale*)")
    parser.add_argument(
        "--reports", required=True, help="reports CSV (VolumeName, Findings_EN, Impressions_EN)"
    )
    parser.add_argument(
        "--out", required=True, help="output folder: manifest.csv (and images/ with --rewrite)"
    )
    parser.add_argument(
        "--rewrite",
        action="store_true",
        help="write HU NIfTI copies to OUT/images/ instead of reading the raw volumes in place",
    )
    parser.add_argument(
        "--max-missing-fraction",
        type=float,
        default=DEFAULT_MAX_MISSING_FRACTION,
        help=f"warn when more than this fraction of scans lack age or sex ({CLINICAL_TEMPLATE})",
    )
    args = parser.parse_args(argv)
    try:
        check_max_missing_fraction(args.max_missing_fraction, "--max-missing-fraction")
        write = convert_ctrate if args.rewrite else ctrate_inplace_manifest
        manifest = write(args.volumes, args.metadata, args.reports, args.out)
        rows = pd.read_csv(manifest, usecols=["scan_id", *DEMOGRAPHIC_COLUMNS]).to_dict("records")
        warn_missing_fields(
            rows,
            CLINICAL_TEMPLATE,
            max_fraction=args.max_missing_fraction,
            where=str(manifest),
            option="--max-missing-fraction",
        )
    except InputError as err:
        parser.error(str(err))
    print(
        f"{manifest}: CT-RATE manifest written (time and event are empty: CT-RATE has no follow-up); "
        f"clinical sentences (age, sex): model.clinical_template={CLINICAL_TEMPLATE}"
    )
    return 0
