"""The multi-modal projector: image tokens (B, T, C) -> decoder embeddings (B, T, d_model).

``linear`` is the paper's H_v = W Z_v (with bias); ``mlp2x_gelu`` is LLaVA-1.5's Linear-GELU-Linear.
"""

from __future__ import annotations

from torch import nn

PROJECTOR_KINDS = ("linear", "mlp2x_gelu")


class ProjectorError(ValueError):
    """An unknown projector kind."""


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """A projector of ``kind`` mapping the last axis from ``in_dim`` to ``out_dim``."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ProjectorError(f"projector: expected one of {PROJECTOR_KINDS}, got {kind!r}")
