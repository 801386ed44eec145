"""Survival, dispersion and alignment losses: pure functions of tensors (see docs/DESIGN.md, "Losses").

Conventions: ``time`` (N,) real and finite, ``event`` (N,) in {0, 1} (bool, integer or float; 1 = event
observed), ``bin_index`` (N,) integer DeepHit bin of each time. Every loss returns a 0-d tensor in the dtype
of its first argument that stays attached to the autograd graph, also in its degenerate cases (it is then ``0
* input.sum()``). Bad inputs raise ``LossInputError`` (a ``ValueError``) naming the function, the argument and
what was expected.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, get_args

import torch

from vlsurv.errors import InputError

Ties = Literal["breslow", "efron"]  # how the Cox partial likelihood handles tied event times
TIES: tuple[str, ...] = get_args(Ties)
REDUCTIONS = ("mean", "sum")


class LossInputError(InputError):
    """An argument of a loss has the wrong shape, dtype or values."""


def _zero(reference: torch.Tensor) -> torch.Tensor:
    """A 0-d zero that keeps ``reference``'s graph, so ``backward`` works and yields zero gradients."""
    return reference.sum() * 0.0


def _check_vector(name: str, value: torch.Tensor, length: int, where: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise LossInputError(f"{where}: `{name}` must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 1 or value.shape[0] != length:
        raise LossInputError(f"{where}: `{name}` must have shape ({length},), got {tuple(value.shape)}")


def _check_floating(name: str, value: torch.Tensor, where: str) -> None:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise LossInputError(f"{where}: `{name}` must be a floating-point tensor, got {got}")


def _check_event(event: torch.Tensor, length: int, where: str) -> torch.Tensor:
    """(N,) event -> bool (N,); raises unless every value is 0 or 1."""
    _check_vector("event", event, length, where)
    if event.dtype != torch.bool:
        if event.is_complex() or not bool(((event == 0) | (event == 1)).all()):
            raise LossInputError(f"{where}: `event` must contain only 0 and 1 (1 = event observed)")
    return event.bool()


def _check_time(time: torch.Tensor, length: int, where: str) -> None:
    _check_vector("time", time, length, where)
    if time.dtype == torch.bool or time.is_complex():
        raise LossInputError(f"{where}: `time` must be a real-valued tensor, got {time.dtype}")
    if time.is_floating_point() and not bool(torch.isfinite(time).all()):
        raise LossInputError(f"{where}: `time` must be finite; found NaN or inf")


def _check_bins(bin_index: torch.Tensor, length: int, num_columns: int, where: str) -> None:
    _check_vector("bin_index", bin_index, length, where)
    if bin_index.is_floating_point() or bin_index.dtype == torch.bool or bin_index.is_complex():
        raise LossInputError(f"{where}: `bin_index` must be an integer tensor, got {bin_index.dtype}")
    if length and (int(bin_index.min()) < 0 or int(bin_index.max()) >= num_columns):
        raise LossInputError(
            f"{where}: `bin_index` must lie in [0, {num_columns - 1}] (the logits' columns), "
            f"got values in [{int(bin_index.min())}, {int(bin_index.max())}]"
        )


def cox_loss(
    log_risk: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    ties: str = "breslow",
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Negative Cox partial log-likelihood of log-risks ``log_risk`` (N,) float, in O(N log N).

    With :math:`\xi_k` the distinct event times, :math:`H_k` the events at :math:`\xi_k`
    (:math:`m_k = |H_k|`), :math:`R_k = \{j : t_j \ge \xi_k\}` the risk set,
    :math:`D_k = \sum_{j \in R_k} e^{\eta_j}` and :math:`T_k = \sum_{i \in H_k} e^{\eta_i}`:

    - Breslow: :math:`\ell = \sum_k [\sum_{i \in H_k} \eta_i - m_k \log D_k]`;
    - Efron: :math:`\ell = \sum_k [\sum_{i \in H_k} \eta_i -
      \sum_{r=0}^{m_k-1} \log(D_k - \tfrac{r}{m_k} T_k)]`.

    Returns :math:`-\ell` (``reduction="sum"``) or :math:`-\ell / \sum_i d_i` (``"mean"``, per event;
    torchsurv's "mean" instead averages over distinct event times when there are ties). Rows are sorted by
    time once; the risk-set sums come from a reversed ``logcumsumexp`` read at the first row of each tied
    group, and Efron's terms are computed per event row (its rank ``r`` in its group) as
    :math:`\log D_k + \operatorname{log1p}(-\tfrac{r}{m_k} T_k / D_k)` with
    :math:`T_k / D_k = \sum_{i \in H_k} e^{\eta_i - \log D_k}` (each term at most 1), so all work is
    vectorised and stays in log space (finite for log-risks of any magnitude). Without events the loss is 0
    (graph kept) and a warning is issued.
    """
    where = "cox_loss"
    _check_floating("log_risk", log_risk, where)
    if log_risk.dim() != 1:
        raise LossInputError(f"{where}: `log_risk` must have shape (N,), got {tuple(log_risk.shape)}")
    n = log_risk.shape[0]
    _check_time(time, n, where)
    is_event = _check_event(event, n, where)
    if ties not in TIES:
        raise LossInputError(f"{where}: `ties` must be one of {TIES}, got {ties!r}")
    if reduction not in REDUCTIONS:
        raise LossInputError(f"{where}: `reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    num_events = int(is_event.sum())
    if num_events == 0:
        warnings.warn("cox_loss: no event in the batch; returning a zero loss", stacklevel=2)
        return _zero(log_risk)

    time_sorted, order = torch.sort(time)
    risk_sorted = log_risk[order]
    event_sorted = is_event[order]
    group_start = torch.searchsorted(time_sorted, time_sorted)  # first row of each row's tied-time group
    log_risk_set = torch.logcumsumexp(risk_sorted.flip(0), dim=0).flip(0)  # log sum_{j >= row} exp(eta_j)

    event_rows = event_sorted.nonzero().squeeze(1)
    event_group = group_start[event_rows]
    event_risk = risk_sorted[event_rows]
    log_denominator = log_risk_set[event_group]
    if ties == "efron":
        tied_events = torch.zeros(n, dtype=log_risk.dtype, device=log_risk.device)
        tied_events.index_add_(0, event_group, torch.ones_like(event_risk))
        count = tied_events[event_group]
        events_so_far = torch.cumsum(event_sorted.to(log_risk.dtype), dim=0)
        events_before_group = (events_so_far - event_sorted.to(log_risk.dtype))[event_group]
        rank = events_so_far[event_rows] - 1.0 - events_before_group  # r = 0, ..., m_k - 1 within a group
        # T_k / D_k = sum_{i in H_k} exp(eta_i - log D_k); each term is <= 1 as i is in its own risk set
        tied_share = torch.zeros(n, dtype=log_risk.dtype, device=log_risk.device)
        tied_share = tied_share.index_add(0, event_group, torch.exp(event_risk - log_denominator))[
            event_group
        ]
        tied_share = tied_share.clamp(max=1.0)
        log_denominator = log_denominator + torch.log1p(-(rank / count) * tied_share)
    total = -(event_risk - log_denominator).sum()
    return total / num_events if reduction == "mean" else total


def _check_logits(logits: torch.Tensor, bin_index: torch.Tensor, event: torch.Tensor, where: str):
    _check_floating("logits", logits, where)
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise LossInputError(
            f"{where}: `logits` must have shape (N, K+1) with K >= 1, got {tuple(logits.shape)}"
        )
    n, columns = logits.shape
    _check_bins(bin_index, n, columns, where)
    return _check_event(event, n, where)


def deephit_nll(
    logits: torch.Tensor,
    bin_index: torch.Tensor,
    event: torch.Tensor,
    censored_credit: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""DeepHit negative log-likelihood of ``logits`` (N, K+1) over K cut bins plus the tail bin.

    With :math:`p = \operatorname{softmax}(\text{logits}_i)`, :math:`k = k(i)` = ``bin_index[i]`` (bin k holds
    :math:`(c_{k-1}, c_k]`, :math:`c_{-1} = 0`, bin K the times after :math:`c_{K-1}`),
    :math:`S_k = \sum_{l > k} p_l` the survival at :math:`c_k` (:math:`S_{-1} = 1`) and
    :math:`w_i \in [0, 1]` = ``censored_credit[i]``, the fraction of its bin a censored row survived:

    .. math:: \ell_i = d_i \log p_k + (1 - d_i) [(1 - w_i) \log S_{k-1} + w_i \log S_k],
              \quad L = -\tfrac{1}{N} \sum_i \ell_i,

    computed with ``logsumexp`` (no ``log(0)``). The censoring term interpolates :math:`\log S` linearly
    within the bin, i.e. a constant hazard there, so with :math:`w_i = (t_i - c_{k-1}) / (c_k - c_{k-1})` it
    is :math:`\log S(t_i)` (``DeepHitCuts`` scheme "interpolate", the default). An intercept-only fit then has
    the bin hazards :math:`h_k = p_k / S_{k-1} = d_k / (n_k - \sum_{i \in C_k} (1 - w_i))` (:math:`d_k` events
    in bin k, :math:`n_k` rows in bins :math:`\ge k`, :math:`C_k` the censored rows of bin k): a censored row
    leaves the risk set where it was censored, as in Kaplan-Meier, and with ``DeepHitCuts.from_times``'
    default cuts the fit is within 0.03 of Kaplan-Meier at the cuts on whas500, gbsg2 and flchain
    (tests/test_deephit_km.py). The other schemes: :math:`w = 1/2` ("life_table", the actuarial estimator),
    :math:`w = 1` ("deephit", the original
    convention: survival to the end of the bin, biased up when a bin holds much censoring) and :math:`w = 0`
    ("pycox": only to the cut before, biased down). A row of bin K contributes :math:`\log p_K = \log S_{K-1}`
    (a censored one needs :math:`w = 0`). ``censored_credit=None`` means :math:`w = 1`, which equals pycox's
    ``nll_pmf(phi, idx, events)`` (up to its epsilon) for ``logits = cat(phi, 0)``.
    """
    where = "deephit_nll"
    is_event = _check_logits(logits, bin_index, event, where)
    n, columns = logits.shape
    if censored_credit is None:
        censored_credit = torch.ones(n, dtype=logits.dtype, device=logits.device)
    _check_vector("censored_credit", censored_credit, n, where)
    _check_floating("censored_credit", censored_credit, where)
    if not bool(((censored_credit >= 0) & (censored_credit <= 1)).all()):
        raise LossInputError(f"{where}: `censored_credit` must lie in [0, 1]")
    if bool((~is_event & (bin_index == columns - 1) & (censored_credit > 0)).any()):
        raise LossInputError(
            f"{where}: a censored row has `bin_index` = {columns - 1} (the last column), which has no mass "
            "after it, and `censored_credit` > 0; it must be 0 there (survival only to the last cut)"
        )
    bins = bin_index.long().unsqueeze(1)
    column = torch.arange(columns, device=logits.device).unsqueeze(0)
    log_total = torch.logsumexp(logits, dim=1)
    at_bin = logits.gather(1, bins).squeeze(1)
    log_from = torch.logsumexp(logits.masked_fill(column < bins, -math.inf), dim=1)  # log(S_{k-1} * total)
    after = (column > bins) | (
        bins == columns - 1
    )  # the last column's rows have w = 0: keeps logsumexp finite
    log_after = torch.logsumexp(logits.masked_fill(~after, -math.inf), dim=1)  # log(S_k * total)
    credit = censored_credit.to(logits.dtype)
    log_censored = log_from + credit * (log_after - log_from)
    log_likelihood = torch.where(is_event, at_bin, log_censored) - log_total
    return -log_likelihood.mean()


def deephit_ranking_loss(
    logits: torch.Tensor, bin_index: torch.Tensor, event: torch.Tensor, sigma: float = 0.1
) -> torch.Tensor:
    r"""DeepHit's ranking loss (pycox ``rank_loss_deephit_single``) of ``logits`` (N, K+1); O(N^2) memory.

    With :math:`F_i(k) = \sum_{l \le k} p_{i,l}` the predicted CDF and :math:`k(i)` = ``bin_index[i]``, the
    comparable pairs are :math:`A_{ij} = d_i \cdot [k(i) < k(j) \lor (k(i) = k(j) \land d_j = 0)]` and
    :math:`L = \tfrac{1}{N^2} \sum_{i,j} A_{ij} \exp(-(F_i(k(i)) - F_j(k(i))) / \sigma)`.
    """
    where = "deephit_ranking_loss"
    is_event = _check_logits(logits, bin_index, event, where)
    if not sigma > 0:
        raise LossInputError(f"{where}: `sigma` must be > 0, got {sigma}")
    n = logits.shape[0]
    cdf = torch.softmax(logits, dim=1).cumsum(dim=1)
    cdf_at = cdf.index_select(1, bin_index.long())  # [j, i] = F_j(k(i))
    own = cdf_at.diagonal()  # F_i(k(i))
    difference = own.unsqueeze(1) - cdf_at.transpose(0, 1)  # [i, j] = F_i(k(i)) - F_j(k(i))
    bins_i, bins_j = bin_index.unsqueeze(1), bin_index.unsqueeze(0)
    later = (bins_i < bins_j) | ((bins_i == bins_j) & ~is_event.unsqueeze(0))
    pairs = is_event.unsqueeze(1) & later
    return torch.where(pairs, torch.exp(-difference / sigma), 0.0).sum() / (n * n)


def _squared_distances(z: torch.Tensor) -> torch.Tensor:
    """(M, d) -> (M, M) squared Euclidean distances via the Gram matrix (no (M, M, d) intermediate).

    Rows are centred first: distances do not change and the Gram form loses less to cancellation.
    """
    z = z - z.mean(dim=0, keepdim=True)
    squared_norms = (z * z).sum(dim=1)
    return (squared_norms.unsqueeze(1) + squared_norms.unsqueeze(0) - 2.0 * z @ z.T).clamp(min=0.0)


def _check_embeddings(z: torch.Tensor, where: str) -> int:
    _check_floating("z", z, where)
    if z.dim() != 2:
        raise LossInputError(f"{where}: `z` must have shape (N, d), got {tuple(z.shape)}")
    return z.shape[0]


def dispersion_loss_continuous(
    z: torch.Tensor, time: torch.Tensor, event: torch.Tensor, sigma: float | None = None
) -> torch.Tensor:
    r"""Time-weighted dispersion of the uncensored rows of ``z`` (N, d).

    Over the uncensored rows only:
    :math:`\sum_{i \ne j} w_{ij} \lVert z_i - z_j \rVert^2 / \sum_{i \ne j} w_{ij}` with
    :math:`w_{ij} = \exp(-(t_i - t_j)^2 / (2\sigma^2))`; ``sigma`` defaults to the (unbiased) standard
    deviation of the batch's event times (any positive value when they are all equal, as every weight is then
    1). The normalised weights are a softmax of the log-weights, so no underflow gives 0/0. 0 with fewer than
    two uncensored rows.
    """
    where = "dispersion_loss_continuous"
    n = _check_embeddings(z, where)
    _check_time(time, n, where)
    is_event = _check_event(event, n, where)
    if sigma is not None and not sigma > 0:
        raise LossInputError(f"{where}: `sigma` must be > 0 or None, got {sigma}")
    if int(is_event.sum()) < 2:
        return _zero(z)
    z_events = z[is_event]
    times = time[is_event].to(z.dtype)
    if sigma is None:
        spread = float(times.std())
        sigma = spread if spread > 0 else 1.0
    gaps = times.unsqueeze(1) - times.unsqueeze(0)
    log_weights = -(gaps * gaps) / (2.0 * sigma * sigma)
    off_diagonal = ~torch.eye(len(times), dtype=torch.bool, device=z.device)
    weights = torch.softmax(log_weights.masked_fill(~off_diagonal, -math.inf).flatten(), dim=0)
    return (weights * _squared_distances(z_events).flatten()).sum()


def dispersion_loss_discrete(
    z: torch.Tensor, bin_index: torch.Tensor, event: torch.Tensor, tau: float = 0.5
) -> torch.Tensor:
    r"""Spread of the time-bin prototypes of the uncensored rows of ``z`` (N, d).

    With :math:`\mu_g` the L2-normalised mean of the uncensored rows in bin g and G the number of such bins:
    :math:`\tfrac{1}{G} \sum_g \log[\tfrac{1}{G-1} \sum_{h \ne g} \exp(\mu_g \cdot \mu_h / \tau)]`
    (a logsumexp); 0 when fewer than two bins are present.
    """
    where = "dispersion_loss_discrete"
    n = _check_embeddings(z, where)
    _check_vector("bin_index", bin_index, n, where)
    if bin_index.is_floating_point() or bin_index.dtype == torch.bool or bin_index.is_complex():
        raise LossInputError(f"{where}: `bin_index` must be an integer tensor, got {bin_index.dtype}")
    is_event = _check_event(event, n, where)
    if not tau > 0:
        raise LossInputError(f"{where}: `tau` must be > 0, got {tau}")
    groups, group_of_row = torch.unique(bin_index[is_event], return_inverse=True)
    num_groups = groups.numel()
    if num_groups < 2:
        return _zero(z)
    z_events = z[is_event]
    sums = torch.zeros(num_groups, z.shape[1], dtype=z.dtype, device=z.device).index_add(
        0, group_of_row, z_events
    )
    counts = torch.bincount(group_of_row, minlength=num_groups).to(z.dtype)
    prototypes = torch.nn.functional.normalize(sums / counts.unsqueeze(1), dim=1)
    similarity = prototypes @ prototypes.T / tau
    diagonal = torch.eye(num_groups, dtype=torch.bool, device=z.device)
    per_group = torch.logsumexp(similarity.masked_fill(diagonal, -math.inf), dim=1) - math.log(num_groups - 1)
    return per_group.mean()


def alignment_loss(z_surv: torch.Tensor, z_pooled: torch.Tensor) -> torch.Tensor:
    r"""Mean squared distance :math:`\tfrac{1}{N} \sum_i \lVert z_{surv,i} - z_{pooled,i} \rVert^2` of two (N,
    d)."""
    where = "alignment_loss"
    _check_floating("z_surv", z_surv, where)
    _check_floating("z_pooled", z_pooled, where)
    if z_surv.dim() != 2 or z_surv.shape != z_pooled.shape:
        raise LossInputError(
            f"{where}: `z_surv` and `z_pooled` must both have shape (N, d), got {tuple(z_surv.shape)} and "
            f"{tuple(z_pooled.shape)}"
        )
    return ((z_surv - z_pooled) ** 2).sum(dim=1).mean()


def piecewise_exponential_loss(
    log_hazard: torch.Tensor, log_time: torch.Tensor, is_event: torch.Tensor
) -> torch.Tensor:
    r"""MOTOR's piecewise-exponential negative log-likelihood; all three arguments are (B, bins, tasks).

    Each task's hazard is constant within a time bin: :math:`\lambda_{ikj} = \exp(\eta_{ikj})` with
    :math:`\eta` = ``log_hazard``. With :math:`r_{ikj}` the time scan i spent at risk for task j in bin k
    (``log_time`` = :math:`\log r`, :math:`-\infty` where :math:`r = 0`) and :math:`d_{ikj}` = ``is_event``
    (1 in the bin holding the task's event, else 0), the log-likelihood of a piecewise-exponential time is
    :math:`\sum_{k} [d_{ikj} \eta_{ikj} - \lambda_{ikj} r_{ikj}]`, and the loss is its mean over the
    :math:`M = B \cdot \text{bins} \cdot \text{tasks}` cells:

    .. math:: L = \tfrac{1}{M} \sum_{i,k,j} \exp(\eta_{ikj} + \log r_{ikj})
              - \tfrac{1}{M} \sum_{i,k,j} d_{ikj}\, \eta_{ikj}.

    This is femr's ``MOTORTaskHead`` loss in natural logarithms (femr writes :math:`\log_2` hazards and
    times; the two differ only by the constant factor :math:`\ln 2` on :math:`\eta`). A cell with
    :math:`r = 0` adds :math:`\exp(-\infty) = 0` and no gradient.
    """
    where = "piecewise_exponential_loss"
    _check_floating("log_hazard", log_hazard, where)
    _check_floating("log_time", log_time, where)
    if log_hazard.dim() != 3:
        raise LossInputError(
            f"{where}: `log_hazard` must have shape (B, bins, tasks), got {tuple(log_hazard.shape)}"
        )
    for name, value in (("log_time", log_time), ("is_event", is_event)):
        if not isinstance(value, torch.Tensor) or value.shape != log_hazard.shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise LossInputError(
                f"{where}: `{name}` must have the shape of `log_hazard` {tuple(log_hazard.shape)}, got {got}"
            )
    if bool((torch.isnan(log_time) | (log_time == math.inf)).any()):
        raise LossInputError(
            f"{where}: `log_time` must be finite or -inf (zero time at risk); found NaN or +inf"
        )
    if is_event.dtype != torch.bool and (
        is_event.is_complex() or not bool(((is_event == 0) | (is_event == 1)).all())
    ):
        raise LossInputError(
            f"{where}: `is_event` must contain only 0 and 1 (1 = the event falls in the bin)"
        )
    log_time = log_time.to(log_hazard.dtype)
    exposure = torch.exp(log_hazard + log_time).mean()
    event_term = torch.where(is_event.bool(), log_hazard, torch.zeros_like(log_hazard)).mean()
    return exposure - event_term


def objective(
    lm_loss: torch.Tensor | None,
    surv_loss: torch.Tensor | None,
    disp_loss: torch.Tensor | None,
    align_loss: torch.Tensor | None,
    alpha: float = 0.5,
    lambda_d: float = 1.0,
    lambda_a: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_LM + alpha L_surv + lambda_d L_disp + lambda_a L_align over the components that are not None.

    Returns (total 0-d tensor with grad, {"lm", "surv", "disp", "align" (those present), "total"} as floats).
    Stage 1 passes only ``lm_loss``.
    """
    weighted = {
        "lm": (lm_loss, 1.0),
        "surv": (surv_loss, alpha),
        "disp": (disp_loss, lambda_d),
        "align": (align_loss, lambda_a),
    }
    present = {name: pair for name, pair in weighted.items() if pair[0] is not None}
    if not present:
        raise LossInputError("objective: every loss component is None; expected at least one tensor")
    for name, (value, _) in present.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise LossInputError(f"objective: `{name}` must be a 0-d tensor or None, got {value!r}")
    total = sum(weight * value for value, weight in present.values())
    parts = {name: float(value.detach()) for name, (value, _) in present.items()}
    parts["total"] = float(total.detach())
    return total, parts
