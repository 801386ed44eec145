"""Preprocessed CT volumes with horizon labels: MONAI's PersistentDataset, then seeded augmentations.

The deterministic part, ``vlsurv.data.transforms.build_preprocess`` (load HU, orient, resample, window, crop
or pad: the encoder's preprocessing), runs once per scan: MONAI's ``PersistentDataset`` stores its output
under ``cache_root/<config_hash[:16]>/``, keyed by the image path, size and modification time, so a later
epoch or run reads the resampled volume instead of redoing it. The random part (``augmentations``: flips,
small affine, intensity shift) runs after it, seeded by (seed, epoch, scan index), so a resumed run sees the
same augmented volumes as an uninterrupted one, with any number of workers.

An item is ``{"image": (1, H, W, D) float32, "label": (n_horizons,) float32, "known": (n_horizons,) bool,
"index": int}``; ``known`` is False where the scan is censored before that horizon (see ``labels``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.data import PersistentDataset
from monai.transforms import Compose, RandAffined, RandFlipd, RandShiftIntensityd
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from vlsurv.data.transforms import PreprocessConfig, build_preprocess, config_hash
from vlsurv.horizon.labels import HorizonLabels

KEYS = ("image",)


def augmentations() -> Compose:
    """Flips along each axis (p = 0.5), a small affine (p = 0.5: rotation <= 0.1 rad, scale <= 10 %,
    shift <= 4 voxels) and an intensity shift (p = 0.5, <= 0.05 of the [0, 1] window)."""
    return Compose(
        [
            *(RandFlipd(KEYS, prob=0.5, spatial_axis=axis) for axis in range(3)),
            RandAffined(
                KEYS,
                prob=0.5,
                rotate_range=(0.1, 0.1, 0.1),
                scale_range=(0.1, 0.1, 0.1),
                translate_range=(4, 4, 4),
                padding_mode="border",
            ),
            RandShiftIntensityd(KEYS, offsets=0.05, prob=0.5),
        ]
    )


def volume_cache_dir(cache_root: str | Path, preprocess: PreprocessConfig) -> Path:
    """The PersistentDataset folder of one preprocessing (a new spacing or size gets its own)."""
    return Path(cache_root) / config_hash(preprocess)[:16]


def _stamp(image: str) -> str:
    stat = Path(image).stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


class HorizonVolumes(Dataset):
    """Scans ``images`` (N paths) with ``labels`` (N rows); ``augment`` adds seeded MONAI augmentations."""

    def __init__(
        self,
        images: list[str],
        labels: HorizonLabels,
        preprocess: PreprocessConfig,
        cache_root: str | Path,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        items = [{"image": str(image), "stamp": _stamp(str(image))} for image in images]
        transform = Compose(list(build_preprocess(preprocess, KEYS).transforms))
        cache = volume_cache_dir(cache_root, preprocess)
        cache.mkdir(parents=True, exist_ok=True)
        self.volumes = PersistentDataset(items, transform=transform, cache_dir=cache)
        self.label = torch.from_numpy(np.asarray(labels.label, dtype=np.float32))
        self.known = torch.from_numpy(np.asarray(labels.known, dtype=bool))
        self.augment = augmentations() if augment else None
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentations ``__getitem__`` draws (call before making the epoch's loader)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict:
        item = self.volumes[index]
        if self.augment is not None:
            key = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
            self.augment.set_random_state(seed=int(key))
            item = self.augment(item)
        image = convert_to_tensor(item["image"], dtype=torch.float32, track_meta=False)
        return {"image": image, "label": self.label[index], "known": self.known[index], "index": index}
