"""The per-step training loss of both stages, computed over the global batch (see
vlsurv.training.distributed).

Stage 1: L = L_LM, the mean token NLL of the answer tokens of the global batch (each row's tokens weighted by
its ``answer_weight`` when ``loss.answer_balance`` > 0, vlsurv.training.answer_status.answer_weights, and the
opening's tokens from the decision on by ``status_weight`` when ``loss.status_weight`` > 1;
``lm_token_weights``).
Stage 2: L = L_LM + alpha L_surv + lambda_d L_disp + lambda_a L_align (vlsurv.losses.objective), with
- DeepSurv: L_surv = Cox partial likelihood (``loss.ties``), L_disp = continuous dispersion on time;
- DeepHit: L_surv = DeepHit NLL (+ ``deephit_ranking_weight`` x ranking loss) on the labels of the cuts'
  censoring scheme (``DeepHitCuts.labels``, computed once per sample by ``SampleDataset.set_deephit_cuts`` and
  carried by the batch), L_disp = discrete dispersion over the bins;
and L_align between z_surv and z_pooled. Time, event, the head's output, z_surv and z_pooled are gathered from
all processes, so the risk set and the dispersion pairs span the global batch of one micro-batch
(``loss.risk_set`` "micro_batch"); vlsurv.training.risk_sets widens them to the accumulation window or joins a
memory of earlier rows.

``StepLoss.to_backpropagate`` is what the process backpropagates (world size x its share of L);
``StepLoss.parts`` holds the global values of L and its components (floats, equal on every process) for
logging.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from vlsurv import losses
from vlsurv.model.processor import IGNORE_INDEX
from vlsurv.model.survival import SurvivalConfigError
from vlsurv.training.config import LossConfig
from vlsurv.training.distributed import all_sizes, gather_with_grad, global_sum, world


@dataclass
class StepLoss:
    """``to_backpropagate`` (0-d, with grad), ``parts`` (logged floats), ``rows`` (stage 2: the gathered rows,
    detached, for a risk-set memory)."""

    to_backpropagate: torch.Tensor
    parts: dict[str, float]
    rows: SurvivalRows | None = None


def lm_token_weights(batch: dict) -> torch.Tensor | None:
    """The L_LM weights of a batch for ``token_nll``: None (plain token mean), the (B,) ``answer_weight``
    rows, or, when items carry ``status_position``, ``status_end`` and ``status_weight``
    (``SampleDataset.set_status_weight``), a (B, L) weight per label position: the row's weight everywhere,
    times ``status_weight`` on the opening's tokens from the decision token on, [status_position, status_end),
    and on the sentence's naming of the opening's location, [location_position, location_end).
    """
    rows = batch.get("answer_weight")
    positions = batch.get("status_position")
    if positions is None:
        return rows
    device = positions.device  # the batch's device (accelerate may have moved it)
    weights = torch.ones(batch["labels"].shape, dtype=torch.float32, device=device)
    if rows is not None:
        weights = weights * rows.to(device=device, dtype=torch.float32).unsqueeze(1)
    index = torch.arange(weights.shape[1], device=device).unsqueeze(0)

    def span(start: str, end: str) -> torch.Tensor:
        return (index >= batch[start].to(device).unsqueeze(1)) & (index < batch[end].to(device).unsqueeze(1))

    decided = span("status_position", "status_end") | span("location_position", "location_end")
    weight = batch["status_weight"].to(device=device, dtype=torch.float32).unsqueeze(1)
    return torch.where(decided, weights * weight, weights)


def token_nll(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, V) logits, (B, L) labels -> (sum of next-token NLL over labelled tokens, their count).

    ``weights`` (``lm_token_weights``): (B,) row weights, every token of row b counting w_b times, or (B, L)
    weights of the label positions; each token counts with its weight in both the sum and the count, so
    sum / count is the weighted token mean.
    """
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:].to(shifted_logits.device)
    nll = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shifted_labels.shape)
    labelled = (shifted_labels != IGNORE_INDEX).to(nll.dtype)
    if weights is None:
        return nll.sum(), labelled.sum().long()
    weights = weights.to(device=nll.device, dtype=nll.dtype)
    per_token = (weights[:, 1:] if weights.ndim == 2 else weights.unsqueeze(1)) * labelled
    return (nll * per_token).sum(), per_token.sum()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """0-d global token-mean L_LM whose gradient is this process's share (local NLL sum / global token count):
    the value is the global one, the rest of the global sum is added as a constant. ``weights``: see
    ``token_nll``."""
    nll_sum, count = token_nll(logits, labels, weights)
    global_count = global_sum(count.to(torch.float32)).clamp(min=1.0)
    share = nll_sum / global_count
    return share + (global_sum(nll_sum) / global_count - share.detach())


@dataclass
class SurvivalRows:
    """The survival tensors of N rows: ``time`` (N,) float32, ``event`` (N,), ``head`` (N,) DeepSurv log-risk
    or (N, K+1) DeepHit logits, ``z_surv`` and ``z_pooled`` (N, d) float32; for a DeepHit head also the labels
    of the
    batch (``DeepHitCuts.labels``): ``bin_index`` (N,) long, ``binned_event`` (N,) bool, ``censored_credit``
    (N,)."""

    time: torch.Tensor
    event: torch.Tensor
    head: torch.Tensor
    z_surv: torch.Tensor
    z_pooled: torch.Tensor
    bin_index: torch.Tensor | None = None
    binned_event: torch.Tensor | None = None
    censored_credit: torch.Tensor | None = None

    def apply(self, function) -> SurvivalRows:
        """``function`` on every tensor (the DeepHit labels left None when absent)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return SurvivalRows(**{name: None if t is None else function(t) for name, t in values.items()})

    def detached(self) -> SurvivalRows:
        return self.apply(torch.Tensor.detach)

    @staticmethod
    def cat(parts: list[SurvivalRows]) -> SurvivalRows:
        columns = {f.name: [getattr(p, f.name) for p in parts] for f in fields(SurvivalRows)}
        return SurvivalRows(
            **{
                name: None if column[0] is None else torch.cat(column, dim=0)
                for name, column in columns.items()
            }
        )


DEEPHIT_LABELS = ("bin_index", "binned_event", "censored_credit")


def local_rows(output, batch: dict) -> SurvivalRows:
    """This process's rows of a ``VLMOutput`` and its batch (gradient kept); a DeepHit head needs the batch's
    labels (``SampleDataset.set_deephit_cuts``)."""
    survival = output.survival
    device = survival.z_surv.device
    head = survival.log_risk if survival.log_risk is not None else survival.logits
    labels = {}
    if survival.log_risk is None:
        missing = [key for key in DEEPHIT_LABELS if key not in batch]
        if missing:
            raise SurvivalConfigError(
                f"DeepHit step: the batch has no {missing}; expected the labels of the cuts, given "
                "by a dataset "
                "labelled with SampleDataset.set_deephit_cuts(cuts)"
            )
        labels = {key: batch[key].to(device) for key in DEEPHIT_LABELS}
    return SurvivalRows(
        time=batch["time"].to(device=device, dtype=torch.float32),
        event=batch["event"].to(device),
        head=head.float(),
        z_surv=survival.z_surv.float(),
        z_pooled=output.z_pooled.float(),
        **labels,
    )


def gathered_rows(rows: SurvivalRows) -> SurvivalRows:
    """The rows of every process in rank order (gradient through this process's rows only)."""
    sizes = all_sizes(rows.time.shape[0], rows.time.device)
    return rows.apply(lambda t: gather_with_grad(t, sizes))


def survival_terms(
    rows: SurvivalRows, config: LossConfig, memory: SurvivalRows | None = None
) -> dict[str, torch.Tensor]:
    """L_surv, L_disp, L_align over ``rows`` (N rows, usually the gathered global batch).

    ``memory`` (M rows, detached) joins the coupled terms as constants: the Cox risk set, the DeepHit ranking
    pairs and the dispersion pairs span N + M rows; the DeepHit NLL and L_align, which are sums over single
    rows, stay over the N rows.
    """
    n = rows.time.shape[0]
    joined = rows if memory is None else SurvivalRows.cat([rows, memory])
    time, event, z_surv = joined.time, joined.event, joined.z_surv
    if rows.head.dim() == 1:
        surv = losses.cox_loss(joined.head, time, event, ties=config.ties)
        disp = losses.dispersion_loss_continuous(z_surv, time, event, sigma=config.dispersion_sigma)
    else:
        logits, bins, binned_event = joined.head, joined.bin_index, joined.binned_event
        credit = joined.censored_credit[:n].to(dtype=logits.dtype)
        surv = losses.deephit_nll(logits[:n], bins[:n], binned_event[:n], credit)
        if config.deephit_ranking_weight > 0:
            ranking = losses.deephit_ranking_loss(
                logits, bins, binned_event, sigma=config.deephit_ranking_sigma
            )
            surv = surv + config.deephit_ranking_weight * ranking
        disp = losses.dispersion_loss_discrete(z_surv, bins, event, tau=config.dispersion_tau)
    return {"surv": surv, "disp": disp, "align": losses.alignment_loss(rows.z_surv, rows.z_pooled)}


def weighted_total(
    lm: torch.Tensor | None, terms: dict[str, torch.Tensor], config: LossConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """``losses.objective`` with the configured weights: L_LM (when given) + alpha L_surv + lambda_d L_disp +
    lambda_a L_align, and its parts as floats."""
    return losses.objective(
        lm,
        terms["surv"],
        terms["disp"],
        terms["align"],
        alpha=config.alpha,
        lambda_d=config.lambda_d,
        lambda_a=config.lambda_a,
    )


def survival_part(terms: dict[str, torch.Tensor], config: LossConfig) -> torch.Tensor:
    """alpha L_surv + lambda_d L_disp + lambda_a L_align (the objective without L_LM)."""
    return weighted_total(None, terms, config)[0]


def lobe_loss(logits: torch.Tensor, lobe: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (B, 5) lobe logits over the rows whose ``lobe`` (B,) is a class index (>= 0; -1:
    no lobe); 0 (with grad) when no row has one. This process's rows only: the scale of L_LM's local mean."""
    known = lobe >= 0
    if not bool(known.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[known].float(), lobe[known])


def step_loss(
    output, batch: dict, stage: int, config: LossConfig, memory: SurvivalRows | None = None
) -> StepLoss:
    """The stage's loss for one micro-batch; ``output`` is a ``VLMOutput`` of this process's samples.

    ``memory``: detached rows of earlier micro-batches joined to the coupled terms (``loss.risk_set=memory``).
    ``StepLoss.rows`` holds this micro-batch's gathered rows, detached (stage 2), for the memory.
    """
    _, size = world()
    lm = lm_loss(output.logits, batch["labels"], lm_token_weights(batch))
    if stage == 1:
        value = float(lm.detach())
        if output.lobe_logits is None or config.lobe_weight == 0:
            return StepLoss(to_backpropagate=size * lm, parts={"loss": value, "lm": value})
        lobe = lobe_loss(output.lobe_logits, batch["lobe"])
        total = lm + config.lobe_weight * lobe
        parts = {"loss": float(total.detach()), "lm": value, "lobe": float(lobe.detach())}
        return StepLoss(to_backpropagate=size * total, parts=parts)
    rows = gathered_rows(local_rows(output, batch))
    terms = survival_terms(rows, config, memory)
    total, parts = weighted_total(lm, terms, config)
    parts = {"loss": parts.pop("total"), **parts}
    return StepLoss(to_backpropagate=size * total, parts=parts, rows=rows.detached())
