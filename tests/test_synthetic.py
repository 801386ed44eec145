"""The embedded synthetic cohort: files, determinism, anatomy in HU, visible findings, reports, survival."""

from __future__ import annotations

import json
import re
import time

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage, stats

from vlsurv.data.synthetic import (
    CLINICAL_COLUMNS,
    QUESTION_IDS,
    SurvivalModel,
    SyntheticCohortError,
    build_cohort_table,
    main,
    make_cohort,
    oracle_summary,
    resolve_grid,
    sample_findings,
)
from vlsurv.data.synthetic.anatomy import LOBES, Findings, Tissue, render_scan
from vlsurv.data.synthetic.reports import LOBE_NAMES

SMALL = {"shape": (48, 48, 32)}  # spread over the standard 384 mm cube: 8 x 8 x 12 mm voxels


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    return make_cohort(10, 7, out, **SMALL)


@pytest.fixture(scope="module")
def table():
    return build_cohort_table(300, 11)


@pytest.fixture(scope="module")
def grid():
    return resolve_grid()


def test_cohort_files_and_manifest_schema(small_cohort):
    out = small_cohort.parent
    manifest = pd.read_csv(small_cohort)
    assert list(manifest.columns) == [
        "patient_id",
        "scan_id",
        "image",
        "report",
        "time",
        "event",
        "split",
        *CLINICAL_COLUMNS,
    ]
    assert manifest["scan_id"].is_unique and manifest["patient_id"].is_unique
    assert all(
        (out / path).is_file() and path == f"images/{scan}.nii.gz"
        for path, scan in zip(manifest["image"], manifest["scan_id"])
    )
    assert manifest["split"].value_counts().to_dict() == {"train": 6, "val": 2, "test": 2}
    findings = pd.read_csv(out / "findings.csv")
    assert list(findings["scan_id"]) == list(manifest["scan_id"])
    for column in (
        *QUESTION_IDS,
        "tumor_size_mm",
        "tumor_lobe",
        "node_size_mm",
        "node_station",
        "effusion_side",
        "effusion_mm",
        "metastasis_sites",
        "vessel",
        "bone_lesion_type",
        "bone_site",
    ):
        assert column in findings.columns
    assert set(np.unique(findings[list(QUESTION_IDS)])) <= {0, 1}
    oracle = json.loads((out / "oracle.json").read_text())
    assert oracle["n"] == 10 and oracle["shape"] == [48, 48, 32] and oracle["spacing_mm"] == [8.0, 8.0, 12.0]
    assert 0.5 < oracle["oracle_c_index"] <= 1.0
    assert "oracle_c_index_test" in oracle and "clinical_only_oracle_c_index" in oracle


def test_image_shape_dtype_and_ras_affine(small_cohort):
    image = nib.load(small_cohort.parent / "images" / "syn00000_ct.nii.gz")
    assert image.shape == (48, 48, 32)
    assert image.get_data_dtype() == np.int16
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.diag(image.affine)[:3], [8.0, 8.0, 12.0])
    centre = image.affine @ np.array([23.5, 23.5, 15.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-6)
    assert image.header["sform_code"] == 1 and image.header.get_xyzt_units()[0] == "mm"


def test_same_seed_same_bytes_and_voxels_other_seed_differs(small_cohort, tmp_path):
    again = make_cohort(10, 7, tmp_path / "again", **SMALL)
    for name in ("manifest.csv", "findings.csv", "oracle.json"):
        assert (again.parent / name).read_bytes() == (small_cohort.parent / name).read_bytes()
    for scan in ("syn00000_ct", "syn00009_ct"):
        first = np.asarray(nib.load(small_cohort.parent / "images" / f"{scan}.nii.gz").dataobj)
        second = np.asarray(nib.load(again.parent / "images" / f"{scan}.nii.gz").dataobj)
        np.testing.assert_array_equal(first, second)
    other = make_cohort(2, 8, tmp_path / "other", **SMALL)
    assert pd.read_csv(other)["report"][0] != pd.read_csv(small_cohort)["report"][0]


def test_patient_is_the_same_in_cohorts_of_any_size():
    _, five = build_cohort_table(5, 3)
    _, eight = build_cohort_table(8, 3)
    pd.testing.assert_frame_equal(five.drop(columns="split"), eight.head(5).drop(columns="split"))


def test_tissue_hu_ranges(grid):
    scan = render_scan(Findings(), grid, np.random.default_rng(0))
    expected = {
        Tissue.AIR: (-1010, -990),
        Tissue.FAT: (-120, -80),
        Tissue.MUSCLE: (20, 60),
        Tissue.RIGHT_LUNG: (-900, -800),
        Tissue.LEFT_LUNG: (-900, -800),
        Tissue.HEART: (20, 60),
        Tissue.AORTA: (40, 200),
        Tissue.PULMONARY_ARTERY: (40, 200),
        Tissue.SVC: (40, 200),
        Tissue.VERTEBRA: (600, 800),
        Tissue.RIB: (550, 750),
        Tissue.LIVER: (40, 80),
    }
    for tissue, (low, high) in expected.items():
        values = scan.hu[scan.labels == tissue]
        assert values.size > 50, tissue.name
        assert low <= values.mean() <= high, (tissue.name, values.mean())
    lungs = scan.hu[scan.labels == Tissue.RIGHT_LUNG]
    assert lungs.std() > 15  # noisy, not piecewise constant
    assert scan.hu.dtype == np.int16 and scan.hu.min() >= -1024


def _touches(scan, mask, tissues) -> bool:
    return bool(np.isin(scan.labels[ndimage.binary_dilation(mask) & ~mask], tissues).any())


def test_findings_are_visible_with_their_density(grid):
    findings = Findings(
        tumor_size_mm=45,
        tumor_lobe="RUL",
        nodes=(("subcarinal", 22), ("left hilar", 15)),
        effusion_right_mm=40,
        effusion_left_mm=15,
        lung_metastases_mm=(12, 14),
        adrenal_metastasis_mm=30,
        adrenal_side="left",
        liver_metastasis_mm=25,
        bone_lesion="lytic",
        bone_site="T8 vertebral body",
        bone_size_mm=20,
    )
    scan = render_scan(findings, grid, np.random.default_rng(1))
    voxel_mm3 = np.prod(grid.spacing)
    tumor = scan.mask("tumor")
    assert 0.6 < tumor.sum() * voxel_mm3 / (np.pi / 6 * 45**3) <= 1.0
    assert 20 <= scan.hu[tumor].mean() <= 50
    assert 20 <= scan.hu[scan.mask("lymph_nodes")].mean() <= 50
    effusion = scan.mask("pleura")
    assert 0 <= scan.hu[effusion].mean() <= 20
    right_half = effusion[: grid.shape[0] // 2]  # x < 0 is the patient's left
    assert effusion.sum() > 2 * right_half.sum() > 0  # the right (40 mm) is deeper than the left (15 mm)
    assert 10 <= scan.hu[scan.mask("metastases")].mean() <= 50
    assert scan.hu[scan.mask("bone")].mean() < 200  # lytic: bone replaced by soft tissue
    assert not _touches(scan, tumor, (Tissue.AORTA, Tissue.PULMONARY_ARTERY, Tissue.SVC))
    sclerotic = Findings(bone_lesion="sclerotic", bone_site="left 7th rib", bone_size_mm=16)
    scan = render_scan(sclerotic, grid, np.random.default_rng(2))
    assert scan.mask("bone").sum() >= 3 and scan.hu[scan.mask("bone")].mean() > 900


@pytest.mark.parametrize(
    "vessel,lobe,tissue",
    [
        ("right pulmonary artery", "RLL", Tissue.PULMONARY_ARTERY),
        ("left pulmonary artery", "LUL", Tissue.PULMONARY_ARTERY),
        ("superior vena cava", "RUL", Tissue.SVC),
    ],
)
def test_vessel_involvement_is_a_mass_touching_that_vessel(grid, vessel, lobe, tissue):
    scan = render_scan(
        Findings(tumor_size_mm=40, tumor_lobe=lobe, vessel=vessel), grid, np.random.default_rng(0)
    )
    assert _touches(scan, scan.mask("tumor"), (tissue,))


@pytest.mark.parametrize("lobe", LOBES)
def test_tumor_without_vessel_involvement_keeps_clear_of_the_vessels(grid, lobe):
    for seed, size in enumerate((20, 45, 70)):
        scan = render_scan(Findings(tumor_size_mm=size, tumor_lobe=lobe), grid, np.random.default_rng(seed))
        assert not _touches(scan, scan.mask("tumor"), (Tissue.AORTA, Tissue.PULMONARY_ARTERY, Tissue.SVC))


@pytest.mark.parametrize(
    "shape,spacing", [(None, None), ((64, 64, 48), (6.0, 6.0, 6.0)), ((48, 48, 32), None)]
)
def test_sampled_findings_match_what_is_drawn(grid, shape, spacing):
    grid = grid if shape is None else resolve_grid(shape, spacing)
    for i in range(25):
        rng = np.random.default_rng(100 + i)
        findings = sample_findings(rng)
        scan = render_scan(findings, grid, rng)
        for question in ("tumor", "lymph_nodes", "pleura", "metastases", "bone"):
            assert bool(scan.mask(question).any()) == bool(findings.flags[question]), (i, question, findings)


def _mentions_size(report: str, mm: int) -> bool:
    return (
        f"{mm} mm" in report
        or f"{mm / 10:.1f} cm" in report
        or f"{mm} x " in report
        or (f"{mm / 10:.1f} x " in report)
    )


_NEGATIONS = {
    "tumor": r"\bno\b[^.]*\bmass",
    "lymph_nodes": r"\bno\b[^.]*lymph|lymph nodes are not enlarged|none pathologically enlarged",
    "pleura": r"\bno pleural effusion",
    "metastases": r"\bno\b[^.]*metasta",
    "vessels": r"\bno (vascular invasion|encasement)|without (compression|vascular invasion)",
    "bone": r"\b(no|without)\b[^.]*\b(osseous|lytic|blastic|destructive)",
}


def test_reports_state_present_findings_and_negate_absent_ones(table):
    _, rows = table
    for row in rows.itertuples():
        report = row.report
        assert report.startswith("FINDINGS: ") and "\n\nIMPRESSION: " in report
        for question, pattern in _NEGATIONS.items():
            negated = re.search(pattern, report, flags=re.IGNORECASE) is not None
            assert negated != bool(getattr(row, question)), (row.scan_id, question, report)
        if row.tumor:
            assert LOBE_NAMES[row.tumor_lobe] in report and _mentions_size(report, row.tumor_size_mm)
        if row.lymph_nodes:
            assert all(station in report.lower() for station in row.node_station.split(";"))
            assert _mentions_size(report, row.node_size_mm)
        if row.pleura:
            assert "pleural effusion" in report.lower()
            for side, depth in (("right", row.effusion_right_mm), ("left", row.effusion_left_mm)):
                if not pd.isna(depth):
                    assert side in report.lower() and _mentions_size(report, depth)
        sites = row.metastasis_sites if row.metastases else ""
        for site, pattern in (
            ("lung", r"nodules? in the (contralateral )?(left|right) lung"),
            ("adrenal", r"adrenal (gland, suspicious|mass)"),
            ("liver", r"lesion in the right hepatic lobe|liver lesion measuring"),
        ):
            assert (site in sites) == (re.search(pattern, report) is not None), (site, report)
        if row.vessels:
            assert row.vessel in report
        if row.bone:
            assert row.bone_site in report and _mentions_size(report, row.bone_size_mm)


def test_reports_vary(table):
    _, rows = table
    first_sentences = {report.split(". ")[0] for report in rows["report"]}
    assert len(first_sentences) > 20
    assert rows["report"].str.contains(r"\d cm").any() and rows["report"].str.contains(r"\d mm").any()
    assert rows["report"].str.contains(r"\b1\. ").any() and not rows["report"].str.contains(r"\b1\. ").all()


def test_clinical_fields_are_tied_to_findings_but_not_copies(table):
    _, rows = table
    assert (
        rows["sex"].isin(["male", "female"]).all()
        and rows["smoking"].isin(["never", "former", "current"]).all()
    )
    assert rows["stage"].isin([1, 2, 3, 4]).all() and rows["age"].between(35, 90).all()
    assert set(rows["t_stage"]) <= {"T1", "T2", "T3", "T4"} and set(rows["m_stage"]) <= {"M0", "M1"}
    assert set(rows["n_stage"]) <= {"N0", "N1", "N2", "N3"}
    with_tumor = rows[rows["tumor"] == 1]
    assert stats.spearmanr(with_tumor["tumor_size_mm"], with_tumor["t_stage"].str[1].astype(int))[0] > 0.3
    for question, column, positive in (("metastases", "m_stage", "M1"), ("lymph_nodes", "n_stage", "N0")):
        agreement = ((rows[column] == positive) == (rows[question] == (positive != "N0"))).mean()
        assert 0.7 < agreement < 0.98, (question, agreement)


def test_survival_is_sane_and_image_beats_clinical_only():
    model = SurvivalModel()
    _, rows = build_cohort_table(1500, 5, model)
    assert (rows["time"] > 0).all() and rows["time"].max() <= model.followup_days
    assert 0.25 <= 1 - rows["event"].mean() <= 0.4
    assert 200 < rows["time"].median() < 2000
    oracle = oracle_summary(rows, 5, model)
    assert 0.5 < oracle["clinical_only_oracle_c_index"] < oracle["oracle_c_index_test"] - 0.03
    assert oracle["clinical_terms_c_index_test"] < oracle["oracle_c_index_test"]


def test_default_grid_and_timing(tmp_path):
    start = time.perf_counter()
    manifest = make_cohort(12, 0, tmp_path)
    elapsed = time.perf_counter() - start
    image = nib.load(manifest.parent / "images" / "syn00000_ct.nii.gz")
    assert image.shape == (128, 128, 64)
    np.testing.assert_allclose(image.header.get_zooms(), (3.0, 3.0, 6.0))
    assert elapsed < 10.0, f"12 patients at 128 x 128 x 64 took {elapsed:.1f} s"


def test_bad_arguments_are_rejected_with_clear_messages(tmp_path):
    with pytest.raises(SyntheticCohortError, match="n must be at least 1, got 0"):
        make_cohort(0, 0, tmp_path)
    with pytest.raises(SyntheticCohortError, match=r"field of view along z is 16 x 6 mm = 96 mm.*286 mm"):
        make_cohort(2, 0, tmp_path, shape=(128, 128, 16), spacing=(3.0, 3.0, 6.0))
    with pytest.raises(SyntheticCohortError, match="shape must be 3 positive integers"):
        resolve_grid((64, 0, 32))
    with pytest.raises(SyntheticCohortError, match="spacing must be 3 positive numbers"):
        resolve_grid((64, 64, 32), (3.0, -1.0, 6.0))


def test_cli_writes_a_cohort_and_reports_errors(tmp_path, capsys):
    assert main(["--n", "3", "--seed", "1", "--out", str(tmp_path / "c"), "--shape", "48", "48", "32"]) == 0
    assert "wrote 3 patients" in capsys.readouterr().out
    assert len(list((tmp_path / "c" / "images").glob("*.nii.gz"))) == 3
    with pytest.raises(SystemExit) as exc:
        main(["--n", "3", "--out", str(tmp_path / "d"), "--shape", "8", "8", "8", "--spacing", "1", "1", "1"])
    assert exc.value.code == 2
    assert "field of view along x" in capsys.readouterr().err
