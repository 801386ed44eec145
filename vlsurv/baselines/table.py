"""`vlsurv table`: the paper's Table 2 from baseline runs and VLM evaluations, on one split.

A run folder is either a ``vlsurv baselines`` output (``baselines.json``) or a ``vlsurv evaluate`` output
(``metrics.json`` with its ``inputs``; the method and pre-train flag are read from the model folder named in
the predictions' ``predict_config.yaml``: its survival head, and the ``data.stage1_dir`` of the training
``config.yaml`` beside it). Every run must be scored on the same scans of the same manifest split, else
``TableError``.

Rows: CoxPH, then DeepSurv / DeepHit on text, image and both, then the VLM runs. Columns: pre-train,
report, clinical, CT-image, C-index (95% CI of the first seed or run), mean and sd over seeds (runs of the
same row are pooled), BERTScore (N/A for the baselines). Below it: a paired bootstrap test over patients
of the C-index difference between each VLM row and the best baseline (the highest first-seed C-index, so
the comparison is against the strongest baseline on this split).

Outputs: ``OUT/table.md``, ``OUT/table.csv`` and ``OUT/paired_tests.csv``.
"""

from __future__ import annotations

import argparse
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from vlsurv import metrics as M
from vlsurv.baselines.features import BaselineError, split_fingerprint
from vlsurv.baselines.run import RESULTS
from vlsurv.config import add_config_arguments, bounded, check_fields, config_from_args

COLUMNS = (
    "Method",
    "Pre-train",
    "Report",
    "Clinical",
    "CT-image",
    "C-index (95% CI)",
    "Mean ± sd (seeds)",
    "BERTScore",
)
INPUT_ORDER = {"clinical": 0, "text": 1, "image": 2, "both": 3, "vlm": 4}


class TableError(BaselineError):
    """Runs that cannot share one table (missing files, or different splits)."""


@dataclass
class TableConfig:
    """Options of ``vlsurv table``."""

    runs: list[str] = field(default_factory=list)
    """Folders of `vlsurv baselines` and `vlsurv evaluate` runs."""
    out: str = ""
    """Output folder of table.md, table.csv and paired_tests.csv."""
    bootstrap: int = bounded(1000, ge=1)
    """Bootstrap resamples of the paired test (patients)."""
    seed: int = 0
    """Seed of the paired bootstrap."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class Run:
    """One scored model: its table flags, C-index values and the per-scan test risks of its first seed."""

    folder: Path
    method: str
    input: str
    pretrain: bool | None
    report: bool
    clinical: bool
    ct_image: bool
    c_index: float
    c_index_ci: list[float]
    c_index_values: list[float]
    bertscore: float | None
    scores: pd.DataFrame  # scan_id, patient_id, time, event, risk
    fingerprint: str
    manifest: str

    @property
    def label(self) -> tuple:
        return (self.method, self.input, self.pretrain)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TableError(f"{path}: not valid JSON ({err})") from err


def _baseline_runs(folder: Path) -> list[Run]:
    summary = _json(folder / RESULTS)
    runs = []
    for row in summary["rows"]:
        path = folder / "predictions" / f"{row['key']}.csv"
        if not path.is_file():
            raise TableError(f"{path} does not exist (written by `vlsurv baselines` beside {RESULTS})")
        scores = pd.read_csv(path, dtype={"scan_id": str, "patient_id": str})
        runs.append(
            Run(
                folder,
                row["method"],
                row["input"],
                row.get("pretrain", False),
                False,
                row["clinical"],
                row["ct_image"],
                row["c_index"],
                row["c_index_ci"],
                row["c_index_seeds"],
                None,
                scores[["scan_id", "patient_id", "time", "event", "risk"]],
                summary["split_fingerprint"],
                summary["manifest"],
            )
        )
    return runs


def vlm_flags(predictions: Path) -> tuple[str, bool | None, bool]:
    """(method name, pre-trained with stage 1 or None when unknown, clinical sentence in the prompt)."""
    predict_config = (predictions if predictions.is_dir() else predictions.parent) / "predict_config.yaml"
    if not predict_config.is_file():
        return "Ours", None, True
    model = Path(yaml.safe_load(predict_config.read_text())["model"])
    config = _json(model / "config.json") if (model / "config.json").is_file() else {}
    head = (config.get("survival") or {}).get("head", "")
    method = f"Ours ({ {'deepsurv': 'DeepSurv', 'deephit': 'DeepHit'}.get(head, head) })" if head else "Ours"
    training = model.parent / "config.yaml"
    pretrain = None
    if training.is_file():
        pretrain = bool((yaml.safe_load(training.read_text()).get("data") or {}).get("stage1_dir"))
    return method, pretrain, config.get("clinical_template", "lung") is not None


def _vlm_run(folder: Path) -> Run:
    from vlsurv.config import load_config
    from vlsurv.data.manifest import load_manifest
    from vlsurv.evaluate import EvaluationConfig
    from vlsurv.evaluation_inputs import load_inputs

    metrics = _json(folder / "metrics.json")
    if "inputs" not in metrics:
        raise TableError(
            f"{folder / 'metrics.json'}: no 'inputs' (predictions and manifest paths); rerun "
            "`vlsurv evaluate` with this version to record them"
        )
    predictions, manifest = Path(metrics["inputs"]["predictions"]), Path(metrics["inputs"]["manifest"])
    cfg = load_config(EvaluationConfig, folder / "config.yaml")
    rows = load_inputs(predictions, manifest, None, cfg).rows
    method, pretrain, clinical = vlm_flags(predictions)
    scores = rows[["scan_id", "patient_id", "time", "event", "risk"]].astype({"patient_id": str})
    return Run(
        folder,
        method,
        "vlm",
        pretrain,
        True,
        clinical,
        True,
        metrics["c_index"],
        metrics["c_index_ci"],
        [metrics["c_index"]],
        metrics.get("bertscore_f1"),
        scores,
        split_fingerprint(load_manifest(manifest, check_files=False)),
        str(manifest),
    )


def read_runs(folders: list[str | Path]) -> list[Run]:
    """Every scored model of the run folders; TableError unless they share the split and scored scans."""
    runs: list[Run] = []
    for folder in map(Path, folders):
        if (folder / RESULTS).is_file():
            runs += _baseline_runs(folder)
        elif (folder / "metrics.json").is_file():
            runs.append(_vlm_run(folder))
        else:
            raise TableError(
                f"run folder {folder}: expected {RESULTS} (`vlsurv baselines`) or metrics.json "
                "(`vlsurv evaluate`)"
            )
    if not runs:
        raise TableError("no run given; expected --runs with baseline and evaluate folders")
    first = runs[0]
    for run in runs[1:]:
        same_scans = set(run.scores.scan_id) == set(first.scores.scan_id)
        if run.fingerprint != first.fingerprint or not same_scans:
            raise TableError(
                f"runs have different splits: {run.folder} ({len(run.scores)} scans scored, manifest "
                f"{run.manifest}, split fingerprint {run.fingerprint}) and {first.folder} "
                f"({len(first.scores)} scans scored, manifest {first.manifest}, split fingerprint "
                f"{first.fingerprint}); expected every run on the same manifest split and scans"
            )
    return runs


def _flag(value: bool | None) -> str:
    return "?" if value is None else ("✓" if value else "✗")


def build_table(runs: list[Run]) -> pd.DataFrame:
    """One row per (method, input, pre-train): the first run's C-index and CI, mean and sd over all values."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    records = []
    for (method, source, pretrain), members in groups.items():
        first = members[0]
        values = [v for member in members for v in member.c_index_values]
        records.append(
            {
                "method": method,
                "input": source,
                "pretrain": pretrain,
                "report": first.report,
                "clinical": first.clinical,
                "ct_image": first.ct_image,
                "c_index": first.c_index,
                "c_index_low": first.c_index_ci[0],
                "c_index_high": first.c_index_ci[1],
                "c_index_mean": float(np.mean(values)),
                "c_index_sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                "n_seeds": len(values),
                "bertscore": first.bertscore,
            }
        )
    frame = pd.DataFrame(records)
    order = frame["input"].map(INPUT_ORDER).fillna(len(INPUT_ORDER))
    frame = frame.assign(_order=order).sort_values(["_order", "pretrain", "method"], kind="stable")
    return frame.drop(columns="_order").reset_index(drop=True)


def paired_difference(
    time, event, risk, baseline_risk, groups, n: int, seed: int
) -> tuple[M.BootstrapCI, float]:
    """Bootstrap over patients (``groups``) of C(risk) - C(baseline_risk) on the same rows: its percentile CI
    and the two-sided p-value 2 min(P*(d <= 0), P*(d >= 0)) of the resampled differences d."""
    draws: list[float] = []

    def difference(*arrays) -> float:
        t, e, a, b = arrays
        value = M.concordance_index(t, e, a) - M.concordance_index(t, e, b)
        draws.append(value)
        return value

    ci = M.bootstrap_ci(difference, time, event, risk, baseline_risk, n=n, seed=seed, groups=groups)
    resampled = np.asarray(draws[1:])  # the first call is the point estimate
    return ci, float(min(1.0, 2.0 * min(np.mean(resampled <= 0), np.mean(resampled >= 0))))


def paired_tests(runs: list[Run], n: int, seed: int) -> pd.DataFrame:
    """C(VLM) - C(best baseline) on the same patients: estimate, 95% CI and two-sided bootstrap p-value."""
    baselines = [r for r in runs if r.input != "vlm"]
    models = [r for r in runs if r.input == "vlm"]
    if not baselines or not models:
        return pd.DataFrame()
    best = max(baselines, key=lambda r: r.c_index)
    records = []
    for model in models:
        joined = model.scores.merge(
            best.scores[["scan_id", "risk"]], on="scan_id", suffixes=("", "_baseline")
        )
        ci, p_value = paired_difference(
            joined.time.to_numpy(float),
            joined.event.to_numpy(int),
            joined.risk.to_numpy(float),
            joined.risk_baseline.to_numpy(float),
            joined.patient_id.to_numpy(),
            n,
            seed,
        )
        records.append(
            {
                "model": f"{model.method} ({model.folder})",
                "baseline": f"{best.method} {best.input}",
                "difference": ci.estimate,
                "low": ci.low,
                "high": ci.high,
                "p_value": p_value,
                "patients": ci.n_groups,
            }
        )
    return pd.DataFrame(records)


def _cells(row: pd.Series) -> list[str]:
    method = row["method"] + ("" if row["input"] in ("vlm", "clinical") else f" ({row['input']})")
    sd = "—" if row["c_index_sd"] is None or pd.isna(row["c_index_sd"]) else f"{row['c_index_sd']:.4f}"
    bert = "N/A" if row["bertscore"] is None or pd.isna(row["bertscore"]) else f"{row['bertscore']:.4f}"
    return [
        method,
        _flag(row["pretrain"]),
        _flag(row["report"]),
        _flag(row["clinical"]),
        _flag(row["ct_image"]),
        f"{row['c_index']:.4f} ({row['c_index_low']:.4f}–{row['c_index_high']:.4f})",
        f"{row['c_index_mean']:.4f} ± {sd} (n={row['n_seeds']})",
        bert,
    ]


def _test_lines(tests: pd.DataFrame) -> list[str]:
    return [
        f"{t.model} vs best baseline {t.baseline}: ΔC = {t.difference:+.4f} (95% CI {t.low:+.4f} to "
        f"{t.high:+.4f}), paired bootstrap p = {t.p_value:.3g}, {t.patients} patients"
        for t in tests.itertuples()
    ]


def to_markdown(table: pd.DataFrame, tests: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for _, row in table.iterrows()]
    return "\n".join(lines + [""] + [f"- {line}" for line in _test_lines(tests)]) + "\n"


def to_html(table: pd.DataFrame, tests: pd.DataFrame) -> str:
    """The table as an HTML fragment (every cell escaped), with the paired tests as a list."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(row)) + "</tr>"
        for _, row in table.iterrows()
    )
    items = "".join(f"<li>{html.escape(line)}</li>" for line in _test_lines(tests))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table><ul>{items}</ul>"


def write_table(cfg: TableConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the runs, write OUT/table.md, table.csv and paired_tests.csv; return (table, paired tests)."""
    runs = read_runs(cfg.runs)
    table, tests = build_table(runs), paired_tests(runs, cfg.bootstrap, cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(to_markdown(table, tests), encoding="utf-8")
    table.to_csv(out / "table.csv", index=False)
    tests.to_csv(out / "paired_tests.csv", index=False)
    return table, tests


def main(argv: list[str] | None = None) -> int:
    """`vlsurv table`: Table 2 (baselines beside the VLM) from run folders -> OUT/table.md and table.csv."""
    parser = argparse.ArgumentParser(prog="vlsurv table", description=main.__doc__)
    add_config_arguments(parser, TableConfig, required=("runs", "out"))
    cfg = config_from_args(TableConfig, parser.parse_args(argv))
    table, tests = write_table(cfg)
    print(to_markdown(table, tests), end="")
    print(f"-> {Path(cfg.out) / 'table.md'}, {Path(cfg.out) / 'table.csv'}")
    return 0
