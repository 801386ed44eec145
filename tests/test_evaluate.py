"""`vlsurv evaluate` on small made-up predictions and manifests written in tmp_path."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from lifelines.statistics import logrank_test

from vlsurv import metrics as M
from vlsurv.cli import main as cli_main
from vlsurv.config import ConfigError
from vlsurv.errors import InputError
from vlsurv.evaluate import EvaluationConfig, EvaluationError, evaluate_predictions

QUESTIONS = ("tumor", "lymph_nodes", "pleura", "metastases", "vessels", "bone")


def make_case(folder, n=150, n_train=90, seed=0, with_train_predictions=True):
    """A PH-model cohort: manifest.csv, out/predictions.csv, out/answers.jsonl and vqa.jsonl."""
    rng = np.random.default_rng(seed)
    log_risk = rng.normal(size=n)
    event_time, censor_time = rng.exponential(900 * np.exp(-log_risk)), rng.uniform(300, 2500, n)
    ids = [f"scan{i:03d}" for i in range(n)]
    manifest = pd.DataFrame(
        {
            "patient_id": [f"p{i:03d}" for i in range(n)],
            "scan_id": ids,
            "image": [f"images/{i}.nii.gz" for i in ids],
            "report": "Findings withheld.",
            "time": np.maximum(np.minimum(event_time, censor_time).round(), 1.0),
            "event": (event_time <= censor_time).astype(int),
            "split": ["train"] * n_train + ["test"] * (n - n_train),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(folder / "manifest.csv", index=False)
    risk = log_risk + rng.normal(scale=0.4, size=n)
    predictions = pd.DataFrame(
        {
            "scan_id": ids,
            "risk": risk,
            **{f"risk_{q}": risk + rng.normal(scale=0.3, size=n) for q in QUESTIONS},
        }
    )
    if not with_train_predictions:
        predictions = predictions[manifest.split == "test"]
    (folder / "out").mkdir(exist_ok=True)
    predictions.to_csv(folder / "out" / "predictions.csv", index=False)
    with open(folder / "out" / "answers.jsonl", "w") as answers, open(folder / "vqa.jsonl", "w") as vqa:
        for row in predictions.itertuples():
            for q in QUESTIONS:
                answers.write(
                    json.dumps(
                        {
                            "scan_id": row.scan_id,
                            "question_id": q,
                            "question": f"Any {q}? <b>",
                            "answer": f"A 2 cm {q} finding.",
                            "risk": getattr(row, f"risk_{q}"),
                        }
                    )
                    + "\n"
                )
                vqa.write(
                    json.dumps(
                        {
                            "scan_id": row.scan_id,
                            "question_id": q,
                            "question": f"Any {q}?",
                            "answer": f"No {q} abnormality.",
                        }
                    )
                    + "\n"
                )
    return manifest, predictions


def _config(**kw):
    return EvaluationConfig(**{"horizons": (365.0, 1095.0), "bootstrap": 20, **kw})


def test_cli_writes_metrics_plots_and_a_self_contained_escaped_report(tmp_path):
    manifest, predictions = make_case(tmp_path)
    paths = [
        "--predictions",
        tmp_path / "out",
        "--manifest",
        tmp_path / "manifest.csv",
        "--vqa",
        tmp_path / "vqa.jsonl",
        "--out",
        tmp_path / "eval",
    ]
    options = ["--horizons", "365", "1095", "--bootstrap", "30", "--bertscore-samples", "12", "--seed", "1"]
    code = cli_main(["evaluate", *map(str, paths), *options])
    assert code == 0
    for name in ("metrics.json", "km.png", "calibration.png", "report.html", "config.yaml"):
        assert (tmp_path / "eval" / name).is_file(), name
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    test = manifest.merge(predictions, on="scan_id")[lambda f: f.split == "test"]
    assert metrics["n"] == len(test) and metrics["n_events"] == test.event.sum()
    assert metrics["c_index"] == pytest.approx(M.concordance_index(test.time, test.event, test.risk))
    assert metrics["c_index_ci"][0] < metrics["c_index"] < metrics["c_index_ci"][1]
    assert metrics["c_index"] > 0.65 and metrics["uno_c_ci"][0] < metrics["uno_c"] < metrics["uno_c_ci"][1]
    assert set(metrics["td_auc"]) == {"365", "1095"} and metrics["logrank_p"] < 0.05
    assert set(metrics["per_question_c_index"]) == set(QUESTIONS)
    assert len(metrics["calibration"]["365"]) == 6 and "90 train-split" in metrics["calibration_source"]
    assert metrics["bertscore_pairs"] == 12 and 0 < metrics["bertscore_f1"] < 1
    page = (tmp_path / "eval" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and page.count("<img") == 2 and 'src="http' not in page
    assert "Any pleura? &lt;b&gt;" in page and "<b>" not in page
    assert test.sort_values("risk").scan_id.iloc[-1] in page and "No pleura abnormality." in page


def test_survival_curves_give_integrated_brier_and_curve_calibration(tmp_path):
    manifest, predictions = make_case(tmp_path)
    times = np.arange(100.0, 2100.0, 100.0)
    hazard = np.exp(predictions.risk.to_numpy())[:, None] / 900
    curves = pd.DataFrame(np.exp(-hazard * times), columns=[f"S@{t:g}" for t in times])
    curves.insert(0, "scan_id", predictions.scan_id)
    curves.to_csv(tmp_path / "out" / "survival_curves.csv", index=False)
    metrics = evaluate_predictions(
        tmp_path / "out", tmp_path / "manifest.csv", tmp_path / "eval", config=_config()
    )
    assert metrics["calibration_source"] == "survival curves" and metrics["bertscore_f1"] is None
    start, end = metrics["integrated_brier_range"]
    inside = (times >= start) & (times <= end)
    assert start >= 100 and inside.sum() >= 10
    train, test = manifest[manifest.split == "train"], (manifest.split == "test").to_numpy()
    shuffled = np.random.default_rng(0).permutation(curves.iloc[:, 1:].to_numpy()[test][:, inside])
    blind = M.integrated_brier_score(
        train.time, train.event, manifest.time[test], manifest.event[test], shuffled, times[inside]
    )
    assert 0 < metrics["integrated_brier_score"] < blind - 0.02


def test_curves_that_end_before_a_horizon_skip_only_its_calibration_with_a_note(tmp_path):
    """A DeepHit curve ends at its last cut: S beyond it is unknown, so calibration there is skipped, not
    extrapolated, while the time-dependent AUC (risk ranking only) is still computed at that horizon."""
    manifest, predictions = make_case(tmp_path)
    times = np.arange(100.0, 1000.0, 100.0)
    hazard = np.exp(predictions.risk.to_numpy())[:, None] / 900
    curves = pd.DataFrame(np.exp(-hazard * times), columns=[f"S@{t:g}" for t in times])
    curves.insert(0, "scan_id", predictions.scan_id)
    curves.to_csv(tmp_path / "out" / "survival_curves.csv", index=False)
    metrics = evaluate_predictions(
        tmp_path / "out", tmp_path / "manifest.csv", tmp_path / "eval", config=_config()
    )
    assert set(metrics["td_auc"]) == {"365", "1095"} and set(metrics["calibration"]) == {"365"}
    assert metrics["calibration_skipped_horizons"] == ["1095"]
    assert any("1095" in note and "last survival-curve time 900" in note for note in metrics["notes"])


def test_predictions_without_train_rows_fit_the_breslow_baseline_in_sample(tmp_path):
    make_case(tmp_path, with_train_predictions=False)
    metrics = evaluate_predictions(
        tmp_path / "out", tmp_path / "manifest.csv", tmp_path / "eval", config=_config()
    )
    assert "in-sample on the 60 evaluated rows" in metrics["calibration_source"]
    assert any("no train-split predictions" in note for note in metrics["notes"])


def test_scan_ids_that_do_not_match_the_manifest_are_named(tmp_path):
    _, predictions = make_case(tmp_path)
    predictions.loc[:2, "scan_id"] = ["ghost1", "ghost2", "ghost3"]
    predictions.to_csv(tmp_path / "out" / "predictions.csv", index=False)
    with pytest.raises(
        EvaluationError,
        match=r"3 of 150 scan ids in .*predictions.csv are not in the manifest "
        r".*manifest.csv, e.g. ghost1, ghost2, ghost3",
    ):
        evaluate_predictions(tmp_path / "out", tmp_path / "manifest.csv", tmp_path / "eval", config=_config())


def test_horizon_beyond_follow_up_fails_or_is_skipped_and_recorded(tmp_path):
    manifest, _ = make_case(tmp_path)
    longest = min(
        manifest[manifest.split == "test"].time.max(), manifest[manifest.split == "train"].time.max()
    )
    with pytest.raises(
        EvaluationError,
        match=rf"horizon 9000 is beyond the follow-up: the longest follow-up is "
        rf"{longest:g}.*--skip-invalid-horizons",
    ):
        evaluate_predictions(
            tmp_path / "out",
            tmp_path / "manifest.csv",
            tmp_path / "eval",
            config=_config(horizons=(365.0, 9000.0)),
        )
    metrics = evaluate_predictions(
        tmp_path / "out",
        tmp_path / "manifest.csv",
        tmp_path / "eval",
        config=_config(horizons=(365.0, 9000.0), skip_invalid_horizons=True),
    )
    assert (
        list(metrics["td_auc"]) == ["365"] and "beyond the follow-up" in metrics["skipped_horizons"]["9000"]
    )
    metrics = evaluate_predictions(
        tmp_path / "out",
        tmp_path / "manifest.csv",
        tmp_path / "none",
        config=_config(horizons=(9000.0,), skip_invalid_horizons=True),
    )
    assert (
        metrics["td_auc"] == {}
        and metrics["uno_c_tau"] == manifest[manifest.split == "train"].time.max()
        and "calibration" not in metrics
    )
    assert not (tmp_path / "none" / "calibration.png").exists()


def test_all_censored_and_constant_risk_are_refused(tmp_path):
    manifest, predictions = make_case(tmp_path)
    manifest.assign(event=0).to_csv(tmp_path / "censored.csv", index=False)
    with pytest.raises(ValueError, match="all 60 evaluated patients are censored"):
        evaluate_predictions(tmp_path / "out", tmp_path / "censored.csv", tmp_path / "eval", config=_config())
    predictions.assign(risk=0.25).to_csv(tmp_path / "out" / "predictions.csv", index=False)
    with pytest.raises(
        ValueError, match="C-index is undefined: the risk is constant .all 60 values equal 0.25"
    ):
        evaluate_predictions(tmp_path / "out", tmp_path / "manifest.csv", tmp_path / "eval", config=_config())


def test_missing_bertscore_model_fails_before_any_output(tmp_path):
    make_case(tmp_path)
    with pytest.raises(ValueError, match=r"BERTScore model path .*no-such-model does not exist"):
        evaluate_predictions(
            tmp_path / "out",
            tmp_path / "manifest.csv",
            tmp_path / "eval",
            tmp_path / "vqa.jsonl",
            _config(bertscore_model=str(tmp_path / "no-such-model")),
        )
    assert not (tmp_path / "eval").exists()


def test_bad_prediction_and_answer_files_name_the_line_and_field(tmp_path):
    make_case(tmp_path)

    def run():
        out, vqa = tmp_path / "out", tmp_path / "vqa.jsonl"
        return evaluate_predictions(out, tmp_path / "manifest.csv", tmp_path / "eval", vqa, _config())

    path = tmp_path / "out" / "predictions.csv"
    lines = path.read_text().splitlines()
    columns = lines[0].split(",")
    cells = lines[3].split(",")
    cells[columns.index("risk_pleura")] = "high"
    path.write_text("\n".join(lines[:3] + [",".join(cells)] + lines[4:]) + "\n")
    with pytest.raises(
        EvaluationError,
        match=r"predictions.csv line 4 \(scan_id scan002\), field risk_pleura: "
        r"expected a finite number, got 'high'",
    ):
        run()
    path.write_text("\n".join(lines) + "\n")
    answers = tmp_path / "out" / "answers.jsonl"
    rows = answers.read_text().splitlines()
    answers.write_text("\n".join(rows[:2] + ["{not json"] + rows[3:]) + "\n")
    with pytest.raises(EvaluationError, match=r"answers.jsonl line 3: not valid JSON"):
        run()
    path.unlink()
    with pytest.raises(EvaluationError, match=r"predictions.csv does not exist"):
        run()


def add_repeat_scans(folder, manifest, predictions, patients, copies, days_later=0.0, seed=1):
    """Append ``copies`` more scans of each of ``patients`` (after every other row): the same event, the
    follow-up ``days_later`` days shorter per scan, and the same risk (``days_later=0``) or a noisy one."""
    rng = np.random.default_rng(seed)
    scans, risks = [], []
    for k in range(1, copies + 1):
        for _, row in manifest[manifest.patient_id.isin(patients)].iterrows():
            scan_id = f"{row.scan_id}_r{k}"
            scans.append(
                row.to_dict()
                | {
                    "scan_id": scan_id,
                    "image": f"images/{scan_id}.nii.gz",
                    "time": max(row.time - k * days_later, 1.0),
                }
            )
            risk = predictions.set_index("scan_id").loc[row.scan_id]
            noise = 0.0 if days_later == 0 else rng.normal(scale=0.3, size=risk.size)
            risks.append({"scan_id": scan_id, **(risk + noise).to_dict()})
    repeated = pd.concat([manifest, pd.DataFrame(scans)], ignore_index=True)
    repeated.to_csv(folder / "manifest.csv", index=False)
    repeated_predictions = pd.concat([predictions, pd.DataFrame(risks)], ignore_index=True)
    repeated_predictions.to_csv(folder / "out" / "predictions.csv", index=False)
    return repeated


def _evaluate(folder, name, **kw):
    metrics = evaluate_predictions(
        folder / "out", folder / "manifest.csv", folder / name, config=_config(**kw)
    )
    saved = json.loads((folder / name / "metrics.json").read_text())
    assert saved["patient_level"] == metrics["patient_level"]
    return metrics


def test_identical_repeat_scans_change_no_patient_level_number(tmp_path):
    """Every test patient scanned three times (same time, event, risk) is still one patient."""
    manifest, predictions = make_case(tmp_path)
    single = _evaluate(tmp_path, "single", bootstrap=200)
    test_patients = manifest.patient_id[manifest.split == "test"]
    add_repeat_scans(tmp_path, manifest, predictions, test_patients, copies=2)
    repeated = _evaluate(tmp_path, "repeated", bootstrap=200)
    assert repeated["n"] == 3 * single["n"] == 180 and repeated["n_patients"] == single["n_patients"] == 60
    level = repeated["patient_level"]
    assert level["method"] == "cluster_bootstrap" and level["patients_with_several_scans"] == 60
    assert "over patients" in level["bootstrap"] and "one scan per patient" in level["kaplan_meier_logrank"]
    for key in ("c_index", "uno_c", "td_auc_mean", "logrank_p"):
        assert repeated[key] == pytest.approx(single[key]), key
    assert repeated["c_index_ci"] == pytest.approx(single["c_index_ci"])
    assert repeated["uno_c_ci"] == pytest.approx(single["uno_c_ci"])
    assert repeated["calibration"] == single["calibration"]
    test = manifest.merge(predictions, on="scan_id")[lambda f: f.split == "test"]
    index = np.repeat(np.arange(len(test)), 3)
    scans = M.bootstrap_ci(
        M.concordance_index,
        test.time.to_numpy()[index],
        test.event.to_numpy()[index],
        test.risk.to_numpy()[index],
        n=200,
        seed=0,
    )
    ci = repeated["c_index_ci"]
    assert scans.high - scans.low < 0.75 * (ci[1] - ci[0])  # what treating scans as patients would report


def test_later_scans_are_left_out_of_the_log_rank_and_first_scan_mode_keeps_one_per_patient(tmp_path):
    manifest, predictions = make_case(tmp_path, n=300, n_train=150)
    single = _evaluate(tmp_path, "single", bootstrap=50)
    test = manifest.merge(predictions, on="scan_id")[lambda f: f.split == "test"]
    several = test.patient_id.iloc[::2]
    add_repeat_scans(tmp_path, manifest, predictions, several, copies=3, days_later=30.0)
    cluster = _evaluate(tmp_path, "cluster", bootstrap=50)
    scans = tmp_path / "manifest.csv"
    scans = pd.read_csv(scans, dtype={"scan_id": str}).merge(
        pd.read_csv(tmp_path / "out" / "predictions.csv", dtype={"scan_id": str}), on="scan_id"
    )[lambda f: f.split == "test"]
    assert cluster["n"] == len(scans) == 150 + 3 * 75 and cluster["n_patients"] == 150
    assert cluster["c_index"] == pytest.approx(M.concordance_index(scans.time, scans.event, scans.risk))
    high = test.risk > test.risk.median()
    expected = logrank_test(test.time[high], test.time[~high], test.event[high], test.event[~high])
    assert cluster["logrank_p"] == pytest.approx(expected.p_value)
    assert "the scan with the longest follow-up" in cluster["patient_level"]["one_scan_rule"]
    first = _evaluate(tmp_path, "first", bootstrap=50, patient_level="first-scan")
    assert first["patient_level"]["method"] == "one_scan_per_patient" and first["n"] == 150
    for key in ("c_index", "c_index_ci", "uno_c_ci", "logrank_p", "calibration"):
        assert first[key] == pytest.approx(single[key]) if key != "calibration" else first[key] == single[key]
    by_column = _evaluate(
        tmp_path, "by_column", bootstrap=50, patient_level="first-scan", scan_order_column="time"
    )  # the shortest follow-up: the last scan
    last = scans.sort_values("time", kind="stable").drop_duplicates("patient_id")
    assert by_column["c_index"] == pytest.approx(M.concordance_index(last.time, last.event, last.risk))
    assert by_column["patient_level"]["one_scan_rule"].startswith("the scan with the smallest time")


def test_bad_patient_level_options_name_the_field(tmp_path):
    make_case(tmp_path)
    with pytest.raises(
        ConfigError, match=r"^patient_level: expected one of \['cluster', 'first-scan'\], got 'sc'"
    ):
        _config(patient_level="sc")
    with pytest.raises(
        EvaluationError,
        match=r"scan_order_column 'scan_date' is not a column of .*manifest.csv; found \[.*'split'",
    ):
        _evaluate(tmp_path, "eval", scan_order_column="scan_date")
    assert issubclass(EvaluationError, InputError) and issubclass(M.MetricError, InputError)


def test_calibration_uses_the_train_rows_breslow_baseline_by_default(tmp_path):
    manifest, predictions = make_case(tmp_path)
    metrics = _evaluate(tmp_path, "eval")
    assert metrics["calibration_baseline"] == "train" and metrics["calibration_in_sample"] is False
    rows = manifest.merge(predictions, on="scan_id")
    train, test = rows[rows.split == "train"], rows[rows.split == "test"]
    out_of_sample = M.breslow_risk_at(train.time, train.event, train.risk, test.risk, [365.0])[:, 0]
    in_sample = M.breslow_risk_at(test.time, test.event, test.risk, test.risk, [365.0])[:, 0]
    table = pd.DataFrame(metrics["calibration"]["365"])
    expected = M.calibration_table(test.time, test.event, out_of_sample, 365.0)
    np.testing.assert_allclose(table.predicted, expected.predicted)
    in_sample_table = M.calibration_table(test.time, test.event, in_sample, 365.0)
    assert not np.allclose(table.predicted, in_sample_table.predicted)


def test_in_sample_calibration_is_said_on_the_command_line_in_metrics_json_and_the_report(tmp_path, capsys):
    make_case(tmp_path, with_train_predictions=False)
    argv = [
        "evaluate",
        "--predictions",
        str(tmp_path / "out"),
        "--manifest",
        str(tmp_path / "manifest.csv"),
        "--out",
        str(tmp_path / "eval"),
        "--horizons",
        "365",
        "--bootstrap",
        "20",
    ]
    assert cli_main(argv) == 0
    printed = capsys.readouterr()
    assert "vlsurv evaluate: warning: calibration is IN-SAMPLE" in printed.err
    assert "--split all" in printed.err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["calibration_in_sample"] is True and metrics["calibration_baseline"] == "in-sample"
    assert "IN-SAMPLE" in (tmp_path / "eval" / "report.html").read_text()


def test_scan_order_column_of_dates_picks_the_earliest_scan_and_bad_dates_are_named(tmp_path):
    manifest, predictions = make_case(tmp_path)
    test_patients = manifest.patient_id[manifest.split == "test"]
    repeated = add_repeat_scans(tmp_path, manifest, predictions, test_patients, copies=1, days_later=30.0)
    later = repeated.scan_id.str.endswith("_r1")  # dated before the original scan: the earliest
    dates = pd.Timestamp("2020-06-01") + pd.to_timedelta(np.where(later, -10, 0), unit="D")
    repeated.assign(scan_date=dates.strftime("%Y-%m-%d")).to_csv(tmp_path / "manifest.csv", index=False)
    metrics = _evaluate(tmp_path, "dated", patient_level="first-scan", scan_order_column="scan_date")
    rows = repeated[later].merge(pd.read_csv(tmp_path / "out" / "predictions.csv", dtype={"scan_id": str}))
    assert metrics["n"] == 60 and metrics["c_index"] == pytest.approx(
        M.concordance_index(rows.time, rows.event, rows.risk)
    )
    dates = dates.strftime("%Y-%m-%d").to_numpy().copy()
    missing = repeated.scan_id[later].iloc[3]
    dates[np.flatnonzero(later)[3]] = "soon"
    repeated.assign(scan_date=dates).to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(
        EvaluationError,
        match=rf"scan_order_column 'scan_date': expected numbers or dates, got 'soon' \(scan_id {missing}\)",
    ):
        _evaluate(tmp_path, "bad", scan_order_column="scan_date")
    dates[np.flatnonzero(later)[3]] = ""
    repeated.assign(scan_date=dates).to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(
        EvaluationError, match=rf"manifest.csv: scan_order_column 'scan_date' is empty for scan_id {missing}"
    ):
        _evaluate(tmp_path, "empty", scan_order_column="scan_date")
