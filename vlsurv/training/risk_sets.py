"""Risk sets wider than one micro-batch: the whole accumulation window (exact) or a memory of recent rows.

With ``optim.grad_accum`` = A micro-batches per optimizer step, ``loss.risk_set`` chooses the rows that the
coupled terms of stage 2 (Cox risk set, DeepHit ranking pairs, dispersion pairs) span:

- ``"micro_batch"``: one micro-batch across processes (vlsurv.training.objective.step_loss).
- ``"window"``: the A micro-batches of the step, exactly as one step with a batch A times larger would see
  them, without holding A graphs in memory (the GradCache trick, Gao et al. 2021). ``cache_window`` runs the
  window's micro-batches forward without grad, recording the RNG state before each (so dropout draws the same
  masks again), and computes the window's survival part S = alpha L_surv + lambda_d L_disp + lambda_a L_align
  over the window's rows gathered from every process, and its gradient g = dS/d(head, z_surv, z_pooled) at
  this process's rows. Then each micro-batch runs forward with grad from its recorded RNG state, and
  ``window_step_loss`` backpropagates P * (NLL_m / T + sum(g_m * out_m)), where T is the window's
  labelled-token count over every
  process: summed over the window, d/dtheta of this is P times this process's share of
  dL/dtheta for L = L_LM (window token mean) + S, and DDP's average over the P processes gives dL/dtheta.
  The model's weights do not change inside a window, so the second forward reproduces the cached outputs.
  Cost: one extra forward pass without grad per micro-batch; memory: the window's inputs and (rows x d)
  outputs.
- ``"memory"``: the micro-batch plus the detached rows (head output, z_surv, time, event) of the
  ``memory_batches`` micro-batches before it, joined to the coupled terms as constants (``RiskMemory``). This
  is torchsurv's ``Momentum`` memory bank without its EMA target network: the remembered rows come from the
  online model, a few optimizer steps old at most. The memory starts empty and is not saved in checkpoints.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlsurv.training.config import LossConfig
from vlsurv.training.distributed import global_sum, world
from vlsurv.training.objective import (
    StepLoss,
    SurvivalRows,
    gathered_rows,
    lm_token_weights,
    local_rows,
    survival_part,
    survival_terms,
    token_nll,
)


class RiskMemory:
    """A FIFO of the detached gathered rows of the last ``capacity`` micro-batches."""

    def __init__(self, capacity: int) -> None:
        self.batches: deque[SurvivalRows] = deque(maxlen=capacity)

    def rows(self) -> SurvivalRows | None:
        """The remembered rows, oldest first (None while empty)."""
        return SurvivalRows.cat(list(self.batches)) if self.batches else None

    def push(self, rows: SurvivalRows) -> None:
        self.batches.append(rows.detached())


def rng_state() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The CPU and CUDA generator states (what dropout draws from)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


@dataclass
class WindowCache:
    """One accumulation window: its micro-batches, the RNG state before each one's forward, the survival
    part's gradient w.r.t. this process's (head, z_surv, z_pooled) of each, the global token count T, logged
    values."""

    batches: list[dict]
    rng_states: list[tuple[torch.Tensor, list[torch.Tensor]]]
    gradients: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    token_count: torch.Tensor
    parts: dict[str, float]


def cache_window(forward: Callable[[dict], object], batches: list[dict], config: LossConfig) -> WindowCache:
    """Forward the window's micro-batches without grad; the window's loss values and dS/d(outputs)."""
    states, leaves, nll_total, token_count = [], [], torch.zeros(()), torch.zeros(())
    with torch.no_grad():
        for batch in batches:
            states.append(rng_state())
            output = forward(batch)
            nll, count = token_nll(output.logits, batch["labels"], lm_token_weights(batch))
            nll_total = nll_total + global_sum(nll).cpu()
            token_count = token_count + global_sum(count.to(torch.float32)).cpu()
            rows = local_rows(output, batch)
            for name in ("head", "z_surv", "z_pooled"):
                setattr(rows, name, getattr(rows, name).detach().requires_grad_(True))
            leaves.append(rows)
    token_count = token_count.clamp(min=1.0)
    with torch.enable_grad():
        window = SurvivalRows.cat([gathered_rows(rows) for rows in leaves])
        terms = survival_terms(window, config)
        part = survival_part(terms, config)
        part.backward()
    gradients = [
        tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in (r.head, r.z_surv, r.z_pooled))
        for r in leaves
    ]
    lm = float(nll_total / token_count)
    parts = {"loss": lm + float(part.detach()), "lm": lm}
    parts.update({name: float(value.detach()) for name, value in terms.items()})
    return WindowCache(batches, states, gradients, token_count, parts)


def window_step_loss(output, batch: dict, cache: WindowCache, index: int) -> StepLoss:
    """What micro-batch ``index`` of the window backpropagates: P * (NLL_m / T + sum(g_m * out_m)).

    Summed over the window this gives the gradient of one step on the whole window; under accelerate's
    accumulation (which divides each micro-batch's loss by A) the caller multiplies by A.
    """
    _, size = world()
    nll, _ = token_nll(output.logits, batch["labels"], lm_token_weights(batch))
    rows = local_rows(output, batch)
    head, z_surv, z_pooled = cache.gradients[index]
    surrogate = (head * rows.head).sum() + (z_surv * rows.z_surv).sum() + (z_pooled * rows.z_pooled).sum()
    lm = nll / cache.token_count.to(nll.device)
    return StepLoss(to_backpropagate=size * (lm + surrogate), parts=dict(cache.parts))
