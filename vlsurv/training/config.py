"""``TrainConfig``: the typed config tree of both training stages, loaded from YAML plus ``key=value`` overrides.

Paper defaults (DESIGN.md): AdamW (0.9, 0.999), cosine schedule with 500 warmup steps, lr 1e-6 for every part
of a model with a decoder, local batch 12, gradient accumulation 8, bf16 where the device has it; loss weights
alpha = 0.5, lambda_d = lambda_a = 1.

Sampling (``sampling``): ``"patient_balanced"`` is the default. Stage-2 samples are (scan, question) pairs and
every patient has about six of them; plain shuffling ("pairs") puts several copies of one patient into a batch,
which fills the Cox risk set with tied duplicates (same time, same event, nearly the same z) and gives the
dispersion loss pairs of a patient with itself. A patient-balanced batch holds distinct patients with one random
question each; one epoch is one pass over the patients. Stage 1 has no survival loss, so its configs choose
"pairs" (every VQA pair once per epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlsurv.config import ConfigError, load_config
from vlsurv.model.vlm import ModelConfig

SAMPLINGS = ("patient_balanced", "pairs")
SCHEDULERS = ("cosine", "constant")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
TRACKERS = ("tensorboard", "none")
TIES = ("breslow", "efron")
RISK_SETS = ("micro_batch", "window", "memory")


@dataclass
class DataConfig:
    """Inputs: the cohort manifest, the VQA JSONL, the feature cache and (stage 2) the stage-1 model directory.

    ``clinical_missing_warn``: warn (once per run) when more than this fraction of the run's scans lack a
    field of ``model.clinical_template`` (vlsurv.data.clinical.warn_missing_fields).
    """

    manifest: str = ""
    vqa: str = ""
    cache: str = ""
    stage1_dir: str = ""
    questions: str = "lung"
    train_split: str = "train"
    val_split: str = "val"
    clinical_missing_warn: float = 0.2


@dataclass
class OptimConfig:
    """AdamW with one learning rate per parameter group, cosine schedule with warmup, accumulation, clipping.

    ``batch_size`` is per process; one optimizer step sees ``batch_size * num_processes * grad_accum`` samples.
    ``max_steps`` > 0 caps the run in optimizer steps; otherwise ``epochs`` passes over the training data.
    Warmup: exactly one of ``warmup_steps`` (optimizer steps) and ``warmup_ratio`` (a fraction in [0, 1) of the
    run's planned optimizer steps, rounded down) is set, the other null; a ``warmup_steps`` at least the planned
    steps stops the run (vlsurv.training.setup.warmup_steps), as the learning rate would never leave warmup.
    """

    lr_projector: float = 1e-6
    lr_lora: float = 1e-6
    lr_survival: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    scheduler: str = "cosine"
    warmup_steps: int | None = 500
    warmup_ratio: float | None = None
    batch_size: int = 12
    grad_accum: int = 8
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int = 0


@dataclass
class LossConfig:
    """Stage-2 objective: L_LM + alpha L_surv + lambda_d L_disp + lambda_a L_align (see vlsurv.losses).

    ``dispersion_sigma`` None = the std of the global batch's event times; ``deephit_ranking_weight`` adds
    DeepHit's ranking loss to L_surv with that weight.

    ``risk_set`` (stage 2) sets the rows that the coupled terms (Cox risk set, DeepHit ranking pairs, dispersion
    pairs) span: "micro_batch" = one micro-batch across processes (``batch_size x processes``); "window" = the
    optimizer step's whole accumulation window (``x grad_accum``), exact, at the cost of one extra forward pass
    without grad per micro-batch; "memory" = the micro-batch plus the detached rows of the ``memory_batches``
    micro-batches before it, as constants (vlsurv.training.risk_sets).
    """

    alpha: float = 0.5
    lambda_d: float = 1.0
    lambda_a: float = 1.0
    ties: str = "breslow"
    dispersion_sigma: float | None = None
    dispersion_tau: float = 0.5
    deephit_ranking_weight: float = 0.0
    deephit_ranking_sigma: float = 0.1
    risk_set: str = "micro_batch"
    memory_batches: int = 7


@dataclass
class EvalConfig:
    """Validation every ``every_n_steps`` optimizer steps (0: only at the end of each epoch)."""

    every_n_steps: int = 0
    batch_size: int = 12
    sample_answers: int = 2
    max_new_tokens: int = 32


@dataclass
class CheckpointConfig:
    """``accelerate save_state`` every N optimizer steps (0: never); keep the last k, plus the best when asked.

    "Best" is the highest validation C-index in stage 2 and the lowest validation LM loss in stage 1 (a stage-1
    survival head is untrained, so its C-index says nothing).
    """

    every_n_steps: int = 500
    keep_last: int = 2
    keep_best: bool = True


@dataclass
class TrainConfig:
    """Everything one training run needs; ``stage`` 1 (VQA) or 2 (joint survival)."""

    stage: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sampling: str = "patient_balanced"
    deephit_cuts: list[float] | None = None
    mixed_precision: str = "no"
    seed: int = 0
    output_dir: str = "runs/train"
    tracker: str = "tensorboard"
    progress: bool = True  # the tqdm bar (main process only)

    def __post_init__(self) -> None:
        check_choice("stage", self.stage, (1, 2))
        check_choice("sampling", self.sampling, SAMPLINGS)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        check_choice("tracker", self.tracker, TRACKERS)
        check_choice("optim.scheduler", self.optim.scheduler, SCHEDULERS)
        check_choice("loss.ties", self.loss.ties, TIES)
        if not 0.0 <= self.data.clinical_missing_warn <= 1.0:
            raise ConfigError(f"data.clinical_missing_warn: expected a fraction between 0 and 1, got "
                              f"{self.data.clinical_missing_warn}")
        check_choice("loss.risk_set", self.loss.risk_set, RISK_SETS)
        check_at_least("loss.memory_batches", self.loss.memory_batches, 1)
        for name in ("lr_projector", "lr_lora", "lr_survival"):
            value = getattr(self.optim, name)
            if not value >= 0.0:
                raise ConfigError(f"optim.{name}: expected a learning rate >= 0, got {value}")
        for name in ("batch_size", "grad_accum", "epochs"):
            check_at_least(f"optim.{name}", getattr(self.optim, name), 1)
        check_at_least("optim.max_steps", self.optim.max_steps, 0)
        self.check_warmup()
        for name in ("weight_decay", "max_grad_norm"):
            check_at_least(f"optim.{name}", getattr(self.optim, name), 0.0)
        if not all(0.0 <= b < 1.0 for b in self.optim.betas):
            raise ConfigError(f"optim.betas: expected two values in [0, 1), got {list(self.optim.betas)}")
        for name in ("alpha", "lambda_d", "lambda_a", "deephit_ranking_weight"):
            check_at_least(f"loss.{name}", getattr(self.loss, name), 0.0)
        if self.loss.dispersion_sigma is not None and self.loss.dispersion_sigma <= 0:
            raise ConfigError(f"loss.dispersion_sigma: expected > 0 or null, got {self.loss.dispersion_sigma}")
        if self.loss.dispersion_tau <= 0:
            raise ConfigError(f"loss.dispersion_tau: expected > 0, got {self.loss.dispersion_tau}")
        check_at_least("eval.every_n_steps", self.eval.every_n_steps, 0)
        check_at_least("eval.batch_size", self.eval.batch_size, 1)
        check_at_least("eval.sample_answers", self.eval.sample_answers, 0)
        check_at_least("checkpoint.every_n_steps", self.checkpoint.every_n_steps, 0)
        check_at_least("checkpoint.keep_last", self.checkpoint.keep_last, 1)
        if self.stage == 2 and not self.data.stage1_dir:
            raise ConfigError(
                "data.stage1_dir: stage 2 needs the stage-1 model directory (the `final` folder of a stage-1 run, "
                "holding projector.safetensors); got none"
            )
        if self.deephit_cuts is not None:
            self.check_given_cuts()

    def check_warmup(self) -> None:
        steps, ratio = self.optim.warmup_steps, self.optim.warmup_ratio
        if (steps is None) == (ratio is None):
            raise ConfigError(
                f"optim.warmup_steps = {steps}, optim.warmup_ratio = {ratio}: expected exactly one of them set and "
                "the other null (e.g. optim.warmup_steps=null optim.warmup_ratio=0.1)"
            )
        if steps is not None:
            check_at_least("optim.warmup_steps", steps, 0)
        elif not 0.0 <= ratio < 1.0:
            raise ConfigError(f"optim.warmup_ratio: expected a fraction in [0, 1), got {ratio}")

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


def check_choice(key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")


def check_at_least(key: str, value, minimum) -> None:
    if not value >= minimum:
        raise ConfigError(f"{key}: expected a value >= {minimum}, got {value}")


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """``vlsurv.config.load_config(TrainConfig, path, overrides)``; every error names the key."""
    return load_config(TrainConfig, path, overrides)
