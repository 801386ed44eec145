"""Benchmark: training throughput (samples/s) of stage 1 and stage 2, tiny decoder vs a larger one, and
peak RSS.

Inputs are made on the fly: a synthetic cohort (``make_cohort``), a VQA file from its findings, a feature
cache of the tiny Merlin-architecture encoder, and two Llama decoders built with ``build_tiny_decoder``: the
tiny configs' size (2 layers x 128) and a larger one (8 layers x 512). Each measurement builds a ``Trainer``
from ``configs/tiny/stage{1,2_deepsurv}.yaml``, runs ``--warmup`` micro-batches, then times ``--steps``
micro-batches (forward, global-batch loss, backward, optimizer step) and prints samples/s = samples / seconds.

    python benchmarks/train_step.py [--patients 40] [--batch-size 8] [--steps 12] [--warmup 2] [key=value ...]

Trailing ``key=value`` pairs override the training configs (e.g. ``mixed_precision=bf16`` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import pandas as pd

from vlsurv.data.synthetic import make_cohort
from vlsurv.data.transforms import PreprocessConfig
from vlsurv.encoders.cache import FeatureCache, encode_manifest
from vlsurv.encoders.merlin import MerlinImageEncoder
from vlsurv.model.tiny import build_tiny_decoder
from vlsurv.prompts import load_questions
from vlsurv.training.config import load_train_config
from vlsurv.training.loop import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
DECODERS = {"tiny 2x128": (2, 128), "larger 8x512": (8, 512)}


def make_inputs(root: Path, patients: int) -> dict[str, Path]:
    """Cohort, VQA pairs (one answer per question from the findings flags) and the tiny-encoder cache."""
    manifest = make_cohort(patients, 0, root / "cohort", shape=(48, 48, 32))
    findings = pd.read_csv(root / "cohort" / "findings.csv").to_dict("records")
    questions = load_questions("lung")
    rows = [
        {
            "scan_id": f["scan_id"],
            "question_id": q.id,
            "question": q.text,
            "answer": f"Yes, {q.id.replace('_', ' ')} findings are present."
            if f[q.id]
            else f"No {q.id} findings.",
        }
        for f in findings
        for q in questions
    ]
    (root / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    preprocess = PreprocessConfig(spacing=(6.0, 6.0, 6.0), spatial_size=(64, 64, 32))
    encode_manifest(manifest, root / "cache", MerlinImageEncoder.tiny(), preprocess, progress=False)
    texts = [r["question"] for r in rows] + [r["answer"] for r in rows]
    decoders = {
        name: build_tiny_decoder(
            root / name.split()[0], texts, num_layers=layers, hidden_size=hidden, num_heads=8
        )
        for name, (layers, hidden) in DECODERS.items()
    }
    return {"manifest": manifest, "vqa": root / "vqa.jsonl", "cache": root / "cache", **decoders}


def throughput(trainer: Trainer, steps: int, warmup: int) -> float:
    """Samples per second of ``steps`` timed micro-batches after ``warmup`` untimed ones."""
    batches = [indices for _, indices in trainer.plan.local_batches(0, 0)]
    needed = warmup + steps
    batches = (batches * (needed // len(batches) + 1))[:needed]
    trainer.model.train()
    for indices in batches[:warmup]:
        trainer.micro_step(indices)
    start = time.perf_counter()
    for indices in batches[warmup:]:
        trainer.micro_step(indices)
    seconds = time.perf_counter() - start
    return sum(len(b) for b in batches[warmup:]) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = make_inputs(root, args.patients)
        tokens, dim = FeatureCache(inputs["cache"]).token_shape
        print(
            f"{args.patients} patients, image tokens {tokens} x {dim}, local batch {args.batch_size}, "
            f"{args.steps} timed micro-batches after {args.warmup} warm-up, overrides "
            f"{args.overrides or 'none'}"
        )
        print(f"{'decoder':<14} {'stage':<6} {'samples/s':>10}")
        for name in DECODERS:
            common = [
                f"data.manifest={inputs['manifest']}",
                f"data.vqa={inputs['vqa']}",
                f"data.cache={inputs['cache']}",
                f"model.decoder_path={inputs[name]}",
                f"model.image_token_dim={dim}",
                f"model.num_image_tokens={tokens}",
                f"optim.batch_size={args.batch_size}",
                "optim.grad_accum=1",
                "tracker=none",
                "eval.sample_answers=0",
                "checkpoint.every_n_steps=0",
                *args.overrides,
            ]
            stage1_dir = root / f"run_{name.split()[0]}_stage1"
            stage1 = Trainer(
                load_train_config(CONFIGS / "stage1.yaml", [*common, f"output_dir={stage1_dir}"])
            )
            print(f"{name:<14} {'1':<6} {throughput(stage1, args.steps, args.warmup):>10.1f}")
            final = stage1.finish()
            stage2 = Trainer(
                load_train_config(
                    CONFIGS / "stage2_deepsurv.yaml",
                    [
                        *common,
                        f"data.stage1_dir={final}",
                        f"output_dir={root / f'run_{name.split()[0]}_stage2'}",
                    ],
                )
            )
            print(f"{name:<14} {'2':<6} {throughput(stage2, args.steps, args.warmup):>10.1f}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
