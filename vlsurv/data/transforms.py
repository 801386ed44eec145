"""Merlin's CT preprocessing as MONAI dictionary transforms built from a config.

``build_preprocess(cfg)`` chains, on dicts ``{"image": path_or_CTVolume}``:
``LoadCTd`` (``load_ct`` -> MetaTensor (1, X, Y, Z) with the affine) -> ``Orientationd`` to
``cfg.orientation`` -> ``Spacingd`` to ``cfg.spacing`` mm -> ``ScaleIntensityRanged`` clipping
``[hu_min, hu_max]`` to ``[out_min, out_max]`` -> ``ResizeWithPadOrCropd`` to ``cfg.spatial_size``
(centred; padding takes the value ``out_min``, i.e. air) -> float32.
``preprocess_ct(path_or_volume, cfg)`` returns a float32 tensor (1, H, W, D) (RAS: H = right-left
axis, W = anterior-posterior axis, D = axial). ``config_hash(cfg)`` is a stable sha256 of the config.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    Spacingd,
)

from vlsurv.config import bounded, check_fields, invalid, to_dict
from vlsurv.data.ct import CTVolume, check_volume, load_ct

SECTION = "PreprocessConfig"  # how errors name a field: PreprocessConfig.spacing


@dataclass
class PreprocessConfig:
    """Preprocessing numbers; the defaults are Merlin's (RAS, 1.5 x 1.5 x 3 mm, [-1000, 1000] HU -> [0, 1],
    224 x 224 x 160 voxels). ``config_hash`` of it names the feature caches: values are normalised (upper-case
    axis codes, float mm and HU, int sizes) before they are hashed."""

    orientation: str = "RAS"
    """Target axis codes, one of L/R, P/A, I/S per axis (such as 'RAS'); case-insensitive."""
    spacing: tuple[float, float, float] = bounded((1.5, 1.5, 3.0), gt=0.0, what="3 mm values")
    """Target voxel spacing in mm along the three axes."""
    hu_min: float = -1000.0
    """Lowest Hounsfield unit kept; lower values are clipped to it (maps to ``out_min``)."""
    hu_max: float = 1000.0
    """Highest Hounsfield unit kept; higher values are clipped to it (maps to ``out_max``)."""
    out_min: float = 0.0
    """Intensity of ``hu_min`` after scaling (and of the padding, i.e. air)."""
    out_max: float = 1.0
    """Intensity of ``hu_max`` after scaling."""
    spatial_size: tuple[int, int, int] = bounded((224, 224, 160), ge=1, what="3 sizes")
    """Output volume (H, W, D) in voxels, centred crop or pad."""

    def __post_init__(self) -> None:
        self.orientation = str(self.orientation).upper()
        self.spacing = tuple(float(v) for v in self.spacing)
        self.spatial_size = tuple(int(v) for v in self.spatial_size)
        self.hu_min, self.hu_max = float(self.hu_min), float(self.hu_max)
        self.out_min, self.out_max = float(self.out_min), float(self.out_max)
        check_fields(self, SECTION)
        axes = [
            next((i for i, pair in enumerate(("LR", "PA", "IS")) if c in pair), None)
            for c in self.orientation
        ]
        if len(self.orientation) != 3 or sorted(axes, key=str) != [0, 1, 2]:
            expected = (
                f"expected 3 axis codes such as 'RAS', got {self.orientation!r} (one of L/R, P/A, I/S each)"
            )
            raise invalid(SECTION, "orientation", expected)
        if len(self.spacing) != 3:
            raise invalid(SECTION, "spacing", f"expected 3 mm values > 0, got {list(self.spacing)}")
        if len(self.spatial_size) != 3:
            raise invalid(SECTION, "spatial_size", f"expected 3 sizes >= 1, got {list(self.spatial_size)}")
        if self.hu_min >= self.hu_max:
            raise invalid(SECTION, "hu_max", f"expected hu_min < hu_max, got {self.hu_min} >= {self.hu_max}")


class LoadCTd(MapTransform):
    """Replace each key's path (or CTVolume) by a channel-first MetaTensor (1, X, Y, Z) in HU with its
    affine."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        out = dict(data)
        for key in self.key_iterator(out):
            value = out[key]
            volume = check_volume(value) if isinstance(value, CTVolume) else load_ct(Path(str(value)))
            affine = torch.as_tensor(volume.affine, dtype=torch.float64)
            out[key] = MetaTensor(
                torch.from_numpy(volume.array.copy())[None],
                affine=affine,
                meta={"filename_or_obj": volume.source, "original_affine": affine.clone()},
            )
        return out


def build_preprocess(cfg: PreprocessConfig, keys: KeysCollection = ("image",)) -> Compose:
    """MONAI ``Compose`` over dicts ``{"image": path}`` producing float32 (1, H, W, D) per key."""
    return Compose(
        [
            LoadCTd(keys),
            Orientationd(keys, axcodes=cfg.orientation, labels=None),
            Spacingd(keys, pixdim=cfg.spacing, mode="bilinear", padding_mode="border"),
            ScaleIntensityRanged(
                keys, a_min=cfg.hu_min, a_max=cfg.hu_max, b_min=cfg.out_min, b_max=cfg.out_max, clip=True
            ),
            ResizeWithPadOrCropd(keys, spatial_size=cfg.spatial_size, mode="constant", value=cfg.out_min),
            EnsureTyped(keys, dtype=torch.float32, track_meta=False),
        ]
    )


def preprocess_ct(path_or_volume: str | Path | CTVolume, cfg: PreprocessConfig) -> torch.Tensor:
    """Load and preprocess one CT: float32 tensor (1, *cfg.spatial_size)."""
    return build_preprocess(cfg)({"image": path_or_volume})["image"]


def config_hash(cfg: PreprocessConfig) -> str:
    """Stable sha256 (hex) of the resolved config."""
    payload = json.dumps({"type": type(cfg).__name__, **to_dict(cfg)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
