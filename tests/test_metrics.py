"""vlsurv.metrics against lifelines / scikit-survival on the data sets they ship, plus bad inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index as lifelines_c
from sklearn.metrics import roc_auc_score
from sksurv.column import encode_categorical
from sksurv.datasets import load_flchain, load_gbsg2, load_whas500
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw
from sksurv.metrics import integrated_brier_score as sksurv_ibs
from sksurv.util import Surv

from vlsurv import metrics as M
from vlsurv import metrics_text


def _sksurv_cohort(loader):
    """(time, event, Cox linear predictor) of a sksurv data set, CoxPH fitted on all covariates."""
    X, y = loader()
    X = encode_categorical(X.dropna(axis=1))
    event_field, time_field = y.dtype.names
    model = CoxPHSurvivalAnalysis(alpha=1e-3).fit(X, y)
    return y[time_field].astype(float), y[event_field], model.predict(X), model, X, y


@pytest.fixture(scope="module")
def rossi():
    frame = load_rossi()
    cox = CoxPHFitter().fit(frame, "week", "arrest")
    log_risk = cox.predict_log_partial_hazard(frame).to_numpy()
    return frame.week.to_numpy(float), frame.arrest.to_numpy(), log_risk, cox, frame


@pytest.mark.parametrize("loader", [load_whas500, load_gbsg2], ids=["whas500", "gbsg2"])
def test_harrell_c_matches_sksurv_and_lifelines(loader):
    time, event, risk, *_ = _sksurv_cohort(loader)
    ours = M.concordance_index(time, event, risk)
    assert ours == pytest.approx(concordance_index_censored(event, time, risk)[0], abs=1e-12)
    assert ours == pytest.approx(lifelines_c(time, -risk, event), abs=1e-12)
    assert 0.6 < ours < 0.9


def test_harrell_c_on_rossi_and_flchain(rossi):
    time, event, log_risk, cox, _ = rossi
    assert M.concordance_index(time, event, log_risk) == pytest.approx(cox.concordance_index_, abs=1e-12)
    X, y = load_flchain()
    subset = np.random.default_rng(0).choice(len(y), 1500, replace=False)
    X = encode_categorical(X.drop(columns=["chapter", "creatinine"])).iloc[subset]
    risk = CoxPHSurvivalAnalysis(alpha=1e-3).fit(X, y[subset]).predict(X)
    t, e = y["futime"][subset].astype(float), y["death"][subset]
    assert M.concordance_index(t, e, risk) == pytest.approx(lifelines_c(t, -risk, e), abs=1e-12)


def test_reversed_risk_gives_one_minus_c_and_monotone_transform_keeps_c(rossi):
    time, event, log_risk, *_ = rossi
    c = M.concordance_index(time, event, log_risk)
    assert M.concordance_index(time, event, -log_risk) == pytest.approx(1 - c, abs=1e-12)
    assert M.concordance_index(time, event, np.exp(log_risk)) == pytest.approx(c, abs=1e-12)


def test_uno_c_matches_sksurv_and_equals_harrell_without_censoring():
    time, event, risk, *_ = _sksurv_cohort(load_gbsg2)
    train, test = np.arange(time.size) % 2 == 0, np.arange(time.size) % 2 == 1
    tau = 1500.0
    expected = concordance_index_ipcw(
        Surv.from_arrays(event[train], time[train]),
        Surv.from_arrays(event[test], time[test]),
        risk[test],
        tau,
    )[0]
    assert M.uno_c(time[train], event[train], time[test], event[test], risk[test], tau) == pytest.approx(
        expected
    )
    rng = np.random.default_rng(1)
    t_all = rng.exponential(size=200)
    r = -np.log(t_all) + rng.normal(size=200)
    all_events = np.ones(200, dtype=int)
    uno = M.uno_c(t_all, all_events, t_all, all_events, r)
    assert uno == pytest.approx(M.concordance_index(t_all, all_events, r), abs=1e-12)


def test_time_dependent_auc_matches_sksurv_and_roc_auc_without_censoring():
    from sksurv.metrics import cumulative_dynamic_auc

    time, event, risk, *_ = _sksurv_cohort(load_whas500)
    train, test = np.arange(time.size) % 2 == 0, np.arange(time.size) % 2 == 1
    horizons = [30.0, 365.0, 1000.0]
    auc, mean_auc = M.time_dependent_auc(
        time[train], event[train], time[test], event[test], risk[test], horizons
    )
    expected, expected_mean = cumulative_dynamic_auc(
        Surv.from_arrays(event[train], time[train]),
        Surv.from_arrays(event[test], time[test]),
        risk[test],
        horizons,
    )
    assert list(auc.values()) == pytest.approx(expected.tolist())
    assert mean_auc == pytest.approx(expected_mean)
    rng = np.random.default_rng(2)
    t_all = rng.exponential(size=300)
    r = -np.log(t_all) + rng.normal(size=300)
    e_all = np.ones(300, dtype=int)
    auc_no_censoring, _ = M.time_dependent_auc(t_all, e_all, t_all, e_all, r, [0.7])
    assert auc_no_censoring[0.7] == pytest.approx(roc_auc_score(t_all <= 0.7, r))


def test_time_dependent_auc_when_last_time_is_event_and_censoring(rossi):
    """rossi ends at week 52 with events and censorings: sksurv alone fails there (G = 0)."""
    time, event, log_risk, *_ = rossi
    auc, _ = M.time_dependent_auc(time, event, time, event, log_risk, [10, 26, 40])
    assert all(0.55 < v < 0.75 for v in auc.values())
    truncated = event & (time <= 40)
    assert M.time_dependent_auc(time, event, time, truncated, log_risk, [10, 26, 40])[0] == pytest.approx(auc)


def test_integrated_brier_score_matches_sksurv_and_beats_a_blind_model():
    time, event, _, model, X, y = _sksurv_cohort(load_gbsg2)
    train, test = np.arange(time.size) % 2 == 0, np.arange(time.size) % 2 == 1
    times = np.linspace(200, 2000, 10)
    curves = np.array([f(times) for f in model.predict_survival_function(X[test])])
    ibs = M.integrated_brier_score(time[train], event[train], time[test], event[test], curves, times)
    assert ibs == pytest.approx(sksurv_ibs(y[train], y[test], curves, times))
    blind = np.full_like(curves, 0.5)
    assert ibs < M.integrated_brier_score(time[train], event[train], time[test], event[test], blind, times)


def test_breslow_risk_matches_lifelines_cox_survival(rossi):
    time, event, log_risk, cox, frame = rossi
    horizons = [10.0, 26.0, 40.0]
    ours = M.breslow_risk_at(time, event, log_risk, log_risk[:20], horizons)
    expected = 1 - cox.predict_survival_function(frame.iloc[:20], times=horizons).T.to_numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    assert np.all(M.breslow_risk_at(time, event, log_risk, log_risk[:3], [0.5]) == 0)


def test_curve_risk_reads_step_curves():
    survival = np.array([[0.9, 0.7, 0.4], [1.0, 0.95, 0.9]])
    risk = M.curve_risk_at(survival, [100, 200, 300], [50, 100, 250, 300])
    np.testing.assert_allclose(risk, [[0.0, 0.1, 0.3, 0.6], [0.0, 0.0, 0.05, 0.1]])
    with pytest.raises(M.MetricError, match="horizon 400 is beyond the last survival-curve time 300"):
        M.curve_risk_at(survival, [100, 200, 300], [400])


def test_bootstrap_ci_brackets_estimate_is_seeded_and_counts_skipped(rossi):
    time, event, log_risk, *_ = rossi
    first = M.bootstrap_ci(M.concordance_index, time, event, log_risk, n=60, seed=3)
    again = M.bootstrap_ci(M.concordance_index, time, event, log_risk, n=60, seed=3)
    assert first == again
    assert first.low < first.estimate < first.high and first.n_skipped == 0 and first.n_resamples == 60
    t, r = np.arange(1.0, 9.0), np.arange(8.0)
    sparse = M.bootstrap_ci(M.concordance_index, t, np.eye(8, dtype=int)[0], -r, n=200, seed=0)
    assert 0 < sparse.n_skipped < 100 and sparse.n_resamples == 200 - sparse.n_skipped
    assert sparse.low == sparse.high == sparse.estimate == 1.0
    one_pair = np.eye(8, dtype=int)[6]
    with pytest.raises(M.MetricError, match="undefined on 1[0-9][0-9] of 200 resamples"):
        M.bootstrap_ci(M.concordance_index, t, one_pair, r, n=200, seed=0)
    with pytest.raises(M.MetricError, match="no comparable pair"):
        M.concordance_index(t, np.eye(8, dtype=int)[7], r)


def test_calibration_of_the_true_model_is_close_and_bins_shrink_when_small():
    rng = np.random.default_rng(4)
    n = 3000
    hazard = np.exp(rng.normal(size=n)) / 1000
    event_time, censor_time = rng.exponential(1 / hazard), rng.uniform(0, 3000, n)
    time, event = np.minimum(event_time, censor_time), (event_time <= censor_time).astype(int)
    horizon = 500.0
    true_risk = 1 - np.exp(-hazard * horizon)
    table = M.calibration_table(time, event, true_risk, horizon)
    assert list(table.columns) == [
        "bin",
        "n",
        "n_events",
        "predicted",
        "observed",
        "observed_low",
        "observed_high",
    ]
    assert len(table) == 10 and table.n.sum() == n
    assert np.abs(table.predicted - table.observed).mean() < 0.03
    assert (table.observed_low <= table.observed).all() and (table.observed <= table.observed_high).all()
    assert len(M.calibration_table(time[:45], event[:45], true_risk[:45], horizon)) == 4
    shifted = M.calibration_table(time, event, np.clip(true_risk + 0.3, 0, 1), horizon)
    assert (shifted.predicted - shifted.observed).mean() > 0.2


def test_logrank_split_matches_lifelines(rossi):
    time, event, log_risk, *_ = rossi
    split = M.logrank_split(time, event, log_risk)
    high = log_risk > np.median(log_risk)
    assert (split.high_risk == high).all()
    expected = logrank_test(time[high], time[~high], event[high], event[~high])
    assert split.p_value == pytest.approx(expected.p_value) and split.p_value < 0.05


@pytest.mark.parametrize("metric", [M.concordance_index, M.logrank_split])
def test_constant_risk_all_censored_and_nan_raise(metric):
    time, event = np.arange(1.0, 11.0), np.array([1, 0] * 5)
    with pytest.raises(M.MetricError, match="undefined: the risk is constant"):
        metric(time, event, np.full(10, 0.3))
    with pytest.raises(M.MetricError, match="all 10 patients are censored"):
        metric(time, np.zeros(10), np.arange(10.0))
    with pytest.raises(M.MetricError, match="1 NaN/infinite values .first at row 4"):
        metric(time, event, np.where(np.arange(10) == 4, np.nan, 1.0 * np.arange(10)))
    with pytest.raises(M.MetricError, match="event must be 0 or 1"):
        metric(time, np.full(10, 2), np.arange(10.0))
    with pytest.raises(M.MetricError, match="time has 10 values but event has 9"):
        metric(time, event[:9], np.arange(10.0))


def test_horizon_beyond_follow_up_names_horizon_and_follow_up(rossi):
    time, event, log_risk, *_ = rossi
    with pytest.raises(
        M.MetricError, match=r"horizon 60 is beyond the follow-up: the longest follow-up is 52"
    ):
        M.time_dependent_auc(time, event, time, event, log_risk, [26, 60])
    with pytest.raises(M.MetricError, match=r"horizon 52 is beyond the follow-up"):
        M.calibration_table(time, event, np.full(time.size, 0.2), 52)
    late_events = (np.arange(1.0, 11.0) >= 5).astype(int)
    with pytest.raises(M.MetricError, match="horizon 3 has no event at or before it"):
        M.check_horizon(3.0, np.arange(1.0, 11.0), late_events)
    with pytest.raises(M.MetricError, match="horizon 0.5 is before the first follow-up time 1"):
        M.check_horizon(0.5, np.arange(1.0, 11.0), late_events)


def test_bertscore_minilm_scores_identical_pairs_near_one():
    result = metrics_text.bertscore(
        ["A 3 cm spiculated mass in the right upper lobe.", "Small left pleural effusion."],
        ["A 3 cm spiculated mass in the right upper lobe.", "The vertebral bodies show no lytic lesion."],
    )
    assert result.num_layers == 6 and result.model.endswith("model")
    assert result.f1[0] == pytest.approx(1.0, abs=1e-4)
    assert result.f1[1] < 0.6 and result.precision.shape == result.recall.shape == (2,)


def test_bertscore_bad_model_path_and_inputs(tmp_path):
    with pytest.raises(metrics_text.BertScoreError, match="BERTScore model path .*nowhere does not exist"):
        metrics_text.bertscore(["a"], ["b"], model=tmp_path / "nowhere")
    with pytest.raises(metrics_text.BertScoreError, match="1 candidates but 2 references"):
        metrics_text.bertscore(["a"], ["b", "c"])
    with pytest.raises(metrics_text.BertScoreError, match=r"num_layers must be in \[1, 6\]"):
        metrics_text.bertscore(["a"], ["b"], num_layers=9)


def _repeat_rows(size: int, seed: int, fraction: float = 0.5, copies: int = 4) -> np.ndarray:
    """Row indices where a random ``fraction`` of the rows appear ``copies`` times (one patient's scans)."""
    rng = np.random.default_rng(seed)
    return np.repeat(np.arange(size), np.where(rng.random(size) < fraction, copies, 1))


def test_cluster_bootstrap_of_a_cohort_copied_three_times_is_the_row_bootstrap_of_the_original(rossi):
    time, event, log_risk, *_ = rossi
    index = np.repeat(np.arange(time.size), 3)
    original = M.bootstrap_ci(M.concordance_index, time, event, log_risk, n=100, seed=5)
    rows = M.bootstrap_ci(M.concordance_index, time[index], event[index], log_risk[index], n=100, seed=5)
    clustered = M.bootstrap_ci(
        M.concordance_index, time[index], event[index], log_risk[index], n=100, seed=5, groups=index
    )
    assert rows.high - rows.low < 0.75 * (original.high - original.low)  # scans as patients: too narrow
    assert clustered.estimate == pytest.approx(original.estimate)
    assert clustered.as_list() == pytest.approx(original.as_list())
    assert clustered.n_groups == time.size and rows.n_groups == index.size
    singletons = M.bootstrap_ci(M.concordance_index, time, event, log_risk, n=100, seed=5, groups=-time)
    assert singletons.as_list() != original.as_list()  # groups of tied times: a different resampling
    unique = M.bootstrap_ci(
        M.concordance_index, time, event, log_risk, n=100, seed=5, groups=np.arange(time.size)
    )
    assert unique == original


@pytest.mark.parametrize("loader", [load_whas500, load_gbsg2], ids=["whas500", "gbsg2"])
def test_repeat_scans_of_half_the_patients_narrow_the_row_bootstrap_but_not_the_cluster_bootstrap(loader):
    """Four identical scans for half of the patients weigh them 4x: the C-index can only get less certain."""
    time, event, risk, *_ = _sksurv_cohort(loader)
    event = event.astype(int)
    index = _repeat_rows(time.size, seed=0)
    original = M.bootstrap_ci(M.concordance_index, time, event, risk, n=100, seed=1)
    rows = M.bootstrap_ci(M.concordance_index, time[index], event[index], risk[index], n=100, seed=1)
    clustered = M.bootstrap_ci(
        M.concordance_index, time[index], event[index], risk[index], n=100, seed=1, groups=index
    )
    width, clustered_width = original.high - original.low, clustered.high - clustered.low
    assert clustered_width > 0.95 * width and rows.high - rows.low < 0.75 * clustered_width


def _clustered_cohort(rng, n_patients=150):
    """A PH cohort where half of the patients have 4 scans: one patient risk plus scan noise, and each
    later scan 20 days closer to the event. Returns scan-level (time, event, risk, patient)."""
    log_risk = rng.normal(size=n_patients)
    event_time, censor_time = rng.exponential(1000 * np.exp(-log_risk)), rng.uniform(0, 3000, n_patients)
    scans = np.where(rng.random(n_patients) < 0.5, 4, 1)
    patient = np.repeat(np.arange(n_patients), scans)
    later = np.concatenate([np.arange(k) for k in scans])
    patient_risk = log_risk + rng.normal(scale=0.5, size=n_patients)
    risk = patient_risk[patient] + rng.normal(scale=0.3, size=patient.size)
    time = np.maximum(np.minimum(event_time, censor_time)[patient] - 20.0 * later, 0.5)
    return time, (event_time <= censor_time).astype(int)[patient], risk, patient


def test_cluster_bootstrap_standard_error_matches_the_spread_over_simulated_cohorts():
    rng = np.random.default_rng(0)
    spread = np.std([M.concordance_index(*_clustered_cohort(rng)[:3]) for _ in range(200)])
    cluster_ratio, row_ratio = [], []
    for seed in range(3):
        time, event, risk, patient = _clustered_cohort(np.random.default_rng(100 + seed))
        clustered = M.bootstrap_ci(M.concordance_index, time, event, risk, n=150, seed=seed, groups=patient)
        rows = M.bootstrap_ci(M.concordance_index, time, event, risk, n=150, seed=seed)
        cluster_ratio.append((clustered.high - clustered.low) / (2 * 1.96 * spread))
        row_ratio.append((rows.high - rows.low) / (2 * 1.96 * spread))
    assert 0.8 < np.mean(cluster_ratio) < 1.2 and np.mean(row_ratio) < 0.7


def test_first_row_per_group_and_logrank_on_one_scan_per_patient(rossi):
    time, event, log_risk, *_ = rossi
    index = _repeat_rows(time.size, seed=2, copies=3)
    later = pd.Series(index).groupby(index).cumcount().to_numpy()  # 0 for the first scan
    scan_time = np.maximum(time[index] - later, 0.0)  # a later scan leaves a shorter follow-up
    order = np.random.default_rng(0).permutation(index.size)  # manifest order need not group patients
    patients, scan_time, scan_event = index[order], scan_time[order], event[index][order]
    first = M.first_row_per_group(patients, -scan_time)
    assert np.all(np.diff(first) > 0) and sorted(patients[first]) == list(range(time.size))
    np.testing.assert_array_equal(scan_time[first], time[patients[first]])
    split = M.logrank_split(
        scan_time[first], scan_event[first], log_risk[patients[first]], groups=patients[first]
    )
    high = log_risk > np.median(log_risk)
    expected = logrank_test(time[high], time[~high], event[high], event[~high])
    assert split.p_value == pytest.approx(expected.p_value)
    everything = M.logrank_split(scan_time, scan_event, log_risk[patients])
    assert everything.p_value < expected.p_value / 10  # repeat scans counted as patients: p far too small
    repeated = int(np.argmax(np.bincount(patients)))
    groups = np.where(patients == repeated, "p", np.arange(index.size).astype(str))
    with pytest.raises(M.MetricError, match=r"independent patients: group 'p' has 3 rows.*one row per"):
        M.logrank_split(scan_time, scan_event, log_risk[patients], groups=groups)
    assert M.first_row_per_group(["b", "a", "b", "a"], [2, 5, 1, 5]).tolist() == [1, 2]
    with pytest.raises(M.MetricError, match="groups has 3 rows but order has 2"):
        M.first_row_per_group(["a", "b", "a"], [1, 2])
