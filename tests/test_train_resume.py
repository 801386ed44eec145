"""A tiny run killed with SIGKILL after a checkpoint and resumed with ``--resume latest`` ends with the
weights of an uninterrupted run (CPU, float tolerance); checkpoints are atomic, pruned to the last k plus the
best."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_inputs
from safetensors.torch import load_file

from vlsurv.training.checkpoints import STATE_NAME, CheckpointError, CheckpointManager, read_state
from vlsurv.training.config import load_train_config
from vlsurv.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/tiny/stage1.yaml"
STEPS = 14
WEIGHTS = ("projector.safetensors", "adapter/adapter_model.safetensors", "survival_branch.safetensors")


def _overrides(inputs: dict, decoder: Path, out: Path) -> list[str]:
    return [
        f"data.manifest={inputs['manifest']}",
        f"data.vqa={inputs['vqa']}",
        f"data.cache={inputs['cache']}",
        f"model.decoder_path={decoder}",
        f"output_dir={out}",
        "tracker=none",
        # dropout draws from the RNG, an accumulation spans batches, and evaluation runs every 5 steps (with
        # generation): all of it must line up after the restart.
        "model.lora.dropout=0.1",
        "optim.grad_accum=2",
        "optim.batch_size=4",
        f"optim.max_steps={STEPS}",
        "checkpoint.every_n_steps=3",
        "checkpoint.keep_last=2",
        "checkpoint.keep_best=true",
        "eval.every_n_steps=5",
        "eval.sample_answers=1",
    ]


def _command(inputs: dict, decoder: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vlsurv",
        "train",
        "--config",
        str(CONFIG),
        *_overrides(inputs, decoder, out),
    ]


def _weights(final: Path) -> dict[str, torch.Tensor]:
    return {f"{name}:{key}": value for name in WEIGHTS for key, value in load_file(str(final / name)).items()}


@pytest.mark.resume
@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_decoder_dir, tmp_path):
    inputs = build_tiny_inputs(tmp_path / "inputs")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = tmp_path / "straight"
    train(load_train_config(CONFIG, _overrides(inputs, tiny_decoder_dir, straight)))

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _command(inputs, tiny_decoder_dir, killed),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    for line in process.stdout:
        if line.startswith("saved checkpoint"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "final").exists(), "the run finished before it was killed"
    manager = CheckpointManager(killed / "checkpoints", keep_last=2, keep_best=True, higher_is_better=False)
    assert manager.completed() and manager.completed()[-1][0] < STEPS

    resumed = subprocess.run(
        _command(inputs, tiny_decoder_dir, killed) + ["--resume", "latest"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    expected, actual = _weights(straight / "final"), _weights(killed / "final")
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=1e-6, rtol=1e-5, msg=key)

    kept = [step for step, _ in manager.completed()]
    straight_manager = CheckpointManager(
        straight / "checkpoints", keep_last=2, keep_best=True, higher_is_better=False
    )
    assert kept == [step for step, _ in straight_manager.completed()] and 2 <= len(kept) <= 3
    assert {9, 12} & set(kept) and max(kept) <= STEPS
    assert not list((killed / "checkpoints").glob(".tmp-*"))
    best_step, best_dir = manager.best()
    assert best_step in kept
    validation = [json.loads(line) for line in (straight / "validation.jsonl").read_text().splitlines()]
    assert read_state(best_dir)["metric"] == pytest.approx(
        min(v["val/lm_loss"] for v in validation), abs=1e-6
    )


def test_resume_names_what_is_missing(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=1, keep_best=False, higher_is_better=True)
    with pytest.raises(CheckpointError, match=r"--resume latest: no complete checkpoint in .*checkpoints"):
        manager.resolve("latest")
    half = tmp_path / "checkpoints" / "step-000000003"
    half.mkdir(parents=True)
    with pytest.raises(
        CheckpointError, match=rf"--resume {half}: not a complete checkpoint; expected .*{STATE_NAME}"
    ):
        manager.resolve(str(half))
    assert manager.completed() == []


def test_pruning_keeps_the_last_k_and_the_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, keep_best=True, higher_is_better=True)
    for step, metric in [(1, 0.6), (2, 0.8), (3, None), (4, 0.7), (5, 0.5)]:
        folder = tmp_path / f"step-{step:09d}"
        folder.mkdir()
        (folder / STATE_NAME).write_text(json.dumps({"step": step, "metric": metric}))
    (tmp_path / ".tmp-step-000000006").mkdir()
    manager.prune()
    manager.remove_temporary()
    assert [step for step, _ in manager.completed()] == [2, 4, 5]
    assert manager.best()[0] == 2 and manager.best_metric() == 0.8
    assert not (tmp_path / ".tmp-step-000000006").exists()
    lower = CheckpointManager(tmp_path, keep_last=1, keep_best=True, higher_is_better=False)
    lower.prune()
    assert [step for step, _ in lower.completed()] == [5]
