"""`vlsurv tte-evaluate`: per-task C-index, AUROC at horizons and calibration of a tte_pretrain run.

    vlsurv tte-evaluate --model runs/tiny/tte/final --out runs/tiny/tte/eval [--split test]
        [--events E --scans S --cache C] [--horizons 365 730 1825] [--min-events 10] [--calibration-horizon H]

The events and scans tables are read and checked as the stage reads them (``vlsurv.tte.events.load_events``;
by default the ``data.events`` / ``data.scans`` / ``data.cache`` of the run's ``config.yaml`` beside
``final/``). The evaluated scans are the rows of the scans table whose ``split`` is ``--split`` (``all``:
every row), labelled with ``build_labels`` over the run's own tasks (``tte.json``). The head predicts
log-hazards (N, bins, K) from the cached tokens; ``vlsurv.tte.evaluation.task_metrics`` scores every task with
at least ``--min-events`` events, and ``task_calibration`` gives each of those tasks its expected against
observed events per decile of predicted risk at the calibration horizon.

Outputs in ``--out``: ``metrics.json`` (counts, the means over the evaluated tasks, and the calibration
deciles summed over the calibrated tasks), ``per_task.csv`` (task, n_events, c_index, auroc_<h>...,
expected_events and observed_events at the calibration horizon) and ``calibration.csv`` (one row per task and
decile).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vlsurv.config import add_config_arguments, bounded, check_fields, config_from_args, invalid, save_config
from vlsurv.encoders.cache import CacheError, FeatureCache
from vlsurv.encoders.provenance import (
    IMAGE_ENCODER_NAME,
    EncoderMismatchError,
    cache_provenance,
    read_provenance,
)
from vlsurv.metrics import MetricError
from vlsurv.tte.config import load_tte_config
from vlsurv.tte.evaluation import task_calibration, task_metrics
from vlsurv.tte.events import SCAN_COLUMNS, ScanTable, TTEInputError, load_events, read_table
from vlsurv.tte.labels import TTELabels, build_labels
from vlsurv.tte.transfer import bin_edges, load_tte_head, predict_log_hazard

METRICS_NAME, PER_TASK_NAME, CALIBRATION_NAME = "metrics.json", "per_task.csv", "calibration.csv"
ALL_SPLITS = "all"


@dataclass
class TTEEvaluateConfig:
    """Options of ``vlsurv tte-evaluate`` (saved as OUT/config.yaml)."""

    model: str = ""
    """The `final` folder of a tte_pretrain run (tte.json, head.safetensors)."""
    out: str = ""
    """Output folder: metrics.json, per_task.csv, calibration.csv."""
    events: str | None = None
    """Events table (patient_id, time, code); null = data.events of the run's config.yaml."""
    scans: str | None = None
    """Scans table (scan_id, patient_id, time, split); null = data.scans of the run's config.yaml."""
    cache: str | None = None
    """Feature cache of the evaluated scans; null = data.cache of the run's config.yaml."""
    split: str = "test"
    """Scans evaluated: the rows of the scans table's split column with this value (all = every row)."""
    horizons: list[float] = field(default_factory=lambda: [365.0, 730.0, 1825.0])
    """Horizons in days of the AUROCs; the C-index ranks the cumulative hazard at the last one."""
    min_events: int = bounded(10, ge=1)
    """Tasks with fewer events among the evaluated scans are skipped."""
    calibration_horizon: float | None = bounded(None, gt=0.0, what="days")
    """Horizon in days of the calibration deciles (null = the middle one of the horizons)."""
    batch_size: int = bounded(256, ge=1)
    """Scans per forward pass of the head."""

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.horizons or not all(math.isfinite(h) and h > 0 for h in self.horizons):
            raise invalid(
                "", "horizons", f"expected one or more positive numbers of days, got {self.horizons}"
            )

    @property
    def calibrated_at(self) -> float:
        """The calibration horizon in days."""
        ordered = sorted(self.horizons)
        return self.calibration_horizon or ordered[(len(ordered) - 1) // 2]


def run_inputs(cfg: TTEEvaluateConfig) -> dict[str, str]:
    """{"events", "scans", "cache"}: the options, or for those not given the run's ``config.yaml`` data."""
    given = {"events": cfg.events, "scans": cfg.scans, "cache": cfg.cache}
    if all(given.values()):
        return given
    run_config = Path(cfg.model).parent / "config.yaml"
    if not run_config.is_file():
        absent = next(name for name, value in given.items() if not value)
        raise TTEInputError(
            f"--{absent}: not given, and {run_config} (the run's config, which would name it) does not "
            f"exist; expected --{absent} or the `final` folder inside its tte_pretrain run folder"
        )
    data = load_tte_config(run_config).data
    return {name: value or getattr(data, name) for name, value in given.items()}


def split_rows(scans: pd.DataFrame, split: str, path: str) -> np.ndarray:
    """Row indices (S,) of the scans of ``split`` (every row for ``all``); TTEInputError for none."""
    if split == ALL_SPLITS:
        return np.arange(len(scans))
    if "split" not in scans.columns:
        raise TTEInputError(
            f"{path}: no split column, so --split {split!r} selects no scan; expected a split column or "
            f"--split {ALL_SPLITS}"
        )
    values = scans["split"].astype(str).to_numpy()
    rows = np.flatnonzero(values == split)
    if rows.size == 0:
        raise TTEInputError(
            f"{path}: no scan of split {split!r} (--split); the table's splits are {sorted(set(values))}"
        )
    return rows


def check_cache_encoder(model_dir: Path, cache: FeatureCache) -> None:
    """EncoderMismatchError when the run fine-tuned its encoder (``image_encoder.json``) and the cache records
    tokens of another one: its tokens are not what the head was trained on."""
    if not (model_dir / IMAGE_ENCODER_NAME).is_file():
        return
    record, _, _ = read_provenance(model_dir)
    cached = cache_provenance(cache)
    if cached is not None and cached["key"] != record["key"]:
        differing = next(f for f in record["key"] if record["key"][f] != cached["key"].get(f))
        raise EncoderMismatchError(
            f"--cache {cache.root}: its tokens come from {differing} {cached['key'][differing]!r} but the "
            f"model was trained with {record['key'][differing]!r} ({model_dir / IMAGE_ENCODER_NAME}); encode "
            "the scans with the run's encoder (`vlsurv encode --encoder-config final/encoder.yaml "
            "--checkpoint final/image_encoder.safetensors --preprocess-config final/preprocess.yaml`)"
        )


def evaluation_labels(cfg: TTEEvaluateConfig, inputs: dict[str, str], tasks: list[str]) -> TTELabels:
    """Labels (S, K) of the split's scans for the run's ``tasks``; TTEInputError when no task has
    ``min_events`` events."""
    scans = read_table(inputs["scans"], inputs["scans"], SCAN_COLUMNS)
    events, scan_table = load_events(inputs["events"], scans)
    rows = split_rows(scans, cfg.split, inputs["scans"])
    chosen = ScanTable(scan_table.scan_ids[rows], scan_table.patient[rows], scan_table.time[rows])
    labels = build_labels(events, chosen, np.asarray(tasks))
    counts = labels.event.sum(axis=0)
    if counts.max() < cfg.min_events:
        best = int(counts.argmax())
        raise TTEInputError(
            f"--min-events {cfg.min_events}: no task of the model has that many events among the {rows.size} "
            f"scans of split {cfg.split!r} (the most, {str(labels.tasks[best])!r}, has {int(counts[best])}); "
            "expected a lower --min-events or a larger split"
        )
    return labels


def calibration_of(
    labels: TTELabels, log_hazard: np.ndarray, edges: np.ndarray, tasks: list[str], horizon: float
) -> tuple[pd.DataFrame, dict[str, str]]:
    """(calibration rows of every task that has them, with a ``task`` column; {task: why not} of others)."""
    tables, skipped = [], {}
    for task in tasks:
        try:
            tables.append(task_calibration(labels, log_hazard, edges, task, horizon).assign(task=task))
        except MetricError as err:
            skipped[task] = str(err)
    columns = ["task", "bin", "n", "n_events", "predicted", "observed", "expected_events", "observed_events"]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=columns)
    return table[[*columns, *[c for c in table.columns if c not in columns]]], skipped


def _number(value) -> float | None:
    """A float for JSON, None for NaN."""
    return None if value is None or not np.isfinite(value) else float(value)


def evaluate_tte(cfg: TTEEvaluateConfig) -> dict:
    """Score the run ``cfg.model`` on ``cfg.split``, write the outputs into ``cfg.out``; returns metrics."""
    model_dir = Path(cfg.model)
    head, info = load_tte_head(model_dir)
    inputs = run_inputs(cfg)
    labels = evaluation_labels(cfg, inputs, info["tasks"])
    cache = FeatureCache(inputs["cache"])
    absent = [s for s in labels.scan_ids if s not in cache]
    if absent:
        raise CacheError(
            f"--cache {inputs['cache']}: {len(absent)} scans of split {cfg.split!r} are not cached (first: "
            f"{absent[:3]}); encode them with `vlsurv encode`"
        )
    check_cache_encoder(model_dir, cache)
    edges, horizon = bin_edges(info), cfg.calibrated_at
    log_hazard = predict_log_hazard(head, cache, labels.scan_ids, cfg.batch_size)
    per_task = task_metrics(labels, log_hazard, edges, cfg.horizons, cfg.min_events)
    calibration, skipped = calibration_of(labels, log_hazard, edges, per_task["task"].tolist(), horizon)
    sums = calibration.groupby("task")[["expected_events", "observed_events"]].sum()
    per_task = per_task.join(sums.add_suffix(f"_{horizon:g}"), on="task")
    deciles = calibration.groupby("bin")[["n", "n_events", "expected_events", "observed_events"]].sum()
    scores = [c for c in per_task.columns if c == "c_index" or c.startswith("auroc_")]
    metrics = {
        "model": str(model_dir),
        "split": cfg.split,
        "scans": int(labels.scan_ids.size),
        "horizons": sorted(cfg.horizons),
        "c_index_horizon": max(cfg.horizons),
        "min_events": cfg.min_events,
        "tasks": {"in_model": len(info["tasks"]), "evaluated": len(per_task)},
        "mean": {c: _number(per_task[c].mean()) for c in scores},
        "scored": {c: int(per_task[c].notna().sum()) for c in scores},
        "calibration": {
            "horizon": horizon,
            "tasks": int(calibration["task"].nunique()),
            "skipped": skipped,
            "expected_events": float(calibration["expected_events"].sum()),
            "observed_events": float(calibration["observed_events"].sum()),
            "deciles": [
                {
                    "bin": int(b),
                    "n": int(row["n"]),
                    "n_events": int(row["n_events"]),
                    "expected_events": float(row["expected_events"]),
                    "observed_events": float(row["observed_events"]),
                }
                for b, row in deciles.iterrows()
            ],
        },
    }
    metrics["tasks"]["skipped"] = metrics["tasks"]["in_model"] - metrics["tasks"]["evaluated"]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    per_task.to_csv(out / PER_TASK_NAME, index=False)
    calibration.to_csv(out / CALIBRATION_NAME, index=False)
    (out / METRICS_NAME).write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> int:
    """`vlsurv tte-evaluate`: per-task C-index, AUROC at horizons and calibration of a tte_pretrain run."""
    parser = argparse.ArgumentParser(prog="vlsurv tte-evaluate", description=main.__doc__)
    add_config_arguments(parser, TTEEvaluateConfig, required=("model", "out"))
    cfg = config_from_args(TTEEvaluateConfig, parser.parse_args(argv))
    metrics = evaluate_tte(cfg)
    tasks, mean = metrics["tasks"], metrics["mean"]
    shown = ", ".join(f"{k} {v:.3f}" for k, v in mean.items() if v is not None)
    print(
        f"{tasks['evaluated']} of {tasks['in_model']} tasks with >= {cfg.min_events} events on the "
        f"{metrics['scans']} scans of split {cfg.split!r}: mean {shown}"
    )
    calibration = metrics["calibration"]
    print(
        f"calibration at {calibration['horizon']:g} days over {calibration['tasks']} tasks: "
        f"{calibration['expected_events']:.1f} expected, {calibration['observed_events']:.1f} observed events"
    )
    print(f"-> {Path(cfg.out) / METRICS_NAME}")
    return 0
