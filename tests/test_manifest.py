"""Manifest read/write and row-level validation errors."""

from __future__ import annotations

import pandas as pd
import pytest

from vlsurv.data.manifest import MANIFEST_COLUMNS, SPLITS, ManifestError, load_manifest, write_manifest


def make_rows(folder, n=3):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        (folder / "images" / f"s{i}.nii.gz").write_bytes(b"")
        rows.append(
            {
                "patient_id": f"p{i}",
                "scan_id": f"s{i}",
                "image": f"images/s{i}.nii.gz",
                "report": f"FINDINGS: scan {i}.",
                "time": 10.0 * (i + 1),
                "event": i % 2,
                "split": SPLITS[i % 3],
                "age": 60 + i,
            }
        )
    return rows


def write_csv(folder, rows, name="manifest.csv"):
    path = folder / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_schema_constants():
    assert MANIFEST_COLUMNS == ("patient_id", "scan_id", "image", "report", "time", "event", "split")
    assert SPLITS == ("train", "val", "test")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_roundtrip_resolves_images_and_keeps_clinical(tmp_path, suffix):
    rows = make_rows(tmp_path)
    path = write_manifest(pd.DataFrame(rows), tmp_path / f"manifest{suffix}")
    table = load_manifest(path)
    assert list(table.columns) == [*MANIFEST_COLUMNS, "age"]
    assert table["image"].tolist() == [
        str((tmp_path / "images" / f"s{i}.nii.gz").resolve()) for i in range(3)
    ]
    assert table["time"].dtype == "float64" and table["event"].dtype == "int64"
    assert table["event"].tolist() == [0, 1, 0] and table["age"].tolist() == [60, 61, 62]
    assert table["scan_id"].tolist() == ["s0", "s1", "s2"]
    # Writing the loaded table again stores images relative to the manifest folder.
    again = write_manifest(table, tmp_path / f"again{suffix}")
    assert load_manifest(again).equals(table)
    if suffix == ".csv":
        assert "images/s0.nii.gz" in again.read_text()


def test_numeric_looking_ids_stay_strings(tmp_path):
    rows = make_rows(tmp_path)
    rows[0]["patient_id"] = "007"
    assert load_manifest(write_csv(tmp_path, rows))["patient_id"][0] == "007"


def test_survival_optional_for_vqa_data(tmp_path):
    rows = make_rows(tmp_path)
    for row in rows:
        row["time"], row["event"] = None, None
    path = write_csv(tmp_path, rows)
    table = load_manifest(path, require_survival=False)
    assert table["time"].isna().all() and table["event"].isna().all()
    with pytest.raises(ManifestError, match=r"row 1 \(scan_id='s0'\): field 'time': is empty or NaN"):
        load_manifest(path)
    no_columns = write_csv(
        tmp_path, [{k: v for k, v in r.items() if k not in ("time", "event")} for r in rows], "vqa.csv"
    )
    assert load_manifest(no_columns, require_survival=False)["time"].isna().all()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("time", -3.0, r"row 2 \(scan_id='s1'\): field 'time': got -3\.0; expected a finite number >= 0"),
        ("time", "soon", r"row 2 \(scan_id='s1'\): field 'time': got 'soon'"),
        ("time", float("nan"), r"row 2 \(scan_id='s1'\): field 'time': is empty or NaN"),
        ("event", 2, r"row 2 \(scan_id='s1'\): field 'event': got 2; expected 0 or 1"),
        ("event", 0.5, r"row 2 \(scan_id='s1'\): field 'event': got 0\.5; expected 0 or 1"),
        ("split", "validation", r"row 2 \(scan_id='s1'\): field 'split': 'validation' is not one of"),
        ("scan_id", "s0", r"row 2 \(scan_id='s0'\): field 'scan_id': duplicate of row 1"),
        (
            "image",
            "images/absent.nii.gz",
            r"row 2 \(scan_id='s1'\): field 'image': file not found: .*absent\.nii\.gz",
        ),
        ("patient_id", "", r"row 2 \(scan_id='s1'\): field 'patient_id': is empty"),
    ],
)
def test_bad_rows_name_row_and_field(tmp_path, field, value, message):
    rows = make_rows(tmp_path)
    rows[1][field] = value
    path = write_csv(tmp_path, rows)
    with pytest.raises(ManifestError, match=r"manifest\.csv: " + message):
        load_manifest(path)


def test_negative_time_checked_even_without_survival_requirement(tmp_path):
    rows = make_rows(tmp_path)
    rows[2]["time"] = -1
    with pytest.raises(ManifestError, match=r"row 3 \(scan_id='s2'\): field 'time'"):
        load_manifest(write_csv(tmp_path, rows), require_survival=False)


def test_missing_image_allowed_without_file_check(tmp_path):
    rows = make_rows(tmp_path)
    rows[0]["image"] = "images/absent.nii.gz"
    table = load_manifest(write_csv(tmp_path, rows), check_files=False)
    assert table["image"][0].endswith("absent.nii.gz")


def test_missing_required_column(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "split"} for r in make_rows(tmp_path)]
    with pytest.raises(ManifestError, match=r"manifest\.csv: missing required column\(s\) \['split'\]"):
        load_manifest(write_csv(tmp_path, rows))


def test_missing_file_and_bad_format(tmp_path):
    with pytest.raises(ManifestError, match=r"absent\.csv: manifest file not found"):
        load_manifest(tmp_path / "absent.csv")
    (tmp_path / "manifest.parquet").write_bytes(b"x")
    with pytest.raises(ManifestError, match=r"manifest\.parquet: unsupported manifest format '\.parquet'"):
        load_manifest(tmp_path / "manifest.parquet")
    with pytest.raises(ManifestError, match=r"out\.txt: unsupported manifest format"):
        write_manifest(pd.DataFrame(make_rows(tmp_path)), tmp_path / "out.txt")
