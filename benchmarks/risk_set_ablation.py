"""Risk-set ablation (README "Training"): test C-index of stage 2 with ``loss.risk_set`` micro_batch /
window / memory on a heavily censored synthetic cohort, same data, epochs and optimizer steps.

Shared once: a cohort of ``--patients`` (event rate ~20% through ``SurvivalModel(censor_mean_days,
followup_days)``), the rules VQA file, a tiny decoder, a tiny-encoder feature cache and a stage-1 run
(configs/tiny/stage1.yaml). Then per seed and option a stage-2 DeepSurv run
(configs/tiny/stage2_deepsurv.yaml) with micro-batch ``--batch`` x accumulation ``--accum``; the memory holds
``accum - 1`` micro-batches, so both wide options span one optimizer step's rows. Validation during training
is skipped (the budget is fixed; the last step is scored). Score: Harrell's C on the test split of the mean
six-question risk, answers = the reference answers (teacher forcing, no generation), so the ablation measures
the survival training alone.

    python benchmarks/risk_set_ablation.py --out runs/risk_set_ablation \\
        [--patients 300] [--epochs 6] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vlsurv.data.clinical import clinical_sentence
from vlsurv.data.datasets import SampleDataset, read_vqa, scan_question_samples
from vlsurv.data.manifest import load_manifest
from vlsurv.data.synthetic import SurvivalModel, make_cohort
from vlsurv.data.transforms import PreprocessConfig
from vlsurv.demo import extract_vqa
from vlsurv.encoders.cache import FeatureCache, encode_manifest
from vlsurv.encoders.merlin import MerlinImageEncoder
from vlsurv.metrics import concordance_index
from vlsurv.model.tiny import build_tiny_decoder, cohort_texts
from vlsurv.prompts import load_questions
from vlsurv.training.config import load_train_config
from vlsurv.training.loop import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"
OPTIONS = ("micro_batch", "window", "memory")


class FixedBudgetTrainer(Trainer):
    """A ``Trainer`` that neither validates nor checkpoints during the run."""

    def validate_and_checkpoint(self, synced: bool, epoch_end: bool) -> None:
        return None


def prepare(out: Path, patients: int, censor_mean_days: float, followup_days: float) -> list[str]:
    """Cohort, VQA, decoder, cache and stage 1; the shared ``key=value`` overrides of every stage-2 run."""
    model = SurvivalModel(censor_mean_days=censor_mean_days, followup_days=followup_days)
    manifest = make_cohort(patients, 0, out / "cohort", shape=(48, 48, 32), model=model)
    vqa = extract_vqa(manifest, out / "qa")
    decoder = build_tiny_decoder(
        out / "decoder",
        cohort_texts(manifest, vqa),
        num_layers=2,
        hidden_size=128,
        seed=0,
        pretrain_steps=40,
    )
    encode_manifest(
        manifest,
        out / "cache",
        MerlinImageEncoder.tiny(),
        PreprocessConfig(spacing=(6.0, 6.0, 6.0), spatial_size=(64, 64, 32)),
        progress=False,
    )
    tokens, dim = FeatureCache(out / "cache").token_shape
    common = [
        f"data.manifest={manifest}",
        f"data.vqa={vqa}",
        f"data.cache={out / 'cache'}",
        f"model.decoder_path={decoder}",
        f"model.image_token_dim={dim}",
        f"model.num_image_tokens={tokens}",
        "tracker=none",
        "overwrite_output_dir=true",
        "progress=false",
        "eval.sample_answers=0",
    ]
    stage1 = out / "stage1"
    if not (stage1 / "final").is_dir():
        FixedBudgetTrainer(
            load_train_config(CONFIGS / "stage1.yaml", [*common, f"output_dir={stage1}", "optim.epochs=2"])
        ).fit()
    return [*common, f"data.stage1_dir={stage1 / 'final'}"]


def test_c_index(trainer: Trainer) -> float:
    """Harrell's C on the test split: mean risk over the six questions with their reference answers."""
    config = trainer.config
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    manifest = load_manifest(config.data.manifest, require_survival=True, check_files=False)
    samples = scan_question_samples(
        manifest,
        read_vqa(config.data.vqa),
        load_questions(config.data.questions),
        "test",
        trainer.data.train.feature_cache,
        lambda row: clinical_sentence(row, config.model.clinical_template),
        True,
    )
    dataset = SampleDataset(samples, trainer.data.train.feature_cache, model.processor)
    risks: dict[str, list[float]] = {}
    with torch.no_grad():
        for start in range(0, len(dataset), 32):
            batch = dataset.collate([dataset[i] for i in range(start, min(start + 32, len(dataset)))])
            output = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                image_tokens=batch["image_tokens"],
                pool_mask=model.pool_mask(batch),
            )
            for sample, risk in zip(samples[start : start + 32], model.risk(output.survival).tolist()):
                risks.setdefault(sample.scan_id, []).append(risk)
    table = {s.scan_id: (s.time, s.event) for s in samples}
    ids = sorted(risks)
    return concordance_index(
        [table[i][0] for i in ids], [table[i][1] for i in ids], [sum(risks[i]) / len(risks[i]) for i in ids]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/risk_set_ablation"))
    parser.add_argument("--patients", type=int, default=600)
    parser.add_argument("--censor-mean-days", type=float, default=300.0)
    parser.add_argument("--followup-days", type=float, default=800.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    args = parser.parse_args()
    common = prepare(args.out, args.patients, args.censor_mean_days, args.followup_days)
    results_path = args.out / "results.jsonl"
    for seed in args.seeds:
        for option in args.options:
            start = time.perf_counter()
            config = load_train_config(
                CONFIGS / "stage2_deepsurv.yaml",
                [
                    *common,
                    f"seed={seed}",
                    f"output_dir={args.out / f'{option}_seed{seed}'}",
                    f"optim.batch_size={args.batch}",
                    f"optim.grad_accum={args.accum}",
                    f"optim.epochs={args.epochs}",
                    f"loss.risk_set={option}",
                    f"loss.memory_batches={max(1, args.accum - 1)}",
                ],
            )
            trainer = FixedBudgetTrainer(config)
            trainer.fit()
            line = {
                "option": option,
                "seed": seed,
                "test_c_index": test_c_index(trainer),
                "steps": trainer.total_steps,
                "seconds": round(time.perf_counter() - start, 1),
            }
            print(json.dumps(line), flush=True)
            with results_path.open("a") as handle:
                handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
