"""INSPECT v2 adapter on a tiny INSPECT-like folder made in the test."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vlsurv.data.inspect_v2 import InspectError, inspect_manifest
from vlsurv.data.manifest import MANIFEST_COLUMNS, load_manifest, write_manifest


def write_tsv(path, rows):
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)


def make_inspect(root, *, labels=None, splits=None):
    (root / "CTPA").mkdir(parents=True)
    write_tsv(root / "labels_20250611.tsv", labels or [
        {"impression_id": "101", "tte_mortality": 35, "is_censored_mortality": 0, "12_month_PH": 1},
        {"impression_id": "102", "tte_mortality": 400.5, "is_censored_mortality": 1, "12_month_PH": 0},
        {"impression_id": "103", "tte_mortality": 12, "is_censored_mortality": 0, "12_month_PH": 0},
        {"impression_id": "104", "tte_mortality": None, "is_censored_mortality": None, "12_month_PH": 0},
    ])
    write_tsv(root / "impressions_20250611.tsv", [
        {"impression_id": i, "impressions": f"Impression {i}: no acute pulmonary embolism."}
        for i in ("101", "102", "103", "104")])
    # Columns with odd case and spaces, as read defensively.
    write_tsv(root / "study_mapping_20250611.tsv", [
        {" Impression_ID": "101", "image_id ": "img_a", "person_id": "P1"},
        {" Impression_ID": "102", "image_id ": "img_b", "person_id": "P1"},
        {" Impression_ID": "103", "image_id ": "img_c", "person_id": "P2"},
        {" Impression_ID": "104", "image_id ": "img_d", "person_id": "P3"},
    ])
    write_tsv(root / "splits_20250611.tsv", splits or [
        {"impression_id": "101", "split": "train"}, {"impression_id": "102", "split": "valid"},
        {"impression_id": "103", "split": "test"}, {"impression_id": "104", "split": "train"}])
    for image_id in ("img_a", "img_b", "img_c", "img_d"):
        (root / "CTPA" / f"{image_id}.nii.gz").write_bytes(b"")
    return root


def test_manifest_rows_time_in_days_and_event(tmp_path):
    table = inspect_manifest(make_inspect(tmp_path / "inspect"))
    assert list(table.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert table["scan_id"].tolist() == ["img_a", "img_b", "img_c"]  # 104 has no mortality label
    assert table["patient_id"].tolist() == ["P1", "P1", "P2"]
    np.testing.assert_allclose(table["time"], [35.0, 400.5, 12.0])
    assert table["event"].tolist() == [1, 0, 1] and table["event"].dtype == "int64"
    assert table["split"].tolist() == ["train", "val", "test"]
    assert table["report"][1] == "Impression 102: no acute pulmonary embolism."
    assert table["image"][0].endswith("CTPA/img_a.nii.gz")
    assert table["12_month_ph"].tolist() == ["1", "0", "0"] and table["impression_id"][0] == "101"
    path = write_manifest(table, tmp_path / "manifest.csv")
    assert load_manifest(path)["scan_id"].tolist() == ["img_a", "img_b", "img_c"]


def test_keep_unlabelled(tmp_path):
    table = inspect_manifest(make_inspect(tmp_path / "inspect"), keep_unlabelled=True)
    assert table["scan_id"].tolist() == ["img_a", "img_b", "img_c", "img_d"]
    assert np.isnan(table["time"][3]) and np.isnan(table["event"][3])


def test_missing_label_column(tmp_path):
    root = make_inspect(tmp_path / "inspect", labels=[{"impression_id": "101", "tte_mortality": 3}])
    with pytest.raises(InspectError, match=r"labels_20250611\.tsv: missing column\(s\) \['is_censored_mortality'\]"):
        inspect_manifest(root)


@pytest.mark.parametrize(("tte", "censored", "message"), [
    (-4, 0, r"row 1 \(impression_id='101'\): field 'tte_mortality': got '-4'; expected days >= 0"),
    (10, 2, r"row 1 \(impression_id='101'\): field 'is_censored_mortality': got '2'; expected 0 or 1"),
])
def test_bad_label_rows(tmp_path, tte, censored, message):
    root = make_inspect(tmp_path / "inspect",
                        labels=[{"impression_id": "101", "tte_mortality": tte, "is_censored_mortality": censored}])
    with pytest.raises(InspectError, match=r"labels_20250611\.tsv: " + message):
        inspect_manifest(root)


def test_unknown_split_and_missing_split_row(tmp_path):
    root = make_inspect(tmp_path / "a", splits=[{"impression_id": "101", "split": "holdout"}])
    with pytest.raises(InspectError, match=r"splits_20250611\.tsv: row 1 .*field 'split': got 'holdout'"):
        inspect_manifest(root)
    root = make_inspect(tmp_path / "b", splits=[{"impression_id": "101", "split": "train"}])
    with pytest.raises(InspectError, match=r"row 2 \(image_id='img_b'\): impression_id '102' has no row in splits"):
        inspect_manifest(root)


def test_missing_files(tmp_path):
    root = make_inspect(tmp_path / "inspect")
    (root / "study_mapping_20250611.tsv").unlink()
    with pytest.raises(InspectError, match=r"inspect: no study_mapping_\*\.tsv file found"):
        inspect_manifest(root)
    (root / "labels_old.tsv").write_text("impression_id\n")
    with pytest.raises(InspectError, match=r"several labels_\*\.tsv files"):
        inspect_manifest(root)
    with pytest.raises(InspectError, match=r"absent: INSPECT folder not found"):
        inspect_manifest(tmp_path / "absent")


def test_study_without_impression(tmp_path):
    root = make_inspect(tmp_path / "inspect")
    write_tsv(root / "impressions_20250611.tsv", [{"impression_id": "101", "impressions": "No PE."}])
    with pytest.raises(InspectError, match=r"row 2 \(image_id='img_b'\): impression_id '102' has no row in "
                                           r"impressions_20250611\.tsv"):
        inspect_manifest(root)
    write_tsv(root / "impressions_20250611.tsv", [{"impression_id": "101", "summary": "No PE."}])
    with pytest.raises(InspectError, match=r"impressions_20250611\.tsv: no impression text column"):
        inspect_manifest(root)


def test_cli_writes_the_manifest_and_names_a_missing_folder(tmp_path, capsys):
    from vlsurv.cli import main

    assert main(["inspect", "--root", str(make_inspect(tmp_path / "inspect")), "--out", str(tmp_path / "m.csv")]) == 0
    assert "3 INSPECT scans, 2 deaths" in capsys.readouterr().out
    assert load_manifest(tmp_path / "m.csv", require_survival=True, check_files=False)["time"].tolist() == [35, 400.5, 12]
    with pytest.raises(SystemExit):
        main(["inspect", "--root", str(tmp_path / "absent"), "--out", str(tmp_path / "n.csv")])
    assert "absent: INSPECT folder not found" in capsys.readouterr().err
