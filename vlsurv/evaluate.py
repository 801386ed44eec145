"""`vlsurv evaluate`: survival metrics with bootstrap CIs, calibration, KM plot, BERTScore, report.html.

Inputs: ``OUT/predictions.csv`` (scan_id, risk, risk_<question_id>...), ``OUT/answers.jsonl``
(scan_id, question_id, question, answer, risk; optional), ``OUT/survival_curves.csv`` (scan_id,
``S@<time>``...; DeepHit, optional), the manifest (time, event, split per scan) and optionally the
VQA file (scan_id, question_id, question, answer) with the report-derived reference answers.

Rows evaluated: the prediction rows outside the manifest's train split (all of them when every
row is a train row), or those of ``--split``. The manifest's train split supplies the censoring
distribution of Uno's C and td-AUC, and, when the predictions include train rows (``vlsurv predict
--split all``), the Breslow baseline that turns a DeepSurv log-risk into 1 - S(h | x) for
calibration. Without train rows the baseline is fitted in-sample on the evaluated rows, and the
command says so on stderr, in metrics.json (``calibration_in_sample``) and in report.html. With
survival curves the calibration uses the curves instead. A horizon outside the follow-up is an
error, or is skipped and recorded with ``--skip-invalid-horizons``. Uno's C is truncated at the
longest valid horizon (at the last training time when no horizon is valid). For DeepHit, write
survival_curves.csv: a Breslow baseline on -E[T] would not be a calibrated model.

Patients with several scans (``patient_id`` repeats), ``--patient-level``:

- ``cluster`` (default): every scan is a prediction, so the point C-index, Uno's C, td-AUC and IBS
  use all scans; their CIs come from a cluster bootstrap over patients (a resample draws patients
  and keeps all of their scans). Kaplan-Meier, the log-rank test and the calibration table (KM
  observed risk with Greenwood CIs) need independent subjects, so they use one scan per patient.
- ``first-scan``: every metric on one scan per patient.

One scan per patient is the earliest: the smallest ``--scan-order-column`` (e.g. a scan date), or by
default the longest follow-up (the time counts from the scan, as INSPECT's ``tte_mortality``), ties
to the first in manifest order. metrics.json's ``patient_level`` records the method and the rule.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from vlsurv import metrics as M
from vlsurv import metrics_clinical, metrics_text
from vlsurv.config import add_config_arguments, bounded, check_fields, config_from_args, save_config
from vlsurv.evaluation_inputs import EvaluationError, EvaluationInputs, load_inputs
from vlsurv.prompts import strip_status
from vlsurv.report import example_scans, plot_calibration, plot_kaplan_meier, write_report


@dataclass
class EvaluationConfig:
    """Options of ``vlsurv evaluate`` (saved as EVAL/config.yaml)."""

    horizons: tuple[float, ...] = (365.0, 1095.0, 1825.0)
    """Time-dependent AUC / calibration horizons, in the manifest's time unit."""
    bootstrap: int = 1000
    """Bootstrap resamples for the CIs."""
    bertscore_model: str | None = None
    """Local HF model folder for BERTScore; null = the packaged MiniLM."""
    bertscore_layers: int | None = None
    """BERTScore layer; null = the model's last."""
    bertscore_samples: int = 500
    """(answer, reference) pairs sampled for BERTScore."""
    seed: int = 0
    """Seed of the bootstrap and the BERTScore sample."""
    split: str | None = None
    """Evaluate only the prediction rows of this manifest split; null = every row outside the train split."""
    skip_invalid_horizons: bool = False
    """Skip (and record) horizons outside the follow-up instead of failing."""
    n_examples: int = 6
    """Example scans shown in report.html."""
    patient_level: Literal["cluster", "first-scan"] = "cluster"
    """Repeat scans of a patient: 'cluster' (all scans, bootstrap over patients; KM, log-rank and
    calibration on one scan per patient) or 'first-scan' (one scan per patient everywhere)."""
    scan_order_column: str | None = None
    """Manifest column (number or date) whose smallest value is a patient's first scan; null = the longest
    follow-up."""
    questions: str = "lung"
    """Question set (name or YAML path) whose rules read the answers back for the clinical accuracy."""
    ground_truth: str | None = None
    """CSV of scan_id and one 0/1 column per question id (the synthetic cohort's findings.csv) that the
    clinical accuracy is also scored against; null = against the report-derived answers only."""
    size_tolerance_mm: float = bounded(5.0, ge=0.0)
    """Clinical accuracy: a size in a true-positive answer is right within this many mm of the report's."""

    def __post_init__(self) -> None:
        check_fields(self)


def _valid_horizons(cfg: EvaluationConfig, rows: pd.DataFrame, train: pd.DataFrame, notes: list[str]):
    valid, skipped = [], {}
    for horizon in cfg.horizons:
        try:
            M.check_horizon(horizon, rows.time, rows.event, train.time)
            valid.append(float(horizon))
        except M.MetricError as err:
            if not cfg.skip_invalid_horizons:
                raise EvaluationError(
                    f"{err}; pass --horizons inside the follow-up, or --skip-invalid-horizons to skip it"
                ) from err
            skipped[f"{horizon:g}"] = str(err)
            notes.append(f"horizon {horizon:g} skipped: {err}")
    return valid, skipped


def in_sample_warning(n_rows: int) -> str:
    """The plain statement that calibration used an in-sample Breslow baseline, and how to avoid it."""
    return (
        f"calibration is IN-SAMPLE: no train-split predictions, so the Breslow baseline was fitted on "
        f"the {n_rows} evaluated rows it is judged on; run `vlsurv predict --split all` to have it "
        "fitted on the train rows"
    )


def _calibration_horizons(horizons: list[float], curves, notes: list[str]) -> list[float]:
    """The horizons a calibration can be read at: all of them for a Breslow baseline; for survival curves
    (DeepHit: S is known up to the last cut only) those up to the last curve time, the others noted."""
    if curves is None:
        return horizons
    last = float(curves[1][-1])
    for horizon in (h for h in horizons if h > last):
        notes.append(
            f"calibration at horizon {horizon:g} skipped: beyond the last survival-curve time {last:g} "
            "(S is not estimated past the last DeepHit cut)"
        )
    return [h for h in horizons if h <= last]


def _risk_at_horizons(rows, train_rows, curves, horizons, notes) -> tuple[np.ndarray, dict]:
    """(N, H) probabilities 1 - S(h | x) and metrics.json's calibration_source / _baseline / _in_sample."""
    if curves is not None:
        frame, times = curves
        probability = M.curve_risk_at(frame.loc[rows.scan_id].to_numpy(), times, horizons)
        return probability, {
            "calibration_source": "survival curves",
            "calibration_baseline": "survival curves",
            "calibration_in_sample": False,
        }
    in_sample = train_rows.empty
    if in_sample:
        train_rows = rows
        source = f"Breslow baseline fitted in-sample on the {len(rows)} evaluated rows"
        notes.append(in_sample_warning(len(rows)))
    else:
        source = f"Breslow baseline fitted on {len(train_rows)} train-split predictions"
    probability = M.breslow_risk_at(train_rows.time, train_rows.event, train_rows.risk, rows.risk, horizons)
    return probability, {
        "calibration_source": source,
        "calibration_in_sample": in_sample,
        "calibration_baseline": "in-sample" if in_sample else "train",
    }


def _bertscore(cfg: EvaluationConfig, inputs: EvaluationInputs) -> dict:
    """Mean BERTScore of a seeded sample of (generated answer, report-derived answer) pairs (the generated
    answer without a status_first opening, vlsurv.prompts.strip_status)."""
    answers, vqa = inputs.answers, inputs.vqa
    pairs = answers[answers.scan_id.isin(set(inputs.rows.scan_id))].merge(
        vqa[["scan_id", "question_id", "answer"]], on=["scan_id", "question_id"], suffixes=("", "_reference")
    )
    if pairs.empty:
        raise EvaluationError("no (scan_id, question_id) of the evaluated answers is in the VQA file")
    picked = np.random.default_rng(cfg.seed).choice(len(pairs), min(cfg.bertscore_samples, len(pairs)), False)
    sample = pairs.iloc[np.sort(picked)]
    # a status_first model's "Present: " / "Absent: " opening is not in the reference text
    candidates = [strip_status(text) for text in sample.answer.astype(str)]
    references = sample.answer_reference.astype(str).tolist()
    score = metrics_text.bertscore(candidates, references, cfg.bertscore_model, cfg.bertscore_layers)
    return {
        "bertscore_f1": float(score.f1.mean()),
        "bertscore_precision": float(score.precision.mean()),
        "bertscore_recall": float(score.recall.mean()),
        "bertscore_pairs": len(sample),
        "bertscore_model": score.model,
        "bertscore_layer": score.num_layers,
    }


def _clinical_accuracy(cfg: EvaluationConfig, inputs: EvaluationInputs) -> dict | None:
    """vlsurv.metrics_clinical on the evaluated rows' answers, against the VQA file and the ground truth."""
    from vlsurv.prompts import load_questions

    questions = load_questions(cfg.questions)
    answers = inputs.answers[inputs.answers.scan_id.isin(set(inputs.rows.scan_id))]
    if answers.empty:
        inputs.notes.append("clinical accuracy skipped: no generated answer of an evaluated scan")
        return None
    truth = None
    if cfg.ground_truth is not None:
        truth = metrics_clinical.read_ground_truth(cfg.ground_truth, [q.id for q in questions])
    return metrics_clinical.clinical_accuracy(
        answers,
        inputs.vqa,
        questions,
        ground_truth=truth,
        patient_ids=dict(zip(inputs.rows.scan_id, inputs.rows.patient_id)),
        bootstrap=cfg.bootstrap,
        seed=cfg.seed,
        size_tolerance_mm=cfg.size_tolerance_mm,
    )


def _concordance(cfg: EvaluationConfig, inputs: EvaluationInputs, tau: float) -> dict:
    """Harrell's and Uno's C with percentile bootstrap CIs over patients (same seeded resamples)."""
    rows, train = inputs.rows, inputs.train
    time, event, risk = rows.time.to_numpy(float), rows.event.to_numpy(int), rows.risk.to_numpy(float)
    train_time, train_event = train.time.to_numpy(float), train.event.to_numpy(int)

    def uno(t, e, r):
        return M.uno_c(train_time, train_event, t, e, r, tau)

    options = {"n": cfg.bootstrap, "seed": cfg.seed, "groups": rows.patient_id.to_numpy()}
    harrell = M.bootstrap_ci(M.concordance_index, time, event, risk, **options)
    uno_ci = M.bootstrap_ci(uno, time, event, risk, **options)
    return {
        "c_index": harrell.estimate,
        "c_index_ci": harrell.as_list(),
        "uno_c": uno_ci.estimate,
        "uno_c_ci": uno_ci.as_list(),
        "uno_c_tau": tau,
        "bootstrap": {
            "resamples": cfg.bootstrap,
            "skipped_c_index": harrell.n_skipped,
            "skipped_uno_c": uno_ci.n_skipped,
            "seed": cfg.seed,
            "unit": "patient",
            "patients": harrell.n_groups,
        },
    }


def evaluate_predictions(
    predictions: str | Path,
    manifest: str | Path,
    out: str | Path,
    vqa: str | Path | None = None,
    config: EvaluationConfig | None = None,
) -> dict:
    """Compute every metric; write EVAL/metrics.json, km.png, calibration.png, report.html; return metrics."""
    cfg = config or EvaluationConfig()
    if cfg.bertscore_model is not None:
        metrics_text.resolve_bertscore_model(cfg.bertscore_model)
    inputs = load_inputs(Path(predictions), Path(manifest), None if vqa is None else Path(vqa), cfg)
    rows, train, notes = inputs.rows, inputs.train, inputs.notes
    time, event, risk = rows.time.to_numpy(float), rows.event.to_numpy(int), rows.risk.to_numpy(float)
    horizons, skipped = _valid_horizons(cfg, rows, train, notes)
    first = inputs.first_scans
    results: dict = {
        "n": len(rows),
        "n_events": int(event.sum()),
        "n_patients": len(first),
        "splits": rows.split.value_counts().to_dict(),
        "patient_level": inputs.patient_level,
        "inputs": {
            "predictions": str(Path(predictions).resolve()),
            "manifest": str(Path(manifest).resolve()),
        },
    }
    results.update(_concordance(cfg, inputs, max(horizons) if horizons else float(train.time.max())))
    results.update(
        horizons=horizons,
        skipped_horizons=skipped,
        td_auc={},
        td_auc_mean=None,
        per_question_c_index=_per_question_c_index(rows, notes),
    )
    if inputs.curves is not None:
        results.update(_integrated_brier(inputs.curves, rows, train, notes))
    split = M.logrank_split(time[first], event[first], risk[first], groups=rows.patient_id.to_numpy()[first])
    results["logrank_p"] = split.p_value
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    km_png = plot_kaplan_meier(time[first], event[first], split.high_risk, split.p_value, out / "km.png")
    images = {"Kaplan-Meier: high vs low risk (median split)": km_png}
    if horizons:
        auc, mean_auc = M.time_dependent_auc(train.time, train.event, time, event, risk, horizons)
        results["td_auc_mean"] = mean_auc
        results["td_auc"] = {f"{h:g}": v for h, v in auc.items()}
        calibrated = _calibration_horizons(horizons, inputs.curves, notes)
        results["calibration_skipped_horizons"] = [f"{h:g}" for h in horizons if h not in calibrated]
        if calibrated:
            probability, source = _risk_at_horizons(rows, inputs.train_rows, inputs.curves, calibrated, notes)
            tables = {
                h: M.calibration_table(time[first], event[first], probability[first, i], h)
                for i, h in enumerate(calibrated)
            }
            results["calibration"] = {f"{h:g}": t.to_dict("records") for h, t in tables.items()}
            results.update(source)
            images["Calibration: predicted vs observed risk"] = plot_calibration(
                tables, out / "calibration.png"
            )
    results.update(bertscore_f1=None, bertscore_precision=None, bertscore_recall=None)
    if inputs.vqa is not None:
        results.update(_bertscore(cfg, inputs))
    results["clinical_accuracy"] = None if inputs.answers is None else _clinical_accuracy(cfg, inputs)
    results["question_risk_gaps"] = None
    if cfg.ground_truth is not None and any(c.startswith("risk_") for c in rows.columns):
        truth = metrics_clinical.read_ground_truth(
            cfg.ground_truth, [c[len("risk_") :] for c in rows.columns]
        )
        results["question_risk_gaps"] = metrics_clinical.question_risk_gaps(rows, truth)
    results["notes"] = notes
    save_config(cfg, out / "config.yaml")
    (out / "metrics.json").write_text(json.dumps(results, indent=2, default=_plain))
    examples = example_scans(rows, inputs.answers, inputs.vqa, cfg.n_examples)
    write_report(out / "report.html", results, images, examples, notes)
    return results


def _plain(value):
    """JSON fallback for numpy scalars."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to metrics.json")


def _per_question_c_index(rows: pd.DataFrame, notes: list[str]) -> dict:
    """Harrell's C of each question's own risk; None (with a note) where it is undefined."""
    values = {}
    for column in [c for c in rows.columns if c.startswith("risk_")]:
        try:
            values[column[len("risk_") :]] = M.concordance_index(rows.time, rows.event, rows[column])
        except M.MetricError as err:
            values[column[len("risk_") :]] = None
            notes.append(f"{column}: {err}")
    return values


def _integrated_brier(curves, rows: pd.DataFrame, train: pd.DataFrame, notes: list[str]) -> dict:
    """IBS over the curve times inside the follow-up (IPCW from the train split), or None with a note."""
    frame, times = curves
    start, end = rows.time.min(), min(rows.time.max(), train.time.max())
    inside = (times >= start) & (times < end)
    if inside.sum() < 2:
        notes.append(f"integrated Brier score skipped: fewer than 2 curve times in [{start:g}, {end:g})")
        return {"integrated_brier_score": None}
    survival = frame.loc[rows.scan_id].to_numpy()[:, inside]
    score = M.integrated_brier_score(train.time, train.event, rows.time, rows.event, survival, times[inside])
    return {"integrated_brier_score": score, "integrated_brier_range": [times[inside][0], times[inside][-1]]}


def main(argv: list[str] | None = None) -> int:
    """`vlsurv evaluate`: metrics, plots and report.html for the output of `vlsurv predict`."""
    parser = argparse.ArgumentParser(prog="vlsurv evaluate", description=main.__doc__)
    parser.add_argument("--predictions", required=True, help="folder (or predictions.csv) written by predict")
    parser.add_argument("--manifest", required=True, help="cohort manifest with time, event, split")
    parser.add_argument("--vqa", help="VQA JSONL with report-derived reference answers (enables BERTScore)")
    parser.add_argument("--out", required=True, help="output folder")
    add_config_arguments(parser, EvaluationConfig, flags={"n_examples": "--examples"})
    args = parser.parse_args(argv)
    cfg = config_from_args(EvaluationConfig, args)
    results = evaluate_predictions(args.predictions, args.manifest, args.out, args.vqa, cfg)
    low, high = results["c_index_ci"]
    print(
        f"n={results['n']} scans of {results['n_patients']} patients, events={results['n_events']} "
        f"C-index {results['c_index']:.3f} [{low:.3f}, {high:.3f}] Uno's C {results['uno_c']:.3f} "
        f"log-rank p {results['logrank_p']:.3g} ({results['patient_level']['method']}) "
        f"-> {Path(args.out) / 'report.html'}"
    )
    if results.get("calibration_in_sample"):
        print(f"vlsurv evaluate: warning: {in_sample_warning(results['n'])}", file=sys.stderr)
    return 0
