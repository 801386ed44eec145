"""The per-step training loss of both stages, computed over the global batch (see vlsurv.training.distributed).

Stage 1: L = L_LM, the mean token NLL of the answer tokens of the global batch.
Stage 2: L = L_LM + alpha L_surv + lambda_d L_disp + lambda_a L_align (vlsurv.losses.objective), with
- DeepSurv: L_surv = Cox partial likelihood (``loss.ties``), L_disp = continuous dispersion on time;
- DeepHit: L_surv = DeepHit NLL (+ ``deephit_ranking_weight`` x ranking loss) on the cut bins of the time,
  L_disp = discrete dispersion over the bins;
and L_align between z_surv and z_pooled. Time, event, the head's output, z_surv and z_pooled are gathered from all
processes, so the risk set and the dispersion pairs span the global batch.

``StepLoss.backward`` is what the process backpropagates (world size x its share of L); ``StepLoss.parts`` holds
the global values of L and its components (floats, equal on every process) for logging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlsurv import losses
from vlsurv.model.processor import IGNORE_INDEX
from vlsurv.model.survival import DeepHitCuts
from vlsurv.training.config import LossConfig
from vlsurv.training.distributed import all_sizes, gather_with_grad, global_sum, world


@dataclass
class StepLoss:
    backward: torch.Tensor
    parts: dict[str, float]


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, V) logits, (B, L) labels -> (sum of next-token NLL over labelled tokens, their count)."""
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:].to(shifted_logits.device)
    total = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, (shifted_labels != IGNORE_INDEX).sum()


def lm_share(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(this process's share of the global token-mean L_LM with grad, the global L_LM value)."""
    nll_sum, count = token_nll(logits, labels)
    global_count = global_sum(count.to(torch.float32)).clamp(min=1.0)
    return nll_sum / global_count, global_sum(nll_sum) / global_count


def survival_terms(
    output, batch: dict, config: LossConfig, cuts: DeepHitCuts | None
) -> dict[str, torch.Tensor]:
    """L_surv, L_disp, L_align over the global batch (gradient through this process's samples)."""
    survival = output.survival
    device = survival.z_surv.device
    sizes = all_sizes(survival.z_surv.shape[0], device)
    time = gather_with_grad(batch["time"].to(device=device, dtype=torch.float32), sizes)
    event = gather_with_grad(batch["event"].to(device), sizes)
    z_surv = gather_with_grad(survival.z_surv.float(), sizes)
    z_pooled = gather_with_grad(output.z_pooled.float(), sizes)
    if survival.log_risk is not None:
        log_risk = gather_with_grad(survival.log_risk.float(), sizes)
        surv = losses.cox_loss(log_risk, time, event, ties=config.ties)
        disp = losses.dispersion_loss_continuous(z_surv, time, event, sigma=config.dispersion_sigma)
    else:
        logits = gather_with_grad(survival.logits.float(), sizes)
        bins = cuts.bin_index(time.detach().cpu()).to(device)
        surv = losses.deephit_nll(logits, bins, event)
        if config.deephit_ranking_weight > 0:
            ranking = losses.deephit_ranking_loss(logits, bins, event, sigma=config.deephit_ranking_sigma)
            surv = surv + config.deephit_ranking_weight * ranking
        disp = losses.dispersion_loss_discrete(z_surv, bins, event, tau=config.dispersion_tau)
    return {"surv": surv, "disp": disp, "align": losses.alignment_loss(z_surv, z_pooled)}


def step_loss(
    output, batch: dict, stage: int, config: LossConfig, cuts: DeepHitCuts | None = None
) -> StepLoss:
    """The stage's loss for one micro-batch; ``output`` is a ``VLMOutput`` of this process's samples."""
    _, size = world()
    lm_local, lm_value = lm_share(output.logits, batch["labels"])
    if stage == 1:
        return StepLoss(backward=size * lm_local, parts={"loss": float(lm_value), "lm": float(lm_value)})
    terms = survival_terms(output, batch, config, cuts)
    weights = {"alpha": config.alpha, "lambda_d": config.lambda_d, "lambda_a": config.lambda_a}
    total_local, _ = losses.objective(lm_local, terms["surv"], terms["disp"], terms["align"], **weights)
    total_value, _ = losses.objective(
        lm_value, terms["surv"].detach(), terms["disp"].detach(), terms["align"].detach(), **weights
    )
    parts = {"loss": float(total_value), "lm": float(lm_value)}
    parts.update({name: float(value.detach()) for name, value in terms.items()})
    return StepLoss(backward=size * total_local, parts=parts)
