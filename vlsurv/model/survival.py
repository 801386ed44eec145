"""The survival branch: residual adapter + DeepSurv or DeepHit head, and DeepHit's time cuts.

- ``ResidualAdapter``: z_surv = r * MLP(z) + (1 - r) * z, MLP = Linear(d, d/q)-ReLU-Linear(d/q, d)-ReLU
  (CLIP-Adapter style; r = 0.2, q = 4 by default).
- ``SurvivalBranch``: adapter then head. DeepSurv: Linear(d, 1) -> log-risk (B,). DeepHit: Linear(d, K+1) ->
  logits (B, K+1), softmax over K time bins plus one tail bin "beyond the last cut".
- ``DeepHitCuts``: K cut times at quantiles of the training event times; ``bin_index(time)`` =
  clamp(searchsorted(cuts, time), max=K-1) as pycox's label transform; bin k holds (cut_{k-1}, cut_k].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

HEADS = ("deepsurv", "deephit")
DEEPHIT_RISKS = ("expected_time", "cif_at_horizon")


class SurvivalConfigError(ValueError):
    """A survival-branch setting or DeepHit cut that is not what is expected."""


@dataclass
class SurvivalConfig:
    """Survival branch settings (``survival:`` in the model config)."""

    head: str = "deepsurv"
    num_bins: int = 10
    adapter_ratio: float = 0.2
    adapter_reduction: int = 4
    deephit_risk: str = "expected_time"
    horizon: float | None = None

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise SurvivalConfigError(f"survival.head: expected one of {HEADS}, got {self.head!r}")
        if self.deephit_risk not in DEEPHIT_RISKS:
            raise SurvivalConfigError(
                f"survival.deephit_risk: expected one of {DEEPHIT_RISKS}, got {self.deephit_risk!r}"
            )
        if self.num_bins < 1:
            raise SurvivalConfigError(f"survival.num_bins: expected >= 1, got {self.num_bins}")
        if not 0.0 <= self.adapter_ratio <= 1.0:
            raise SurvivalConfigError(
                f"survival.adapter_ratio: expected a value in [0, 1], got {self.adapter_ratio}"
            )
        if self.adapter_reduction < 1:
            raise SurvivalConfigError(
                f"survival.adapter_reduction: expected >= 1, got {self.adapter_reduction}"
            )
        if self.head == "deephit" and self.deephit_risk == "cif_at_horizon" and self.horizon is None:
            raise SurvivalConfigError("survival.horizon: required when deephit_risk is 'cif_at_horizon'")


@dataclass
class SurvivalOutput:
    """z_surv (B, d); ``log_risk`` (B,) for DeepSurv or ``logits`` (B, K+1) for DeepHit (the other is None)."""

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
    """Residual adapter + head on z_pooled (B, d) -> ``SurvivalOutput``."""

    def __init__(self, d: int, config: SurvivalConfig | None = None) -> None:
        super().__init__()
        self.config = config or SurvivalConfig()
        self.adapter = ResidualAdapter(d, self.config.adapter_ratio, self.config.adapter_reduction)
        out = 1 if self.config.head == "deepsurv" else self.config.num_bins + 1
        self.head = nn.Linear(d, out)

    def forward(self, z_pooled: torch.Tensor) -> SurvivalOutput:
        z_surv = self.adapter(z_pooled)
        out = self.head(z_surv)
        if self.config.head == "deepsurv":
            return SurvivalOutput(z_surv=z_surv, log_risk=out.squeeze(-1))
        return SurvivalOutput(z_surv=z_surv, logits=out)


class DeepHitCuts:
    """K increasing cut times (float64); bin k covers (cut_{k-1}, cut_k], bin K is the tail."""

    FILE_NAME = "deephit_cuts.json"

    def __init__(self, cuts) -> None:
        cuts = torch.as_tensor(cuts, dtype=torch.float64).flatten()
        if cuts.numel() < 1 or not bool(torch.all(cuts[1:] > cuts[:-1])):
            raise SurvivalConfigError(
                f"DeepHit cuts: expected strictly increasing times, got {cuts.tolist()}"
            )
        self.cuts = cuts

    @property
    def num_bins(self) -> int:
        return int(self.cuts.numel())

    @classmethod
    def from_times(cls, time, event, num_bins: int) -> DeepHitCuts:
        """Cuts at the 1/K, 2/K, ..., 1 quantiles of the event times (rows with event == 1)."""
        time = torch.as_tensor(time, dtype=torch.float64).flatten()
        event = torch.as_tensor(event).flatten().bool()
        event_times = time[event]
        if event_times.numel() == 0:
            raise SurvivalConfigError(
                "DeepHit cuts: the training set has no event (event == 1); expected at least one"
            )
        levels = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)[1:]
        cuts = torch.unique(torch.quantile(event_times, levels))
        if cuts.numel() < num_bins:
            raise SurvivalConfigError(
                f"DeepHit cuts: only {cuts.numel()} distinct quantiles of {event_times.numel()} event times; "
                f"expected survival.num_bins = {num_bins}, lower it"
            )
        return cls(cuts)

    def bin_index(self, time) -> torch.Tensor:
        """(N,) long bin of each time: clamp(searchsorted(cuts, time), max=K-1)."""
        time = torch.as_tensor(time, dtype=torch.float64)
        return torch.searchsorted(self.cuts, time.contiguous()).clamp(max=self.num_bins - 1)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / self.FILE_NAME
        path.write_text(json.dumps({"cuts": self.cuts.tolist()}))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> DeepHitCuts:
        path = Path(directory) / cls.FILE_NAME
        try:
            return cls(json.loads(path.read_text())["cuts"])
        except (KeyError, json.JSONDecodeError) as err:
            raise SurvivalConfigError(f'{path}: expected JSON {{"cuts": [times...]}}') from err


def deephit_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(B, K+1) softmax probabilities of the K bins and the tail bin."""
    return torch.softmax(logits.float(), dim=-1)


def deephit_survival(logits: torch.Tensor) -> torch.Tensor:
    """(B, K) survival S(cut_k) = 1 - sum_{j <= k} p_j."""
    probs = deephit_probabilities(logits)
    return 1.0 - torch.cumsum(probs[:, :-1], dim=-1)


def deephit_risk(
    logits: torch.Tensor, cuts: DeepHitCuts, kind: str, horizon: float | None = None
) -> torch.Tensor:
    """(B,) ranking score, higher = earlier event.

    ``expected_time``: minus the mean survival time restricted to the last cut, sum_k p_k cut_k + p_K cut_{K-1}
    (an event in bin k is placed at its upper cut). ``cif_at_horizon``: CIF(h) = sum_{k: cut_k <= h} p_k.
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
