"""The tte_pretrain learning-rate schedule: warmup then constant / linear / cosine, per optimizer step, saved
and restored with the checkpoints; a warmup as long as the run is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_tte_training import small_run

from vlsurv.config import ConfigError
from vlsurv.errors import InputError
from vlsurv.training.schedule import lr_factor
from vlsurv.tte.training import train_tte


def logged(run_dir, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_factor_follows_the_transformers_schedules(schedule):
    from transformers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = {
        "constant": lambda: get_constant_schedule_with_warmup(optimizer, 3),
        "linear": lambda: get_linear_schedule_with_warmup(optimizer, 3, 10),
        "cosine": lambda: get_cosine_schedule_with_warmup(optimizer, 3, 10),
    }[schedule]()
    expected = []
    for _ in range(12):
        expected.append(reference.get_last_lr()[0])
        optimizer.step()
        reference.step()
    got = [lr_factor(step, 3, 10, schedule) for step in range(12)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert got[0] == 0.0 and got[3] == pytest.approx(1.0)


def test_the_default_schedule_keeps_the_learning_rate_constant(tmp_path):
    config, tokens = small_run(tmp_path, "run", "optim.max_steps=3", "checkpoint.every_n_steps=0")
    assert (config.optim.schedule, config.optim.warmup_steps) == ("constant", 0)
    train_tte(config, cache=tokens)
    assert logged(tmp_path / "run", "lr") == [1e-2] * 3


def test_a_resumed_run_follows_the_learning_rates_of_an_uninterrupted_one(tmp_path):
    schedule = [
        "optim.max_steps=6",
        "optim.warmup_steps=2",
        "optim.schedule=cosine",
        "checkpoint.keep_best=false",
    ]
    config, tokens = small_run(tmp_path, "whole", *schedule)
    whole = train_tte(config, cache=tokens)
    expected = logged(tmp_path / "whole", "lr")
    assert expected[:3] == pytest.approx([0.0, 5e-3, 1e-2]) and expected[-1] < expected[2]

    # the same run stopped after step 4: its last checkpoint and log, then a resume from that checkpoint
    parts = tmp_path / "parts"
    shutil.copytree(tmp_path / "whole", parts)
    shutil.rmtree(parts / "final")
    shutil.rmtree(parts / "checkpoints" / "step-000000006")
    lines = (parts / "train_log.jsonl").read_text().splitlines()[:4]
    (parts / "train_log.jsonl").write_text("".join(line + "\n" for line in lines))
    config, _ = small_run(tmp_path, "parts", *schedule)
    resumed = train_tte(config, resume="latest", cache=tokens)
    assert logged(parts, "step") == [1, 2, 3, 4, 5, 6]
    assert logged(parts, "lr") == pytest.approx(expected, rel=1e-12)
    want, got = load_file(str(whole / "head.safetensors")), load_file(str(resumed / "head.safetensors"))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_a_warmup_as_long_as_the_run_is_refused(tmp_path):
    config, tokens = small_run(tmp_path, "run", "optim.max_steps=4", "optim.warmup_steps=4")
    with pytest.raises(ConfigError) as raised:
        train_tte(config, cache=tokens)
    assert isinstance(raised.value, InputError)
    assert str(raised.value) == (
        "optim.warmup_steps = 4 is not below the run's 4 planned optimizer steps (optim.max_steps = 4): the "
        "learning rate would never leave warmup; expected optim.warmup_steps < 4"
    )
    config, _ = small_run(tmp_path, "run", "optim.epochs=2", "optim.warmup_steps=50")
    with pytest.raises(
        ConfigError, match=r"not below the run's 6 planned optimizer steps \(optim.epochs = 2 x 3 "
    ):
        train_tte(config, cache=tokens)
