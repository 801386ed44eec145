"""``TrainConfig``: the typed config tree of both training stages, loaded from YAML plus ``key=value``
overrides.

Paper defaults (docs/DESIGN.md, "Training"): AdamW (0.9, 0.999), cosine schedule with 500 warmup steps,
lr 1e-6 for every part of a model with a decoder, local batch 12, gradient accumulation 8, bf16 where the
device has it; loss weights alpha = 0.5, lambda_d = lambda_a = 1.

Sampling (``sampling``): ``"patient_balanced"`` is the default. Stage-2 samples are (scan, question) pairs and
every patient has about six of them; plain shuffling ("pairs") puts several copies of one patient into a
batch, which fills the Cox risk set with tied duplicates (same time, same event, nearly the same z) and gives
the dispersion loss pairs of a patient with itself. A patient-balanced batch holds distinct patients with one
random question each; one epoch is one pass over the patients. Stage 1 has no survival loss, so its configs
choose "pairs" (every VQA pair once per epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from vlsurv.config import ConfigError, bounded, check_fields, load_config
from vlsurv.losses import Ties
from vlsurv.model.model_config import ModelConfig

Sampling = Literal["patient_balanced", "pairs", "answer_balanced"]
Scheduler = Literal["cosine", "constant"]
MixedPrecision = Literal["no", "bf16", "fp16"]
Tracker = Literal["tensorboard", "none"]
RiskSet = Literal["micro_batch", "window", "memory"]
SAMPLINGS: tuple[str, ...] = get_args(Sampling)


@dataclass
class DataConfig:
    """Inputs: cohort manifest, VQA JSONL, feature cache and (stage 2) the stage-1 model directory."""

    manifest: str = ""
    """Cohort manifest (CSV or JSONL): scan_id, image, split, time, event and the clinical columns."""
    vqa: str = ""
    """VQA JSONL: one (scan_id, question_id, question, answer) per line."""
    cache: str = ""
    """Feature cache folder written by `vlsurv encode`."""
    stage1_dir: str = ""
    """Stage 2: the `final` folder of a stage-1 run (holding projector.safetensors)."""
    tte_projector: str = ""
    """Stage 1: start the projector from a tte_pretrain run's `final` folder (vlsurv.tte); empty = fresh."""
    questions: str = "lung"
    """Question set name or YAML path."""
    train_split: str = "train"
    """Manifest split trained on."""
    val_split: str = "val"
    """Manifest split validated on."""
    clinical_missing_warn: float = bounded(0.2, ge=0.0, le=1.0, what="a fraction")
    """Warn (once per run) when more than this fraction of scans lack a field of model.clinical_template."""

    def __post_init__(self) -> None:
        check_fields(self, "data")


@dataclass
class OptimConfig:
    """AdamW with one learning rate per parameter group, cosine schedule with warmup, accumulation, clipping.

    ``batch_size`` is per process; one optimizer step sees ``batch_size * num_processes * grad_accum``
    samples. ``max_steps`` > 0 caps the run in optimizer steps; otherwise ``epochs`` passes over the training
    data.
    Warmup: exactly one of ``warmup_steps`` (optimizer steps) and ``warmup_ratio`` (a fraction in [0, 1) of
    the run's planned optimizer steps, rounded down) is set, the other null; a ``warmup_steps`` at least the
    planned steps stops the run (vlsurv.training.setup.warmup_steps), as the learning rate would never leave
    warmup.
    """

    lr_projector: float = bounded(1e-6, ge=0.0, what="a learning rate")
    """Learning rate of the multi-modal projector (0 freezes it: no gradient, no optimizer state)."""
    lr_lora: float = bounded(1e-6, ge=0.0, what="a learning rate")
    """Learning rate of the LoRA weights (0 freezes them; a stage 2 at 0 runs the decoder forward only)."""
    lr_survival: float = bounded(1e-6, ge=0.0, what="a learning rate")
    """Learning rate of the survival branch (adapter and head; 0 freezes it)."""
    weight_decay: float = bounded(0.0, ge=0.0)
    """AdamW weight decay."""
    betas: tuple[float, float] = bounded((0.9, 0.999), ge=0.0, lt=1.0, what="two values")
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    scheduler: Scheduler = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_steps: int | None = bounded(500, ge=0)
    """Warmup length in optimizer steps (null when warmup_ratio is set)."""
    warmup_ratio: float | None = bounded(None, ge=0.0, lt=1.0, what="a fraction")
    """Warmup length as a fraction of the planned optimizer steps (null when warmup_steps is set)."""
    batch_size: int = bounded(12, ge=1)
    """Samples per micro-batch, per process."""
    grad_accum: int = bounded(8, ge=1)
    """Micro-batches accumulated per optimizer step."""
    max_grad_norm: float = bounded(1.0, ge=0.0)
    """Gradient clipping norm."""
    epochs: int = bounded(1, ge=1)
    """Passes over the training data (when max_steps is 0)."""
    max_steps: int = bounded(0, ge=0)
    """Optimizer steps that end the run; 0 = run the epochs."""

    def __post_init__(self) -> None:
        check_fields(self, "optim")
        if (self.warmup_steps is None) == (self.warmup_ratio is None):
            raise ConfigError(
                f"optim.warmup_steps = {self.warmup_steps}, optim.warmup_ratio = {self.warmup_ratio}: "
                "expected exactly one of them set and the other null "
                "(e.g. optim.warmup_steps=null optim.warmup_ratio=0.1)"
            )


@dataclass
class LossConfig:
    """Stage-2 objective: L_LM + alpha L_surv + lambda_d L_disp + lambda_a L_align (see vlsurv.losses).

    ``risk_set`` (stage 2) sets the rows that the coupled terms (Cox risk set, DeepHit ranking pairs,
    dispersion pairs) span: "micro_batch" = one micro-batch across processes (``batch_size x processes``);
    "window" = the optimizer step's whole accumulation window (``x grad_accum``), exact, at the cost of one
    extra forward pass without grad per micro-batch; "memory" = the micro-batch plus the detached rows of the
    ``memory_batches`` micro-batches before it, as constants (vlsurv.training.risk_sets).
    """

    alpha: float = bounded(0.5, ge=0.0)
    """Weight of the survival loss L_surv."""
    lambda_d: float = bounded(1.0, ge=0.0)
    """Weight of the dispersion loss L_disp."""
    lambda_a: float = bounded(1.0, ge=0.0)
    """Weight of the alignment loss L_align."""
    ties: Ties = "breslow"
    """Tie handling of the Cox partial likelihood."""
    dispersion_sigma: float | None = bounded(None, gt=0.0)
    """Time scale of the dispersion loss; null = the std of the global batch's event times."""
    dispersion_tau: float = bounded(0.5, gt=0.0)
    """Temperature of the dispersion loss."""
    deephit_ranking_weight: float = bounded(0.0, ge=0.0)
    """Weight of DeepHit's ranking loss added to L_surv (0 = none)."""
    deephit_ranking_sigma: float = 0.1
    """Scale of DeepHit's ranking loss."""
    risk_set: RiskSet = "micro_batch"
    """Rows the coupled terms span: one micro-batch, the accumulation window, or a memory of past rows."""
    memory_batches: int = bounded(7, ge=1)
    """Earlier micro-batches kept (detached) when risk_set is "memory"."""
    answer_balance: float = bounded(0.0, ge=0.0, le=1.0, what="a power")
    """L_LM of both stages: power p of the per-(question, answer status) weight (N_q / (S_q n_qs))^p of each
    training answer (vlsurv.training.answer_status.answer_weights). 0 = plain token mean; 1 = a question's
    present and absent answers weigh the same in total, so the decoder cannot lower the loss by answering
    from the prior of report-derived answers, where "No ..." dominates."""
    status_weight: float = bounded(1.0, ge=1.0, what="a weight")
    """L_LM of both stages, for answers that open with their status (``model.answer_format``): weight of the
    opening's tokens from the decision on (the token where "Present:" and "Absent:" first differ, and the
    location of a findings_first opening, and the sentence's first naming of that location after it),
    relative to the other answer tokens (1 = the plain token mean).
    The opening is a few tokens among ~20 of the answer, so in the plain mean the wording of the descriptions
    outweighs what the image decides; weighting it up makes the image's share of the answer count. The
    sentence's lobe or side is weighted with the opening's because a small decoder otherwise writes the side
    its commonest sentence has ("Present, tumor, right upper lobe: ... in the left upper lobe")."""
    lobe_weight: float = bounded(0.0, ge=0.0, what="a weight")
    """Stage 1 with ``model.image_positions: grid``: weight of an auxiliary cross-entropy in which a linear
    read-out of the grid summary names the tumour's lobe that the scan's reference tumour answer names
    (``metrics_clinical.named_location``), on every training sample of such a scan; 0 = off. The read-out
    trains with the projector and is not saved with the model. The LM loss alone fits the training scans'
    lobes and reads a test scan's lobe less well than a linear probe of the same tokens (README, "Where the
    lobe was lost")."""

    def __post_init__(self) -> None:
        check_fields(self, "loss")


@dataclass
class EvalConfig:
    """Validation every ``every_n_steps`` optimizer steps (0: only at the end of each epoch)."""

    every_n_steps: int = bounded(0, ge=0)
    """Optimizer steps between validations; 0 = at the end of each epoch."""
    batch_size: int = bounded(12, ge=1)
    """Scans per validation batch."""
    sample_answers: int = bounded(2, ge=0)
    """Generated answers logged per validation."""
    max_new_tokens: int = 32
    """Answer length cap of validation's generation."""
    clinical_scans: int = bounded(0, ge=0)
    """Val scans (the first ones, every question) whose greedy answers give the clinical macro F1
    (vlsurv.metrics_clinical, logged as val/clinical_macro_f1); 0 = not computed."""
    status_calibration: Literal["none", "max_f1"] = "max_f1"
    """model.answer_format status_first: "max_f1" fits each question's present / absent threshold on the val
    scans when training ends (vlsurv.training.status_calibration, saved as model.status_bias); "none" keeps
    the greedy threshold."""
    status_present_cap: float = bounded(2.0, ge=1.0)
    """status_calibration: the fitted threshold answers "present" on at most this multiple of the val
    references' present count (a question without signal is not fitted to "present for everyone")."""

    def __post_init__(self) -> None:
        check_fields(self, "eval")


@dataclass
class CheckpointConfig:
    """``accelerate save_state`` every N optimizer steps (0: never); keep the last k, plus the best when
    asked.

    "Best" is the highest validation C-index in stage 2 and the lowest validation LM loss in stage 1 (a
    stage-1 survival head is untrained, so its C-index says nothing).
    """

    every_n_steps: int = bounded(500, ge=0)
    """Optimizer steps between checkpoints; 0 = never."""
    keep_last: int = bounded(2, ge=1)
    """Checkpoints kept, newest first."""
    keep_best: bool = True
    """Also keep the best checkpoint."""

    def __post_init__(self) -> None:
        check_fields(self, "checkpoint")


@dataclass
class TrainConfig:
    """Everything one training run needs; ``stage`` 1 (VQA) or 2 (joint survival)."""

    stage: Literal[1, 2] = 1
    """1: VQA (projector + LoRA); 2: joint survival (LoRA + survival branch)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Inputs."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to build (vlsurv.model.vlm.ModelConfig)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer, schedule and batch sizes."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Stage-2 loss weights and settings."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    sampling: Sampling = "patient_balanced"
    """Batches of distinct patients with one question each ("patient_balanced"), of VQA pairs ("pairs"), or of
    VQA pairs with each question's present and absent answers drawn equally ("answer_balanced", stage 1)."""
    deephit_cuts: list[float] | None = None
    """DeepHit cut times (model.survival.num_bins of them); null = quantiles of the training event times."""
    mixed_precision: MixedPrecision = "no"
    """accelerate's mixed precision."""
    seed: int = 0
    """Seed of the model initialisation, sampling and generation."""
    output_dir: str = "runs/train"
    """Run folder: config, checkpoints, logs and final/."""
    overwrite_output_dir: bool = False
    """A fresh run (no --resume) into an output_dir holding an earlier run's checkpoints or final/: false
    refuses, true deletes them first."""
    tracker: Tracker = "tensorboard"
    """Metrics logger."""
    progress: bool = True
    """Show the tqdm bar (main process only)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.stage == 2 and not self.data.stage1_dir:
            raise ConfigError(
                "data.stage1_dir: stage 2 needs the stage-1 model directory (the `final` folder of "
                "a stage-1 run, "
                "holding projector.safetensors); got none"
            )
        if self.deephit_cuts is not None:
            self.check_given_cuts()
        if self.loss.lobe_weight > 0 and (self.stage != 1 or self.model.image_positions != "grid"):
            raise ConfigError(
                f"loss.lobe_weight: {self.loss.lobe_weight} reads the lobe from the grid summary of stage 1, "
                f"but stage is {self.stage} and model.image_positions is {self.model.image_positions!r}; "
                "expected stage 1 with image_positions grid, or lobe_weight 0"
            )
        if self.loss.status_weight != 1.0 and not self.model.opens_with_status:
            raise ConfigError(
                f"loss.status_weight: {self.loss.status_weight} weights the token where 'Present:' and "
                f"'Absent:' differ, but model.answer_format is {self.model.answer_format!r}; expected "
                "status_first or findings_first, or status_weight 1"
            )

    def check_given_cuts(self) -> None:
        cuts = list(self.deephit_cuts or [])
        if self.model.survival.head != "deephit":
            raise ConfigError("deephit_cuts: given, but model.survival.head is not 'deephit'")
        if len(cuts) != self.model.survival.num_bins:
            raise ConfigError(
                f"deephit_cuts: got {len(cuts)} cut times, expected model.survival.num_bins = "
                f"{self.model.survival.num_bins}"
            )
        if any(b <= a for a, b in zip(cuts, cuts[1:])) or (cuts and cuts[0] <= 0):
            raise ConfigError(f"deephit_cuts: expected strictly increasing positive times, got {cuts}")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """``vlsurv.config.load_config(TrainConfig, path, overrides)``; every error names the key."""
    return load_config(TrainConfig, path, overrides)
