"""The Table-2 baselines (vlsurv.baselines): CoxPH, DeepSurv / DeepHit MLPs, the paired test, and bad input.

CoxPH is checked against the synthetic cohort's own clinical CoxPH (the demo's number must not move), the MLPs
against scikit-survival's Cox model on whas500, the paired bootstrap against its definition; every bad-input
error goes through the CLI and its message is checked.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vlsurv.baselines.features import covariate_design, standardize
from vlsurv.baselines.models import MLPOptions, fit_mlp
from vlsurv.baselines.run import coxph_c_index
from vlsurv.baselines.table import paired_difference
from vlsurv.cli import main as vlsurv_main
from vlsurv.data.manifest import MANIFEST_COLUMNS, write_manifest
from vlsurv.data.synthetic import CLINICAL_COLUMNS, build_cohort_table, clinical_cox_c_index
from vlsurv.metrics import concordance_index

FAST = ["--seeds", "0", "--max-epochs", "5", "--bootstrap", "20"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """(manifest path, table) of a 120-patient synthetic cohort without images (CoxPH and text need none)."""
    _, table = build_cohort_table(120, 0)
    path = write_manifest(
        table[[*MANIFEST_COLUMNS, *CLINICAL_COLUMNS]], tmp_path_factory.mktemp("bl") / "m.csv"
    )
    return path, table


@pytest.mark.parametrize("n", [120, 300])
def test_coxph_baseline_is_the_cohorts_clinical_cox_fit(n):
    """The demo's clinical-only C-index (0.608 at seed 0) now comes from the baseline; it is the same fit."""
    from vlsurv.demo import clinical_only_c_index

    _, table = build_cohort_table(n, 0)
    expected = clinical_cox_c_index(table)
    assert coxph_c_index(table) == pytest.approx(expected, abs=1e-9)
    assert clinical_only_c_index(table) == pytest.approx(expected, abs=1e-9)


def test_covariate_design_encodes_numbers_stage_codes_and_categories():
    train = pd.DataFrame(
        {
            "age": [60, 70, 80, None],
            "smoking": ["ex-smoker", "never", "current", "former"],
            "t_stage": ["T1", "T2", "T4", "T3"],
            "sex": ["male", "male", "male", "male"],
        },
        index=[0, 1, 2, 3],
    )
    test = pd.DataFrame(
        {"age": [None], "smoking": ["active"], "t_stage": ["T2"], "sex": ["female"]}, index=[10]
    )
    design = covariate_design(train, test, "lung")
    # never is the template's first smoking word (the reference); "active" is a spelling of current;
    # the age gap is the train median; a constant train column (sex) is dropped
    assert list(design.columns) == ["age", "smoking=current", "smoking=former", "t_stage"]
    assert design.loc[10].tolist() == [70.0, 1.0, 0.0, 2.0]
    assert covariate_design(train, train, "lung")["smoking=former"].tolist() == [1.0, 0.0, 0.0, 1.0]


@pytest.fixture(scope="module")
def whas500():
    """whas500 (scikit-survival) as standardized floats, time, event and a seeded 60/20/20 split."""
    from sksurv.datasets import load_whas500

    x, y = load_whas500()
    x = x.astype(float).to_numpy()
    rng = np.random.default_rng(0)
    split = rng.permutation(np.repeat(["train", "val", "test"], [300, 100, 100]))
    masks = {name: split == name for name in ("train", "val", "test")}
    x = standardize(x[masks["train"]], x)[1]
    return x, y["lenfol"].astype(float), y["fstat"].astype(int), masks


def _options(hidden, lr, epochs=300):
    return MLPOptions(tuple(hidden), 0.1, lr, 0.01, 32, epochs, 20, 10, 0.5)


def test_mlps_on_whas500_rank_like_a_cox_model(whas500):
    """A linear DeepSurv is a Cox model: test C within 0.03 of scikit-survival's; DeepHit within 0.05."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    x, time, event, masks = whas500
    train, val, test = masks["train"], masks["val"], masks["test"]
    cox = CoxPHSurvivalAnalysis(alpha=1e-3).fit(x[train], Surv.from_arrays(event[train] == 1, time[train]))
    reference = concordance_index(time[test], event[test], cox.predict(x[test]))
    assert reference > 0.7
    deepsurv = fit_mlp("deepsurv", x, time, event, train, val, _options([], 1e-2), seed=0)
    deephit = fit_mlp("deephit", x, time, event, train, val, _options([32], 1e-3), seed=0)
    assert concordance_index(time[test], event[test], deepsurv.risk[test]) == pytest.approx(
        reference, abs=0.03
    )
    assert concordance_index(time[test], event[test], deephit.risk[test]) > reference - 0.05
    assert deepsurv.best_epoch <= deepsurv.epochs
    again = fit_mlp("deepsurv", x, time, event, train, val, _options([], 1e-2), seed=0)
    np.testing.assert_array_equal(again.risk, deepsurv.risk)  # seeded


def test_paired_difference_is_the_c_index_gap_with_its_bootstrap(whas500):
    x, time, event, masks = whas500
    test = masks["test"]
    good = x[test] @ np.ones(x.shape[1])  # any fixed ranking
    noise = np.random.default_rng(1).normal(size=test.sum())
    groups = np.arange(test.sum())
    ci, p = paired_difference(time[test], event[test], good, noise, groups, n=200, seed=0)
    gap = concordance_index(time[test], event[test], good) - concordance_index(time[test], event[test], noise)
    assert ci.estimate == pytest.approx(gap)
    assert ci.low < ci.estimate < ci.high
    _, same = paired_difference(time[test], event[test], good, good + 1e-3 * noise, groups, n=200, seed=0)
    assert 0.0 <= p <= 1.0 and same > 0.05


def test_text_baseline_and_table_of_one_run(cohort, tmp_path, capsys):
    manifest, _ = cohort
    out = tmp_path / "bl"
    argv = ["baselines", "--manifest", str(manifest), "--out", str(out), "--methods", "coxph", "deepsurv"]
    assert vlsurv_main([*argv, "--modalities", "text", *FAST]) == 0
    assert vlsurv_main(["table", "--runs", str(out), "--out", str(tmp_path / "table")]) == 0
    table = pd.read_csv(tmp_path / "table" / "table.csv")
    assert table[["method", "input"]].values.tolist() == [["CoxPH", "clinical"], ["DeepSurv", "text"]]
    markdown = (tmp_path / "table" / "table.md").read_text()
    assert markdown.splitlines()[0].startswith(
        "| Method | Pre-train | Report | Clinical | CT-image | C-index"
    )
    assert "N/A" in markdown and "0.6" in capsys.readouterr().out


# --- bad input: one line naming the file, option or modality ------------------------------------------------


def _error(argv, capsys) -> str:
    assert vlsurv_main(argv) == 2
    return capsys.readouterr().err.strip()


def test_text_encoder_that_does_not_exist(cohort, tmp_path, capsys):
    manifest, _ = cohort
    missing = tmp_path / "no-such-encoder"
    argv = ["baselines", "--manifest", str(manifest), "--out", str(tmp_path), "--text-encoder", str(missing)]
    assert _error([*argv, *FAST], capsys) == (
        f"vlsurv baselines: error: text_encoder: {missing} does not exist or is not a local Hugging Face "
        "model folder (expected a directory with config.json, tokenizer and weights, e.g. Merlin's "
        "Clinical-Longformer)"
    )


def test_image_modality_that_the_cache_lacks(cohort, tmp_path, capsys):
    from vlsurv.data.synthetic import make_cohort
    from vlsurv.data.transforms import PreprocessConfig
    from vlsurv.encoders.cache import encode_manifest
    from vlsurv.encoders.merlin import MerlinImageEncoder

    manifest, _ = cohort
    two = make_cohort(2, 0, tmp_path / "two", shape=(16, 16, 8))  # the first 2 scans of the same cohort
    preprocess = PreprocessConfig(spacing=(12.0, 12.0, 24.0), spatial_size=(16, 16, 8))
    encode_manifest(two, tmp_path / "cache", MerlinImageEncoder.tiny(), preprocess, progress=False)
    argv = ["baselines", "--manifest", str(manifest), "--out", str(tmp_path / "o"), "--methods", "deepsurv"]
    message = _error([*argv, "--modalities", "image", "--cache", str(tmp_path / "cache"), *FAST], capsys)
    assert message.startswith(
        f"vlsurv baselines: error: modality 'image': the feature cache {tmp_path / 'cache'} lacks 118 of the "
        "manifest's 120 scans (first: ['syn00002_ct', 'syn00003_ct', 'syn00004_ct'])"
    )
    message = _error([*argv, "--modalities", "both", *FAST], capsys)
    assert (
        message
        == "vlsurv baselines: error: modality 'both' needs the image features: pass --cache (a feature cache)"
    )
    message = _error([*argv, "--modalities", "image", "--cache", str(tmp_path / "two"), *FAST], capsys)
    assert message.startswith(
        f"vlsurv baselines: error: modality 'image' needs the image features, but {tmp_path / 'two'} is "
        "not a feature cache (no index.json"
    )


def test_table_of_runs_on_different_splits(cohort, tmp_path, capsys):
    manifest, table = cohort
    moved = table.copy()
    first_train, first_test = moved.index[moved.split == "train"][0], moved.index[moved.split == "test"][0]
    moved.loc[[first_train, first_test], "split"] = ["test", "train"]
    other = write_manifest(moved[[*MANIFEST_COLUMNS, *CLINICAL_COLUMNS]], tmp_path / "other.csv")
    for name, path in (("a", manifest), ("b", other)):
        argv = ["baselines", "--manifest", str(path), "--out", str(tmp_path / name), "--methods", "coxph"]
        assert vlsurv_main([*argv, *FAST]) == 0
    message = _error(
        ["table", "--runs", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path)], capsys
    )
    assert message.startswith(f"vlsurv table: error: runs have different splits: {tmp_path / 'b'} (")
    assert message.endswith("expected every run on the same manifest split and scans")


def test_unknown_method_names_the_option(cohort, tmp_path, capsys):
    manifest, _ = cohort
    argv = ["baselines", "--manifest", str(manifest), "--out", str(tmp_path), "--methods", "coxph", "rsf"]
    message = _error(argv, capsys)
    assert (
        "methods in command line: expected one or more of ['coxph', 'deepsurv', 'deephit'], "
        "got ['coxph', 'rsf']" in message
    )


@pytest.mark.parametrize(("stage1_dir", "pretrain"), [("runs/stage1/final", True), (None, False)])
def test_vlm_row_reads_head_and_stage_1_from_the_model_folder(tmp_path, stage1_dir, pretrain):
    """The pre-train column is real: a stage-2 run trained from a stage-1 model (data.stage1_dir) or not."""
    import json

    import yaml

    from vlsurv.baselines.table import vlm_flags

    model = tmp_path / "stage2" / "final"
    model.mkdir(parents=True)
    (model / "config.json").write_text(
        json.dumps({"survival": {"head": "deephit"}, "clinical_template": "lung"})
    )
    (tmp_path / "stage2" / "config.yaml").write_text(yaml.safe_dump({"data": {"stage1_dir": stage1_dir}}))
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "predict_config.yaml").write_text(yaml.safe_dump({"model": str(model)}))
    assert vlm_flags(tmp_path / "predictions") == ("Ours (DeepHit)", pretrain, True)
