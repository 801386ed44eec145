"""The window risk set on 2 CPU processes (gloo, DDP) gives the loss and gradients of 1 process on one batch.

The fixed global batch of conftest (7 rows) is split into an accumulation window of two micro-batches
(rows 0-3 and 4-6); each process takes its shard of each, caches the window (forward without grad, the
window's rows gathered over processes), then backpropagates each micro-batch's cached-gradient share through
DDP. Rank 0 writes the window's loss components and the averaged gradients; the reference is ``step_loss`` on
all 7 rows in one process and one micro-batch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import GLOBAL_BATCH, build_model, global_batch, gradients, run_step
from safetensors.torch import load_file, save_file

from vlsurv.training.config import LossConfig
from vlsurv.training.risk_sets import cache_window, set_rng_state, window_step_loss
from vlsurv.training.sampling import shard

WINDOW = ([0, 1, 2, 3], [4, 5, 6])


def launched_main(decoder: str, out: Path) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    results = {}
    for head in ("deepsurv", "deephit"):
        model = build_model(decoder, head)
        wrapped = accelerator.prepare(model)

        def forward(batch: dict, wrapped=wrapped):
            return wrapped(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                image_tokens=batch["image_tokens"],
                pool_mask=batch["attention_mask"],
            )

        batches = [
            global_batch(model.processor, shard(rows, rank, world), model.deephit_cuts) for rows in WINDOW
        ]
        cache = cache_window(forward, batches, LossConfig(deephit_ranking_weight=0.5))
        for index, batch in enumerate(batches):
            set_rng_state(cache.rng_states[index])
            accelerator.backward(window_step_loss(forward(batch), batch, cache, index).to_backpropagate)
        results[head] = cache.parts
        if accelerator.is_main_process:
            save_file(gradients(model), str(out / f"grads_{head}.safetensors"))
    if accelerator.is_main_process:
        (out / "parts.json").write_text(json.dumps({"world": world, **results}))
    accelerator.wait_for_everyone()


@pytest.mark.distributed
def test_two_process_window_matches_one_batch_in_one_process(tiny_decoder_dir, tmp_path):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        __file__,
        "--decoder",
        str(tiny_decoder_dir),
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    launched = json.loads((tmp_path / "parts.json").read_text())
    assert launched["world"] == 2
    for head in ("deepsurv", "deephit"):
        model = build_model(str(tiny_decoder_dir), head)
        batch = global_batch(model.processor, list(range(GLOBAL_BATCH)), model.deephit_cuts)
        parts, backward = run_step(model, batch)
        backward.backward()
        for name, value in parts.items():
            assert launched[head][name] == pytest.approx(value, abs=1e-6, rel=1e-6), (head, name)
        reference = gradients(model)
        distributed = {
            k.removeprefix("module."): v
            for k, v in load_file(str(tmp_path / f"grads_{head}.safetensors")).items()
        }
        assert distributed.keys() == reference.keys()
        for name, grad in reference.items():
            torch.testing.assert_close(distributed[name], grad, atol=1e-6, rtol=1e-5, msg=f"{head} {name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--decoder", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    launched_main(args.decoder, args.out)
