"""The horizon AUROC table: every model's score, per horizon, on the same scans with the same labels.

At horizon h the positives are the scans with a death within h and the negatives those followed past h; scans
censored before h are excluded (``labels``). AUROC(h) = P(score of a positive > score of a negative) (ties
count 1/2), sklearn's ``roc_auc_score``. The CI is the percentile bootstrap over patients of
``vlsurv.metrics.bootstrap_ci`` (resamples with one class only are skipped and counted). A horizon without
positives or negatives among the evaluated scans gets no AUROC and a note saying why, never 0.5.

Other models come in as ``RiskSource``s: a CSV with ``scan_id`` and a risk column (higher = earlier death),
such as ``vlsurv predict``'s predictions.csv (``risk``, or one question's ``risk_<id>``); one risk serves
every horizon. The fine-tuned network brings one probability per horizon.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vlsurv import metrics as M
from vlsurv.horizon.labels import HorizonError, HorizonLabels, horizon_name

COLUMNS = [
    "model",
    "horizon",
    "n",
    "positives",
    "negatives",
    "excluded",
    "auroc",
    "ci_low",
    "ci_high",
    "note",
]


@dataclass(frozen=True)
class RiskSource:
    """Column ``column`` of CSV ``path`` (with ``scan_id``), shown as ``name``."""

    name: str
    path: Path
    column: str = "risk"


def parse_compare(spec: str) -> RiskSource:
    """``NAME=PATH`` or ``NAME:COLUMN=PATH`` -> RiskSource."""
    label, separator, path = spec.partition("=")
    name, _, column = label.partition(":")
    if not separator or not name.strip() or not path.strip():
        raise HorizonError(
            f"--compare {spec!r}: expected NAME=PATH or NAME:COLUMN=PATH (e.g. vlm=run/predictions.csv)"
        )
    return RiskSource(name.strip(), Path(path.strip()), column.strip() or "risk")


def read_risks(source: RiskSource, scan_ids: list[str]) -> np.ndarray:
    """(N,) risks of ``scan_ids`` from ``source``; raises ``HorizonError`` naming the file when the column, a
    scan or a finite value is missing."""
    path = source.path / "predictions.csv" if source.path.is_dir() else source.path
    if not path.is_file():
        raise HorizonError(
            f"--compare {source.name}: {path} not found; expected a CSV with scan_id and a risk"
        )
    frame = pd.read_csv(path, dtype={"scan_id": str})
    for column in ("scan_id", source.column):
        if column not in frame.columns:
            raise HorizonError(
                f"{path}: no column {column!r} (columns: {list(frame.columns)}); "
                "expected scan_id and the risk column"
            )
    if frame.scan_id.duplicated().any():
        raise HorizonError(f"{path}: scan_id {frame.scan_id[frame.scan_id.duplicated()].iloc[0]!r} repeats")
    risk = frame.set_index("scan_id")[source.column]
    missing = [s for s in scan_ids if s not in risk.index]
    if missing:
        raise HorizonError(
            f"{path}: {len(missing)} of the {len(scan_ids)} evaluated scans have no {source.column!r} "
            f"(first: {missing[:3]}); expected a risk for every scan of the evaluated split"
        )
    values = pd.to_numeric(risk.loc[scan_ids], errors="coerce").to_numpy(float)
    bad = ~np.isfinite(values)
    if bad.any():
        raise HorizonError(
            f"{path}: column {source.column!r} of scan {scan_ids[int(np.argmax(bad))]!r}: "
            "expected a finite number"
        )
    return values


def auroc(label, score) -> float:
    """Area under the ROC curve of ``score`` (N,) for binary ``label`` (N,); MetricError with one class."""
    from sklearn.metrics import roc_auc_score

    label = np.asarray(label)
    if label.min() == label.max():
        raise M.MetricError(
            f"AUROC needs positives and negatives; all {label.size} labels are {int(label[0])}"
        )
    return float(roc_auc_score(label, score))


def _row(name, horizon, count, estimate=None, ci=None, note="") -> dict:
    low, high = (None, None) if ci is None else ci
    row = dict(zip(COLUMNS, [name, horizon_name(horizon), count["positives"] + count["negatives"]]))
    return {**row, **count, "auroc": estimate, "ci_low": low, "ci_high": high, "note": note}


def model_rows(
    name: str, scores: np.ndarray, labels: HorizonLabels, groups, bootstrap: int, seed: int
) -> list[dict]:
    """One table row per horizon for ``scores`` (N, H) (or (N,), the same score at every horizon)."""
    scores = np.asarray(scores, dtype=float)
    scores = np.repeat(scores[:, None], len(labels.horizons), 1) if scores.ndim == 1 else scores
    groups = np.asarray(groups)
    rows = []
    for j, (horizon, count) in enumerate(zip(labels.horizons, labels.counts().values())):
        known = labels.known[:, j]
        if count["positives"] == 0 or count["negatives"] == 0:
            missing = "deaths within" if count["positives"] == 0 else "scans followed past"
            note = (
                f"AUROC undefined: no {missing} {horizon_name(horizon)} among the "
                f"{int(known.sum())} labelled scans ({count['excluded']} excluded as censored earlier)"
            )
            rows.append(_row(name, horizon, count, note=note))
            continue
        label, score = labels.label[known, j], scores[known, j]
        estimate, ci, note = auroc(label, score), None, ""
        try:
            result = M.bootstrap_ci(auroc, label, score, n=bootstrap, seed=seed, groups=groups[known])
            ci = (result.low, result.high)
            if result.n_skipped:
                note = f"{result.n_skipped} of {bootstrap} resamples had one class and were skipped"
        except M.MetricError as err:
            note = f"no CI: {err}"
        rows.append(_row(name, horizon, count, estimate, ci, note))
    return rows


def format_table(rows: list[dict]) -> str:
    """The table as aligned text: model, horizon, counts, AUROC [CI] or the note."""
    lines = [f"{'model':<24} {'horizon':>8} {'n':>5} {'pos':>5} {'neg':>5} {'excl':>5}  AUROC [95% CI]"]
    for r in rows:
        if r["auroc"] is None:
            value = r["note"]
        elif r["ci_low"] is None:
            value = f"{r['auroc']:.3f} ({r['note']})"
        else:
            value = f"{r['auroc']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        lines.append(
            f"{r['model']:<24} {r['horizon']:>8} {r['n']:>5} {r['positives']:>5} {r['negatives']:>5} "
            f"{r['excluded']:>5}  {value}"
        )
    return "\n".join(lines)
