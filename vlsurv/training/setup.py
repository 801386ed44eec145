"""Building a run from a ``TrainConfig``: the model for the stage, the datasets, DeepHit cuts, optimizer, schedule.

Stage 1: a fresh model; trained: projector + LoRA (``set_stage(1)``); a ``standardize`` projector input norm is
fitted on the training scans' tokens first.
Stage 2: the projector from ``data.stage1_dir`` (frozen) and its LoRA adapter when the folder has one (else a fresh
LoRA); trained: LoRA + residual adapter + head (``set_stage(2)``). A DeepHit head gets its cuts from
``deephit_cuts`` when given, else from the event times of the training split's scans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from vlsurv.config import ConfigError
from vlsurv.data.clinical import clinical_sentence
from vlsurv.data.datasets import SampleDataset, read_vqa, scan_question_samples, training_samples
from vlsurv.data.manifest import load_manifest
from vlsurv.encoders.cache import FeatureCache
from vlsurv.model.projector import standardizer_of
from vlsurv.model.survival import DeepHitCuts, SurvivalConfigError
from vlsurv.model.vlm import VisionLanguageSurvivalModel
from vlsurv.model.vlm_io import ADAPTER_DIR, PROJECTOR_NAME
from vlsurv.prompts import load_questions
from vlsurv.training.config import TrainConfig
from vlsurv.training.sampling import BatchPlan


@dataclass
class RunData:
    """The training and validation datasets of a run, and the survival table of its training scans."""

    train: SampleDataset
    val: SampleDataset
    train_time: list[float]
    train_event: list[int]


def stage1_paths(config: TrainConfig) -> tuple[Path, Path | None]:
    """(the stage-1 projector file, its LoRA adapter folder or None); ConfigError naming data.stage1_dir."""
    folder = Path(config.data.stage1_dir)
    projector = folder / PROJECTOR_NAME
    if not projector.is_file():
        raise ConfigError(
            f"data.stage1_dir {folder}: no {PROJECTOR_NAME}; expected the `final` folder of a stage-1 run"
        )
    adapter = folder / ADAPTER_DIR
    return projector, adapter if adapter.is_dir() else None


def build_model(config: TrainConfig) -> VisionLanguageSurvivalModel:
    """The model of ``config.stage`` with its trainable parts set (call after seeding)."""
    if config.stage == 1:
        model = VisionLanguageSurvivalModel(config.model)
    else:
        projector, adapter = stage1_paths(config)
        model = VisionLanguageSurvivalModel(config.model, adapter_dir=adapter)
        model.load_projector(projector)
    model.set_stage(config.stage)
    return model


def load_data(config: TrainConfig, processor) -> RunData:
    """Manifest + VQA + feature cache -> training pairs of ``data.train_split`` and validation scan x questions."""
    survival = config.stage == 2
    manifest = load_manifest(config.data.manifest, require_survival=survival, check_files=False)
    vqa = read_vqa(config.data.vqa)
    cache = FeatureCache(config.data.cache)
    template = config.model.clinical_template

    def clinical(row) -> str:
        return clinical_sentence(row, template)

    where = f"data.manifest {config.data.manifest}"
    train = training_samples(manifest, vqa, config.data.train_split, cache, clinical, survival, where)
    questions = load_questions(config.data.questions)
    val = scan_question_samples(manifest, vqa, questions, config.data.val_split, cache, clinical, survival, where)
    train_scans = {s.scan_id: (s.time, s.event) for s in train}
    return RunData(
        train=SampleDataset(train, cache, processor),
        val=SampleDataset(val, cache, processor),
        train_time=[t for t, _ in train_scans.values()],
        train_event=[e for _, e in train_scans.values()],
    )


def fit_input_standardizer(model: VisionLanguageSurvivalModel, data: RunData) -> None:
    """Stage 1 with ``projector_input_norm: standardize``: token statistics of the training scans (each once)."""
    standardizer = standardizer_of(model.multi_modal_projector)
    if standardizer is None:
        return
    scan_ids = sorted({sample.scan_id for sample in data.train.samples})
    standardizer.fit(torch.stack([data.train.tokens.get(scan_id) for scan_id in scan_ids]))


def deephit_cuts(config: TrainConfig, data: RunData) -> DeepHitCuts:
    """The configured cuts, or quantile cuts of the training scans' event times (ConfigError when impossible)."""
    if config.deephit_cuts is not None:
        return DeepHitCuts(config.deephit_cuts)
    try:
        return DeepHitCuts.from_times(data.train_time, data.train_event, config.model.survival.num_bins)
    except SurvivalConfigError as err:
        raise ConfigError(
            f"model.survival.head=deephit: cannot compute the DeepHit cuts from the {config.data.train_split!r} "
            f"split of data.manifest {config.data.manifest}: {err}; or give deephit_cuts explicitly"
        ) from err


def build_optimizer(model: VisionLanguageSurvivalModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameter groups, each with its own learning rate (group ``name`` kept)."""
    rates = {"projector": config.optim.lr_projector, "lora": config.optim.lr_lora,
             "survival": config.optim.lr_survival}
    groups = [
        {"params": params, "lr": rates[name], "name": name, "weight_decay": config.optim.weight_decay}
        for name, params in model.parameter_groups().items()
        if params
    ]
    return torch.optim.AdamW(groups, betas=tuple(config.optim.betas), eps=config.optim.eps)


def total_steps(config: TrainConfig, plan: BatchPlan) -> int:
    """Optimizer steps of the run: ``max_steps``, else ``epochs`` passes (a trailing partial accumulation dropped)."""
    if config.optim.max_steps > 0:
        return config.optim.max_steps
    return max(1, math.floor(config.optim.epochs * plan.batches_per_epoch() / config.optim.grad_accum))


def build_scheduler(optimizer, config: TrainConfig, steps: int):
    """transformers' cosine (or constant) schedule with ``warmup_steps`` linear warmup, stepped per optimizer step."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if config.optim.scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, config.optim.warmup_steps, steps)
    return get_constant_schedule_with_warmup(optimizer, config.optim.warmup_steps)


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
