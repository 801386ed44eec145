"""``TTEPretrainConfig``: the typed config of the ``tte_pretrain`` stage (scripts/train.py, vlsurv train).

A YAML with ``stage: tte_pretrain`` is routed here instead of ``TrainConfig`` (``is_tte_config``). The head
trains on the feature cache's tokens, or with ``data.images`` on the tokens of an image encoder run on the
scans' volumes, whose last stage trains with the head when ``model.train_last_block`` (vlsurv.tte.images).
``model.projector`` and ``model.projector_input_norm`` match stage 1's ``model.projector`` options so that the
pretrained projector can start stage 1 (``data.tte_projector``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from vlsurv.config import ConfigError, bounded, check_fields, invalid, load_config
from vlsurv.model.projector import ProjectorKind, ProjectorNorm
from vlsurv.training.config import CheckpointConfig, MixedPrecision

TTE_STAGE = "tte_pretrain"


@dataclass
class TTEDataConfig:
    """The EHR events, the scan times and the feature cache of the scans (or, with ``images``, their volumes
    and the encoder)."""

    events: str = ""
    """Events table (parquet or CSV) with columns patient_id, time, code (MEDS-like)."""
    scans: str = ""
    """Scans table (parquet or CSV) with columns scan_id, patient_id, time and optionally split."""
    cache: str = ""
    """Feature cache folder written by `vlsurv encode`, holding every scan of the scans table."""
    train_split: str = "train"
    """Scans trained on when the scans table has a split column (else all scans)."""
    val_split: str = "val"
    """Scans validated on when the scans table has a split column (else none)."""
    images: bool = False
    """Read the scans' volumes (data.manifest) and run the image encoder in the loop instead of data.cache."""
    manifest: str = ""
    """With images: the cohort manifest (scan_id, image) holding every scan of the scans table."""
    encoder: Literal["full", "tiny"] = "full"
    """With images: the encoder preset, as `vlsurv encode --encoder` (full = Merlin's ResNet-152)."""
    encoder_config: str | None = None
    """With images: a YAML EncoderConfig (replaces data.encoder)."""
    encoder_checkpoint: str | None = None
    """With images: the encoder checkpoint (.pt or .safetensors); null = the config's seeded random init."""
    preprocess_config: str | None = None
    """With images: a YAML PreprocessConfig (null = Merlin's preprocessing)."""
    num_workers: int = bounded(0, ge=0)
    """With images: DataLoader processes that load and preprocess the volumes."""

    def __post_init__(self) -> None:
        check_fields(self, "data")
        if self.images and not self.manifest:
            raise invalid(
                "data", "manifest", "expected the cohort manifest (scan_id, image) when data.images is true"
            )


@dataclass
class TTETaskConfig:
    """Task selection and time bins."""

    k: int = bounded(8192, ge=1)
    """Number of tasks: the top-k codes by patients with the code after their scan."""
    min_event_fraction: float = bounded(0.01, ge=0.0, le=1.0, what="a fraction")
    """Codes occurring after the scan in fewer than this fraction of scanned patients are dropped."""
    num_bins: int = bounded(8, ge=1)
    """Time bins, cut at percentiles of the training event times (first at 0, last at infinity)."""

    def __post_init__(self) -> None:
        check_fields(self, "tasks")


@dataclass
class TTEModelConfig:
    """The head: tokens -> projector (stage 1's) -> mean over tokens -> per-bin features -> log-hazards."""

    image_token_dim: int = bounded(2048, ge=1)
    """Width C of the cached image tokens."""
    num_image_tokens: int = bounded(1, ge=1)
    """Number T of cached image tokens per scan."""
    projector: ProjectorKind = "linear"
    """Projector architecture (as stage 1's model.projector)."""
    projector_input_norm: ProjectorNorm = "none"
    """Projector input normalisation (as stage 1's model.projector_input_norm)."""
    projection_dim: int = bounded(4096, ge=1)
    """Projector output width: the decoder's hidden size when stage 1 is to start from it."""
    final_dim: int = bounded(512, ge=1)
    """Width of the per-bin features that the shared task layer reads (MOTOR's final_layer_size)."""
    train_last_block: bool = False
    """With data.images: train the encoder's last stage (layer4) with the head; the rest stays frozen."""

    def __post_init__(self) -> None:
        check_fields(self, "model")


@dataclass
class TTEOptimConfig:
    """AdamW with a learning-rate schedule stepped per optimizer step: ``warmup_steps`` of linear warmup from
    0, then constant, linear decay to 0 or cosine decay to 0 at the run's last step (transformers' schedules).
    A ``warmup_steps`` not below the run's planned steps is an error (vlsurv.tte.training.planned_warmup)."""

    lr: float = bounded(1e-4, ge=0.0, what="a learning rate")
    """Peak learning rate."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning rate after warmup: constant, linear decay to 0, or cosine decay to 0 at the last step."""
    warmup_steps: int = bounded(0, ge=0)
    """Optimizer steps of linear warmup from 0 to optim.lr."""
    weight_decay: float = bounded(0.0, ge=0.0)
    """AdamW weight decay."""
    batch_size: int = bounded(64, ge=1)
    """Scans per batch, per process."""
    epochs: int = bounded(10, ge=1)
    """Passes over the training scans (when max_steps is 0)."""
    max_steps: int = bounded(0, ge=0)
    """Optimizer steps that end the run; 0 = run the epochs."""
    max_grad_norm: float = bounded(1.0, ge=0.0)
    """Gradient clipping norm (0 = none)."""

    def __post_init__(self) -> None:
        check_fields(self, "optim")


@dataclass
class TTEPretrainConfig:
    """One time-to-event pretraining run over cached features."""

    stage: Literal["tte_pretrain"] = TTE_STAGE
    """Must be tte_pretrain."""
    data: TTEDataConfig = field(default_factory=TTEDataConfig)
    """Inputs."""
    tasks: TTETaskConfig = field(default_factory=TTETaskConfig)
    """Task selection and bins."""
    model: TTEModelConfig = field(default_factory=TTEModelConfig)
    """The head."""
    optim: TTEOptimConfig = field(default_factory=TTEOptimConfig)
    """Optimizer and batch size."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing (best = lowest validation loss)."""
    mixed_precision: MixedPrecision = "no"
    """accelerate's mixed precision."""
    seed: int = 0
    """Seed of the initialisation and of the batch order."""
    output_dir: str = "runs/tte"
    """Run folder: config, checkpoints, train_log.jsonl and final/."""
    progress: bool = True
    """Show the tqdm bar (main process only)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.model.train_last_block and not self.data.images:
            raise ConfigError(
                "model.train_last_block: needs data.images=true (cached tokens have passed the last block "
                "already); expected false or data.images=true with data.manifest"
            )


def is_tte_config(path: str | Path, overrides: list[str] | None = None) -> bool:
    """Whether the YAML at ``path`` (after ``stage=...`` overrides) asks for the tte_pretrain stage."""
    stage_overrides = [o.split("=", 1)[1].strip() for o in overrides or [] if o.startswith("stage=")]
    if stage_overrides:
        return stage_overrides[-1] == TTE_STAGE
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # load_train_config reports the file's problem
    return isinstance(raw, dict) and raw.get("stage") == TTE_STAGE


def load_tte_config(path: str | Path | None, overrides: list[str] | None = None) -> TTEPretrainConfig:
    """``vlsurv.config.load_config(TTEPretrainConfig, path, overrides)``; every error names the key."""
    return load_config(TTEPretrainConfig, path, overrides)
