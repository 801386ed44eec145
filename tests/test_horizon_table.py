"""Horizon labels (early-censored scans excluded), the horizon AUROC table and other models' risk files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines.datasets import load_rossi

from vlsurv.config import ConfigError
from vlsurv.horizon.config import HorizonConfig
from vlsurv.horizon.labels import HorizonError, horizon_labels
from vlsurv.horizon.table import RiskSource, format_table, model_rows, parse_compare, read_risks


def test_labels_exclude_early_censored_scans_and_count_them():
    #            death<h  death=h  death>h  cens<h  cens=h  cens>h
    time = [100.0, 365.0, 400.0, 200.0, 365.0, 900.0]
    event = [1, 1, 1, 0, 0, 0]
    labels = horizon_labels(time, event, (365.0, 1000.0))
    assert labels.known[:, 0].tolist() == [True, True, True, False, True, True]
    assert labels.label[:, 0].tolist() == [1, 1, 0, 0, 0, 0]
    assert labels.counts()["365"] == {"positives": 2, "negatives": 3, "excluded": 1}
    # at 1000 days every censored scan (200, 365, 900) is censored before the horizon
    assert labels.counts()["1000"] == {"positives": 3, "negatives": 0, "excluded": 3}


def test_auroc_equals_scikit_survival_where_nobody_is_censored_before_the_horizon():
    """Rossi: every censoring is at week 52, so before it the cumulative/dynamic AUC has no IPCW weights and
    equals the plain AUROC of arrest within h against follow-up past h (ties in prio included)."""
    from sksurv.metrics import cumulative_dynamic_auc
    from sksurv.util import Surv

    rossi = load_rossi()
    horizons = (13.0, 30.0, 51.0)
    test = Surv.from_arrays(rossi.arrest.astype(bool), rossi.week.astype(float))
    later = np.where(rossi.arrest == 1, rossi.week, 60).astype(
        float
    )  # censoring distribution: G = 1 before 60
    train = Surv.from_arrays(rossi.arrest.astype(bool), later)
    risk = rossi.prio.to_numpy(float)
    expected, _ = cumulative_dynamic_auc(train, test, risk, list(horizons))
    labels = horizon_labels(rossi.week, rossi.arrest, horizons)
    rows = model_rows("prio", risk, labels, np.arange(len(rossi)), bootstrap=200, seed=0)
    assert [r["auroc"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-12)
    for row in rows:
        assert row["excluded"] == 0 and row["n"] == len(rossi) and row["note"] == ""
        assert row["ci_low"] < row["auroc"] < row["ci_high"]


def test_a_horizon_without_positives_gets_a_message_not_auroc_one_half():
    rossi = load_rossi()  # the first arrest is in week 1
    labels = horizon_labels(rossi.week, rossi.arrest, (0.5, 30.0))
    rows = model_rows("prio", rossi.prio.to_numpy(float), labels, np.arange(len(rossi)), 50, 0)
    assert rows[0]["auroc"] is None and rows[0]["ci_low"] is None
    assert rows[0][
        "note"
    ] == "AUROC undefined: no deaths within 0.5 among the 432 labelled scans (0 excluded as " + (
        "censored earlier)"
    )
    assert rows[1]["auroc"] is not None
    text = format_table(rows)
    assert "no deaths within 0.5" in text and "0.500" not in text


def test_a_horizon_past_every_follow_up_gets_a_message_too():
    labels = horizon_labels([10.0, 20.0, 30.0], [1, 0, 0], (40.0,))
    (row,) = model_rows("m", np.array([0.1, 0.2, 0.3]), labels, np.arange(3), 20, 0)
    assert row["auroc"] is None
    assert row["note"].startswith("AUROC undefined: no scans followed past 40 among the 1 labelled scans")
    assert (row["positives"], row["negatives"], row["excluded"]) == (1, 0, 2)


def test_risks_of_other_models_are_read_from_a_predictions_file(tmp_path):
    path = tmp_path / "predictions.csv"
    pd.DataFrame({"scan_id": ["a", "b", "c"], "risk": [0.1, 0.2, 0.3], "risk_tumor": [3.0, 2.0, 1.0]}).to_csv(
        path, index=False
    )
    assert read_risks(parse_compare(f"vlm={tmp_path}"), ["c", "a"]).tolist() == [0.3, 0.1]
    assert read_risks(parse_compare(f"vlm tumor:risk_tumor={path}"), ["b"]).tolist() == [2.0]
    assert parse_compare(f"vlm tumor:risk_tumor={path}") == RiskSource("vlm tumor", path, "risk_tumor")


def test_risk_file_errors_name_the_file_and_what_was_expected(tmp_path):
    path = tmp_path / "predictions.csv"
    pd.DataFrame({"scan_id": ["a", "b"], "risk": [0.1, float("nan")]}).to_csv(path, index=False)
    with pytest.raises(
        HorizonError, match=r"predictions.csv: no column 'risk_x' .*expected scan_id and the risk"
    ):
        read_risks(RiskSource("m", path, "risk_x"), ["a"])
    with pytest.raises(
        HorizonError, match=r"predictions.csv: 1 of the 2 evaluated scans have no 'risk' .*'z'"
    ):
        read_risks(RiskSource("m", path), ["a", "z"])
    with pytest.raises(
        HorizonError, match=r"predictions.csv: column 'risk' of scan 'b': expected a finite number"
    ):
        read_risks(RiskSource("m", path), ["a", "b"])
    with pytest.raises(
        HorizonError, match=r"--compare m: .*missing.csv not found; expected a CSV with scan_id"
    ):
        read_risks(RiskSource("m", tmp_path / "missing.csv"), ["a"])
    with pytest.raises(HorizonError, match=r"--compare 'vlm': expected NAME=PATH or NAME:COLUMN=PATH"):
        parse_compare("vlm")


def test_config_rejects_repeated_horizons_and_swin_sizes_off_the_grid():
    with pytest.raises(
        ConfigError, match=r"horizon.horizons: expected distinct horizons > 0, got \[365.0, 365.0\]"
    ):
        HorizonConfig(horizons=(365.0, 365.0))
    with pytest.raises(ConfigError, match=r"horizon.horizons: expected horizons > 0"):
        HorizonConfig(horizons=(0.0,))
    with pytest.raises(
        ConfigError, match=r"horizon.spatial_size: expected multiples of 32 for swin, got \[48, 32"
    ):
        HorizonConfig(model="swin", spatial_size=(48, 32, 32))
