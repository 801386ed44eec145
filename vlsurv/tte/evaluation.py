"""Evaluation of a TTE head: per-task C-index and AUROC at horizons, and calibration at a horizon.

With bin edges :math:`e_0 = 0 < \\dots < e_B = \\infty` and hazards :math:`\\lambda_k = \\exp(\\eta_k)`, the
cumulative hazard is :math:`\\Lambda(h) = \\sum_k \\lambda_k \\min(\\max(h - e_k, 0), e_{k+1} - e_k)` and the
predicted risk of an event by h is :math:`1 - \\exp(-\\Lambda(h))`. Per task (over the tasks with at least
``min_events`` events, so that the metrics mean something): Harrell's C of :math:`\\Lambda` at the C-index
horizon (vlsurv.metrics.concordance_index); AUROC at each horizon h of that risk over the cases (event by h)
against the controls (followed beyond h), censored-before-h scans left out (scikit-learn
``roc_auc_score``). Calibration: ``vlsurv.metrics.calibration_table`` (deciles of predicted risk, Kaplan-Meier
observed risk) plus the expected and observed event counts per decile.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from vlsurv.metrics import MetricError, calibration_table, concordance_index
from vlsurv.tte.labels import TTELabels


def cumulative_hazard(log_hazard: np.ndarray, edges: np.ndarray, horizon: float) -> np.ndarray:
    """(N, bins, K) log-hazards per day and bin edges (bins + 1,) -> (N, K) cumulative hazard at
    ``horizon``."""
    start, width = edges[:-1], np.diff(edges)
    exposure = np.minimum(np.maximum(horizon - start, 0.0), width)  # (bins,)
    return np.einsum("nbk,b->nk", np.exp(log_hazard.astype(np.float64)), exposure)


def _auroc(time: np.ndarray, event: np.ndarray, risk: np.ndarray, horizon: float) -> float | None:
    from sklearn.metrics import roc_auc_score

    cases = event & (time <= horizon)
    controls = time > horizon
    known = cases | controls
    if not cases.any() or not controls.any():
        return None
    return float(roc_auc_score(cases[known], risk[known]))


def task_metrics(
    labels: TTELabels,
    log_hazard: np.ndarray,
    edges: np.ndarray,
    horizons: Sequence[float],
    min_events: int = 10,
) -> pd.DataFrame:
    """One row per task with at least ``min_events`` events: task, n_events, c_index (risk = cumulative
    hazard at the last horizon) and auroc_<h> per horizon (NaN where a horizon has no case or no control)."""
    horizons = sorted(float(h) for h in horizons)
    rows = []
    for j in np.flatnonzero(labels.event.sum(axis=0) >= min_events):
        time, event = labels.time[:, j].astype(np.float64), labels.event[:, j]
        hazards = {h: cumulative_hazard(log_hazard[:, :, j : j + 1], edges, h)[:, 0] for h in horizons}
        try:
            c_index = concordance_index(time, event, hazards[horizons[-1]])
        except MetricError:
            c_index = np.nan
        row = {"task": str(labels.tasks[j]), "n_events": int(event.sum()), "c_index": c_index}
        for h in horizons:
            auroc = _auroc(time, event, hazards[h], h)
            row[f"auroc_{h:g}"] = np.nan if auroc is None else auroc
        rows.append(row)
    return pd.DataFrame(rows, columns=["task", "n_events", "c_index", *[f"auroc_{h:g}" for h in horizons]])


def task_calibration(
    labels: TTELabels, log_hazard: np.ndarray, edges: np.ndarray, task: str, horizon: float, n_bins: int = 10
) -> pd.DataFrame:
    """Predicted against observed risk by ``horizon`` for one ``task`` in deciles of predicted risk:
    ``calibration_table``'s columns plus expected_events (sum of predicted risks) and observed_events
    (Kaplan-Meier observed risk x n)."""
    matches = np.flatnonzero(labels.tasks == task)
    if matches.size == 0:
        raise MetricError(f"task {task!r} is not one of the {len(labels.tasks)} tasks of these labels")
    j = int(matches[0])
    risk = 1.0 - np.exp(-cumulative_hazard(log_hazard[:, :, j : j + 1], edges, horizon)[:, 0])
    table = calibration_table(labels.time[:, j], labels.event[:, j], risk, horizon, n_bins, min_per_bin=5)
    table["expected_events"] = table["predicted"] * table["n"]
    table["observed_events"] = table["observed"] * table["n"]
    return table
