"""INSPECT v2 adapter on a tiny INSPECT-like folder made in the test."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from vlsurv.data.clinical import MissingClinicalFieldsWarning, clinical_sentence
from vlsurv.data.inspect_v2 import InspectError, inspect_manifest
from vlsurv.data.manifest import MANIFEST_COLUMNS, load_manifest, write_manifest


def write_tsv(path, rows):
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)


def make_inspect(root, *, labels=None, splits=None):
    (root / "CTPA").mkdir(parents=True)
    write_tsv(
        root / "labels_20250611.tsv",
        labels
        or [
            {"impression_id": "101", "tte_mortality": 35, "is_censored_mortality": 0, "12_month_PH": 1},
            {"impression_id": "102", "tte_mortality": 400.5, "is_censored_mortality": 1, "12_month_PH": 0},
            {"impression_id": "103", "tte_mortality": 12, "is_censored_mortality": 0, "12_month_PH": 0},
            {"impression_id": "104", "tte_mortality": None, "is_censored_mortality": None, "12_month_PH": 0},
        ],
    )
    write_tsv(
        root / "impressions_20250611.tsv",
        [
            {"impression_id": i, "impressions": f"Impression {i}: no acute pulmonary embolism."}
            for i in ("101", "102", "103", "104")
        ],
    )
    # Columns with odd case and spaces, as read defensively.
    write_tsv(
        root / "study_mapping_20250611.tsv",
        [
            {" Impression_ID": "101", "image_id ": "img_a", "person_id": "P1"},
            {" Impression_ID": "102", "image_id ": "img_b", "person_id": "P1"},
            {" Impression_ID": "103", "image_id ": "img_c", "person_id": "P2"},
            {" Impression_ID": "104", "image_id ": "img_d", "person_id": "P3"},
        ],
    )
    write_tsv(
        root / "splits_20250611.tsv",
        splits
        or [
            {"impression_id": "101", "split": "train"},
            {"impression_id": "102", "split": "valid"},
            {"impression_id": "103", "split": "test"},
            {"impression_id": "104", "split": "train"},
        ],
    )
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
    assert table["12_month_ph"].tolist() == [1.0, 0.0, 0.0] and table["impression_id"][0] == "101"
    path = write_manifest(table, tmp_path / "manifest.csv")
    assert load_manifest(path)["scan_id"].tolist() == ["img_a", "img_b", "img_c"]


def test_keep_unlabelled(tmp_path):
    table = inspect_manifest(make_inspect(tmp_path / "inspect"), keep_unlabelled=True)
    assert table["scan_id"].tolist() == ["img_a", "img_b", "img_c", "img_d"]
    assert np.isnan(table["time"][3]) and np.isnan(table["event"][3])


def test_missing_label_column(tmp_path):
    root = make_inspect(tmp_path / "inspect", labels=[{"impression_id": "101", "tte_mortality": 3}])
    with pytest.raises(
        InspectError, match=r"labels_20250611\.tsv: missing column\(s\) \['is_censored_mortality'\]"
    ):
        inspect_manifest(root)


@pytest.mark.parametrize(
    ("tte", "censored", "message"),
    [
        (-4, 0, r"row 1 \(impression_id='101'\): field 'tte_mortality': got '-4'; expected days >= 0"),
        (10, 2, r"row 1 \(impression_id='101'\): field 'is_censored_mortality': got '2'; expected 0 or 1"),
    ],
)
def test_bad_label_rows(tmp_path, tte, censored, message):
    root = make_inspect(
        tmp_path / "inspect",
        labels=[{"impression_id": "101", "tte_mortality": tte, "is_censored_mortality": censored}],
    )
    with pytest.raises(InspectError, match=r"labels_20250611\.tsv: " + message):
        inspect_manifest(root)


def test_unknown_split_and_missing_split_row(tmp_path):
    root = make_inspect(tmp_path / "a", splits=[{"impression_id": "101", "split": "holdout"}])
    with pytest.raises(InspectError, match=r"splits_20250611\.tsv: row 1 .*field 'split': got 'holdout'"):
        inspect_manifest(root)
    root = make_inspect(tmp_path / "b", splits=[{"impression_id": "101", "split": "train"}])
    with pytest.raises(
        InspectError, match=r"row 2 \(image_id='img_b'\): impression_id '102' has no row in splits"
    ):
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
    with pytest.raises(
        InspectError,
        match=r"row 2 \(image_id='img_b'\): impression_id '102' has no row in "
        r"impressions_20250611\.tsv",
    ):
        inspect_manifest(root)
    write_tsv(root / "impressions_20250611.tsv", [{"impression_id": "101", "summary": "No PE."}])
    with pytest.raises(InspectError, match=r"impressions_20250611\.tsv: no impression text column"):
        inspect_manifest(root)


def test_cli_writes_the_manifest_and_names_a_missing_folder(tmp_path, capsys):
    from vlsurv.cli import main

    root = make_inspect(tmp_path / "inspect")
    with pytest.warns(MissingClinicalFieldsWarning, match=r"pe_positive 100%"):  # no PE flags, no EHR table
        assert main(["inspect", "--root", str(root), "--out", str(tmp_path / "m.csv")]) == 0
    assert "3 INSPECT scans, 2 deaths" in capsys.readouterr().out
    assert load_manifest(tmp_path / "m.csv", require_survival=True, check_files=False)["time"].tolist() == [
        35,
        400.5,
        12,
    ]
    with pytest.raises(SystemExit):
        main(["inspect", "--root", str(tmp_path / "absent"), "--out", str(tmp_path / "n.csv")])
    assert "absent: INSPECT folder not found" in capsys.readouterr().err


# INSPECT's public labels file: PE flags and horizon labels as TRUE / FALSE / Censored strings.
REAL_LABELS = [
    {
        "impression_id": "101",
        "pe_positive_nlp": "TRUE",
        "pe_acute": "TRUE",
        "pe_subsegmentalonly": "FALSE",
        "1_month_mortality": "FALSE",
        "12_month_mortality": "TRUE",
        "12_month_PH": "Censored",
        "tte_mortality": 200,
        "is_censored_mortality": "FALSE",
        "tte_PH": 30,
        "is_censored_PH": "TRUE",
    },
    {
        "impression_id": "102",
        "pe_positive_nlp": "FALSE",
        "pe_acute": "FALSE",
        "pe_subsegmentalonly": "FALSE",
        "1_month_mortality": "FALSE",
        "12_month_mortality": "Censored",
        "12_month_PH": "FALSE",
        "tte_mortality": 250,
        "is_censored_mortality": "TRUE",
        "tte_PH": 250,
        "is_censored_PH": "True",
    },
    {
        "impression_id": "103",
        "pe_positive_nlp": "True",
        "pe_acute": "False",
        "pe_subsegmentalonly": "True",
        "1_month_mortality": "TRUE",
        "12_month_mortality": "TRUE",
        "12_month_PH": "FALSE",
        "tte_mortality": 12,
        "is_censored_mortality": "False",
        "tte_PH": 12,
        "is_censored_PH": 1,
    },
]
VITALS = [
    {
        "impression_id": "101",
        "age": 61,
        "sex": "F",
        "temperature": 98.6,
        "respiratory_rate": 18,
        "mean_arterial_pressure": 124,
        "pulse": 65,
    },
    {
        "impression_id": "103",
        "age": 81,
        "sex": "M",
        "temperature": 99.1,
        "respiratory_rate": 22,
        "mean_arterial_pressure": 90.5,
        "pulse": 110,
    },
]


def test_real_label_names_and_values_are_typed(tmp_path):
    table = inspect_manifest(make_inspect(tmp_path / "inspect", labels=REAL_LABELS))
    assert table["event"].tolist() == [1, 0, 1] and table["time"].tolist() == [200.0, 250.0, 12.0]
    assert table["pe_positive_nlp"].tolist() == [1.0, 0.0, 1.0]
    assert table["pe_acute"].tolist() == [1.0, 0.0, 0.0] and table["pe_subsegmentalonly"].tolist() == [
        0.0,
        0.0,
        1.0,
    ]
    # Horizon labels for fixed-horizon work: TRUE 1, FALSE 0, Censored NaN.
    np.testing.assert_array_equal(table["12_month_mortality"], [1.0, np.nan, 1.0])
    np.testing.assert_array_equal(table["1_month_mortality"], [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(table["12_month_ph"], [np.nan, 0.0, 0.0])
    assert table["tte_ph"].tolist() == [30.0, 250.0, 12.0] and table["is_censored_ph"].tolist() == [
        1.0,
        1.0,
        1.0,
    ]
    for column in ("12_month_mortality", "pe_acute", "tte_ph"):
        assert table[column].dtype == "float64"


def test_real_labels_give_the_pe_clause(tmp_path):
    table = inspect_manifest(make_inspect(tmp_path / "inspect", labels=REAL_LABELS))
    rows = table.to_dict("records")
    assert (
        clinical_sentence(rows[0], "pe") == "Acute pulmonary embolism (not limited to subsegmental arteries)."
    )
    assert clinical_sentence(rows[1], "pe") == "No pulmonary embolism."
    assert (
        clinical_sentence(rows[2], "pe") == "Chronic pulmonary embolism (limited to subsegmental arteries)."
    )
    path = write_manifest(table, tmp_path / "manifest.csv")  # the same after a round trip through the CSV
    reloaded = load_manifest(path, check_files=False).to_dict("records")
    assert [clinical_sentence(r, "pe") for r in reloaded] == [clinical_sentence(r, "pe") for r in rows]
    assert np.isnan(reloaded[1]["12_month_mortality"])


@pytest.mark.parametrize(("key", "suffix"), [("impression_id", ".csv"), ("person_id", ".tsv")])
def test_clinical_table_joined_by_impression_or_person(tmp_path, key, suffix):
    if key == "impression_id":
        clinical = pd.DataFrame(VITALS)
    else:  # one row per patient: 101 and 102 are both P1's
        clinical = pd.DataFrame(VITALS).assign(person_id=["P1", "P2"]).drop(columns="impression_id")
    path = tmp_path / f"vitals{suffix}"
    clinical.to_csv(path, sep="\t" if suffix == ".tsv" else ",", index=False)
    table = inspect_manifest(make_inspect(tmp_path / "inspect", labels=REAL_LABELS), clinical=path)
    rows = table.to_dict("records")
    assert clinical_sentence(rows[0], "pe") == (
        "A 61-year-old female, acute pulmonary embolism (not limited to subsegmental arteries), temperature "
        "98.6 F, respiratory rate 18.0 breaths per minute, mean arterial pressure 124.0 mmHg, pulse 65.0 bpm."
    )
    assert clinical_sentence(rows[2], "pe") == (
        "An 81-year-old male, chronic pulmonary embolism (limited to subsegmental arteries), "
        "temperature 99.1 F, "
        "respiratory rate 22.0 breaths per minute, mean arterial pressure 90.5 mmHg, pulse 110.0 bpm."
    )
    if key == "impression_id":
        assert clinical_sentence(rows[1], "pe") == "No pulmonary embolism."  # no vitals row for 102
    else:
        assert clinical_sentence(rows[1], "pe").startswith("A 61-year-old female, no pulmonary embolism")
    assert table["age"].dtype == "float64" or table["age"].dtype == "int64"


def test_bad_clinical_tables_are_named(tmp_path):
    root = make_inspect(tmp_path / "inspect", labels=REAL_LABELS)
    pd.DataFrame([{"mrn": "1", "age": 3}]).to_csv(tmp_path / "nokey.csv", index=False)
    with pytest.raises(
        InspectError,
        match=r"nokey\.csv: no key column; expected one of \['impression_id', "
        r"'person_id', 'patient_id'\]",
    ):
        inspect_manifest(root, clinical=tmp_path / "nokey.csv")
    pd.DataFrame([{"impression_id": "101", "age": 3}, {"impression_id": "101", "age": 4}]).to_csv(
        tmp_path / "twice.csv", index=False
    )
    with pytest.raises(
        InspectError, match=r"twice\.csv: impression_id '101' has several rows; expected one row"
    ):
        inspect_manifest(root, clinical=tmp_path / "twice.csv")
    pd.DataFrame([{"impression_id": "101", "split": "test"}]).to_csv(tmp_path / "clash.csv", index=False)
    with pytest.raises(
        InspectError, match=r"clash\.csv: column\(s\) \['split'\] are already in the manifest"
    ):
        inspect_manifest(root, clinical=tmp_path / "clash.csv")
    with pytest.raises(InspectError, match=r"absent\.csv: clinical table not found"):
        inspect_manifest(root, clinical=tmp_path / "absent.csv")


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        (
            "12_month_mortality",
            "maybe",
            r"field '12_month_mortality': got 'maybe'; expected TRUE, FALSE or Censored",
        ),
        ("pe_acute", "Censored", r"field 'pe_acute': got 'Censored'; expected 0 or 1 \(or TRUE/FALSE\)"),
        ("is_censored_mortality", "", r"field 'is_censored_mortality' is empty but its pair is not"),
    ],
)
def test_bad_label_values_name_row_and_field(tmp_path, column, value, expected):
    labels = [dict(REAL_LABELS[0])] + REAL_LABELS[1:]
    labels[0][column] = value
    with pytest.raises(
        InspectError, match=r"labels_20250611\.tsv: row 1 \(impression_id='101'\): " + expected
    ):
        inspect_manifest(make_inspect(tmp_path / "inspect", labels=labels))


def test_cli_joins_clinical_and_warns_on_missing_fields(tmp_path, capsys):
    from vlsurv.cli import main

    root = make_inspect(tmp_path / "inspect", labels=REAL_LABELS)
    pd.DataFrame(VITALS).to_csv(tmp_path / "vitals.csv", index=False)
    out = tmp_path / "m.csv"
    with pytest.warns(MissingClinicalFieldsWarning) as caught:
        assert (
            main(
                [
                    "inspect",
                    "--root",
                    str(root),
                    "--out",
                    str(out),
                    "--clinical",
                    str(tmp_path / "vitals.csv"),
                ]
            )
            == 0
        )
    assert "model.clinical_template=pe" in capsys.readouterr().out
    assert len(caught) == 1
    message = str(caught[0].message)  # 102 has no vitals row: 1 of 3 scans
    assert "age 33% (columns age, Age, age_at_scan)" in message and "pulse 33%" in message
    assert "pe_" not in message and "no acute pulmonary" not in message.lower()
    assert load_manifest(out, check_files=False)["pulse"].tolist()[::2] == [65, 110]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (
            main(
                [
                    "inspect",
                    "--root",
                    str(root),
                    "--out",
                    str(out),
                    "--clinical",
                    str(tmp_path / "vitals.csv"),
                    "--max-missing-fraction",
                    "0.5",
                ]
            )
            == 0
        )
