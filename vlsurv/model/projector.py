"""The multi-modal projector: image tokens (B, T, C) -> decoder embeddings (B, T, d_model).

``linear`` is the paper's H_v = W Z_v (with bias); ``mlp2x_gelu`` is LLaVA-1.5's Linear-GELU-Linear.
``input_norm`` puts a normalisation of the frozen encoder's tokens in front of either:

- ``layernorm``: a trainable LayerNorm over C, per token;
- ``standardize``: fixed per-(token, channel) statistics of the training scans, ``(z - mean) / std``.
  A frozen encoder's tokens are dominated by what every scan shares (the anatomy at each token position);
  the scan-to-scan part the projector must read can be a few percent of it. Standardising with the
  training split's statistics (``TokenStandardizer.fit``, done at the start of stage 1 and saved with the
  projector) puts that part at unit scale.

``positions`` "learned" adds a trainable (T, d_model) embedding to the projected tokens
(``LearnedPositions``). A CNN's tokens say what is at a place, hardly where the place is; the decoder sees
the T tokens in a row and, through RoPE, only their relative order. With the embedding, "left lower zone" is
part of a token's content, so a side or a lobe can be read by one attention step. ``positions`` "grid" adds
to every token a position-weighted linear summary of the whole grid (``GridSummary``), which a decoder can
read whichever token it attends to.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from vlsurv.errors import InputError

ProjectorKind = Literal["linear", "mlp2x_gelu"]
ProjectorNorm = Literal["none", "layernorm", "standardize"]
ImagePositions = Literal["none", "learned", "grid"]
PROJECTOR_KINDS: tuple[str, ...] = get_args(ProjectorKind)
PROJECTOR_NORMS: tuple[str, ...] = get_args(ProjectorNorm)
IMAGE_POSITIONS: tuple[str, ...] = get_args(ImagePositions)


class ProjectorError(InputError):
    """An unknown projector kind or input norm, or statistics of the wrong shape."""


class TokenStandardizer(nn.Module):
    """``(z - mean) / std`` with (T, C) buffers; identity until ``fit`` is called (``fitted`` is 0 or 1)."""

    def __init__(self, num_tokens: int, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(num_tokens, dim))
        self.register_buffer("std", torch.ones(num_tokens, dim))
        self.register_buffer("fitted", torch.zeros(()))
        self._seen_fitted = False

    @torch.no_grad()
    def fit(self, tokens: torch.Tensor, floor: float = 0.1) -> None:
        """Statistics of (N, T, C) training tokens.

        Each std is at least ``floor`` x the median std of the varying entries, so a nearly constant entry
        (a ReLU channel that almost never fires) is not blown up into noise; a constant entry is only centred.
        """
        if tokens.dim() != 3 or tokens.shape[1:] != self.mean.shape or tokens.shape[0] < 2:
            raise ProjectorError(
                f"projector standardize: expected training tokens (N >= 2, {self.mean.shape[0]}, "
                f"{self.mean.shape[1]}), got {tuple(tokens.shape)}"
            )
        tokens = tokens.double()
        std = tokens.std(0)
        varying = std > self.eps
        if not varying.any():
            raise ProjectorError(
                "projector standardize: every token entry is constant over the training scans"
            )
        std = torch.where(varying, std.clamp_min(floor * std[varying].median()), torch.ones_like(std))
        self.mean.copy_(tokens.mean(0))
        self.std.copy_(std)
        self.fitted.fill_(1.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Checked until it passes once, so a fitted model does not sync with the device on every call.
        if not self._seen_fitted and not bool(self.fitted):
            raise ProjectorError(
                "projector standardize: the token statistics were never fitted; stage 1 fits them on the "
                "training scans (TokenStandardizer.fit), and a saved model carries them"
            )
        self._seen_fitted = True
        return (tokens - self.mean.to(tokens.dtype)) / self.std.to(tokens.dtype)


class GridSummary(nn.Module):
    """A shared projector plus a summary of the whole token grid added to every token: (B, T, C) -> (B, T, d),
    ``H_t = P(z_t) + sum_s B_s A z_s``, with A (r, C) shared and B_s (d, r) one per token position s.

    Through a shared projector a decoder reads what is in a token, and by attending over the tokens a mix of
    them, blind to where each lies; a finding's side or lobe is then readable only when attention singles its
    token out. The summary is a linear function of the flattened grid, with weights that depend on the
    position, as a linear probe on the flattened tokens has; added to every token, any attention pattern reads
    it. B starts at zero, so a fresh projector begins as the shared one (A learns once B has moved, as in
    LoRA).
    """

    def __init__(self, shared: nn.Module, num_tokens: int, in_dim: int, out_dim: int, rank: int) -> None:
        super().__init__()
        self.shared = shared
        self.down = nn.Linear(in_dim, rank, bias=False)
        self.up = nn.Parameter(torch.zeros(num_tokens, rank, out_dim))

    def summary(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> the (B, d) summary added to every token."""
        down = self.down(tokens)
        return torch.einsum("btr,trd->bd", down, self.up.to(down.dtype))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.shared(tokens) + self.summary(tokens).unsqueeze(1)


class LearnedPositions(nn.Module):
    """(B, T, d) -> (B, T, d) plus a trainable (T, d) embedding of each token's place; zero at the start, so a
    fresh projector begins as one without it."""

    def __init__(self, num_tokens: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(num_tokens, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.embedding.to(tokens.dtype)


def build_projector(
    kind: str,
    in_dim: int,
    out_dim: int,
    input_norm: str = "none",
    num_tokens: int = 1,
    positions: str = "none",
    position_rank: int = 16,
) -> nn.Module:
    """A projector of ``kind`` mapping the last axis from ``in_dim`` to ``out_dim`` (``num_tokens`` for
    standardize and learned positions)."""
    if positions == "learned":
        projector = build_projector(kind, in_dim, out_dim, input_norm, num_tokens)
        return nn.Sequential(projector, LearnedPositions(num_tokens, out_dim))
    if positions == "grid":
        projector = build_projector(kind, in_dim, out_dim, "none", num_tokens)
        projector = GridSummary(projector, num_tokens, in_dim, out_dim, position_rank)
        return _with_input_norm(projector, input_norm, in_dim, num_tokens)
    if positions != "none":
        raise ProjectorError(f"image_positions: expected one of {IMAGE_POSITIONS}, got {positions!r}")
    if kind == "linear":
        projector: nn.Module = nn.Linear(in_dim, out_dim)
    elif kind == "mlp2x_gelu":
        projector = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    else:
        raise ProjectorError(f"projector: expected one of {PROJECTOR_KINDS}, got {kind!r}")
    return _with_input_norm(projector, input_norm, in_dim, num_tokens)


def _with_input_norm(projector: nn.Module, input_norm: str, in_dim: int, num_tokens: int) -> nn.Module:
    """``projector`` behind the ``input_norm`` of ``build_projector``."""
    if input_norm == "none":
        return projector
    if input_norm == "layernorm":
        return nn.Sequential(nn.LayerNorm(in_dim, eps=1e-6), projector)
    if input_norm == "standardize":
        return nn.Sequential(TokenStandardizer(num_tokens, in_dim), projector)
    raise ProjectorError(f"projector_input_norm: expected one of {PROJECTOR_NORMS}, got {input_norm!r}")


def grid_summary(projector: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The (B, d) summary that a ``build_projector(..., positions="grid")`` projector adds to every token of
    (B, T, C) ``tokens`` (behind its input norm)."""
    grid = projector if isinstance(projector, GridSummary) else None
    if isinstance(projector, nn.Sequential) and isinstance(projector[-1], GridSummary):
        grid, tokens = projector[-1], projector[0](tokens)
    if grid is None:
        raise ProjectorError("grid_summary: the projector has no grid summary; expected image_positions grid")
    return grid.summary(tokens)


def standardizer_of(projector: nn.Module) -> TokenStandardizer | None:
    """The projector's ``TokenStandardizer``, if it has one."""
    return next((m for m in projector.modules() if isinstance(m, TokenStandardizer)), None)
