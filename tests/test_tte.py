"""Time-to-event pretraining parts: the piecewise-exponential loss, the events reader and its errors, task
selection, labels, bins, the head and the synthetic EHR."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import PiecewiseExponentialFitter
from lifelines.datasets import load_rossi

from vlsurv.data.synthetic import EVENT_CODES, build_cohort_table, build_events_table
from vlsurv.errors import InputError
from vlsurv.losses import LossInputError, piecewise_exponential_loss
from vlsurv.tte.config import TTEModelConfig
from vlsurv.tte.events import TTEInputError, load_events
from vlsurv.tte.head import TTEHead
from vlsurv.tte.labels import TimeBins, TTELabels, base_rates, build_labels, select_tasks


def direct_loss(log_hazard, time, event, edges) -> float:
    """The MOTOR loss cell by cell from its definition: mean of hazard x time at risk in the bin, minus the
    mean of the log-hazard in the bin holding each observed event."""
    batch, bins, tasks = log_hazard.shape
    total = 0.0
    for i in range(batch):
        for k in range(bins):
            for j in range(tasks):
                at_risk = max(0.0, min(time[i, j], edges[k + 1]) - edges[k])
                total += math.exp(log_hazard[i, k, j]) * at_risk
                if event[i, j] and edges[k] <= time[i, j] < edges[k + 1]:
                    total -= log_hazard[i, k, j]
    return total / (batch * bins * tasks)


def test_loss_matches_the_direct_formula_including_empty_bins():
    rng = np.random.default_rng(0)
    edges = np.array([0.0, 30.0, 100.0, 365.0, np.inf])
    time = rng.choice([0.0, 5.0, 30.0, 80.0, 400.0, 2000.0], size=(6, 7))
    event = rng.random((6, 7)) < 0.5
    log_hazard = torch.tensor(rng.normal(-4.0, 1.0, size=(6, 4, 7)), requires_grad=True)
    log_time, is_event = TimeBins(edges).targets(torch.tensor(time), torch.tensor(event))
    assert torch.isneginf(log_time).any()  # times before a bin, and time 0, give zero time at risk
    loss = piecewise_exponential_loss(log_hazard, log_time.double(), is_event)
    assert loss.item() == pytest.approx(
        direct_loss(log_hazard.detach().numpy(), time, event, edges), rel=1e-12
    )
    loss.backward()
    assert torch.isfinite(log_hazard.grad).all()
    empty = torch.isneginf(log_time) & ~is_event
    assert (log_hazard.grad[empty] == 0).all()


def test_intercept_fit_equals_lifelines_piecewise_exponential_on_rossi():
    """One task, one log-hazard per bin fitted by minimising the loss = lifelines' MLE (1 / lambda_i)."""
    rossi = load_rossi()
    breakpoints = [10.5, 25.5, 40.5]
    fitter = PiecewiseExponentialFitter(breakpoints).fit(rossi["week"], rossi["arrest"])
    bins = TimeBins(np.array([0.0, *breakpoints, np.inf]))
    time = torch.tensor(rossi["week"].to_numpy(), dtype=torch.float64).unsqueeze(1)
    log_time, is_event = bins.targets(time, torch.tensor(rossi["arrest"].to_numpy()).unsqueeze(1))
    log_hazard = torch.zeros(1, bins.num_bins, 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_hazard], max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = piecewise_exponential_loss(log_hazard.expand(len(rossi), -1, -1), log_time.double(), is_event)
        loss.backward()
        return loss

    optimizer.step(closure)
    hazards = torch.exp(log_hazard).flatten().detach().numpy()
    lambdas = fitter.summary.loc[[f"lambda_{i}_" for i in range(bins.num_bins)], "coef"].to_numpy()
    np.testing.assert_allclose(hazards, 1.0 / lambdas, rtol=1e-4)


@pytest.mark.parametrize(
    ("log_time", "is_event", "message"),
    [
        (
            torch.zeros(2, 3, 5),
            torch.zeros(2, 3, 4),
            "`log_time` must have the shape of `log_hazard` (2, 3, 4)",
        ),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3), "`is_event` must have the shape of `log_hazard` (2, 3, 4)"),
        (torch.full((2, 3, 4), math.nan), torch.zeros(2, 3, 4), "`log_time` must be finite or -inf"),
        (torch.zeros(2, 3, 4), torch.full((2, 3, 4), 2.0), "`is_event` must contain only 0 and 1"),
    ],
)
def test_loss_rejects_bad_inputs(log_time, is_event, message):
    with pytest.raises(LossInputError, match="piecewise_exponential_loss") as caught:
        piecewise_exponential_loss(torch.zeros(2, 3, 4), log_time, is_event)
    assert message in str(caught.value)


def random_ehr(seed: int, patients: int = 30, codes: int = 6):
    """Events with ties and repeated codes, and 1-3 scans per patient (one exactly at an event's time)."""
    rng = np.random.default_rng(seed)
    rows = [(p, 0.0, "VISIT") for p in range(patients)]
    for _ in range(patients * 12):
        rows.append(
            (int(rng.integers(patients)), float(rng.integers(1, 200)), f"C{int(rng.integers(codes))}")
        )
    events = pd.DataFrame(rows, columns=["patient_id", "time", "code"])
    scans = []
    for p in range(patients):
        for s in range(int(rng.integers(1, 4))):
            scans.append((f"p{p}s{s}", p, float(rng.integers(0, 150))))
    scans.append(("exact", 0, float(events[events["patient_id"] == 0]["time"].iloc[-1])))
    return events, pd.DataFrame(scans, columns=["scan_id", "patient_id", "time"])


def test_labels_equal_a_per_cell_reference():
    events, scans = random_ehr(1)
    event_table, scan_table = load_events(events, scans)
    tasks = np.array(["C0", "C3", "C5", "VISIT"])
    labels = build_labels(event_table, scan_table, tasks)
    assert labels.time.shape == (len(scans), 4) and labels.time.dtype == np.float32
    for i, scan in scans.iterrows():
        own = events[events["patient_id"] == scan["patient_id"]]
        end = max(own["time"].max(), scans[scans["patient_id"] == scan["patient_id"]]["time"].max())
        for j, code in enumerate(tasks):
            later = own[(own["code"] == code) & (own["time"] > scan["time"])]["time"]
            assert labels.event[i, j] == (len(later) > 0)
            expected = (later.min() if len(later) else end) - scan["time"]
            assert labels.time[i, j] == pytest.approx(expected)
    assert not labels.event[:, 3].any()  # VISIT only at day 0, never after a scan


def test_select_tasks_ranks_codes_by_patients_after_the_scan():
    events = pd.DataFrame(
        {
            "patient_id": [1, 1, 1, 2, 2, 3, 3, 3, 1],
            "time": [0, 5, 6, 0, 9, 0, 7, 8, -1],
            "code": ["A", "B", "B", "B", "C", "B", "C", "A", "MEDS_BIRTH"],
        }
    )
    scans = pd.DataFrame({"scan_id": ["s1", "s2", "s3"], "patient_id": [1, 2, 3], "time": [1, 1, 1]})
    event_table, scan_table = load_events(events, scans)
    chosen = select_tasks(event_table, scan_table, k=2, min_event_fraction=0.5)
    assert list(chosen.codes) == ["C"]  # after the scan: C in patients 2 and 3, A and B only in 1 (under 0.5)
    np.testing.assert_allclose(chosen.event_fraction, [2 / 3])
    np.testing.assert_array_equal(chosen.patients_with_event, [2])
    everything = select_tasks(event_table, scan_table, k=8, min_event_fraction=0.0)
    assert list(everything.codes) == ["C", "A", "B"]  # ties in table order; MEDS_BIRTH is never a task
    assert list(select_tasks(event_table, scan_table, k=2, min_event_fraction=0.0).codes) == ["C", "A"]


def test_bins_sit_at_event_percentiles_and_split_the_time_at_risk():
    rng = np.random.default_rng(2)
    time = rng.exponential(300.0, size=(50, 3)).astype(np.float32)
    event = rng.random((50, 3)) < 0.6
    labels = TTELabels(np.arange(50).astype(str), np.array(["a", "b", "c"]), time, event)
    bins = TimeBins.from_labels(labels, 4)
    np.testing.assert_allclose(bins.edges[1:-1], np.quantile(time[event], [0.25, 0.5, 0.75]))
    assert bins.edges[0] == 0.0 and bins.edges[-1] == np.inf
    log_time, is_event = bins.targets(torch.tensor(time), torch.tensor(event))
    np.testing.assert_allclose(torch.exp(log_time).sum(1).numpy(), time, rtol=1e-5)
    np.testing.assert_array_equal(is_event.sum(1).numpy(), event.astype(int))
    rates = base_rates(labels)
    np.testing.assert_allclose(rates, event.sum(0) / time.sum(0, dtype=np.float64), rtol=1e-6)


def test_head_shapes_and_base_rate_bias():
    config = TTEModelConfig(image_token_dim=8, num_image_tokens=3, projection_dim=6, final_dim=4)
    head = TTEHead(config, num_bins=5, num_tasks=7)
    rates = np.geomspace(1e-4, 1e-2, 7)
    head.set_base_rates(rates)
    torch.nn.init.zeros_(head.task_layer.weight)
    out = head(torch.randn(2, 3, 8))
    assert out.shape == (2, 5, 7)
    np.testing.assert_allclose(out[0, 0].detach().numpy(), np.log(rates), rtol=1e-5)
    assert head.features(torch.randn(2, 3, 8)).shape == (2, 6)


# --- the four bad inputs of the issue, and the reader's other checks ----------------------------------------


def small_tables():
    events = pd.DataFrame(
        {"patient_id": [1, 1, 2, 2], "time": [0.0, 10.0, 0.0, 4.0], "code": ["A", "B", "A", "B"]}
    )
    scans = pd.DataFrame({"scan_id": ["s1", "s2"], "patient_id": [1, 2], "time": [2.0, 1.0]})
    return events, scans


def test_an_event_before_the_first_record_is_an_error():
    events, scans = small_tables()
    events.loc[len(events)] = [1, 1.0, "MEDS_BIRTH"]
    with pytest.raises(TTEInputError) as caught:
        load_events(events, scans)
    assert str(caught.value) == (
        "events: row 0: event 'A' at 0 days is before the first record of patient 1 (MEDS_BIRTH at 1 "
        "days); expected every event at or after the patient's first record"
    )
    events, scans = small_tables()
    scans.loc[0, "time"] = -3.0
    with pytest.raises(
        TTEInputError,
        match=r"scans: row 0 \(scan_id 's1'\): scan time -3 days is before "
        r"patient 1's first record at 0 days",
    ):
        load_events(events, scans)


def test_a_code_column_of_mixed_types_is_an_error():
    events, scans = small_tables()
    events["code"] = ["A", 7, "A", "B"]
    with pytest.raises(TTEInputError) as caught:
        load_events(events, scans)
    assert str(caught.value).startswith("events: column `code` mixes types: str (row 0: 'A'), int (row 1: 7)")


def test_a_missing_scan_time_is_an_error(tmp_path):
    events, scans = small_tables()
    scans.loc[1, "time"] = np.nan
    path = tmp_path / "scans.csv"
    scans.to_csv(path, index=False)
    with pytest.raises(TTEInputError) as caught:
        load_events(events, path)
    assert isinstance(caught.value, InputError)
    assert str(caught.value) == (
        f"{path}: row 1 (scan_id 's2'): `time` is missing; expected each scan's acquisition time"
    )


def test_no_task_passing_the_threshold_is_an_error():
    events, scans = small_tables()
    events.loc[3, "time"] = 0.5  # patient 2's B now comes before its scan
    with pytest.raises(TTEInputError) as caught:
        select_tasks(*load_events(events, scans), k=4, min_event_fraction=0.9)
    assert str(caught.value) == (
        "tasks.min_event_fraction = 0.9: no code passes it (the most frequent, 'B', occurs after the scan in "
        "0.5 of the 2 scanned patients); expected a lower threshold or more follow-up events"
    )


def test_reader_names_other_problems(tmp_path):
    events, scans = small_tables()
    with pytest.raises(TTEInputError, match=r"scans: missing columns \['time'\]"):
        load_events(events, scans.drop(columns="time"))
    scans.loc[1, "patient_id"] = 9
    with pytest.raises(TTEInputError, match="scans: row 1: patient_id 9 has no event in events"):
        load_events(events, scans)
    events, scans = small_tables()
    scans["time"] = pd.to_datetime(["2020-01-01", "2020-01-02"])
    with pytest.raises(
        TTEInputError, match="scan times are datetimes but the event times of events are numbers"
    ):
        load_events(events, scans)


def test_datetime_csv_tables_become_days(tmp_path):
    events = pd.DataFrame(
        {
            "patient_id": ["a", "a", "a"],
            "time": ["2020-01-01", "2020-01-11", "2020-03-01"],
            "code": ["X", "Y", "Y"],
        }
    )
    scans = pd.DataFrame({"scan_id": ["s"], "patient_id": ["a"], "time": ["2020-01-05 12:00"]})
    events.to_csv(tmp_path / "events.csv", index=False)
    scans.to_csv(tmp_path / "scans.csv", index=False)
    labels = build_labels(*load_events(tmp_path / "events.csv", tmp_path / "scans.csv"), np.array(["Y", "X"]))
    np.testing.assert_allclose(labels.time, [[5.5, 55.5]])
    np.testing.assert_array_equal(labels.event, [[True, False]])


# --- the synthetic EHR -------------------------------------------------------------------------------------


def test_synthetic_events_follow_the_findings_and_leave_the_cohort_unchanged():
    findings, table = build_cohort_table(300, 5)
    before = table.copy()
    events, scans = build_events_table(findings, table, 5)
    pd.testing.assert_frame_equal(table, before)
    assert list(scans["scan_id"]) == list(table["scan_id"])
    event_table, scan_table = load_events(events, scans)
    tasks = np.array(["CPT/32555", "ICD10/R04.2", "NOISE/020", "DEATH"])
    labels = build_labels(event_table, scan_table, tasks)
    effusion, vessel = (
        table["effusion_mm"].fillna(0).to_numpy() > 0,
        table["vessel"].fillna("").to_numpy() != "",
    )

    def rate(rows, task):  # events per day at risk
        return labels.event[rows, task].sum() / labels.time[rows, task].sum()

    assert rate(effusion, 0) > 3 * rate(~effusion, 0)  # thoracentesis after an effusion
    assert rate(vessel, 1) > 3 * rate(~vessel, 1)  # hemoptysis after vessel invasion
    assert 0.7 < rate(effusion, 2) / rate(~effusion, 2) < 1.4  # a noise code ignores the image
    np.testing.assert_array_equal(labels.event[:, 3], table["event"].to_numpy() == 1)
    np.testing.assert_allclose(labels.time[:, 3], table["time"].to_numpy(), atol=0.01)
    assert set(EVENT_CODES) <= set(events["code"])
