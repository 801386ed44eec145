"""The window risk set on 2 CPU processes (gloo, DDP) gives the loss and gradients of 1 process on one batch.

The fixed global batch of conftest (7 rows) is split into an accumulation window of two micro-batches
(rows 0-3 and 4-6); each process takes its shard of each, caches the window (forward without grad, the
window's rows gathered over processes), then backpropagates each micro-batch's cached-gradient share through
DDP. Rank 0 writes the window's loss components and the averaged gradients; the reference is ``step_loss`` on
all 7 rows in one process and one micro-batch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from conftest import (
    build_model,
    compare_launched_step_with_one_process,
    global_batch,
    launch_on_two_cpu_processes,
    write_launched_step,
)

from vlsurv.training.config import LossConfig
from vlsurv.training.risk_sets import cache_window, set_rng_state, window_step_loss
from vlsurv.training.sampling import shard

WINDOW = ([0, 1, 2, 3], [4, 5, 6])


def launched_main(decoder: str, out: Path) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    results, models = {}, {}
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
        models[head] = model
    write_launched_step(accelerator, out, results, models)


@pytest.mark.distributed
def test_two_process_window_matches_one_batch_in_one_process(tiny_decoder_dir, tmp_path):
    launch_on_two_cpu_processes(__file__, "--decoder", str(tiny_decoder_dir), "--out", str(tmp_path))
    compare_launched_step_with_one_process(tiny_decoder_dir, tmp_path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--decoder", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    launched_main(args.decoder, args.out)
