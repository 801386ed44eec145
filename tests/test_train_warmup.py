"""Warmup that ends: a ``warmup_steps`` not below the planned optimizer steps stops the run naming the keys,
``warmup_ratio`` scales with the run, the shipped configs finish warmup and decay at INSPECT's and CT-RATE's
sizes, and the schedule the scheduler plans is the one the loop runs (the cosine reaches 0 at the loop's last
step)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_tiny_inputs

from vlsurv.config import ConfigError
from vlsurv.training.config import load_train_config
from vlsurv.training.loop import Trainer
from vlsurv.training.sampling import BatchPlan
from vlsurv.training.setup import total_steps, warmup_steps

ROOT = Path(__file__).resolve().parents[1]


def plan_for(config, units: int) -> BatchPlan:
    """One process's plan over ``units`` patients (patient_balanced) or VQA pairs (pairs), one pair per
    patient."""
    return BatchPlan([f"p{i}" for i in range(units)], config.optim.batch_size, config.sampling, 0, 1)


def stage2(*overrides: str):
    return load_train_config(ROOT / "configs/stage2_deepsurv.yaml", list(overrides))


def test_warmup_steps_not_below_the_planned_steps_stop_with_the_keys_named():
    config = stage2("optim.warmup_steps=500", "optim.warmup_ratio=null")  # the old stage-2 setting
    plan = plan_for(config, 9000)
    steps = total_steps(config, plan)
    assert (plan.batches_per_epoch(), steps) == (750, 281)
    with pytest.raises(ConfigError) as caught:
        warmup_steps(config, steps, plan.batches_per_epoch())
    assert str(caught.value) == (
        "optim.warmup_steps = 500 is not below the run's 281 planned optimizer steps (optim.epochs = 3 x 750 "
        "batches per epoch / optim.grad_accum = 8): the learning rate would never leave warmup; lower "
        "optim.warmup_steps or set optim.warmup_steps=null optim.warmup_ratio=<fraction in [0, 1)>"
    )
    capped = stage2("optim.warmup_steps=40", "optim.warmup_ratio=null", "optim.max_steps=40")
    with pytest.raises(
        ConfigError,
        match=r"optim.warmup_steps = 40 is not below the run's 40 planned optimizer "
        r"steps \(optim.max_steps = 40\)",
    ):
        warmup_steps(capped, total_steps(capped, plan), 750)
    assert warmup_steps(stage2("optim.warmup_steps=280", "optim.warmup_ratio=null"), steps, 750) == 280


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["optim.warmup_ratio=0.1", "optim.warmup_steps=500"],
            "optim.warmup_steps = 500, optim.warmup_ratio = 0.1: expected exactly one of them set "
            "and the other null",
        ),
        (
            ["optim.warmup_ratio=null", "optim.warmup_steps=null"],
            "optim.warmup_steps = None, optim.warmup_ratio = None: expected exactly one of them set "
            "and the other null",
        ),
        (
            ["optim.warmup_ratio=1.0"],
            "optim.warmup_ratio in {config}: expected a fraction in [0, 1) or null, got 1.0",
        ),
        (
            ["optim.warmup_ratio=null", "optim.warmup_steps=-1"],
            "optim.warmup_steps in {config}: expected a value >= 0 or null, got -1",
        ),
    ],
)
def test_exactly_one_valid_warmup_setting(overrides, message):
    with pytest.raises(ConfigError) as caught:
        stage2(*overrides)
    assert message.format(config=ROOT / "configs/stage2_deepsurv.yaml") in str(caught.value)


@pytest.mark.parametrize(
    ("name", "units", "expected"),
    [
        ("stage2_deepsurv", 9000, (281, 28)),  # the 9k-patient cohort: 3 epochs of 750 batches / 8
        ("stage2_deephit", 9000, (281, 28)),
        ("stage2_deepsurv", 17000, (531, 53)),  # all of INSPECT's ~17k patients
        ("stage1", 50000 * 6, (9375, 468)),  # CT-RATE's ~50k volumes x 6 questions, every pair once per epoch
    ],
)
def test_shipped_configs_finish_warmup_and_decay_at_cohort_sizes(name, units, expected):
    config = load_train_config(ROOT / f"configs/{name}.yaml")
    plan = plan_for(config, units)
    steps = total_steps(config, plan)
    warmup = warmup_steps(config, steps, plan.batches_per_epoch())
    assert (steps, warmup) == expected
    assert 0 < warmup <= 0.1 * steps


@pytest.mark.slow
def test_the_loop_runs_the_steps_the_scheduler_planned(tiny_decoder_dir, tmp_path, capsys):
    inputs = build_tiny_inputs(tmp_path / "inputs")
    config = load_train_config(
        ROOT / "configs/tiny/stage1.yaml",
        [
            f"data.manifest={inputs['manifest']}",
            f"data.vqa={inputs['vqa']}",
            f"data.cache={inputs['cache']}",
            f"model.decoder_path={tiny_decoder_dir}",
            f"output_dir={tmp_path / 'run'}",
            "tracker=none",
            "progress=false",
            "optim.batch_size=16",
            "optim.grad_accum=2",
            "optim.epochs=3",
            "optim.warmup_steps=null",
            "optim.warmup_ratio=0.3",
            "eval.sample_answers=0",
            "checkpoint.every_n_steps=0",
        ],
    )
    trainer = Trainer(config)
    steps, warmup = trainer.total_steps, trainer.warmup_steps
    assert steps == 3 * trainer.plan.batches_per_epoch() // 2 and warmup == int(0.3 * steps) >= 2
    assert (
        f"planned optimizer steps: {steps} ({trainer.plan.batches_per_epoch()} batches per epoch, "
        f"optim.grad_accum 2); warmup steps: {warmup}; schedule: cosine"
    ) in capsys.readouterr().out
    trainer.fit()
    log = [json.loads(line) for line in (trainer.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, steps + 1))
    rates = [entry["lr/projector"] for entry in log]  # the rate after each step's scheduler.step()
    peak = config.optim.lr_projector
    assert rates[: warmup - 1] == pytest.approx([peak * k / warmup for k in range(1, warmup)])
    assert rates[warmup - 1] == pytest.approx(peak) and all(
        a > b for a, b in zip(rates[warmup - 1 :], rates[warmup:])
    )
    assert rates[-1] == pytest.approx(0.0, abs=1e-12) and rates[-2] > 0
