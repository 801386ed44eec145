"""2 CPU processes (gloo) on a fixed global batch give the loss and gradients of 1 process on the same batch.

The test launches this file with ``accelerate launch --multi_gpu --num_processes 2`` and
``Accelerator(cpu=True)``: two CPU processes over gloo (accelerate's ``--cpu`` flag starts several processes
only through mpirun, which a plain CPU machine lacks; the test checks that two processes ran). Each process
takes its shard of the global batch, runs the stage-2 step loss (Cox / DeepHit risk sets and dispersion pairs
over the gathered global batch) and backpropagates through DDP; rank 0 writes the loss components and the
averaged gradients of the survival branch and LoRA. The reference is the same code in this process,
unlaunched, on the whole global batch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import (
    GLOBAL_BATCH,
    build_model,
    build_tiny_inputs,
    compare_launched_step_with_one_process,
    global_batch,
    launch_on_two_cpu_processes,
    run_step,
    tiny_config,
    write_launched_step,
)
from safetensors.torch import load_file

from vlsurv.training.sampling import shard


def launched_main(decoder: str, out: Path) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    results, models = {}, {}
    for head in ("deepsurv", "deephit"):
        model = build_model(decoder, head)
        wrapped = accelerator.prepare(model)
        batch = global_batch(
            model.processor, shard(list(range(GLOBAL_BATCH)), rank, world), model.deephit_cuts
        )
        parts, backward = run_step(wrapped, batch)
        accelerator.backward(backward)
        results[head] = parts
        models[head] = model
    write_launched_step(accelerator, out, results, models)


@pytest.mark.distributed
def test_two_processes_match_one_process_on_the_same_global_batch(tiny_decoder_dir, tmp_path):
    launch_on_two_cpu_processes(__file__, "--decoder", str(tiny_decoder_dir), "--out", str(tmp_path))
    assert json.loads((tmp_path / "parts.json").read_text())["deepsurv"].keys() == {
        "loss",
        "lm",
        "surv",
        "disp",
        "align",
    }
    for reference in compare_launched_step_with_one_process(tiny_decoder_dir, tmp_path).values():
        survival = [k for k in reference if k.startswith("survival_branch.")]
        assert len(survival) == 6 and all(reference[k].abs().sum() > 0 for k in survival)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_training_run_matches_a_one_process_run(tiny_decoder_dir, tmp_path):
    """`accelerate launch scripts/train.py` on 2 CPU processes with local batch 4 ends with the weights of one
    process with batch 8: same global batches, global-batch losses, checkpoints and validation under DDP."""
    from vlsurv.training.loop import train

    inputs = build_tiny_inputs(tmp_path / "inputs")
    stage1 = train(
        tiny_config(
            "stage1",
            inputs,
            tiny_decoder_dir,
            tmp_path / "stage1",
            "optim.max_steps=2",
            "optim.warmup_steps=1",
        )
    )
    common = [
        f"data.manifest={inputs['manifest']}",
        f"data.vqa={inputs['vqa']}",
        f"data.cache={inputs['cache']}",
        f"model.decoder_path={tiny_decoder_dir}",
        f"data.stage1_dir={stage1}",
        "tracker=none",
        "optim.max_steps=4",
        "checkpoint.every_n_steps=2",
        "eval.every_n_steps=2",
        "eval.sample_answers=1",
    ]
    script = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "stage2_deepsurv.yaml"
    launch_on_two_cpu_processes(
        script,
        "--config",
        str(config),
        *common,
        "optim.batch_size=4",
        f"output_dir={tmp_path / 'two'}",
    )
    one = train(
        tiny_config(
            "stage2_deepsurv",
            inputs,
            tiny_decoder_dir,
            tmp_path / "one",
            *common[4:],
            f"data.stage1_dir={stage1}",
            "optim.batch_size=8",
        )
    )
    two = tmp_path / "two"
    logs = [
        [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
        for run in (one.parent, two)
    ]
    assert len(logs[0]) == len(logs[1]) == 4
    for a, b in zip(*logs):
        for key in ("train/loss", "train/lm", "train/surv", "train/disp", "train/align"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
    assert (two / "checkpoints" / "step-000000004" / "trainer_state.json").is_file()
    validation = [json.loads(line) for line in (two / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in validation] == [2, 4] and all("val/c_index" in v for v in validation)
    # The Cox loss does not change when every log-risk shifts by a constant, so the head bias's gradient is
    # float noise, which Adam scales up to full-size steps: it is the one weight that cannot be compared.
    for name in ("survival_branch.safetensors", "adapter/adapter_model.safetensors"):
        expected, actual = load_file(str(one / name)), load_file(str(two / "final" / name))
        assert expected.keys() == actual.keys()
        for key in sorted(set(expected) - {"head.bias"}):
            torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-4, msg=f"{name} {key}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--decoder", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    launched_main(args.decoder, args.out)
