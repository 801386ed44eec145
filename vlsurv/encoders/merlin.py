"""Merlin's frozen 3D image encoder: a torchvision ResNet-152 inflated to 3D (I3D), re-implemented.

The module tree and parameter names match Merlin's ``I3ResNet`` exactly, so the official
checkpoint's ``encode_image.i3_resnet.*`` keys load strictly. Shapes for a CT batch ``x`` of
shape (B, 1, H, W, D) (MONAI layout, D = axial):

- ``feature_map(x)`` -> (B, C, ceil(D/16), ceil(H/32), ceil(W/32)), C = 32 * base_width
  (2048 for Merlin: (B, 2048, 10, 7, 7) at 224 x 224 x 160);
- ``forward(x)`` -> tokens (B, T, C): ``mean_depth`` averages over depth, T = H' * W' (49),
  row-major over (H', W'); ``all`` keeps every cell, T = D' * H' * W' (490), depth-major;
  ``mean_width`` averages over W' (anterior-posterior after the RAS preprocessing) and keeps depth and
  side, T = D' * H' (70), depth-major: an upper-lobe finding and a lower-lobe one land on different tokens,
  and a small finding is averaged over W' cells only, not over the depth too;
  ``global`` averages everything, T = 1.

The encoder is frozen: always in eval mode, no parameter requires grad, and every forward runs
under ``torch.no_grad``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from torch import nn

from vlsurv.config import bounded, check_fields, invalid
from vlsurv.errors import CheckpointError

OFFICIAL_PREFIX = "encode_image.i3_resnet."
EXPANSION = 4
MERLIN_LAYERS = (3, 8, 36, 3)


@dataclass
class EncoderConfig:
    """Architecture of the I3D ResNet; the defaults are Merlin's (ResNet-152, 2048-d tokens)."""

    layers: tuple[int, int, int, int] = bounded(MERLIN_LAYERS, ge=1, what="four block counts")
    """Bottleneck blocks in each of the four ResNet stages (Merlin: ResNet-152's 3, 8, 36, 3)."""
    base_width: int = bounded(64, ge=1, what="an integer")
    """Width of the first stage; tokens have 32 * base_width channels."""
    token_mode: Literal["mean_depth", "all", "mean_width", "global"] = "mean_depth"
    """Tokens from the last feature map: averaged over depth (H' * W'), every cell, averaged over W' keeping
    depth (D' * H'), or one global average."""
    num_classes: int = bounded(1692, ge=1, what="an integer")
    """Outputs of Merlin's phenotype classifier head (kept so the checkpoint loads strictly)."""
    contrastive_dim: int = bounded(512, ge=1, what="an integer")
    """Outputs of Merlin's contrastive projection head (kept so the checkpoint loads strictly)."""
    seed: int = 0
    """Seed of the random initialisation (before a checkpoint is loaded)."""

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        check_fields(self)
        if len(self.layers) != 4:
            raise invalid("", "layers", f"expected four block counts >= 1, got {list(self.layers)}")

    @property
    def out_dim(self) -> int:
        return self.base_width * 8 * EXPANSION

    @property
    def name(self) -> str:
        """Architecture name recorded in the feature cache (token mode not included)."""
        if self.layers == MERLIN_LAYERS and self.base_width == 64:
            return "merlin-i3resnet152"
        return f"i3resnet-{'-'.join(map(str, self.layers))}-w{self.base_width}"


def tiny_config(**overrides) -> EncoderConfig:
    """A small config of the same architecture (tests, demo): layers (1, 1, 1, 1), 256-d tokens."""
    settings = dict(layers=(1, 1, 1, 1), base_width=8, num_classes=16, contrastive_dim=16)
    settings.update(overrides)
    return EncoderConfig(**settings)


class Bottleneck3d(nn.Module):
    """torchvision's Bottleneck inflated: 1x1x1 -> 3x3x3 (stride in all axes) -> 1x1x1, + shortcut."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv3d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm3d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class MerlinImageEncoder(nn.Module):
    """Frozen I3D ResNet; key names and shapes identical to Merlin's ``I3ResNet``."""

    def __init__(self, config: EncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or EncoderConfig()
        width = self.config.base_width
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.conv1 = nn.Conv3d(3, width, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
            self.bn1 = nn.BatchNorm3d(width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
            in_channels = width
            for index, blocks in enumerate(self.config.layers):
                layer_width = width * 2**index
                stride = 1 if index == 0 else 2
                layer = [Bottleneck3d(in_channels, layer_width, stride)]
                in_channels = layer_width * EXPANSION
                layer += [Bottleneck3d(in_channels, layer_width, 1) for _ in range(blocks - 1)]
                setattr(self, f"layer{index + 1}", nn.Sequential(*layer))
            self.classifier = nn.Conv3d(self.out_dim, self.config.num_classes, 1)
            self.contrastive_head = nn.Conv3d(self.out_dim, self.config.contrastive_dim, 1)
            self._init_weights()
        self.weights_id = f"random-init:{self.config.seed}"
        self.requires_grad_(False)
        super().train(False)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @classmethod
    def tiny(cls, **overrides) -> MerlinImageEncoder:
        """A small encoder of the same code (tests, demo): see ``tiny_config``."""
        return cls(tiny_config(**overrides))

    @property
    def out_dim(self) -> int:
        return self.config.out_dim

    @property
    def name(self) -> str:
        return self.config.name

    def train(self, mode: bool = True) -> MerlinImageEncoder:
        """Frozen: stays in eval mode whatever ``mode`` asks."""
        return super().train(False)

    def stage_maps(self, x: torch.Tensor, stages: int = 4) -> list[torch.Tensor]:
        """(B, 1, H, W, D) preprocessed CTs -> the outputs of the first ``stages`` ResNet stages
        [(B, C_s, d_s, h_s, w_s)], with the autograd graph when grad is enabled (pretraining)."""
        weight = self.conv1.weight
        x = x.to(device=weight.device, dtype=weight.dtype).permute(0, 1, 4, 2, 3).repeat(1, 3, 1, 1, 1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4)[:stages]:
            x = stage(x)
            maps.append(x)
        return maps

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W, D) -> (B, C, D', H', W'), Merlin's last feature map."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"encoder input: expected shape (B, 1, H, W, D), got {tuple(x.shape)}")
        with torch.no_grad():
            return self.stage_maps(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W, D) -> tokens (B, T, C) according to ``config.token_mode``."""
        return pool_tokens(self.feature_map(x), self.config.token_mode)

    def global_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Merlin's pooled heads: (contrastive embedding (B, E), phenotype logits (B, K))."""
        with torch.no_grad():
            pooled = self.feature_map(x).mean(dim=(2, 3, 4), keepdim=True)
            contrastive = self.contrastive_head(pooled).flatten(1)
            logits = self.classifier(pooled).flatten(1)
        return contrastive, logits

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], config: EncoderConfig | None = None, source: str = "state dict"
    ) -> MerlinImageEncoder:
        """Load an official Merlin state dict (image keys under ``encode_image.i3_resnet.``; the
        text encoder and ``logit_scale`` are ignored) or a bare I3ResNet one, strictly."""
        image_state = _image_encoder_state(state, source)
        with torch.device("meta"):
            model = cls(config)
        _check_keys_and_shapes(image_state, model.state_dict(), model.name, source)
        image_state = {k: v.float() if v.is_floating_point() else v for k, v in image_state.items()}
        model.load_state_dict(image_state, strict=True, assign=True)
        model.requires_grad_(False)
        model.weights_id = f"state-dict:{source}"
        return model.train(False)

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: EncoderConfig | None = None) -> MerlinImageEncoder:
        """Load a ``.pt``/``.pth`` state dict (official or bare) or a ``.safetensors`` file.

        ``config`` defaults to Merlin's full ResNet-152; ``weights_id`` becomes the file's sha256.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        state = read_state_dict(path)
        model = cls.from_state_dict(state, config, source=str(path))
        model.weights_id = file_sha256(path)
        return model


def pool_tokens(features: torch.Tensor, mode: str) -> torch.Tensor:
    """Feature map (B, C, D', H', W') -> tokens (B, T, C) for a ``token_mode`` (see the module docstring)."""
    batch, channels = features.shape[:2]
    if mode == "mean_depth":
        return features.mean(dim=2).flatten(2).transpose(1, 2)
    if mode == "all":
        return features.flatten(2).transpose(1, 2)
    if mode == "mean_width":
        return features.mean(dim=4).flatten(2).transpose(1, 2)
    return features.mean(dim=(2, 3, 4)).reshape(batch, 1, channels)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_failure(err: Exception) -> str:
    """One line saying why a file did not load (torch's weights-only refusal spans many lines)."""
    refused = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please|\n|$)", str(err))
    if refused:
        return (
            f"refused: {refused.group(1).strip()}; only tensors are unpickled, so code in a pickle "
            "never runs; "
            "expected a plain state dict of tensors or a .safetensors file"
        )
    return " ".join(str(err).split())


def read_state_dict(path: Path, nested: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """{name: tensor} of a ``.safetensors`` file or a torch file read with ``weights_only=True``. ``nested``:
    wrapper keys whose dict holds the weights (MedicalNet's and MONAI bundles' ``state_dict``, ``model``,
    ``net``), taken in that order. CheckpointError naming the file when it is unreadable or not a flat
    mapping of names to tensors."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, pickled objects refused by weights_only, ...
        raise CheckpointError(
            f"checkpoint {path}: cannot read it as a state dict ({_load_failure(err)})"
        ) from err
    for key in nested:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"checkpoint {path}: expected a flat state dict of tensors, got {type(state).__name__}"
        )
    return state


def _image_encoder_state(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Strip the official prefix, dropping every other key; a bare dict passes through."""
    if any(key.startswith(OFFICIAL_PREFIX) for key in state):
        return {
            key[len(OFFICIAL_PREFIX) :]: value
            for key, value in state.items()
            if key.startswith(OFFICIAL_PREFIX)
        }
    if "conv1.weight" in state:
        return dict(state)
    first = ", ".join(list(state)[:3]) or "nothing"
    raise CheckpointError(
        f"checkpoint {source}: no image-encoder keys; expected keys under '{OFFICIAL_PREFIX}' "
        "(official Merlin "
        f"checkpoint) or bare I3ResNet keys such as 'conv1.weight', found {first}"
    )


def _check_keys_and_shapes(
    got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], name: str, source: str, shown: int = 3
) -> None:
    """Raise CheckpointError naming the first few missing / unexpected / wrongly shaped keys."""
    missing = [key for key in expected if key not in got]
    if missing:
        raise CheckpointError(
            f"checkpoint {source}: {len(missing)} image-encoder keys expected by {name} are missing "
            f"(first: {', '.join(missing[:shown])})"
        )
    unexpected = [key for key in got if key not in expected]
    if unexpected:
        raise CheckpointError(
            f"checkpoint {source}: {len(unexpected)} image-encoder keys are unknown to {name} "
            f"(first: {', '.join(unexpected[:shown])})"
        )
    wrong = [key for key in expected if tuple(got[key].shape) != tuple(expected[key].shape)]
    if wrong:
        details = "; ".join(
            f"{key}: expected {tuple(expected[key].shape)}, got {tuple(got[key].shape)}"
            for key in wrong[:shown]
        )
        raise CheckpointError(
            f"checkpoint {source}: {len(wrong)} keys have the wrong shape for {name} ({details})"
        )
