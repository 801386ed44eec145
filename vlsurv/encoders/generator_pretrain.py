"""Deeply supervised pretraining of a small Merlin-code encoder on the synthetic generator's scans and masks.

Merlin's image encoder was pretrained on 15k CTs with their reports and EHR phenotypes before anyone asked it
about a scan; its weights cannot be downloaded here. A random-init encoder of the same code carries large
findings by chance (the demo's tokens: effusion and vessel invasion at linear-probe AUROC 1.00) and small ones
hardly (a 1-3 cm bone lesion: 0.44-0.69 over init seeds and widths). Supervision from the demo's 180 training
reports moves only stage 4 and does not reach them (``vlsurv.encoders.pretrain``). This module gives the demo
a pretrained stand-in, in the manner of supervised CT pretraining with voxel labels (SuPreM, Li et al. 2024),
shipped as ``weights/tiny_generator.safetensors`` and rebuilt by ``scripts/pretrain_demo_encoder.py``:

- data: scans and finding masks rendered by ``vlsurv.data.synthetic`` from the stream
  ``patient_rng(seed, PRETRAIN_STREAM, step, i, k)``, which no cohort draws from (cohorts use streams 1-3), so
  no demo patient of any seed, train, val or test, is seen. A fraction ``bone_enrich`` of the scans is
  redrawn until it has a bone lesion, the smallest and rarest finding (18% of patients);
- every stage is trained (stem included). A 1x1x1 head reads each stage's map F_s (B, C_s, d_s, h_s, w_s):
  stages 1-3 through auxiliary heads that are dropped afterwards, stage 4 through the encoder's own phenotype
  head (``classifier``, its first Q outputs), so that the tokens the decoder reads are the ones supervised;
- per stage and masked finding m, logits z (B, M, n cells) against the mask max-pooled to that grid, t:
  L_s = mean_m w_m mean_{t_m=1} BCE(z_m, 1) + mean_{b,m} w_m mean(top_k of BCE(z, 0) over the cells with t=0)
        + mean_{t=0} BCE(z, 0),
  with k = max(4, n / 256), the first mean over the findings with a positive cell in the batch and weights w
  (``finding_weights``, default 1): each finding's positives weigh the same (a bone lesion's few cells as much
  as an effusion's many), positives as much as all negatives, and the hardest negatives (the intervertebral
  discs next to a lytic lesion, normal lymph nodes) are pulled out of the mean;
- per scan, the maximum over stage 4's cells of each question's logit against the scan's flag (vessel
  invasion, which has no mask of its own, is learned only here): L_scan = mean_{b,q} BCE(max_c z4, y);
- L = sum_s L_s + L_scan, AdamW with a one-cycle learning rate; BatchNorm uses batch statistics while
  training and keeps the running ones for the frozen use.

The shipped checkpoint took two phases (configs/encoder_pretrain/): 1000 steps at lr 2e-3 with equal weights
(tumour, nodes, effusion and vessel invasion learned; bone still at chance: head AUROC 0.42), then 1500 steps
at lr 1e-3 from there with the bone lesion's terms weighted 5 (bone head AUROC 0.63 after 250 steps, 0.81
after 500).

Afterwards the encoder is frozen again (eval mode, no grad). ``evaluate_encoder`` scores it on fresh scans of
another stream: the head's scan-level AUROC per question and a linear probe on the tokens the decoder reads.
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlsurv.config import bounded, check_fields, invalid
from vlsurv.data.synthetic.anatomy import FINDING_TISSUES, render_scan
from vlsurv.data.synthetic.cohort import QUESTION_IDS, patient_rng, sample_findings
from vlsurv.data.synthetic.write import resolve_grid
from vlsurv.data.transforms import PreprocessConfig
from vlsurv.encoders.merlin import MerlinImageEncoder, pool_tokens, tiny_config
from vlsurv.encoders.pretrain import EncoderPretrainError

#: The spawn key of the pretraining scans (cohorts draw from 1: patients, 2: splits, 3: events).
PRETRAIN_STREAM = 9
#: The evaluation scans' spawn key.
EVAL_STREAM = 10
QUESTIONS = QUESTION_IDS
#: Questions whose finding has a voxel mask in the generator (vessel invasion has none).
MASKED = tuple(FINDING_TISSUES)
WEIGHTS_DIR = Path(__file__).parent / "weights"
#: The shipped checkpoint (bare I3ResNet keys, tiny_config) and its record (config, evaluation, sha256).
BUILTIN_CHECKPOINT = WEIGHTS_DIR / "tiny_generator.safetensors"
BUILTIN_RECORD = WEIGHTS_DIR / "tiny_generator.json"


@dataclass
class GeneratorPretrainConfig:
    """The deeply supervised pretraining of a tiny encoder on generator scans (see the module docstring)."""

    steps: int = bounded(3000, ge=1)
    """Optimizer steps; each draws ``batch_size`` fresh scans."""
    batch_size: int = bounded(4, ge=1)
    """Scans per step."""
    lr: float = bounded(2e-3, gt=0.0, what="a learning rate")
    """Peak AdamW learning rate of the one-cycle schedule."""
    warmup_fraction: float = bounded(0.05, gt=0.0, lt=1.0, what="a fraction")
    """Share of the steps spent warming up to ``lr``."""
    weight_decay: float = bounded(1e-4, ge=0.0)
    """AdamW weight decay."""
    bone_enrich: float = bounded(0.5, ge=0.0, le=1.0, what="a fraction")
    """Share of the scans redrawn until they have a bone lesion."""
    volume_shape: tuple[int, int, int] = (128, 128, 64)
    """Voxels of each scan, on the generator's standard 384 mm cube (the demo's default: 3 x 3 x 6 mm)."""
    seed: int = 0
    """Seed of the encoder's initialisation and of the scans."""
    eval_scans: int = bounded(300, ge=20)
    """Fresh scans of the evaluation (two thirds fit the probe, one third scores it)."""
    encoder: dict = field(default_factory=lambda: {"token_mode": "mean_width"})
    """Overrides of ``tiny_config`` (the architecture the checkpoint is for)."""
    finding_weights: dict[str, float] = field(default_factory=dict)
    """Weight of a masked finding's positive and hard-negative terms in every L_s (1 when not named)."""
    schedule_steps: int = bounded(0, ge=0)
    """Steps the one-cycle schedule is laid out for (0: ``steps``); a phase may stop before it ends."""
    first_step: int = bounded(0, ge=0)
    """Index in the scan stream of the first step's scans (a later phase draws scans the earlier did not)."""
    init: str = ""
    """Encoder checkpoint (safetensors of ``tiny_config(**encoder)``) to start from; "" = random init. The
    auxiliary heads start afresh."""

    def __post_init__(self) -> None:
        self.volume_shape = tuple(int(v) for v in self.volume_shape)
        check_fields(self, "generator_pretrain")
        for name, weight in self.finding_weights.items():
            if name not in MASKED or not weight > 0:
                raise invalid(
                    "generator_pretrain",
                    "finding_weights",
                    f"weights > 0 of {list(MASKED)}, got {name}: {weight}",
                )
        if self.schedule_steps and self.schedule_steps < self.steps:
            raise invalid(
                "generator_pretrain",
                "schedule_steps",
                f"0 or at least steps ({self.steps}), got {self.schedule_steps}",
            )

    def weights(self) -> torch.Tensor:
        """(M,) weights of the ``MASKED`` findings."""
        return torch.tensor([float(self.finding_weights.get(q, 1.0)) for q in MASKED])


def generator_batch(
    seed: int, key: tuple[int, ...], size: int, shape: tuple[int, int, int], bone_enrich: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``size`` scans of stream ``key`` -> volumes (B, 1, H, W, D) scaled as the encoder's preprocessing does
    (``PreprocessConfig``'s HU window; the generator's grid is RAS at the target spacing already), masks
    (B, M, D, H, W) of the ``MASKED`` findings in the encoder's axis order, flags (B, Q) of ``QUESTIONS``."""
    grid, window = resolve_grid(shape), PreprocessConfig()
    choose = patient_rng(seed, *key)
    volumes, masks, flags = [], [], []
    for i in range(size):
        enrich, draw = choose.random() < bone_enrich, 0
        findings = sample_findings(patient_rng(seed, *key, i, draw))
        while enrich and not findings.flags["bone"]:
            draw += 1
            findings = sample_findings(patient_rng(seed, *key, i, draw))
        scan = render_scan(findings, grid, patient_rng(seed, *key, i, 1_000_000 + draw))
        hu = np.clip(scan.hu.astype(np.float32), window.hu_min, window.hu_max)
        scaled = (hu - window.hu_min) / (window.hu_max - window.hu_min) * (window.out_max - window.out_min)
        volumes.append(torch.from_numpy(scaled + window.out_min))
        masks.append(torch.from_numpy(np.stack([scan.mask(q) for q in MASKED])).permute(0, 3, 1, 2))
        flags.append([float(findings.flags[q]) for q in QUESTIONS])
    return torch.stack(volumes)[:, None], torch.stack(masks).float(), torch.tensor(flags)


def cell_logits(encoder: MerlinImageEncoder, last_map: torch.Tensor) -> torch.Tensor:
    """Stage 4's map (B, C, d, h, w) -> the phenotype head on every cell, first Q outputs (B, Q, d, h, w)."""
    head = encoder.classifier
    return F.conv3d(last_map, head.weight[: len(QUESTIONS)], head.bias[: len(QUESTIONS)])


def dense_mask_loss(
    logits: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """L_s of the module docstring: logits (B, M, d, h, w) of one stage against full-resolution masks
    (B, M, D, H, W) in {0, 1}, max-pooled to the logits' grid; ``weights`` (M,) scale each finding's positive
    and hard-negative terms (default 1)."""
    weights = torch.ones(logits.shape[1]) if weights is None else weights
    targets = F.adaptive_max_pool3d(masks, logits.shape[2:])
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    cells = targets.sum(dim=(0, 2, 3, 4))  # (M,) positive cells of each finding in the batch
    per_finding = (loss * targets).sum(dim=(0, 2, 3, 4)) / cells.clamp(min=1.0)
    positive = (per_finding * weights)[cells > 0].sum() / max(int((cells > 0).sum()), 1)
    negative = (loss * (1.0 - targets)).flatten(2)
    k = max(4, negative.shape[2] // 256)
    hard = (negative.topk(k, dim=2).values.mean(dim=2) * weights).mean()
    return positive + hard + negative.mean()


def scan_flag_loss(cell_scores: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """L_scan: cell logits (B, Q, d, h, w), flags (B, Q) -> BCE of each question's maximum over the cells."""
    return F.binary_cross_entropy_with_logits(cell_scores.amax(dim=(2, 3, 4)), flags)


class _AuxiliaryHeads(nn.Module):
    """1x1x1 convs reading stages 1-3 (dropped after pretraining)."""

    def __init__(self, encoder: MerlinImageEncoder) -> None:
        super().__init__()
        widths = [stage[-1].conv3.out_channels for stage in (encoder.layer1, encoder.layer2, encoder.layer3)]
        self.heads = nn.ModuleList([nn.Conv3d(width, len(MASKED), 1) for width in widths])


def training_loss(
    encoder: MerlinImageEncoder, heads: _AuxiliaryHeads, volumes, masks, flags, weights=None
) -> tuple[torch.Tensor, dict[str, float]]:
    """L = sum_s L_s + L_scan on one batch (``weights``: see dense_mask_loss); returns it and its parts."""
    maps = encoder.stage_maps(volumes)
    cells = cell_logits(encoder, maps[3])
    masked = [QUESTIONS.index(q) for q in MASKED]
    dense = [dense_mask_loss(head(m), masks, weights) for head, m in zip(heads.heads, maps[:3])]
    dense.append(dense_mask_loss(cells[:, masked], masks, weights))
    dense_total, scan = sum(dense), scan_flag_loss(cells, flags)
    return dense_total + scan, {"dense": dense_total.item(), "scan": scan.item()}


def pretrain_on_generator(
    config: GeneratorPretrainConfig,
    resume_dir: str | Path | None = None,
    save_every: int = 250,
    log: Callable[[dict], None] | None = None,
    log_every: int = 25,
) -> tuple[MerlinImageEncoder, list[dict]]:
    """Pretrain a ``tiny_config(**config.encoder)`` encoder; returns it frozen and the logged losses.

    With ``resume_dir``, the whole state (weights, optimizer, schedule, step, history) is written to
    ``resume_dir/state.pt`` every ``save_every`` steps and read back on the next call with the same config, so
    a stopped run goes on where it stopped (each step's scans are a function of the step, so the result is the
    same)."""
    torch.manual_seed(config.seed)
    encoder = MerlinImageEncoder.tiny(seed=config.seed, **config.encoder)
    if config.init:
        encoder.load_state_dict(MerlinImageEncoder.from_checkpoint(config.init, encoder.config).state_dict())
    heads = _AuxiliaryHeads(encoder)
    params = [*encoder.parameters(), *heads.parameters()]
    for parameter in params:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        total_steps=config.schedule_steps or config.steps,
        pct_start=config.warmup_fraction,
    )
    parts = {"encoder": encoder, "heads": heads, "optimizer": optimizer, "schedule": schedule}
    state_path = Path(resume_dir) / "state.pt" if resume_dir is not None else None
    first, history = _resume(state_path, config, parts)
    weights, start = config.weights(), time.monotonic()
    # MerlinImageEncoder.train keeps it frozen; BatchNorm needs batch statistics while training
    nn.Module.train(encoder, True)
    try:
        for step in range(first, config.steps):
            key = (PRETRAIN_STREAM, config.first_step + step)
            batch = generator_batch(
                config.seed, key, config.batch_size, config.volume_shape, config.bone_enrich
            )
            loss, losses = training_loss(encoder, heads, *batch, weights=weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % log_every == 0 or step + 1 == config.steps:
                entry = {"step": step + 1, **losses, "seconds": round(time.monotonic() - start, 1)}
                history.append(entry)
                if log is not None:
                    log(entry)
            if state_path is not None and ((step + 1) % save_every == 0 or step + 1 == config.steps):
                _save_state(state_path, config, parts, step + 1, history)
    finally:
        encoder.train(False)
        encoder.requires_grad_(False)
    return encoder, history


def _save_state(path: Path, config: GeneratorPretrainConfig, parts: dict, step: int, history: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: part.state_dict() for name, part in parts.items()}
    partial = path.with_suffix(".partial")
    torch.save({**state, "step": step, "history": history, "config": asdict(config)}, partial)
    partial.replace(path)  # a crash while writing leaves the last complete state


def _resume(path: Path | None, config: GeneratorPretrainConfig, parts: dict) -> tuple[int, list[dict]]:
    """Load ``path`` into ``parts``; returns the first step to run and the history so far."""
    if path is None or not path.is_file():
        return 0, []
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["config"]
    for name, value in asdict(config).items():
        if _plain(saved.get(name)) != _plain(value):
            raise EncoderPretrainError(
                f"{path}: written by a run with {name}={saved.get(name)!r}, this run has {value!r}; "
                "give another resume folder or the same config"
            )
    for name, part in parts.items():
        part.load_state_dict(state[name])
    return int(state["step"]), list(state["history"])


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


@torch.no_grad()
def evaluate_encoder(
    encoder: MerlinImageEncoder, config: GeneratorPretrainConfig, batch_size: int = 20
) -> dict[str, dict[str, float]]:
    """Per question on ``config.eval_scans`` fresh scans (stream EVAL_STREAM): ``head_auroc``, the scan-level
    AUROC of the maximum cell logit, and ``probe_auroc``, a logistic regression (C 0.05, standardized) on the
    flattened tokens of ``encoder.config.token_mode``, fitted on the first two thirds, scored on the rest
    (None where the scans scored have one class only)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    scores, tokens, flags = [], [], []
    for start in range(0, config.eval_scans, batch_size):
        size = min(batch_size, config.eval_scans - start)
        volumes, _, batch_flags = generator_batch(
            config.seed, (EVAL_STREAM, start), size, config.volume_shape
        )
        last = encoder.feature_map(volumes)
        scores.append(cell_logits(encoder, last).amax(dim=(2, 3, 4)))
        tokens.append(pool_tokens(last, encoder.config.token_mode).flatten(1))
        flags.append(batch_flags)
    score, token, flag = (torch.cat(t).numpy() for t in (scores, tokens, flags))
    fit = 2 * len(flag) // 3
    scaler = StandardScaler().fit(token[:fit])

    def auroc(labels, scores):
        return round(float(roc_auc_score(labels, scores)), 3) if 0 < labels.sum() < len(labels) else None

    result = {}
    for j, question in enumerate(QUESTIONS):
        y = flag[:, j]
        held_out = None
        if 0 < y[:fit].sum() < fit:
            probe = LogisticRegression(C=0.05, max_iter=3000).fit(scaler.transform(token[:fit]), y[:fit])
            held_out = auroc(y[fit:], probe.predict_proba(scaler.transform(token[fit:]))[:, 1])
        result[question] = {
            "prevalence": round(float(y.mean()), 3),
            "head_auroc": auroc(y, score[:, j]),
            "probe_auroc": held_out,
        }
    return result


@functools.cache
def builtin_record() -> dict:
    """The shipped checkpoint's record (``BUILTIN_RECORD``), read once."""
    return json.loads(BUILTIN_RECORD.read_text())


def builtin_sha256() -> str:
    """The shipped checkpoint's sha256, as its record gives it (a test checks it against the file)."""
    return builtin_record()["sha256"]


class PretrainedGridWarning(UserWarning):
    """The shipped encoder is used on another voxel grid than the one it was pretrained on."""


def check_builtin_grid(volume_shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
    """Warn (PretrainedGridWarning) when scans of ``volume_shape`` voxels at ``spacing`` mm are not the grid
    the shipped encoder was pretrained on (its record's ``volume_shape`` over the generator's 384 mm cube)."""
    trained = resolve_grid(tuple(builtin_record()["config"]["volume_shape"]))
    given = (tuple(int(v) for v in volume_shape), tuple(float(v) for v in spacing))
    if given != (tuple(trained.shape), tuple(float(v) for v in trained.spacing)):
        warnings.warn(
            f"the pretrained tiny encoder ({BUILTIN_CHECKPOINT.name}) was trained on {list(trained.shape)} "
            f"voxels of {list(trained.spacing)} mm, not {list(given[0])} of {list(given[1])} mm; its "
            "findings may not carry over (give the demo's defaults, or --encoder-weights random)",
            PretrainedGridWarning,
            stacklevel=2,
        )


def load_builtin_encoder(token_mode: str = "mean_width") -> MerlinImageEncoder:
    """The shipped pretrained tiny encoder (``BUILTIN_CHECKPOINT``), frozen, with ``token_mode``; its
    ``weights_id`` is the file's sha256."""
    return MerlinImageEncoder.from_checkpoint(BUILTIN_CHECKPOINT, tiny_config(token_mode=token_mode))


def record(config: GeneratorPretrainConfig, evaluation: dict, history: list[dict], sha256: str) -> dict:
    """The JSON record saved beside a checkpoint."""
    return {"config": asdict(config), "sha256": sha256, "evaluation": evaluation, "history": history}
