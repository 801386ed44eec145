"""``tte_pretrain`` on volumes (``data.images``): the encoder runs in the loop and its last stage trains.

The encoder is split as ``vlsurv.encoders.pretrain`` splits it: the stem and stages 1-3 stay frozen and run
under ``no_grad`` (``stage3_maps``); stage 4 (``layer4``) trains with the head when
``model.train_last_block`` (else it is frozen too), and ``pool_tokens`` gives the head its tokens::

    volumes (B, 1, H, W, D) -> stage3_maps (B, C3, D', H', W') -> layer4 -> pool_tokens (B, T, C)
    -> TTEHead -> log-hazards (B, bins, K)

The encoder's BatchNorm layers keep their running statistics (the encoder stays in eval mode), so a batch of a
few volumes trains as the encoder will predict. Checkpoints hold the head, the trained stage and the buffers;
the frozen weights are rebuilt from ``data.encoder_checkpoint`` (``frozen_weights_dropper``). ``final/`` gets
``image_encoder.safetensors`` (the whole fine-tuned encoder, ``vlsurv.encoders.pretrain.save_encoder``),
``image_encoder.json`` (``vlsurv.encoders.provenance``: its key, with the file's sha256) and
``encoder.yaml`` / ``preprocess.yaml``, so that `vlsurv encode --encoder-config final/encoder.yaml
--checkpoint final/image_encoder.safetensors --preprocess-config final/preprocess.yaml` writes a cache of its
tokens and
``load_recorded_encoder(final, final / "image_encoder.safetensors")`` loads it back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vlsurv.config import load_config, save_config, to_dict
from vlsurv.data.manifest import load_manifest
from vlsurv.data.transforms import PreprocessConfig
from vlsurv.encoders.cache import build_encoder, cache_key
from vlsurv.encoders.merlin import MerlinImageEncoder, pool_tokens
from vlsurv.encoders.pretrain import save_encoder, stage3_maps
from vlsurv.encoders.provenance import ENCODER_CONFIG_NAME, PREPROCESS_CONFIG_NAME, write_provenance
from vlsurv.encoders.scans import Scan, ScanDataset, scans_of
from vlsurv.tte.config import TTEDataConfig, TTEModelConfig
from vlsurv.tte.events import TTEInputError
from vlsurv.tte.head import TTEHead
from vlsurv.tte.labels import TTELabels

ENCODER_WEIGHTS_NAME = "image_encoder.safetensors"
ENCODER_PREFIX = "encoder."


class ImageTTEModel(nn.Module):
    """Encoder + TTE head; ``forward`` volumes (B, 1, H, W, D) -> log-hazards (B, bins, K)."""

    def __init__(self, encoder: MerlinImageEncoder, head: TTEHead, train_last_block: bool) -> None:
        super().__init__()
        self.encoder, self.head, self.train_last_block = encoder, head, train_last_block
        encoder.requires_grad_(False)
        encoder.layer4.requires_grad_(train_last_block)

    def tokens(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W, D) -> tokens (B, T, C): frozen stages under no_grad, then ``layer4`` and pooling."""
        maps = stage3_maps(self.encoder, volumes)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_last_block):
            return pool_tokens(self.encoder.layer4(maps), self.encoder.config.token_mode)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.head(self.tokens(volumes))


class LabelledVolumes(Dataset):
    """Items {"inputs": volume (1, H, W, D) float32, "time": (K,) float32, "event": (K,) bool}; a scan that
    fails to load raises TTEInputError naming it."""

    def __init__(self, scans: list[Scan], preprocess: PreprocessConfig, labels: TTELabels) -> None:
        self.volumes = ScanDataset(scans, preprocess)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, item: int) -> dict:
        loaded = self.volumes[item]
        if loaded.volume is None:
            raise TTEInputError(
                f"data.manifest: scan {loaded.scan.scan_id!r} ({loaded.scan.image}) failed to load: "
                f"{loaded.error}; expected a readable volume for every scan of the scans table"
            )
        return {
            "inputs": loaded.volume,
            "time": torch.from_numpy(self.labels.time[item]),
            "event": torch.from_numpy(self.labels.event[item]),
        }


def manifest_scans(manifest: str | Path, scan_ids: np.ndarray) -> list[Scan]:
    """The manifest's ``Scan`` (image path, overrides) of each of ``scan_ids`` (S,), in that order."""
    frame = load_manifest(manifest, require_survival=False)
    by_id = {scan.scan_id: scan for scan in scans_of(frame)}
    absent = [str(s) for s in scan_ids if str(s) not in by_id]
    if absent:
        raise TTEInputError(
            f"data.manifest {manifest}: {len(absent)} scans of data.scans are not in it (first: "
            f"{absent[:3]}); expected a row (scan_id, image) for every scan of the scans table"
        )
    return [by_id[str(s)] for s in scan_ids]


def build_image_encoder(data: TTEDataConfig) -> tuple[MerlinImageEncoder, PreprocessConfig]:
    """(encoder, preprocessing) of ``data.encoder`` / ``encoder_config`` / ``encoder_checkpoint`` /
    ``preprocess_config``, as `vlsurv encode` builds them."""
    encoder = build_encoder(data.encoder, data.encoder_config, data.encoder_checkpoint)
    preprocess = load_config(PreprocessConfig, data.preprocess_config) if data.preprocess_config else None
    return encoder, preprocess or PreprocessConfig()


@torch.no_grad()
def encoder_tokens(model: ImageTTEModel, dataset: LabelledVolumes, batch_size: int) -> torch.Tensor:
    """(N, T, C) tokens of every item of ``dataset`` through the model's encoder (no grad, eval mode), on the
    encoder's device."""
    device = model.encoder.conv1.weight.device
    loader = DataLoader(dataset, batch_size=batch_size)
    return torch.cat([model.tokens(batch["inputs"].to(device)) for batch in loader])


def check_token_shape(tokens: torch.Tensor, config: TTEModelConfig, encoder: MerlinImageEncoder) -> None:
    """TTEInputError naming model.num_image_tokens / model.image_token_dim when the encoder's (N, T, C)
    ``tokens`` do not fit the head's config."""
    expected = (config.num_image_tokens, config.image_token_dim)
    got = tuple(tokens.shape[1:])
    if got != expected:
        raise TTEInputError(
            f"model.num_image_tokens, model.image_token_dim = {expected}: the encoder ({encoder.name}, "
            f"token_mode {encoder.config.token_mode}) gives {got[0]} tokens of width {got[1]} at this "
            "preprocessing; expected the same numbers in the config"
        )


def frozen_weights_dropper(model: nn.Module):
    """A ``register_save_state_pre_hook`` hook that leaves the frozen encoder weights out of checkpoints (they
    come back from ``data.encoder_checkpoint``); the head, the trained stage and all buffers stay. Keys are
    the unwrapped model's (a DDP ``module.`` prefix removed)."""
    frozen = {
        name.removeprefix("module.")
        for name, parameter in model.named_parameters()
        if not parameter.requires_grad and name.removeprefix("module.").startswith(ENCODER_PREFIX)
    }

    def hook(models, weights, output_dir) -> None:
        for state in weights:
            for key in [key for key in state if key in frozen]:
                del state[key]

    return hook


def save_image_encoder(
    final: Path, encoder: MerlinImageEncoder, preprocess: PreprocessConfig, token_shape: list[int]
) -> Path:
    """The fine-tuned encoder into ``final``: weights, provenance record and its two configs (see the module
    docstring); returns the weights file."""
    weights = save_encoder(encoder, final / ENCODER_WEIGHTS_NAME)
    record = {
        "key": cache_key(encoder, preprocess, "float32"),
        "token_shape": token_shape,
        "encoder_config": to_dict(encoder.config),
        "preprocess_config": to_dict(preprocess),
    }
    write_provenance(final, record)
    save_config(encoder.config, final / ENCODER_CONFIG_NAME)
    save_config(preprocess, final / PREPROCESS_CONFIG_NAME)
    return weights
