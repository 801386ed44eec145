"""`vlsurv tte-evaluate` end to end on the synthetic cohort's EHR: a tte_pretrain run on a written feature
cache, scored per task on a split (C-index, AUROC at horizons, calibration deciles), and each bad input as one
line naming what was expected."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from test_tte_training import _write_cache, small_run

from vlsurv.cli import main
from vlsurv.tte.events import load_events
from vlsurv.tte.labels import build_labels
from vlsurv.tte.training import train_tte


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(tmp folder, final folder) of a 6-step run over 60 synthetic patients' tokens in a feature cache."""
    tmp = tmp_path_factory.mktemp("tte_evaluate")
    _, tokens = small_run(tmp, "run")
    _write_cache(tmp / "cache", tokens)
    config, _ = small_run(
        tmp, "run", "optim.max_steps=6", "checkpoint.every_n_steps=0", f"data.cache={tmp / 'cache'}"
    )
    return tmp, train_tte(config)


def evaluate(capsys, *arguments: str) -> tuple[int, str, str]:
    status = main(["tte-evaluate", *arguments])
    captured = capsys.readouterr()
    return status, captured.out, captured.err.strip()


def test_it_scores_each_task_with_enough_events_and_their_calibration(run, tmp_path, capsys):
    tmp, final = run
    status, out, _ = evaluate(
        capsys, "--model", str(final), "--out", str(tmp_path), "--split", "all", "--min-events", "30"
    )
    assert status == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    per_task = pd.read_csv(tmp_path / "per_task.csv")
    info = json.loads((final / "tte.json").read_text())

    events, scans = load_events(
        tmp / "events.csv", tmp / "scans.csv"
    )  # the run's inputs, from its config.yaml
    counts = build_labels(events, scans, np.asarray(info["tasks"])).event.sum(axis=0)
    expected = {task: int(n) for task, n in zip(info["tasks"], counts) if n >= 30}
    assert dict(zip(per_task["task"], per_task["n_events"])) == expected
    assert metrics["scans"] == 60 and metrics["horizons"] == [365.0, 730.0, 1825.0]
    assert metrics["tasks"] == {"in_model": 16, "evaluated": len(expected), "skipped": 16 - len(expected)}
    assert list(per_task.columns) == [
        "task", "n_events", "c_index", "auroc_365", "auroc_730", "auroc_1825",
        "expected_events_730", "observed_events_730",
    ]  # fmt: skip
    assert metrics["mean"]["c_index"] == pytest.approx(per_task["c_index"].mean())
    assert metrics["mean"]["auroc_365"] == pytest.approx(per_task["auroc_365"].mean())
    assert 0.0 < metrics["mean"]["c_index"] < 1.0

    calibration = pd.read_csv(tmp_path / "calibration.csv")
    pooled = metrics["calibration"]
    assert pooled["horizon"] == 730.0 and pooled["tasks"] == len(expected) and pooled["skipped"] == {}
    assert len(pooled["deciles"]) == 10 and sum(d["n"] for d in pooled["deciles"]) == 60 * len(expected)
    assert pooled["expected_events"] == pytest.approx(calibration["expected_events"].sum())
    assert pooled["expected_events"] == pytest.approx(per_task["expected_events_730"].sum())
    assert (calibration["observed_events"] <= calibration["n"]).all()
    assert (
        f"{len(expected)} of 16 tasks with >= 30 events on the 60 scans of split 'all': mean c_index" in out
    )

    options = ["--min-events", "5", "--horizons", "200", "400", "--calibration-horizon", "300"]
    status, out, _ = evaluate(capsys, "--model", str(final), "--out", str(tmp_path / "test"), *options)
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert status == 0 and metrics["split"] == "test" and metrics["scans"] == 12
    assert metrics["calibration"]["horizon"] == 300.0 and set(metrics["mean"]) == {
        "c_index",
        "auroc_200",
        "auroc_400",
    }


def test_bad_input_gets_one_line_naming_what_was_expected(run, tmp_path, capsys):
    tmp, final = run
    out = ["--out", str(tmp_path / "out")]
    status, _, err = evaluate(capsys, "--model", str(tmp_path), *out)
    assert status == 2 and err == (
        f"vlsurv tte-evaluate: error: {tmp_path}: no tte.json; expected the `final` folder of a tte_pretrain "
        "run (vlsurv train with stage: tte_pretrain)"
    )
    status, _, err = evaluate(capsys, "--model", str(final), *out, "--split", "holdout")
    assert status == 2 and err == (
        f"vlsurv tte-evaluate: error: {tmp / 'scans.csv'}: no scan of split 'holdout' (--split); the table's "
        "splits are ['test', 'train', 'val']"
    )
    pd.read_csv(tmp / "scans.csv").drop(columns="split").to_csv(tmp_path / "scans.csv", index=False)
    status, _, err = evaluate(capsys, "--model", str(final), *out, "--scans", str(tmp_path / "scans.csv"))
    assert status == 2 and err == (
        f"vlsurv tte-evaluate: error: {tmp_path / 'scans.csv'}: no split column, so --split 'test' selects "
        "no scan; expected a split column or --split all"
    )
    status, _, err = evaluate(capsys, "--model", str(final), *out, "--min-events", "13")
    assert status == 2 and err.startswith(
        "vlsurv tte-evaluate: error: --min-events 13: no task of the model has that many events among the 12 "
        "scans of split 'test' (the most, "
    )
    assert err.endswith("expected a lower --min-events or a larger split")
    status, _, err = evaluate(capsys, "--model", str(final), *out, "--horizons", "365", "-30")
    assert status == 2 and err == (
        "vlsurv tte-evaluate: error: horizons in command line: expected one or more positive numbers of "
        "days, got [365.0, -30.0]"
    )
    moved = tmp_path / "moved"
    shutil.copytree(final, moved)
    status, _, err = evaluate(capsys, "--model", str(moved), *out)
    assert status == 2 and err == (
        f"vlsurv tte-evaluate: error: --events: not given, and {tmp_path / 'config.yaml'} (the run's config, "
        "which would name it) does not exist; expected --events or the `final` folder inside its "
        "tte_pretrain run folder"
    )
    assert not (tmp_path / "out").exists()
