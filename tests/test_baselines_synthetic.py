"""Table 2 on the synthetic cohort: the image baselines learn the image signal, and the table is complete.

A 160-patient cohort at 64 x 64 x 32 voxels, encoded by the tiny Merlin-architecture encoder; every baseline
on two seeds; a stand-in VLM evaluation (``vlsurv evaluate`` of the cohort's true linear predictor) beside
them in ``vlsurv table``.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from vlsurv.baselines.table import COLUMNS
from vlsurv.cli import main as vlsurv_main

pytestmark = pytest.mark.slow

PATIENTS = 160


@pytest.fixture(scope="module")
def table_runs(tmp_path_factory):
    from vlsurv.data.synthetic import build_cohort_table, make_cohort
    from vlsurv.data.transforms import PreprocessConfig
    from vlsurv.encoders.cache import encode_manifest
    from vlsurv.encoders.merlin import MerlinImageEncoder
    from vlsurv.evaluate import EvaluationConfig, evaluate_predictions

    root = tmp_path_factory.mktemp("table2")
    manifest = make_cohort(PATIENTS, 0, root / "cohort", shape=(64, 64, 32))
    preprocess = PreprocessConfig(spacing=(6.0, 6.0, 12.0), spatial_size=(64, 64, 32))
    encode_manifest(manifest, root / "cache", MerlinImageEncoder.tiny(), preprocess, progress=False)
    argv = [
        "baselines",
        "--manifest",
        str(manifest),
        "--cache",
        str(root / "cache"),
        "--out",
        str(root / "bl"),
    ]
    assert vlsurv_main([*argv, "--seeds", "0", "1", "--bootstrap", "200"]) == 0
    truth = build_cohort_table(PATIENTS, 0)[1]  # the same patients as make_cohort's
    (root / "oracle").mkdir()
    truth[["scan_id"]].assign(risk=truth["linear_predictor"]).to_csv(
        root / "oracle/predictions.csv", index=False
    )
    config = EvaluationConfig(split="test", bootstrap=100, skip_invalid_horizons=True)
    evaluate_predictions(root / "oracle", manifest, root / "eval", config=config)
    table_argv = ["table", "--runs", str(root / "bl"), str(root / "eval"), "--out", str(root / "table")]
    assert vlsurv_main([*table_argv, "--bootstrap", "200"]) == 0
    return root


def _rows(root) -> dict[str, dict]:
    return {row["key"]: row for row in json.loads((root / "bl" / "baselines.json").read_text())["rows"]}


def test_image_baselines_beat_chance(table_runs):
    rows = _rows(table_runs)
    for key in ("deepsurv_image", "deephit_image"):
        assert rows[key]["c_index_mean"] > 0.6, (key, rows[key]["c_index_seeds"])
        assert rows[key]["n_seeds"] == 2


def test_both_modalities_at_least_as_good_as_text(table_runs):
    rows = _rows(table_runs)
    for method in ("deepsurv", "deephit"):
        assert rows[f"{method}_both"]["c_index_mean"] >= rows[f"{method}_text"]["c_index_mean"], method


def test_table_has_every_row_and_column(table_runs):
    table = pd.read_csv(table_runs / "table" / "table.csv")
    assert table[["method", "input"]].values.tolist() == [
        ["CoxPH", "clinical"],
        ["DeepHit", "text"],
        ["DeepSurv", "text"],
        ["DeepHit", "image"],
        ["DeepSurv", "image"],
        ["DeepHit", "both"],
        ["DeepSurv", "both"],
        ["Ours", "vlm"],
    ]
    lines = (table_runs / "table" / "table.md").read_text().splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |"
    body = [line for line in lines[2:] if line.startswith("|")]
    assert len(body) == 8 and all(line.count("|") == len(COLUMNS) + 1 for line in body)
    assert all(line.endswith("| N/A |") for line in body[:7])
    tests = pd.read_csv(table_runs / "table" / "paired_tests.csv")
    assert len(tests) == 1 and 0.0 <= tests["p_value"][0] <= 1.0
    assert tests["low"][0] <= tests["difference"][0] <= tests["high"][0]
