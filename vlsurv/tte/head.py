"""The MOTOR time-to-event head over cached image tokens.

tokens (B, T, C) -> ``projector`` (stage 1's architecture, per token) -> mean over T -> features (B, d)
-> ``time_layer`` Linear(d, bins x f) -> (B, bins, f) -> LayerNorm(f) -> ``task_layer`` Linear(f, K)
-> log-hazards (B, bins, K) per day.

As in femr's ``MOTORTaskHead`` the task layer is shared by all bins and its bias starts at the log of each
task's base rate (events per day at risk), so the untrained head already predicts each task's average hazard.
The projector is applied per token before pooling so that its weights are those of stage 1's projector (for a
linear projector without input norm this equals projecting the pooled tokens).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from vlsurv.model.projector import build_projector
from vlsurv.tte.config import TTEModelConfig


class TTEHead(nn.Module):
    """Projector + per-bin task logits; ``forward`` (B, T, C) -> log-hazard (B, bins, K)."""

    def __init__(self, config: TTEModelConfig, num_bins: int, num_tasks: int) -> None:
        super().__init__()
        self.num_bins, self.num_tasks, self.final_dim = num_bins, num_tasks, config.final_dim
        self.projector = build_projector(
            config.projector,
            config.image_token_dim,
            config.projection_dim,
            config.projector_input_norm,
            config.num_image_tokens,
        )
        self.time_layer = nn.Linear(config.projection_dim, num_bins * config.final_dim)
        self.norm = nn.LayerNorm(config.final_dim)
        self.task_layer = nn.Linear(config.final_dim, num_tasks)

    @torch.no_grad()
    def set_base_rates(self, rates: np.ndarray) -> None:
        """Task-layer bias = log of each task's base rate (K,), events per day at risk."""
        self.task_layer.bias.copy_(torch.as_tensor(np.log(rates), dtype=self.task_layer.bias.dtype))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, C) tokens -> (B, d) pooled projected features (what transfers to baselines)."""
        return self.projector(tokens).mean(dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        per_bin = self.time_layer(self.features(tokens)).view(-1, self.num_bins, self.final_dim)
        return self.task_layer(self.norm(per_bin))
