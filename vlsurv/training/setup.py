"""Building a run from a ``TrainConfig``: the model for the stage, the datasets, DeepHit cuts, optimizer,
schedule.

Stage 1: a fresh model, its projector optionally from a tte_pretrain run (``data.tte_projector``, vlsurv.tte);
trained: projector + LoRA (``set_stage(1)``); a ``standardize`` projector input norm is fitted on the training
scans' tokens first unless the loaded projector brought its statistics. Stage 2: the projector from
``data.stage1_dir`` (frozen) and its LoRA adapter when the folder has one (else a fresh LoRA); trained: LoRA +
residual adapter + head (``set_stage(2)``). A DeepHit head gets its cuts from ``deephit_cuts`` when given,
else from the event times of the training split's scans; the trainer gives them to the model (saved with it)
and to the training dataset, which labels each sample once (``set_deephit_cuts``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from vlsurv.config import ConfigError
from vlsurv.data.clinical import sentence_function
from vlsurv.data.covariates import ClinicalCovariates
from vlsurv.data.datasets import (
    PromptProcessor,
    SampleDataset,
    read_vqa,
    scan_question_samples,
    split_rows,
    training_samples,
)
from vlsurv.data.manifest import load_manifest
from vlsurv.encoders.cache import FeatureCache
from vlsurv.encoders.provenance import IMAGE_ENCODER_NAME, cache_provenance, read_provenance
from vlsurv.model.lobe_guidance import fit_lobe_classifier
from vlsurv.model.model_config import ModelConfig
from vlsurv.model.projector import standardizer_of
from vlsurv.model.survival import DeepHitCuts, SurvivalConfigError
from vlsurv.model.vlm import VisionLanguageSurvivalModel
from vlsurv.model.vlm_io import ADAPTER_DIR, CONFIG_NAME, PROJECTOR_NAME
from vlsurv.prompts import load_questions
from vlsurv.training.answer_status import answer_strata, lobe_labels, with_status
from vlsurv.training.config import TrainConfig
from vlsurv.training.sampling import BatchPlan
from vlsurv.training.schedule import check_warmup, lr_scheduler


@dataclass
class RunData:
    """The training and validation datasets of a run, and the survival table of its training scans."""

    train: SampleDataset
    val: SampleDataset
    train_time: list[float]
    train_event: list[int]
    train_strata: list[tuple[str, str]] | None = None
    """(question_id, reference answer status) per training sample, when a run option needs it
    (vlsurv.training.answer_status)."""
    covariates: ClinicalCovariates | None = None
    """Stage 2 with ``model.survival.covariates``: their encoding, fitted on the training split's rows (both
    datasets' items carry them)."""


def stage1_paths(config: TrainConfig) -> tuple[Path, Path | None]:
    """(the stage-1 projector file, its LoRA adapter folder or None); ConfigError naming data.stage1_dir."""
    folder = Path(config.data.stage1_dir)
    projector = folder / PROJECTOR_NAME
    if not projector.is_file():
        raise ConfigError(
            f"data.stage1_dir {folder}: no {PROJECTOR_NAME}; expected the `final` folder of a stage-1 run"
        )
    check_stage1_model_matches(config, folder)
    adapter = folder / ADAPTER_DIR
    if not adapter.is_dir():
        return projector, None
    check_lora_matches(config, adapter)
    return projector, adapter


def check_stage1_model_matches(config: TrainConfig, folder: Path) -> None:
    """ConfigError when the stage-1 model answered in another ``model.answer_format`` than stage 2 is set to
    train (stage 2 would teach the adapter a second answer format on top of the first), or its projector has
    other ``model.image_positions`` or, for a grid summary, ``model.image_position_rank`` (its weights would
    not fit)."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return  # a bare projector + adapter folder: nothing says how it answered
    saved = json.loads(path.read_text())
    checks = [("answer_format", "answers with"), ("image_positions", "has a projector with")]
    if config.model.image_positions == "grid":  # the rank shapes the grid summary only
        checks.append(("image_position_rank", "has a projector with"))
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}  # what an older config.json lacks
    for key, what in checks:
        value, wanted = saved.get(key, defaults[key]), getattr(config.model, key)
        if value != wanted:
            raise ConfigError(
                f"data.stage1_dir: the stage-1 model {path} {what} {key} {value!r}; stage 2 has "
                f"model.{key}={wanted!r}; expected the same {key} in both stages"
            )


def check_lora_matches(config: TrainConfig, adapter: Path) -> None:
    """ConfigError naming each ``model.lora`` field (r, alpha, target_modules) that the stage-1 adapter
    disagrees with; stage 2 loads that adapter, so a different ``model.lora`` would otherwise be silently
    ignored."""
    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(
            f"data.stage1_dir: {path} does not exist; expected the LoRA adapter's config (PEFT)"
        )
    saved = json.loads(path.read_text())
    lora = config.model.lora
    pairs = {
        "r": (lora.r, saved.get("r")),
        "alpha": (lora.alpha, saved.get("lora_alpha")),
        "target_modules": (sorted(lora.target_modules), sorted(saved.get("target_modules") or [])),
    }
    differ = [
        f"model.lora.{name}={ours} (adapter: {theirs})"
        for name, (ours, theirs) in pairs.items()
        if ours != theirs
    ]
    if differ:
        raise ConfigError(
            f"data.stage1_dir: the stage-1 LoRA adapter {path} disagrees with the stage-2 config: "
            f"{'; '.join(differ)}; "
            "expected model.lora to match the adapter that stage 2 continues to train"
        )


def image_encoder_record(config: TrainConfig, data: RunData) -> dict | None:
    """The record of the encoder behind the training cache (``cache_provenance``), which the final model
    folder keeps as ``image_encoder.json``; ConfigError when stage 2's cache was encoded otherwise than the
    stage-1 model in ``data.stage1_dir`` was trained on."""
    record = cache_provenance(data.train.feature_cache)
    stage1 = Path(config.data.stage1_dir) if config.stage == 2 else None
    if record is None or stage1 is None or not (stage1 / IMAGE_ENCODER_NAME).is_file():
        return record
    earlier = read_provenance(stage1)[0]["key"]
    differ = [
        f"{f} {record['key'][f]!r} (stage 1: {earlier[f]!r})"
        for f in earlier
        if record["key"][f] != earlier[f]
    ]
    if differ:
        raise ConfigError(
            f"data.cache {config.data.cache}: encoded with {'; '.join(differ)}; expected the encoder and "
            f"preprocessing of the stage-1 model in data.stage1_dir {stage1}"
        )
    return record


def build_model(config: TrainConfig) -> VisionLanguageSurvivalModel:
    """The model of ``config.stage`` with its trainable parts set (call after seeding)."""
    if config.stage == 1:
        model = VisionLanguageSurvivalModel(config.model)
        if config.data.tte_projector:  # a time-to-event pretrained projector (vlsurv.tte)
            model.load_projector(config.data.tte_projector)
        if config.loss.lobe_weight > 0:
            model.add_lobe_readout()
    else:
        projector, adapter = stage1_paths(config)
        model = VisionLanguageSurvivalModel(config.model)
        if adapter is not None:
            model.load_adapter(adapter)
        model.load_projector(projector)
    model.set_stage(config.stage)
    rates = learning_rates(config)
    frozen = [name for name, params in model.parameter_groups().items() if params and rates[name] == 0.0]
    model.freeze_parts(frozen)  # a part at lr 0 would only cost its backward pass
    if not any(model.parameter_groups().values()):
        raise ConfigError(
            f"stage {config.stage}: every trainable part has learning rate 0 (optim.lr_"
            f"{', optim.lr_'.join(frozen)}); nothing would train"
        )
    return model


def load_data(config: TrainConfig, processor: PromptProcessor) -> RunData:
    """Manifest + VQA + feature cache -> training pairs of ``data.train_split`` and validation scan x
    questions."""
    survival = config.stage == 2
    manifest = load_manifest(config.data.manifest, require_survival=survival, check_files=False)
    vqa = read_vqa(config.data.vqa)
    cache = FeatureCache(config.data.cache)
    where = f"data.manifest {config.data.manifest}"
    used = manifest[manifest["split"].isin([config.data.train_split, config.data.val_split])]
    clinical = sentence_function(
        used.to_dict("records"),
        config.model.clinical_template,
        where=where,
        max_missing_fraction=config.data.clinical_missing_warn,
        option="data.clinical_missing_warn",
    )
    train = training_samples(manifest, vqa, config.data.train_split, cache, clinical, survival, where)
    questions = load_questions(config.data.questions)
    val = scan_question_samples(
        manifest, vqa, questions, config.data.val_split, cache, clinical, survival, where
    )
    train_scans = {s.scan_id: (s.time, s.event) for s in train}
    lobes = lobe_labels(train) if config.loss.lobe_weight > 0 else None
    strata = None
    opens_with_status = config.model.opens_with_status
    if opens_with_status or config.sampling == "answer_balanced" or config.loss.answer_balance > 0:
        strata = answer_strata(train, config.data.questions)
    if opens_with_status:
        locations = config.model.answer_format == "findings_first"
        train = with_status(train, strata, locations)
        val = with_status(val, answer_strata(val, config.data.questions), locations)
    data = RunData(
        train=SampleDataset(train, cache, processor),
        val=SampleDataset(val, cache, processor),
        train_time=[t for t, _ in train_scans.values()],
        train_event=[e for _, e in train_scans.values()],
        train_strata=strata,
    )
    if lobes is not None:
        data.train.set_lobes(lobes)
    if survival and config.model.survival.covariates:
        train_rows = split_rows(manifest, config.data.train_split, cache, where)
        data.covariates = ClinicalCovariates.fit(
            train_rows.to_dict("records"),
            config.model.clinical_template,
            config.model.survival.covariates,
            where=f"{config.data.train_split} rows of {where}",
        )
        by_scan = data.covariates.by_scan(used.to_dict("records"))
        data.train.set_covariates(by_scan)
        data.val.set_covariates(by_scan)
    return data


def fit_input_standardizer(model: VisionLanguageSurvivalModel, data: RunData) -> None:
    """Stage 1 with ``projector_input_norm: standardize``: token statistics of the training scans (each
    once)."""
    standardizer = standardizer_of(model.multi_modal_projector)
    if standardizer is None or bool(standardizer.fitted):  # fitted: loaded with a pretrained projector
        return
    scan_ids = sorted({sample.scan_id for sample in data.train.samples})
    standardizer.fit(torch.stack([data.train.feature_cache.get(scan_id) for scan_id in scan_ids]))


def fit_lobe_guidance(model: VisionLanguageSurvivalModel, data: RunData) -> dict[str, float] | None:
    """``model.answer_guidance`` "lobe": fit the lobe classifier (``vlsurv.model.lobe_guidance``) on the
    training scans whose reference tumour answer names one lobe, and attach it; -> {"scans", "train_accuracy"}
    (None without guidance). It reads the frozen tokens only, so every process and a resumed run fit the same
    one."""
    if model.config.answer_guidance != "lobe":
        return None
    lobes = lobe_labels(data.train.samples)
    if not lobes:
        raise ConfigError(
            "model.answer_guidance 'lobe': no training scan's tumour answer names one lobe; expected some "
            "(answers such as 'A mass in the right upper lobe')"
        )
    scan_ids = sorted(lobes)
    tokens = torch.stack([data.train.feature_cache.get(scan_id).float() for scan_id in scan_ids])
    labels = torch.tensor([lobes[scan_id] for scan_id in scan_ids])
    classifier = fit_lobe_classifier(tokens, labels)
    model.set_lobe_classifier(classifier)
    accuracy = (classifier(tokens).argmax(-1) == labels).double().mean().item()
    return {"scans": len(scan_ids), "train_accuracy": round(accuracy, 4)}


def deephit_cuts(config: TrainConfig, data: RunData) -> DeepHitCuts:
    """The configured cuts, or quantile cuts of the training scans' event times placed per
    ``model.survival.deephit_cut_placement``, with ``deephit_censoring``'s labels (ConfigError when
    impossible)."""
    survival = config.model.survival
    if config.deephit_cuts is not None:
        return DeepHitCuts(config.deephit_cuts, censoring=survival.deephit_censoring)
    try:
        return DeepHitCuts.from_times(
            data.train_time,
            data.train_event,
            survival.num_bins,
            placement=survival.deephit_cut_placement,
            censoring=survival.deephit_censoring,
        )
    except SurvivalConfigError as err:
        raise ConfigError(
            "model.survival.head=deephit: cannot compute the DeepHit cuts from the "
            f"{config.data.train_split!r} "
            f"split of data.manifest {config.data.manifest}: {err}; or give deephit_cuts explicitly"
        ) from err


def learning_rates(config: TrainConfig) -> dict[str, float]:
    """Learning rate of each part that ``parameter_groups`` names."""
    return {
        "projector": config.optim.lr_projector,
        "lora": config.optim.lr_lora,
        "survival": config.optim.lr_survival,
    }


def build_optimizer(model: VisionLanguageSurvivalModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameter groups, each with its own learning rate (group ``name`` kept)."""
    rates = learning_rates(config)
    groups = [
        {"params": params, "lr": rates[name], "name": name, "weight_decay": config.optim.weight_decay}
        for name, params in model.parameter_groups().items()
        if params
    ]
    return torch.optim.AdamW(groups, betas=tuple(config.optim.betas), eps=config.optim.eps)


def total_steps(config: TrainConfig, plan: BatchPlan) -> int:
    """Optimizer steps of the run: ``max_steps``, else ``epochs`` passes (a trailing partial accumulation
    dropped)."""
    if config.optim.max_steps > 0:
        return config.optim.max_steps
    return max(1, math.floor(config.optim.epochs * plan.batches_per_epoch() / config.optim.grad_accum))


def warmup_steps(config: TrainConfig, steps: int, batches_per_epoch: int) -> int:
    """The run's warmup in optimizer steps: ``optim.warmup_steps``, or ``optim.warmup_ratio`` x ``steps``
    rounded down; ConfigError when a ``warmup_steps`` is not below the ``steps`` planned (the schedule would
    never decay)."""
    optim = config.optim
    if optim.warmup_ratio is not None:
        return math.floor(optim.warmup_ratio * steps)
    plan = (
        f"optim.max_steps = {optim.max_steps}"
        if optim.max_steps > 0
        else f"optim.epochs = {optim.epochs} x {batches_per_epoch} batches per epoch / optim.grad_accum = "
        f"{optim.grad_accum}"
    )
    check_warmup(
        optim.warmup_steps,
        steps,
        plan,
        "lower optim.warmup_steps or set optim.warmup_steps=null optim.warmup_ratio=<fraction in [0, 1)>",
    )
    return optim.warmup_steps


def build_scheduler(optimizer, config: TrainConfig, steps: int, warmup: int):
    """The cosine (or constant) schedule with ``warmup`` linear warmup steps, stepped per optimizer step
    (vlsurv.training.schedule); the cosine reaches 0 after ``steps`` steps."""
    return lr_scheduler(optimizer, warmup, steps, config.optim.scheduler)


def flat_hparams(data, prefix: str = "") -> dict:
    """Scalar hyper-parameters for the tracker (lists and None as strings)."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out
