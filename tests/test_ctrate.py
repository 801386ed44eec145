"""CT-RATE adapter: metadata spacing and rescale, reports, ids, layouts and manifests."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from vlsurv.data.clinical import MissingClinicalFieldsWarning, clinical_sentence
from vlsurv.data.ct import CTError, ScanOverrides, load_ct
from vlsurv.data.ctrate import (
    CTRateError,
    CTRateGeometry,
    convert_ctrate,
    ctrate_inplace_manifest,
    ctrate_manifest,
    find_ctrate_volumes,
    iter_ctrate,
    load_ctrate_volume,
    parse_dicom_age,
    parse_volume_name,
    parse_xy_spacing,
    read_ctrate_demographics,
    read_ctrate_metadata,
    read_ctrate_reports,
)
from vlsurv.data.manifest import MANIFEST_COLUMNS, ManifestError, load_manifest, scan_overrides
from vlsurv.data.transforms import PreprocessConfig, preprocess_ct

FIXTURES = Path(__file__).parent / "fixtures" / "ctrate"
METADATA = FIXTURES / "validation_metadata.csv"
REPORTS = FIXTURES / "reports.csv"
NAMES = ("valid_1_a_1", "valid_1_a_2", "valid_2_a_1", "valid_5_a_1")
# A misleading header, as in raw CT-RATE files: wrong 1 mm spacing, flipped x axis.
RAW_AFFINE = np.diag([-1.0, 1.0, 1.0, 1.0])


def write_raw_volume(path: Path, seed: int) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = np.random.default_rng(seed).integers(0, 2000, size=(6, 5, 4)).astype(np.int16)
    nib.save(nib.Nifti1Image(stored, RAW_AFFINE), str(path))
    return stored


def nested_layout(root: Path) -> dict[str, np.ndarray]:
    """``<root>/valid/<patient>/<patient>_<a>/<name>.nii.gz`` as CT-RATE ships it."""
    stored = {}
    for seed, name in enumerate(NAMES):
        patient, _, _ = parse_volume_name(name)
        letter = name.split("_")[2]
        stored[name] = write_raw_volume(
            root / "valid" / patient / f"{patient}_{letter}" / f"{name}.nii.gz", seed
        )
    return stored


def test_metadata_fixture_geometry():
    geometry = read_ctrate_metadata(METADATA)
    assert set(geometry) == set(NAMES)
    first = geometry["valid_1_a_1"]
    assert first == CTRateGeometry(
        xy_spacing=(0.341796875, 0.341796875), z_spacing=1.5, slope=1.0, intercept=-1024.0
    )
    assert geometry["valid_1_a_2"].z_spacing == 0.75


def test_parse_xy_spacing_and_errors():
    assert parse_xy_spacing("[0.68359375, 0.7]") == (0.68359375, 0.7)
    with pytest.raises(CTRateError, match=r"XYSpacing: got 'abc'; expected two spacings"):
        parse_xy_spacing("abc")
    with pytest.raises(CTRateError, match=r"XYSpacing: got '\[0.5\]'"):
        parse_xy_spacing("[0.5]")


def test_bad_metadata_row_names_row_and_field(tmp_path):
    lines = METADATA.read_text().splitlines()
    lines[2] = lines[2].replace('"[0.68359375, 0.68359375]"', '"[0.68359375]"')
    (tmp_path / "meta.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(CTRateError, match=r"meta\.csv: row 2 \(valid_1_a_2\.nii\.gz\): field 'XYSpacing'"):
        read_ctrate_metadata(tmp_path / "meta.csv")
    (tmp_path / "short.csv").write_text('VolumeName,XYSpacing\nvalid_1_a_1.nii.gz,"[1, 1]"\n')
    with pytest.raises(CTRateError, match=r"short\.csv: missing column\(s\) \['ZSpacing', 'RescaleSlope'"):
        read_ctrate_metadata(tmp_path / "short.csv")


def test_reports_join_findings_and_impressions():
    reports = read_ctrate_reports(REPORTS)
    assert reports["valid_1_a_1"].startswith("FINDINGS: Trachea and main bronchi are patent.")
    assert reports["valid_1_a_1"].endswith("\n\nIMPRESSION: Right upper lobe nodule, 12 mm.")
    assert "IMPRESSION" not in reports["valid_2_a_1"]  # empty impression is left out


def test_volume_names():
    assert parse_volume_name("valid_1_a_1.nii.gz") == ("valid_1", "valid_1_a_1", "val")
    assert parse_volume_name("/x/train_12_b_3.nii.gz") == ("train_12", "train_12_b_3", "train")
    with pytest.raises(CTRateError, match=r"scan_01\.nii\.gz: not a CT-RATE volume name"):
        parse_volume_name("scan_01.nii.gz")


def test_raw_volume_in_hu_with_metadata_spacing(tmp_path):
    stored = write_raw_volume(tmp_path / "valid_5_a_1.nii.gz", 0)
    geometry = CTRateGeometry(xy_spacing=(0.7, 0.6), z_spacing=2.5, slope=2.0, intercept=-8192.0)
    volume = load_ctrate_volume(tmp_path / "valid_5_a_1.nii.gz", geometry)
    np.testing.assert_allclose(volume.array, stored * 2.0 - 8192.0)
    np.testing.assert_allclose(volume.spacing, (0.6, 0.7, 2.5))
    np.testing.assert_allclose(np.sign(np.diag(volume.affine)[:3]), (-1, 1, 1))  # header directions kept


def test_iter_nested_layout_yields_hu_volumes_and_reports(tmp_path):
    stored = nested_layout(tmp_path / "ct_rate")
    geometry = read_ctrate_metadata(METADATA)
    samples = list(iter_ctrate(tmp_path / "ct_rate", METADATA, REPORTS))
    assert [s.scan_id for s in samples] == list(NAMES)
    for sample in samples:
        g = geometry[sample.scan_id]
        np.testing.assert_allclose(sample.volume.array, stored[sample.scan_id] * g.slope + g.intercept)
        np.testing.assert_allclose(sample.volume.spacing, (g.xy_spacing[1], g.xy_spacing[0], g.z_spacing))
        assert sample.split == "val" and sample.report
    assert samples[1].patient_id == "valid_1" and samples[2].patient_id == "valid_2"


def test_manifest_from_flat_folder(tmp_path):
    for seed, name in enumerate(NAMES):
        write_raw_volume(tmp_path / "flat" / f"{name}.nii.gz", seed)
    assert [p.name for p in find_ctrate_volumes(tmp_path / "flat")] == [f"{n}.nii.gz" for n in NAMES]
    table = ctrate_manifest(tmp_path / "flat", REPORTS)
    assert list(table.columns) == list(MANIFEST_COLUMNS)
    assert table["patient_id"].tolist() == ["valid_1", "valid_1", "valid_2", "valid_5"]
    assert table["split"].unique().tolist() == ["val"]
    assert table["time"].isna().all() and table["event"].isna().all()
    assert table["report"].str.startswith("FINDINGS:").all()


def test_convert_writes_hu_volumes_and_a_valid_manifest(tmp_path):
    stored = nested_layout(tmp_path / "ct_rate")
    manifest = convert_ctrate(tmp_path / "ct_rate", METADATA, REPORTS, tmp_path / "out")
    table = load_manifest(manifest, require_survival=False)
    assert table["scan_id"].tolist() == list(NAMES)
    converted = load_ct(table["image"][0])
    np.testing.assert_allclose(converted.array, stored["valid_1_a_1"] - 1024.0)
    np.testing.assert_allclose(converted.spacing, (0.341796875, 0.341796875, 1.5))


def test_missing_report_or_metadata(tmp_path):
    write_raw_volume(tmp_path / "flat" / "valid_9_a_1.nii.gz", 0)
    with pytest.raises(CTRateError, match=r"reports\.csv: no report for volume .*valid_9_a_1"):
        ctrate_manifest(tmp_path / "flat", REPORTS)
    (tmp_path / "reports.csv").write_text(
        "VolumeName,Findings_EN,Impressions_EN\nvalid_9_a_1.nii.gz,Clear.,\n"
    )
    with pytest.raises(
        CTRateError, match=r"validation_metadata\.csv: no metadata row for volume .*valid_9_a_1"
    ):
        list(iter_ctrate(tmp_path / "flat", METADATA, tmp_path / "reports.csv"))
    with pytest.raises(CTRateError, match=r"absent: CT-RATE volume folder not found"):
        find_ctrate_volumes(tmp_path / "absent")


def test_cli_converts_and_names_a_missing_report(tmp_path, capsys):
    from vlsurv.cli import main

    nested_layout(tmp_path / "ct_rate")
    args = [
        "ctrate",
        "--volumes",
        str(tmp_path / "ct_rate"),
        "--metadata",
        str(METADATA),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*args, "--reports", str(REPORTS)]) == 0
    assert load_manifest(tmp_path / "o" / "manifest.csv", require_survival=False)["scan_id"].tolist() == list(
        NAMES
    )
    (tmp_path / "few.csv").write_text("VolumeName,Findings_EN,Impressions_EN\nvalid_1_a_1.nii.gz,Clear.,\n")
    with pytest.raises(SystemExit):
        main([*args, "--reports", str(tmp_path / "few.csv")])
    assert "few.csv: no report for volume(s) ['valid_1_a_2'" in capsys.readouterr().err


# CT-RATE's metadata columns for demographics (plus geometry), made up inline: ages as DICOM strings.
DEMOGRAPHICS_CSV = """VolumeName,PatientSex,PatientAge,XYSpacing,ZSpacing,RescaleSlope,RescaleIntercept
valid_1_a_1.nii.gz,M,036Y,"[0.7, 0.7]",1.5,1,-1024
valid_1_a_2.nii.gz,M,036Y,"[0.7, 0.7]",1.5,1,-1024
valid_2_a_1.nii.gz,F,081Y,"[0.7, 0.7]",1.5,1,-1024
valid_5_a_1.nii.gz,,,"[0.7, 0.7]",1.5,1,-1024
"""


def test_dicom_ages():
    assert (
        parse_dicom_age("036Y") == 36.0
        and parse_dicom_age("006M") == 0.5
        and parse_dicom_age("14D") == 14 / 365.25
    )
    assert (
        np.isnan(parse_dicom_age(""))
        and np.isnan(parse_dicom_age(None))
        and np.isnan(parse_dicom_age(float("nan")))
    )
    with pytest.raises(CTRateError, match=r"PatientAge: got '36 years'; expected a DICOM age such as '036Y'"):
        parse_dicom_age("36 years")


def test_demographics_and_the_chest_ct_sentence(tmp_path):
    (tmp_path / "meta.csv").write_text(DEMOGRAPHICS_CSV)
    assert read_ctrate_demographics(tmp_path / "meta.csv")["valid_2_a_1"] == {"age": 81.0, "sex": "female"}
    for seed, name in enumerate(NAMES):
        write_raw_volume(tmp_path / "flat" / f"{name}.nii.gz", seed)
    table = ctrate_manifest(tmp_path / "flat", REPORTS, tmp_path / "meta.csv")
    assert table["age"].tolist()[:3] == [36.0, 36.0, 81.0] and np.isnan(table["age"][3])
    assert table["sex"].tolist() == ["male", "male", "female", None]
    sentences = [clinical_sentence(row, "chest_ct") for row in table.to_dict("records")]
    assert sentences == [
        "A 36-year-old male patient undergoing chest CT.",
        "A 36-year-old male patient undergoing chest CT.",
        "An 81-year-old female patient undergoing chest CT.",
        "A patient undergoing chest CT.",
    ]
    assert not any("lung cancer" in sentence.lower() for sentence in sentences)


def test_bad_demographics_name_row_and_field(tmp_path):
    (tmp_path / "meta.csv").write_text(DEMOGRAPHICS_CSV.replace(",F,081Y,", ",X,081Y,"))
    with pytest.raises(
        CTRateError,
        match=r"meta\.csv: row 3 \(valid_2_a_1\.nii\.gz\): field 'PatientSex': got 'X'; "
        r"expected M, F or O",
    ):
        read_ctrate_demographics(tmp_path / "meta.csv")
    (tmp_path / "meta.csv").write_text(DEMOGRAPHICS_CSV.replace(",M,036Y,", ",M,thirty,", 1))
    with pytest.raises(
        CTRateError, match=r"row 1 \(valid_1_a_1\.nii\.gz\): field 'PatientAge': got 'thirty'"
    ):
        read_ctrate_demographics(tmp_path / "meta.csv")


def test_cli_writes_age_sex_and_names_the_template(tmp_path, capsys):
    from vlsurv.cli import main

    nested_layout(tmp_path / "ct_rate")
    (tmp_path / "meta.csv").write_text(DEMOGRAPHICS_CSV)
    args = [
        "ctrate",
        "--volumes",
        str(tmp_path / "ct_rate"),
        "--metadata",
        str(tmp_path / "meta.csv"),
        "--reports",
        str(REPORTS),
        "--out",
        str(tmp_path / "o"),
    ]
    with pytest.warns(MissingClinicalFieldsWarning) as caught:  # valid_5_a_1 has no age and no sex: 1 of 4
        assert main(args) == 0
    assert "model.clinical_template=chest_ct" in capsys.readouterr().out
    message = str(caught[0].message)
    assert len(caught) == 1 and "age 25% (columns age, Age, age_at_scan)" in message and "sex 25%" in message
    assert "nodule" not in message.lower() and "trachea" not in message.lower()
    table = load_manifest(tmp_path / "o" / "manifest.csv", require_survival=False)
    assert table["age"].tolist()[:3] == [36.0, 36.0, 81.0] and table["sex"].tolist()[:3] == [
        "male",
        "male",
        "female",
    ]
    assert clinical_sentence(table.iloc[0], "chest_ct") == "A 36-year-old male patient undergoing chest CT."
    with pytest.raises(SystemExit):
        main([*args, "--max-missing-fraction", "2"])
    assert "--max-missing-fraction: expected a fraction between 0 and 1, got 2.0" in capsys.readouterr().err


# --- raw volumes read in place: the manifest's override columns ---------------------------------------------

SMALL = PreprocessConfig(spacing=(0.5, 0.5, 1.0), spatial_size=(8, 8, 8))


def test_inplace_manifest_reads_the_hu_and_spacing_of_rewritten_volumes(tmp_path):
    nested_layout(tmp_path / "ct_rate")
    inplace = load_manifest(
        ctrate_inplace_manifest(tmp_path / "ct_rate", METADATA, REPORTS, tmp_path / "inplace"),
        require_survival=False,
    )
    rewritten = load_manifest(
        convert_ctrate(tmp_path / "ct_rate", METADATA, REPORTS, tmp_path / "rewritten"),
        require_survival=False,
    )
    assert not (tmp_path / "inplace" / "images").exists()  # nothing copied
    assert inplace["scan_id"].tolist() == rewritten["scan_id"].tolist() == list(NAMES)
    assert all("ct_rate" in image for image in inplace["image"])
    assert inplace.loc[
        0, ["spacing_x", "spacing_y", "spacing_z", "rescale_slope", "rescale_intercept"]
    ].tolist() == [
        0.341796875,
        0.341796875,
        1.5,
        1.0,
        -1024.0,
    ]
    for raw_row, copy_row in zip(inplace.to_dict("records"), rewritten.to_dict("records")):
        raw = load_ct(raw_row["image"], ScanOverrides(**scan_overrides(raw_row)))
        copy = load_ct(copy_row["image"])
        np.testing.assert_array_equal(raw.array, copy.array)
        np.testing.assert_allclose(raw.affine, copy.affine, atol=1e-5)  # NIfTI stores the affine in float32
        np.testing.assert_allclose(
            preprocess_ct(raw, SMALL).numpy(), preprocess_ct(copy, SMALL).numpy(), rtol=1e-5, atol=1e-5
        )
    assert not np.array_equal(load_ct(inplace["image"][0]).array, load_ct(rewritten["image"][0]).array)


def test_cli_reads_in_place_by_default_and_rewrites_on_request(tmp_path, capsys):
    from vlsurv.cli import main

    nested_layout(tmp_path / "ct_rate")
    args = [
        "ctrate",
        "--volumes",
        str(tmp_path / "ct_rate"),
        "--metadata",
        str(METADATA),
        "--reports",
        str(REPORTS),
    ]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert not (tmp_path / "a" / "images").exists()
    assert "rescale_slope" in load_manifest(tmp_path / "a" / "manifest.csv", require_survival=False).columns
    assert main([*args, "--out", str(tmp_path / "b"), "--rewrite"]) == 0
    assert len(list((tmp_path / "b" / "images").glob("*.nii.gz"))) == len(NAMES)


def test_overrides_that_cannot_apply_are_refused(tmp_path):
    with pytest.raises(
        CTError, match=r"ScanOverrides: expected slope and intercept both set or both None, got 1"
    ):
        ScanOverrides(slope=1.0)
    with pytest.raises(
        CTError, match=r"ScanOverrides\.spacing: expected 3 mm values > 0, got \(0\.7, 0\.0, 1\.0\)"
    ):
        ScanOverrides(spacing=(0.7, 0.0, 1.0))
    (tmp_path / "series").mkdir()
    with pytest.raises(
        CTError, match=r"series: a rescale override applies to NIfTI files; DICOM slices carry"
    ):
        load_ct(tmp_path / "series", ScanOverrides(slope=1.0, intercept=-1024.0))


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        (
            "spacing_y",
            "",
            r"field 'spacing_y': is empty; expected \['spacing_x', 'spacing_y', 'spacing_z'\] all set",
        ),
        ("spacing_z", "-1", r"field 'spacing_z': got -1(\.0)?; expected a number > 0"),
        (
            "rescale_intercept",
            "",
            r"field 'rescale_intercept': is empty; expected \['rescale_slope', 'rescale_i",
        ),
        ("rescale_slope", "abc", r"field 'rescale_slope': got 'abc'; expected a number > 0"),
        ("rescale_intercept", "inf", r"field 'rescale_intercept': got inf; expected a finite number"),
    ],
)
def test_bad_override_columns_name_row_and_field(tmp_path, column, value, expected):
    nested_layout(tmp_path / "ct_rate")
    manifest = ctrate_inplace_manifest(tmp_path / "ct_rate", METADATA, REPORTS, tmp_path / "o")
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    table.loc[1, column] = value
    table.to_csv(manifest, index=False)
    with pytest.raises(ManifestError, match=r"manifest\.csv: row 2 \(scan_id='valid_1_a_2'\): " + expected):
        load_manifest(manifest, require_survival=False)


def test_encoding_raw_volumes_in_place_gives_the_tokens_of_rewritten_ones(tmp_path):
    from vlsurv.encoders.cache import FeatureCache, encode_manifest
    from vlsurv.encoders.merlin import MerlinImageEncoder

    nested_layout(tmp_path / "ct_rate")
    encoder, preprocess = (
        MerlinImageEncoder.tiny(),
        PreprocessConfig(spacing=(0.5, 0.5, 1.0), spatial_size=(32, 32, 16)),
    )
    caches = {}
    for name, write in (("inplace", ctrate_inplace_manifest), ("rewritten", convert_ctrate)):
        manifest = write(tmp_path / "ct_rate", METADATA, REPORTS, tmp_path / name)
        encode_manifest(manifest, tmp_path / name / "cache", encoder, preprocess, progress=False)
        caches[name] = FeatureCache(tmp_path / name / "cache")
    for scan_id in NAMES:
        torch.testing.assert_close(
            caches["inplace"].get(scan_id), caches["rewritten"].get(scan_id), rtol=1e-5, atol=1e-5
        )
