"""3D CNN / Swin backbones from MONAI with one logit per mortality horizon, and their initialisation.

``build_network(model, size, n_horizons) -> HorizonNet``; ``HorizonNet(x)`` maps a volume batch
(B, 1, H, W, D) to logits (B, n_horizons): a backbone gives a feature vector (B, F), and row ``j`` of the
linear head is horizon ``j``'s classifier, P(death within h_j | x) = sigmoid(logit_j).

Backbones (``size="full"`` is the published architecture, ``"tiny"`` a small one of the same family for CPU
tests):

- ``resnet18``: MONAI's ResNet-18 with MedicalNet's layout (1 input channel, shortcut A, stride-2 stem),
  so a MedicalNet ``resnet_18*.pth`` loads into it; F = 512.
- ``densenet121``: MONAI's DenseNet-121 with its output layer removed; F = 1024.
- ``swin``: the encoder of MONAI's SwinUNETR (``SwinTransformer``, feature size 48 as the MONAI
  self-supervised weights) with the last stage average-pooled; F = 16 x 48. Each side of the volume must be a
  multiple of 32.

``load_backbone_weights`` initialises the backbone from a local state dict (safetensors, or a torch file read
with ``weights_only=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import torch
from monai.networks.nets import DenseNet, DenseNet121, ResNet, resnet18
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from vlsurv.encoders.merlin import read_state_dict
from vlsurv.errors import CheckpointError
from vlsurv.horizon.config import Architecture, Size
from vlsurv.horizon.labels import HorizonError


class SwinEncoder(SwinTransformer):
    """SwinUNETR's encoder (its state-dict keys less ``swinViT.``) pooled to (B, 16 * embed_dim)."""

    def __init__(self, embed_dim: int, depths: tuple[int, ...], heads: tuple[int, ...], window: int) -> None:
        super().__init__(
            in_chans=1,
            embed_dim=embed_dim,
            window_size=(window,) * 3,
            patch_size=(2, 2, 2),
            depths=depths,
            num_heads=heads,
            spatial_dims=3,
        )
        self.out_features = embed_dim * 2 ** len(depths)

    def forward(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 1, H, W, D) -> the last stage (B, C, H/32, W/32, D/32), layer-normed over C as SwinUNETR's
        ``normalize`` (without einops), averaged to (B, C)."""
        last = super().forward(x, normalize=False)[-1]
        if normalize:
            last = nn.functional.layer_norm(last.movedim(1, -1), [last.shape[1]]).movedim(-1, 1)
        return last.mean(dim=(2, 3, 4))


def _backbone(model: Architecture, size: Size) -> tuple[nn.Module, int]:
    """(backbone mapping (B, 1, H, W, D) to (B, F), F)."""
    tiny = size == "tiny"
    if model == "resnet18":
        options = {"spatial_dims": 3, "n_input_channels": 1, "feed_forward": False, "shortcut_type": "A"}
        options.update(conv1_t_stride=2, bias_downsample=True)
        if tiny:
            return ResNet("basic", [1, 1, 1, 1], [8, 16, 32, 64], **options), 64
        return resnet18(**options), 512
    if model == "densenet121":
        if tiny:
            net = DenseNet(3, 1, 1, init_features=8, growth_rate=4, block_config=(1, 1, 1, 1), bn_size=2)
        else:
            net = DenseNet121(spatial_dims=3, in_channels=1, out_channels=1)
        features = net.class_layers.out.in_features
        net.class_layers.out = nn.Identity()
        return net, features
    if model == "swin":
        encoder = (
            SwinEncoder(12, (1, 1, 1, 1), (1, 2, 2, 4), 4)
            if tiny
            else SwinEncoder(48, (2, 2, 2, 2), (3, 6, 12, 24), 7)
        )
        return encoder, encoder.out_features
    raise HorizonError(f"model: expected one of {list(get_args(Architecture))}, got {model!r}")


class HorizonNet(nn.Module):
    """``backbone`` (B, 1, H, W, D) -> (B, F), then ``head`` (B, F) -> logits (B, n_horizons)."""

    def __init__(self, model: Architecture, size: Size, n_horizons: int) -> None:
        super().__init__()
        self.backbone, features = _backbone(model, size)
        self.head = nn.Linear(features, n_horizons)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(volume))


def build_network(model: Architecture, size: Size, n_horizons: int) -> HorizonNet:
    return HorizonNet(model, size, n_horizons)


@dataclass(frozen=True)
class InitReport:
    """What ``load_backbone_weights`` did: tensors loaded, backbone tensors left at random init, checkpoint
    tensors not used."""

    path: str
    loaded: int
    missing: int
    unused: int

    def message(self, model: str) -> str:
        return (
            f"initialised the {model} backbone from {self.path}: {self.loaded} tensors loaded, "
            f"{self.missing} backbone tensors left at random init, {self.unused} checkpoint tensors unused"
        )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(
            f"{path}: init checkpoint not found; expected a .safetensors or torch state-dict file"
        )
    return read_state_dict(path, nested=("state_dict", "model", "net"))


def load_backbone_weights(backbone: nn.Module, path: str | Path, strip_prefix: str = "") -> InitReport:
    """Copy the tensors of ``path`` whose names (less ``module.`` and ``strip_prefix``) are backbone
    parameters or buffers; the rest of the backbone stays at random init. Raises ``CheckpointError`` naming
    the file when no name matches or a matching tensor has another shape."""
    path = Path(path)
    state = {}
    for key, value in _read_state_dict(path).items():
        key = key.removeprefix("module.")
        if strip_prefix and key.startswith(strip_prefix):
            key = key[len(strip_prefix) :]
        state[key] = value
    own = backbone.state_dict()
    matched = {k: v for k, v in state.items() if k in own}
    if not matched:
        raise CheckpointError(
            f"{path}: none of its {len(state)} tensor names match the backbone "
            f"(checkpoint: {sorted(state)[:3]}, backbone: {sorted(own)[:3]}); "
            "expected weights of this architecture, or set --init-key-prefix"
        )
    for key, value in matched.items():
        if value.shape != own[key].shape:
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {list(value.shape)}, the backbone's has "
                f"{list(own[key].shape)}; "
                "expected weights of this architecture and size (1 input channel)"
            )
    backbone.load_state_dict(matched, strict=False)
    return InitReport(str(path), len(matched), len(own) - len(matched), len(state) - len(matched))
