"""The survival branch: residual adapter + DeepSurv or DeepHit head, and DeepHit's time cuts.

- ``ResidualAdapter``: z_surv = r * MLP(z) + (1 - r) * z, MLP = Linear(d, d/q)-ReLU-Linear(d/q, d)-ReLU
  (CLIP-Adapter style; r = 0.2, q = 4 by default).
- ``SurvivalBranch``: adapter then head. DeepSurv: Linear(d, 1) -> log-risk (B,). DeepHit: Linear(d, K+1) ->
  logits (B, K+1), softmax over K time bins plus one tail bin "beyond the last cut".
- ``DeepHitCuts``: K cut times at quantiles of the training event times, and the censoring scheme of the
  training labels (``labels(time, event)``; see ``vlsurv.losses.deephit_nll``); bin k holds (cut_{k-1},
  cut_k], bin K the times after the last cut. Both are saved with the model in ``deephit_cuts.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from vlsurv.config import ConfigError, bounded, check_fields, invalid

SurvivalHead = Literal["deepsurv", "deephit"]
# The ranking score of a DeepHit head: minus the expected time, or the CIF at ``horizon``.
DeepHitRisk = Literal["expected_time", "cif_at_horizon"]
HEADS: tuple[str, ...] = get_args(SurvivalHead)
DEEPHIT_RISKS: tuple[str, ...] = get_args(DeepHitRisk)
# How much of its bin a censored row is credited with surviving (the NLL's censoring term;
# losses.deephit_nll): "interpolate" the fraction of the bin it was followed, "life_table" half, "deephit" all
# (the original DeepHit convention), "pycox" none (pycox's label transform).
DeepHitCensoring = Literal["interpolate", "life_table", "deephit", "pycox"]
# Where the K cuts go: "event_quantiles_with_tail" at the k/(K+1) quantiles of the event times (the tail bin
# after the last cut holds as many events as a bin), "event_quantiles" at the k/K quantiles (the last cut is
# the largest event time, the original scheme).
DeepHitCutPlacement = Literal["event_quantiles_with_tail", "event_quantiles"]
# The DeepHit head's bias at the start of stage 2: "marginal" the intercept-only fit (the head starts at the
# training set's distribution, as MOTOR's task biases start at base rates), "random" nn.Linear's default init.
DeepHitInit = Literal["marginal", "random"]
DEEPHIT_CENSORING: tuple[str, ...] = get_args(DeepHitCensoring)
DEEPHIT_CUT_PLACEMENTS: tuple[str, ...] = get_args(DeepHitCutPlacement)


class SurvivalConfigError(ConfigError):
    """A survival-branch setting or DeepHit cut that is not what is expected."""


@dataclass
class SurvivalConfig:
    """Survival branch settings (``survival:`` in the model config)."""

    head: SurvivalHead = "deepsurv"
    """DeepSurv (a log-risk, Cox loss) or DeepHit (a distribution over time bins)."""
    num_bins: int = bounded(10, ge=1)
    """DeepHit: time cuts K (K + 1 bins with the tail bin)."""
    adapter_ratio: float = bounded(0.2, ge=0.0, le=1.0)
    """Residual adapter mix r: r * MLP(z) + (1 - r) * z."""
    adapter_reduction: int = bounded(4, ge=1)
    """Residual adapter bottleneck: hidden width d / reduction."""
    deephit_risk: DeepHitRisk = "expected_time"
    """DeepHit's ranking score: minus the expected time, or the CIF at ``horizon``."""
    horizon: float | None = None
    """Time of ``cif_at_horizon`` (required for it)."""
    deephit_censoring: DeepHitCensoring = "interpolate"
    """How much of its bin a censored row is credited with surviving (see DeepHitCensoring)."""
    deephit_cut_placement: DeepHitCutPlacement = "event_quantiles_with_tail"
    """Where the K cuts go among the training event times (see DeepHitCutPlacement)."""
    deephit_init: DeepHitInit = "marginal"
    """DeepHit head bias at the start of stage 2: the training set's marginal (the intercept-only fit) or
    nn.Linear's random init."""
    covariates: list[str] = field(default_factory=list)
    """Fields of the clinical template (e.g. [age, sex, smoking, stage]) that the head also reads directly,
    as a linear term beside z_surv (``vlsurv.data.covariates``; numeric fields standardised and categorical
    ones one-hot on stage 2's training rows); [] = the head reads z_surv alone, as in the paper."""

    def __post_init__(self) -> None:
        check_fields(self, "survival", SurvivalConfigError)
        if self.head == "deephit" and self.deephit_risk == "cif_at_horizon" and self.horizon is None:
            raise invalid(
                "survival", "horizon", "required when deephit_risk is 'cif_at_horizon'", SurvivalConfigError
            )


@dataclass
class SurvivalOutput:
    """z_surv (B, d); ``log_risk`` (B,) for DeepSurv or ``logits`` (B, K+1) for DeepHit (the other is
    None)."""

    z_surv: torch.Tensor
    log_risk: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class ResidualAdapter(nn.Module):
    """z -> ratio * MLP(z) + (1 - ratio) * z on (B, d)."""

    def __init__(self, d: int, ratio: float = 0.2, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, d // reduction)
        self.ratio = ratio
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d), nn.ReLU())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.ratio * self.mlp(z) + (1.0 - self.ratio) * z


class SurvivalBranch(nn.Module):
    """Residual adapter + head on z_pooled (B, d), plus ``covariate_head`` on (B, p) clinical covariates once
    ``add_covariates(p)`` made one -> ``SurvivalOutput``."""

    def __init__(self, d: int, config: SurvivalConfig | None = None) -> None:
        super().__init__()
        self.config = config or SurvivalConfig()
        self.adapter = ResidualAdapter(d, self.config.adapter_ratio, self.config.adapter_reduction)
        out = 1 if self.config.head == "deepsurv" else self.config.num_bins + 1
        self.head = nn.Linear(d, out)
        self.covariate_head: nn.Linear | None = None

    def add_covariates(self, size: int) -> None:
        """A zero-initialised linear term ``Linear(size, out, bias=False)`` on (B, size) covariates (so the
        branch starts as it was); it trains when the rest of the branch does."""
        if size < 1:
            raise SurvivalConfigError(f"add_covariates: expected at least one covariate column, got {size}")
        self.covariate_head = nn.Linear(size, self.head.out_features, bias=False).to(self.head.weight)
        nn.init.zeros_(self.covariate_head.weight)
        self.covariate_head.requires_grad_(self.head.weight.requires_grad)

    def forward(self, z_pooled: torch.Tensor, covariates: torch.Tensor | None = None) -> SurvivalOutput:
        z_surv = self.adapter(z_pooled)
        out = self.head(z_surv)
        if self.covariate_head is not None:
            expected = (z_pooled.shape[0], self.covariate_head.in_features)
            if covariates is None or tuple(covariates.shape) != expected:
                got = "none" if covariates is None else f"shape {tuple(covariates.shape)}"
                raise SurvivalConfigError(
                    f"the survival head reads {expected[1]} clinical covariate columns "
                    f"(survival.covariates {self.config.covariates}); expected covariates of shape "
                    f"{expected}, got {got}"
                )
            out = out + self.covariate_head(covariates.to(out))
        if self.config.head == "deepsurv":
            return SurvivalOutput(z_surv=z_surv, log_risk=out.squeeze(-1))
        return SurvivalOutput(z_surv=z_surv, logits=out)

    @torch.no_grad()
    def start_at_marginal(self, log_probabilities: torch.Tensor) -> None:
        """DeepHit: head bias = ``log_probabilities`` (K+1,), the intercept-only fit, so the head starts at
        the training set's marginal distribution plus each patient's ``W z`` (the weight keeps its init, so
        patients are ranked from the first step) and training learns the deviations, not the base rates."""
        if self.config.head != "deephit" or log_probabilities.shape != self.head.bias.shape:
            raise SurvivalConfigError(
                f"start_at_marginal: expected a DeepHit head and {tuple(self.head.bias.shape)} "
                "log-probabilities, "
                f"got head {self.config.head!r} and {tuple(log_probabilities.shape)}"
            )
        self.head.bias.copy_(log_probabilities.to(self.head.bias))


@dataclass
class DeepHitLabels:
    """Training labels of N rows on K cuts (see ``vlsurv.losses.deephit_nll``).

    ``bin_index`` (N,) long in [0, K] (K = after the last cut); ``event`` (N,) bool, an event after the last
    cut counts as censored at it; ``censored_credit`` (N,) float64 in [0, 1], the fraction of its bin a
    censored row is credited with surviving (0 in bin K).
    """

    bin_index: torch.Tensor
    event: torch.Tensor
    censored_credit: torch.Tensor


class DeepHitCuts:
    """K increasing cut times (float64) and the censoring scheme of the labels; bin k covers (cut_{k-1},
    cut_k] (cut_{-1} = 0), bin K the times after the last cut. ``placement`` records how the cuts were chosen
    (None when they were given or the file predates it)."""

    FILE_NAME = "deephit_cuts.json"

    def __init__(
        self, cuts, censoring: DeepHitCensoring = "interpolate", placement: DeepHitCutPlacement | None = None
    ) -> None:
        cuts = torch.as_tensor(cuts, dtype=torch.float64).flatten()
        if cuts.numel() < 1 or not bool(torch.all(cuts[1:] > cuts[:-1])):
            raise SurvivalConfigError(
                f"DeepHit cuts: expected strictly increasing times, got {cuts.tolist()}"
            )
        if censoring not in DEEPHIT_CENSORING:
            raise SurvivalConfigError(
                f"DeepHit censoring: expected one of {DEEPHIT_CENSORING}, got {censoring!r}"
            )
        if placement is not None and placement not in DEEPHIT_CUT_PLACEMENTS:
            raise SurvivalConfigError(
                f"DeepHit cut placement: expected one of {DEEPHIT_CUT_PLACEMENTS} or null, got {placement!r}"
            )
        self.cuts = cuts
        self.censoring = censoring
        self.placement = placement

    @property
    def num_bins(self) -> int:
        return int(self.cuts.numel())

    @classmethod
    def from_times(
        cls,
        time,
        event,
        num_bins: int,
        placement: DeepHitCutPlacement = "event_quantiles_with_tail",
        censoring: DeepHitCensoring = "interpolate",
    ) -> DeepHitCuts:
        """Cuts at quantiles of the event times (rows with event == 1): the k/(K+1) quantiles, k = 1..K, for
        ``event_quantiles_with_tail``, the k/K quantiles for ``event_quantiles``."""
        time = torch.as_tensor(time, dtype=torch.float64).flatten()
        event = torch.as_tensor(event).flatten().bool()
        event_times = time[event]
        if event_times.numel() == 0:
            raise SurvivalConfigError(
                "DeepHit cuts: the training set has no event (event == 1); expected at least one"
            )
        if placement not in DEEPHIT_CUT_PLACEMENTS:
            raise SurvivalConfigError(
                f"DeepHit cut placement: expected one of {DEEPHIT_CUT_PLACEMENTS}, got {placement!r}"
            )
        steps = num_bins + 1 if placement == "event_quantiles_with_tail" else num_bins
        levels = torch.arange(1, num_bins + 1, dtype=torch.float64) / steps
        cuts = torch.unique(torch.quantile(event_times, levels))
        if cuts.numel() < num_bins:
            raise SurvivalConfigError(
                f"DeepHit cuts: only {cuts.numel()} distinct quantiles of {event_times.numel()} event times; "
                f"expected survival.num_bins = {num_bins}, lower it"
            )
        return cls(cuts, censoring=censoring, placement=placement)

    def bin_index(self, time) -> torch.Tensor:
        """(N,) long bin of each time in [0, K]: searchsorted(cuts, time), K = after the last cut."""
        time = torch.as_tensor(time, dtype=torch.float64)
        return torch.searchsorted(self.cuts, time.contiguous())

    def labels(self, time, event) -> DeepHitLabels:
        """``DeepHitLabels`` of ``time`` (N,) and ``event`` (N,) under this censoring scheme (CPU tensors)."""
        time = torch.as_tensor(time, dtype=torch.float64).flatten()
        bins = self.bin_index(time)
        after_last = bins == self.num_bins
        inside = bins.clamp(max=self.num_bins - 1)
        lower = torch.cat([self.cuts.new_zeros(1), self.cuts])[inside]
        upper = self.cuts[inside]
        if self.censoring == "interpolate":
            width = upper - lower  # 0 or less only in bin 0 when cut_0 <= 0: the row survived to cut_0
            credit = torch.where(width > 0, ((time - lower) / width).clamp(0.0, 1.0), 1.0)
        else:
            credit = torch.full_like(time, {"life_table": 0.5, "deephit": 1.0, "pycox": 0.0}[self.censoring])
        event = torch.as_tensor(event).flatten().bool() & ~after_last
        return DeepHitLabels(bin_index=bins, event=event, censored_credit=credit.masked_fill(after_last, 0.0))

    def marginal_log_probabilities(self, time, event, floor: float = 1e-6) -> torch.Tensor:
        """(K+1,) log p of the intercept-only fit of ``vlsurv.losses.deephit_nll`` under this scheme, in
        closed form: bin hazards h_k = d_k / (n_k - sum_{i in C_k} (1 - w_i)) (see its docstring),
        p_k = S_{k-1} h_k, p_K = S_{K-1}; probabilities are floored at ``floor`` so every log is finite."""
        labels = self.labels(time, event)
        k = self.num_bins
        bins = labels.bin_index
        censored = ~labels.event
        events = torch.bincount(bins[labels.event], minlength=k + 1)[:k].double()
        at_risk = torch.bincount(bins, minlength=k + 1).flip(0).cumsum(0).flip(0)[:k].double()
        left_early = torch.zeros(k + 1, dtype=torch.float64).index_add_(
            0, bins[censored], (1.0 - labels.censored_credit[censored]).double()
        )[:k]
        denominator = at_risk - left_early
        hazard = torch.where(denominator > 0, events / denominator.clamp(min=1e-12), 0.0).clamp(0.0, 1.0)
        survival = torch.cumprod(1.0 - hazard, 0)
        before = torch.cat([survival.new_ones(1), survival[:-1]])
        probabilities = torch.cat([before * hazard, survival[-1:]]).clamp(min=floor)
        return torch.log(probabilities / probabilities.sum())

    def curve_times(self, points_per_bin: int = 8) -> torch.Tensor:
        """(T,) float64 times a survival curve is written at: the cuts for the step schemes ("deephit",
        "pycox"), else ``points_per_bin`` evenly spaced times in each bin, ending at its cut."""
        if self.censoring in ("deephit", "pycox"):
            return self.cuts.clone()
        lower = torch.cat([self.cuts[:1].clamp(max=0.0), self.cuts[:-1]])  # bin 0 starts at 0
        fractions = torch.arange(1, points_per_bin + 1, dtype=torch.float64) / points_per_bin
        times = (lower[:, None] + (self.cuts - lower)[:, None] * fractions[None]).flatten()
        return torch.unique(times)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / self.FILE_NAME
        record = {"cuts": self.cuts.tolist(), "censoring": self.censoring, "placement": self.placement}
        path.write_text(json.dumps(record))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> DeepHitCuts:
        """Read ``deephit_cuts.json``; a file without ``censoring`` predates the schemes: its model was
        trained with the original DeepHit credit."""
        path = Path(directory) / cls.FILE_NAME
        try:
            record = json.loads(path.read_text())
            cuts = record["cuts"]
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise SurvivalConfigError(
                f'{path}: expected JSON {{"cuts": [times...], "censoring": ..., "placement": ...}}'
            ) from err
        try:
            return cls(cuts, record.get("censoring", "deephit"), record.get("placement"))
        except SurvivalConfigError as err:
            raise SurvivalConfigError(f"{path}: {err}") from err


def deephit_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(B, K+1) softmax probabilities of the K bins and the tail bin."""
    return torch.softmax(logits.float(), dim=-1)


def deephit_survival(logits: torch.Tensor) -> torch.Tensor:
    """(B, K) survival S(cut_k) = 1 - sum_{j <= k} p_j."""
    probs = deephit_probabilities(logits)
    return 1.0 - torch.cumsum(probs[:, :-1], dim=-1)


def survival_between_cuts(survival: torch.Tensor, cuts: DeepHitCuts, times: torch.Tensor) -> torch.Tensor:
    """S at ``times`` (T,) from S at the cuts ``survival`` (..., K), under the within-bin assumption of the
    cuts' censoring scheme, with S(0) = 1: "interpolate" a constant hazard in each bin (log S linear, the
    assumption its NLL credits censored rows with), "life_table" S linear (the actuarial estimator), and
    "deephit" / "pycox" a step at each cut (S of the last cut at or before t). Out: (..., T)."""
    times = torch.as_tensor(times, dtype=torch.float64)
    if bool((times > cuts.cuts[-1]).any()):
        raise SurvivalConfigError(
            f"survival_between_cuts: a time {float(times.max()):g} is after the last cut "
            f"{float(cuts.cuts[-1]):g}; S is not estimated there"
        )
    knots = torch.cat([cuts.cuts.new_zeros(1), cuts.cuts]).to(survival.device)
    values = torch.cat([survival.new_ones(*survival.shape[:-1], 1), survival], dim=-1)
    times = times.to(survival.device)
    upper = torch.searchsorted(knots, times).clamp(min=1)  # knots[upper - 1] < t <= knots[upper]
    fraction = ((times - knots[upper - 1]) / (knots[upper] - knots[upper - 1])).clamp(0.0, 1.0)
    fraction = fraction.to(survival.dtype)
    below, above = values[..., upper - 1], values[..., upper]
    if cuts.censoring == "interpolate":
        ratio = torch.where(below > 0, above / below.clamp(min=1e-30), torch.zeros_like(below))
        return below * ratio.clamp(min=0.0) ** fraction
    if cuts.censoring == "life_table":
        return below + fraction * (above - below)
    return torch.where(fraction >= 1.0, above, below)


def deephit_risk(
    logits: torch.Tensor, cuts: DeepHitCuts, kind: str, horizon: float | None = None
) -> torch.Tensor:
    """(B,) ranking score, higher = earlier event.

    ``expected_time``: minus the mean survival time restricted to the last cut, sum_k p_k cut_k + p_K
    cut_{K-1} (an event in bin k is placed at its upper cut). ``cif_at_horizon``: CIF(h) = sum_{k: cut_k <= h}
    p_k.
    """
    if logits.shape[-1] != cuts.num_bins + 1:
        raise SurvivalConfigError(
            f"DeepHit logits have {logits.shape[-1]} columns; expected {cuts.num_bins} cuts + 1"
        )
    probs = deephit_probabilities(logits)
    times = cuts.cuts.to(device=probs.device, dtype=probs.dtype)
    if kind == "expected_time":
        bin_times = torch.cat([times, times[-1:]])
        return -(probs * bin_times).sum(-1)
    if kind == "cif_at_horizon":
        if horizon is None:
            raise SurvivalConfigError("survival.horizon: required when deephit_risk is 'cif_at_horizon'")
        return (probs[:, :-1] * (times <= horizon).to(probs.dtype)).sum(-1)
    raise SurvivalConfigError(f"survival.deephit_risk: expected one of {DEEPHIT_RISKS}, got {kind!r}")
