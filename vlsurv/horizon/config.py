"""``HorizonConfig``: the options of `vlsurv horizon` (saved as OUT/config.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from vlsurv.config import bounded, check_fields, invalid

if TYPE_CHECKING:
    from vlsurv.data.transforms import PreprocessConfig

SECTION = "horizon"
Architecture = Literal["resnet18", "densenet121", "swin"]
Size = Literal["full", "tiny"]
SWIN_DIVISOR = 32  # Swin: patch size 2, then 4 patch-merging stages


@dataclass
class HorizonConfig:
    """Fine-tune a MONAI 3D network for death within fixed horizons, then tabulate horizon AUROCs."""

    manifest: str = ""
    """Cohort manifest (CSV or JSONL) with time, event and split per scan."""
    out: str = ""
    """Output folder: checkpoints, model, label counts, predictions, AUROC table (rerun with --resume)."""
    horizons: tuple[float, ...] = bounded((365.0, 1095.0, 1825.0), gt=0.0, what="horizons")
    """Horizons in the manifest's time unit; one classification head each."""
    model: Architecture = "resnet18"
    """Network: MONAI's ResNet-18, DenseNet-121, or the Swin transformer encoder of SwinUNETR."""
    size: Size = "full"
    """'full' = the published architecture; 'tiny' = a small one of the same family (CPU tests)."""
    init_checkpoint: str | None = None
    """Local state dict (.safetensors, or a torch file read with weights_only) for the backbone, e.g.
    MedicalNet or a MONAI bundle's weights; null = train from scratch."""
    init_key_prefix: str = ""
    """Prefix stripped from the init checkpoint's tensor names ('module.' always is), e.g. 'swinViT.'."""
    spacing: tuple[float, float, float] = bounded((1.5, 1.5, 3.0), gt=0.0, what="3 mm values")
    """Resampled voxel size in mm (the encoder's preprocessing by default)."""
    spatial_size: tuple[int, int, int] = bounded((224, 224, 160), ge=1, what="3 sizes")
    """Volume (H, W, D) in voxels after centred crop or pad; multiples of 32 for swin."""
    volume_cache: str | None = None
    """Folder of MONAI PersistentDataset's preprocessed volumes; null = OUT/volume_cache."""
    augment: bool = True
    """MONAI augmentations while training: flips, small affine, intensity shift."""
    class_weighting: Literal["balanced", "none"] = "balanced"
    """'balanced': positives weighted by negatives / positives of the train split, per horizon."""
    epochs: int = bounded(20, ge=1)
    """Passes over the train split."""
    max_steps: int | None = bounded(None, ge=1)
    """Stop after this many optimizer steps in all (resumed ones included); null = the epochs."""
    batch_size: int = bounded(2, ge=1)
    """Scans per process and step."""
    lr: float = bounded(1e-4, gt=0.0)
    """AdamW learning rate."""
    weight_decay: float = bounded(1e-4, ge=0.0)
    """AdamW weight decay."""
    checkpoint_every: int = bounded(200, ge=0)
    """Save a checkpoint every N steps (0: only at the end); the end of training always saves one."""
    keep_last: int = bounded(2, ge=1)
    """Checkpoints kept."""
    resume: str | None = None
    """'latest' or a checkpoint folder (OUT/checkpoints/step-...) to continue from."""
    eval_split: Literal["val", "test", "all"] = "test"
    """Manifest split the AUROC table is computed on."""
    compare: tuple[str, ...] = ()
    """Other models' risks on the same scans: NAME=PATH or NAME:COLUMN=PATH of a CSV with scan_id and the
    column (default 'risk', higher = earlier death), e.g. vlsurv predict's predictions.csv."""
    bootstrap: int = bounded(1000, ge=1)
    """Bootstrap resamples (over patients) for the AUROC CIs."""
    seed: int = 0
    """Seed of the initialisation, data order, augmentations and bootstrap."""
    cpu: bool = False
    """Train on the CPU even where a GPU is available."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """accelerate's mixed precision."""
    num_workers: int = bounded(0, ge=0)
    """DataLoader worker processes."""

    def __post_init__(self) -> None:
        self.horizons = tuple(float(h) for h in self.horizons)
        check_fields(self, SECTION)
        if not self.horizons or len(set(self.horizons)) != len(self.horizons):
            raise invalid(SECTION, "horizons", f"expected distinct horizons > 0, got {list(self.horizons)}")
        if self.model == "swin" and any(side % SWIN_DIVISOR for side in self.spatial_size):
            raise invalid(
                SECTION,
                "spatial_size",
                f"expected multiples of {SWIN_DIVISOR} for swin, got {list(self.spatial_size)}",
            )

    def preprocess(self) -> PreprocessConfig:
        """The CT preprocessing (Merlin's orientation and HU window) at this spacing and size."""
        from vlsurv.data.transforms import PreprocessConfig  # MONAI (~5 s): not for `vlsurv horizon --help`

        return PreprocessConfig(spacing=self.spacing, spatial_size=self.spatial_size)
