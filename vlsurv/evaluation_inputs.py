"""The inputs of `vlsurv evaluate`, read and checked before any metric runs.

``load_inputs`` reads ``predictions.csv``, the optional ``answers.jsonl`` and ``survival_curves.csv``
beside it, the manifest and the VQA file; joins the predictions to the manifest (patient_id, time, event,
split); picks the evaluated rows (``EvaluationConfig.split``, else every non-train row) and one scan per
patient for the statistics that need independent subjects (see ``vlsurv.evaluate``). Errors are
``EvaluationError``s naming the file, row and field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from vlsurv import metrics as M
from vlsurv.data.manifest import load_manifest
from vlsurv.errors import InputError
from vlsurv.jsonl import read_jsonl

if TYPE_CHECKING:
    from vlsurv.evaluate import EvaluationConfig


class EvaluationError(InputError):
    """Evaluation inputs that do not fit together (the message names the file, row and field)."""


def read_predictions(path: Path) -> pd.DataFrame:
    """predictions.csv -> DataFrame(scan_id str, risk float, risk_<question_id> float...)."""
    if not path.is_file():
        raise EvaluationError(f"{path} does not exist (expected predictions.csv written by `vlsurv predict`)")
    frame = pd.read_csv(path, dtype={"scan_id": str})
    missing = [c for c in ("scan_id", "risk") if c not in frame.columns]
    if missing:
        raise EvaluationError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    if frame.empty:
        raise EvaluationError(f"{path} has no rows")
    for column in [c for c in frame.columns if c == "risk" or c.startswith("risk_")]:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=float))
        if bad.any():
            row = int(np.argmax(bad))
            raise EvaluationError(
                f"{path} line {row + 2} (scan_id {frame.scan_id[row]}), field {column}: "
                f"expected a finite number, got {frame[column][row]!r}"
            )
        frame[column] = values.astype(float)
    duplicated = frame.scan_id[frame.scan_id.duplicated()].unique().tolist()
    if duplicated:
        raise EvaluationError(f"{path}: scan_id repeated: {duplicated[:5]}")
    return frame


def read_answers(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """A JSON-lines answer file whose objects all carry the ``required`` fields; ids read as strings."""
    rows = read_jsonl(path, required, EvaluationError)
    frame = pd.DataFrame(rows, columns=None if rows else list(required))
    for field in ("scan_id", "question_id"):
        if field in frame:
            frame[field] = frame[field].astype(str)
    return frame


def read_survival_curves(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """survival_curves.csv -> (DataFrame indexed by scan_id with (N, K) S values, times (K,))."""
    frame = pd.read_csv(path, dtype={"scan_id": str})
    columns = [c for c in frame.columns if c != "scan_id"]
    if "scan_id" not in frame.columns or not columns or not all(c.startswith("S@") for c in columns):
        raise EvaluationError(f"{path}: expected columns scan_id, S@<time>...; found {list(frame.columns)}")
    try:
        times = np.array([float(c[2:]) for c in columns])
    except ValueError as err:
        raise EvaluationError(f"{path}: a column name is not S@<number>: {columns}") from err
    values = frame[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    if not np.all(np.isfinite(values) & (values >= 0) & (values <= 1)):
        row = int(np.argmax(~np.all(np.isfinite(values) & (values >= 0) & (values <= 1), axis=1)))
        raise EvaluationError(
            f"{path} line {row + 2} (scan_id {frame.scan_id[row]}): expected survival probabilities in [0, 1]"
        )
    order = np.argsort(times)
    return pd.DataFrame(values[:, order], index=frame.scan_id), times[order]


def _load_manifest(path: Path) -> pd.DataFrame:
    manifest = load_manifest(path, require_survival=True, check_files=False)
    manifest = manifest.assign(scan_id=manifest.scan_id.astype(str))
    return manifest


def _match(
    predictions: pd.DataFrame, manifest: pd.DataFrame, pred_path: Path, manifest_path: Path, order: str | None
):
    """Predictions joined to the manifest's patient_id, time, event, split, manifest_row (+ ``order``)."""
    unknown = sorted(set(predictions.scan_id) - set(manifest.scan_id))
    if unknown:
        raise EvaluationError(
            f"{len(unknown)} of {len(predictions)} scan ids in {pred_path} are not in the manifest "
            f"{manifest_path}, e.g. {', '.join(unknown[:5])}; predict and evaluate with the same manifest"
        )
    if order is not None and order not in manifest.columns:
        raise EvaluationError(
            f"scan_order_column {order!r} is not a column of {manifest_path}; found {list(manifest.columns)}"
        )
    columns = list(dict.fromkeys(c for c in ("scan_id", "patient_id", "time", "event", "split", order) if c))
    return predictions.merge(manifest[columns].assign(manifest_row=np.arange(len(manifest))), on="scan_id")


def _one_scan_per_patient(rows: pd.DataFrame, column: str | None, manifest: Path) -> tuple[np.ndarray, str]:
    """Row indices (ascending) of each patient's earliest scan, and the rule in words."""
    if column is None:
        key = -rows.time.to_numpy(float)
        rule = (
            "the scan with the longest follow-up (the time counts from the scan, so the earliest scan), "
            "ties to the first in manifest order"
        )
    else:
        values = rows[column]
        if not pd.api.types.is_numeric_dtype(values):
            dates = pd.to_datetime(values, errors="coerce", format="mixed")
            bad = (dates.isna() & values.notna()).to_numpy()
            if bad.any():
                raise EvaluationError(
                    f"{manifest}: scan_order_column {column!r}: expected numbers or dates, "
                    f"got {values[bad].iloc[0]!r} (scan_id {rows.scan_id[bad].iloc[0]})"
                )
            values = dates
        missing = values.isna().to_numpy()
        if missing.any():
            raise EvaluationError(
                f"{manifest}: scan_order_column {column!r} is empty for scan_id "
                f"{rows.scan_id[missing].iloc[0]}; expected a number or date on every evaluated scan"
            )
        key = values.to_numpy().astype(np.int64 if values.dtype.kind == "M" else float)
        rule = f"the scan with the smallest {column} (the earliest), ties to the first in manifest order"
    rank = np.empty(len(rows), dtype=int)
    rank[np.lexsort((rows.manifest_row.to_numpy(), key))] = np.arange(len(rows))
    return M.first_row_per_group(rows.patient_id.to_numpy(), rank), rule


@dataclass
class EvaluationInputs:
    """Everything read and checked before any metric runs."""

    rows: pd.DataFrame  # evaluated rows: scan_id, risk, risk_<question_id>..., patient_id, time, event, split
    first_scans: np.ndarray  # (P,) indices into rows of one scan per patient (KM, log-rank, calibration)
    patient_level: dict  # metrics.json's record of how repeat scans were handled
    train: pd.DataFrame  # manifest rows whose time/event give the censoring distribution
    train_rows: pd.DataFrame  # train-split predictions (for the Breslow baseline); may be empty
    answers: pd.DataFrame | None
    curves: tuple[pd.DataFrame, np.ndarray] | None
    vqa: pd.DataFrame | None
    notes: list[str]


def load_inputs(
    predictions: Path, manifest: Path, vqa: Path | None, cfg: EvaluationConfig
) -> EvaluationInputs:
    """Read predictions, answers, curves, manifest and VQA; pick the evaluated rows; check they fit."""
    pred_path = predictions / "predictions.csv" if predictions.is_dir() else predictions
    table = _load_manifest(manifest)
    merged = _match(read_predictions(pred_path), table, pred_path, manifest, cfg.scan_order_column)
    if cfg.split is not None:
        rows = merged[merged.split == cfg.split]
        if rows.empty:
            raise EvaluationError(f"no prediction in {pred_path} belongs to the manifest split {cfg.split!r}")
    else:
        rows = merged[merged.split != "train"] if (merged.split != "train").any() else merged
    rows = rows.reset_index(drop=True)
    first_scans, rule = _one_scan_per_patient(rows, cfg.scan_order_column, manifest)
    patient_level = _patient_level(cfg, rows, rule)
    if cfg.patient_level == "first-scan":
        rows, first_scans = rows.iloc[first_scans].reset_index(drop=True), np.arange(len(first_scans))
    if not rows.event.any():
        raise EvaluationError(
            f"all {len(rows)} evaluated patients are censored (event = 0 in {manifest}): "
            "no survival metric is defined"
        )
    notes: list[str] = []
    train = table[table.split == "train"]
    if train.empty:
        train = rows
        notes.append("the manifest has no train split: censoring estimated on the evaluated rows")
    answers_path, curves_path = pred_path.parent / "answers.jsonl", pred_path.parent / "survival_curves.csv"
    answer_fields = ("scan_id", "question_id", "answer")
    answers = read_answers(answers_path, answer_fields) if answers_path.is_file() else None
    curves = read_survival_curves(curves_path) if curves_path.is_file() else None
    absent = sorted(set(rows.scan_id) - set(curves[0].index)) if curves is not None else []
    if absent:
        raise EvaluationError(f"{curves_path} lacks {len(absent)} evaluated scan ids, e.g. {absent[:5]}")
    if vqa is not None and answers is None:
        raise EvaluationError(f"BERTScore against {vqa} needs {answers_path} (generated answers)")
    return EvaluationInputs(
        rows=rows,
        first_scans=first_scans,
        patient_level=patient_level,
        train=train,
        answers=answers,
        curves=curves,
        notes=notes,
        train_rows=merged[(merged.split == "train") & ~merged.scan_id.isin(set(rows.scan_id))],
        vqa=None if vqa is None else read_answers(vqa, answer_fields),
    )


def _patient_level(cfg: EvaluationConfig, rows: pd.DataFrame, rule: str) -> dict:
    """metrics.json's ``patient_level``: the method, the counts and which rows each statistic used."""
    scans_per_patient = rows.patient_id.value_counts()
    one_scan = f"one scan per patient ({rule})"
    cluster = cfg.patient_level == "cluster"
    return {
        "method": "cluster_bootstrap" if cluster else "one_scan_per_patient",
        "n_scans": len(rows),
        "n_patients": int(scans_per_patient.size),
        "patients_with_several_scans": int((scans_per_patient > 1).sum()),
        "one_scan_rule": rule,
        "point_estimates": "all scans (C-index, Uno's C, td-AUC, IBS)" if cluster else one_scan,
        "bootstrap": (
            "cluster bootstrap over patients: each resample draws patients with replacement and "
            "keeps all of their scans"
        )
        if cluster
        else f"over patients, {one_scan}",
        "kaplan_meier_logrank": one_scan + ": the log-rank test needs independent patients",
        "calibration": one_scan + ": Kaplan-Meier observed risk and its CI need independent patients",
    }
