"""The tte_pretrain stage: exact resume from a checkpoint, the `vlsurv train` route with a real feature cache,
transfer to stage 1 and to baseline features, and the per-task evaluation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, build_tiny_inputs, launch_on_two_cpu_processes, tiny_config
from lifelines.utils import concordance_index as lifelines_c_index
from safetensors.torch import load_file
from test_tte_pretrain import simulated_tokens

from vlsurv.data.synthetic import build_cohort_table, build_events_table
from vlsurv.encoders.cache import FeatureCache
from vlsurv.errors import ModelLoadError
from vlsurv.model.projector import standardizer_of
from vlsurv.training.setup import build_model
from vlsurv.tte.config import is_tte_config, load_tte_config
from vlsurv.tte.evaluation import cumulative_hazard, task_calibration, task_metrics
from vlsurv.tte.labels import TTELabels
from vlsurv.tte.training import train_tte
from vlsurv.tte.transfer import bin_edges, load_tte_head, predict_log_hazard, tte_pretrained_features


def small_run(tmp_path, out: str, *overrides: str):
    findings, table = build_cohort_table(60, 1)
    events, scans = build_events_table(findings, table, 1)
    events.to_csv(tmp_path / "events.csv", index=False)
    scans.to_csv(tmp_path / "scans.csv", index=False)
    config = load_tte_config(
        None,
        [
            f"data.events={tmp_path / 'events.csv'}",
            f"data.scans={tmp_path / 'scans.csv'}",
            "model.image_token_dim=64",
            "model.num_image_tokens=4",
            "model.projection_dim=8",
            "model.final_dim=8",
            "tasks.k=16",
            "tasks.num_bins=4",
            "optim.lr=1e-2",
            "optim.batch_size=16",
            "checkpoint.every_n_steps=2",
            "checkpoint.keep_last=3",
            "progress=false",
            f"output_dir={tmp_path / out}",
            *overrides,
        ],
    )
    return config, simulated_tokens(findings, table)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    config, tokens = small_run(tmp_path, "whole", "optim.max_steps=6")
    whole = train_tte(config, cache=tokens)
    config, _ = small_run(tmp_path, "parts", "optim.max_steps=4")
    train_tte(config, cache=tokens)
    checkpoint = tmp_path / "parts" / "checkpoints" / "step-000000004"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "trainer_state.json").is_file()
    config, _ = small_run(tmp_path, "parts", "optim.max_steps=6", "checkpoint.keep_best=false")
    resumed = train_tte(config, resume="latest", cache=tokens)
    expected, got = load_file(str(whole / "head.safetensors")), load_file(str(resumed / "head.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    steps = [line for line in (tmp_path / "parts" / "train_log.jsonl").read_text().splitlines()]
    assert len(steps) == 6  # 4 before the stop and 2 after the resume, none repeated


@pytest.mark.slow
def test_train_command_runs_tte_pretrain_and_stage1_starts_from_its_projector(tmp_path, tiny_decoder_dir):
    from vlsurv.train import main

    inputs = build_tiny_inputs(tmp_path / "inputs", n=12)
    cohort = inputs["manifest"].parent
    overrides = [
        f"data.events={cohort / 'events.csv'}",
        f"data.scans={cohort / 'scans.csv'}",
        f"data.cache={inputs['cache']}",
        f"output_dir={tmp_path / 'tte'}",
        "progress=false",
    ]
    config_path = ROOT / "configs/tiny/tte_pretrain.yaml"
    assert is_tte_config(config_path, overrides)
    assert main(["--config", str(config_path), *overrides]) == 0
    final = tmp_path / "tte" / "final"
    features = tte_pretrained_features(final, inputs["cache"])
    assert features.shape == (12, 64) and np.isfinite(features.to_numpy()).all()
    assert list(features.index) == FeatureCache(inputs["cache"]).scan_ids

    stage1 = tiny_config("stage1", inputs, tiny_decoder_dir, tmp_path / "s1", f"data.tte_projector={final}")
    model = build_model(stage1)
    head, _ = load_tte_head(final)
    for name, value in head.projector.state_dict().items():
        torch.testing.assert_close(model.multi_modal_projector.state_dict()[name], value)
    assert bool(
        standardizer_of(model.multi_modal_projector).fitted
    )  # stage 1 keeps the pretrained statistics
    bad = dataclasses.replace(stage1, data=dataclasses.replace(stage1.data, tte_projector=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="projector.safetensors: weight file does not exist"):
        build_model(bad)


def test_evaluation_of_a_known_hazard_model():
    """Exponential times with hazard exp(-6 + x): the true log-hazard gives the metrics that lifelines
    and a direct count give, and a calibrated decile table."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=2000)
    event_time = rng.exponential(np.exp(6.0 - x))
    censor = rng.uniform(0.0, 1500.0, size=2000)
    time = np.minimum(event_time, censor).astype(np.float32)[:, None]
    event = (event_time <= censor)[:, None]
    labels = TTELabels(np.arange(2000).astype(str), np.array(["T"]), time, event)
    edges = np.array([0.0, 100.0, 400.0, np.inf])
    log_hazard = np.repeat((-6.0 + x)[:, None, None], 3, axis=1)
    per_bin = np.log([1e-3, 2e-3, 5e-3]).reshape(1, 3, 1)  # 100 days x 1e-3 + 200 (300) x 2e-3 (+ 100 x 5e-3)
    np.testing.assert_allclose(cumulative_hazard(per_bin, edges, 300.0), [[0.5]])
    np.testing.assert_allclose(cumulative_hazard(per_bin, edges, 500.0), [[1.2]])
    table = task_metrics(labels, log_hazard, edges, horizons=[200.0, 500.0], min_events=10)
    assert list(table.columns) == ["task", "n_events", "c_index", "auroc_200", "auroc_500"]
    risk = -x  # lifelines: higher score = longer survival
    assert table["c_index"].iloc[0] == pytest.approx(
        lifelines_c_index(time[:, 0], risk, event[:, 0]), abs=1e-6
    )
    cases, controls = event[:, 0] & (time[:, 0] <= 200.0), time[:, 0] > 200.0
    wins = (x[cases][:, None] > x[controls][None, :]).mean()
    assert table["auroc_200"].iloc[0] == pytest.approx(wins, abs=1e-9)
    calibration = task_calibration(labels, log_hazard, edges, "T", horizon=300.0)
    assert len(calibration) == 10
    gap = (calibration["expected_events"] - calibration["observed_events"]).abs()
    assert (gap < 3.0 * np.sqrt(calibration["expected_events"]) + 2.0).all()  # binomial noise only
    assert task_metrics(labels, log_hazard, edges, [200.0], min_events=5000).empty


def test_predicted_hazards_come_from_the_saved_head(tmp_path):
    config, tokens = small_run(tmp_path, "run", "optim.max_steps=2", "checkpoint.every_n_steps=0")
    final = train_tte(config, cache=tokens)
    head, info = load_tte_head(final)
    ids = tokens.scan_ids[:5]
    log_hazard = predict_log_hazard(head, tokens, ids)
    assert log_hazard.shape == (5, len(info["bin_edges"]), len(info["tasks"]))
    assert bin_edges(info)[0] == 0.0 and bin_edges(info)[-1] == np.inf
    features = tte_pretrained_features(final, tokens, ids)
    assert isinstance(features, pd.DataFrame) and features.shape == (5, 8)


def test_vlsurv_train_reports_bad_tte_input_in_one_line(tmp_path, capsys):
    from vlsurv.cli import main

    config, _ = small_run(tmp_path, "run")
    scans = pd.read_csv(config.data.scans)
    scans.loc[2, "time"] = None
    scans.to_csv(config.data.scans, index=False)
    overrides = [f"data.events={config.data.events}", f"data.scans={config.data.scans}", "data.cache=unused"]
    assert main(["train", "--config", str(ROOT / "configs/tiny/tte_pretrain.yaml"), *overrides]) == 2
    assert capsys.readouterr().err.strip() == (
        f"vlsurv train: error: {config.data.scans}: row 2 (scan_id 'syn00002_ct'): `time` is missing; "
        "expected each scan's acquisition time"
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_launch_on_two_processes_trains_and_resumes(tmp_path):
    inputs = build_tiny_inputs(tmp_path / "inputs", n=12)
    cohort, run = inputs["manifest"].parent, tmp_path / "ddp"
    arguments = [
        "--config",
        str(ROOT / "configs/tiny/tte_pretrain.yaml"),
        f"data.events={cohort / 'events.csv'}",
        f"data.scans={cohort / 'scans.csv'}",
        f"data.cache={inputs['cache']}",
        f"output_dir={run}",
        "progress=false",
        "optim.batch_size=3",
        "checkpoint.every_n_steps=2",
    ]
    launch_on_two_cpu_processes(ROOT / "scripts/train.py", *arguments, "optim.epochs=3")
    first = len((run / "train_log.jsonl").read_text().splitlines())
    launch_on_two_cpu_processes(ROOT / "scripts/train.py", *arguments, "optim.epochs=5", "--resume", "latest")
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert (
        steps == list(range(1, len(steps) + 1)) and len(steps) == first * 5 // 3
    )  # continued, none repeated
    assert (run / "final" / "projector.safetensors").is_file()


def _write_cache(root, tokens) -> None:
    """``tokens`` (a cache stand-in) as a feature-cache folder in the layout of vlsurv.encoders.cache."""
    from safetensors.torch import save_file

    root.mkdir()
    key = {
        "encoder": "simulated",
        "token_mode": "mean_depth",
        "checkpoint_sha256": "random-init:0",
        "preprocess_hash": "simulated",
        "dtype": "float32",
    }
    values = {s: tokens.get(s).contiguous() for s in tokens.scan_ids}
    save_file(values, str(root / "shard-00000.safetensors"), metadata=key)
    scans = {
        s: {"shard": "shard-00000.safetensors", "shape": list(v.shape), **key} for s, v in values.items()
    }
    (root / "index.json").write_text(json.dumps({"version": 1, "scans": scans}))


def test_baselines_take_tte_pretrained_features_and_the_table_flags_them(tmp_path):
    from vlsurv.baselines.run import BaselinesConfig, run_baselines
    from vlsurv.baselines.table import main as table_main

    config, tokens = small_run(tmp_path, "run", "optim.max_steps=2", "checkpoint.every_n_steps=0")
    final = train_tte(config, cache=tokens)
    _write_cache(tmp_path / "cache", tokens)
    _, table = build_cohort_table(60, 1)
    table.to_csv(tmp_path / "manifest.csv", index=False)
    common = {
        "manifest": str(tmp_path / "manifest.csv"),
        "cache": str(tmp_path / "cache"),
        "methods": ["deepsurv"],
        "modalities": ["image"],
        "seeds": [0],
        "max_epochs": 3,
        "bootstrap": 20,
    }
    plain = run_baselines(BaselinesConfig(out=str(tmp_path / "plain"), **common))
    pretrained = run_baselines(BaselinesConfig(out=str(tmp_path / "tte"), tte_model=str(final), **common))
    assert (plain["rows"][0]["features"], plain["rows"][0]["pretrain"]) == (64, False)
    assert (pretrained["rows"][0]["features"], pretrained["rows"][0]["pretrain"]) == (8, True)
    runs = ["--runs", str(tmp_path / "plain"), str(tmp_path / "tte"), "--out", str(tmp_path / "table")]
    assert table_main(runs) == 0
    rows = pd.read_csv(tmp_path / "table" / "table.csv")
    assert len(rows) == 2 and set(rows["pretrain"]) == {True, False}
    assert "✓" in (tmp_path / "table" / "table.md").read_text()
    with pytest.raises(
        ModelLoadError, match=r"no tte\.json; expected the `final` folder of a tte_pretrain run"
    ):
        run_baselines(BaselinesConfig(out=str(tmp_path / "bad"), tte_model=str(tmp_path), **common))
