"""Merlin preprocessing from PreprocessConfig: shape, value range and RAS orientation."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from vlsurv.config import ConfigError
from vlsurv.data.ct import CTVolume
from vlsurv.data.transforms import PreprocessConfig, build_preprocess, config_hash, preprocess_ct

# Array axis 0 runs anterior -> posterior (1.3 mm), axis 1 right -> left (2.0 mm), axis 2 inferior -> superior
# (2.5 mm): a permuted, flipped, LPS-like layout with odd spacing.
NON_RAS_AFFINE = np.array(
    [
        [0.0, -2.0, 0.0, 30.0],
        [-1.3, 0.0, 0.0, 12.0],
        [0.0, 0.0, 2.5, -40.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
CFG = PreprocessConfig(
    spacing=(2.0, 2.0, 3.0), spatial_size=(24, 32, 20), hu_min=-500.0, hu_max=500.0, out_min=-1.0, out_max=2.0
)


def make_volume():
    """Body at 0 HU with a 3000 HU marker in the right-anterior-superior corner and a -3000 HU core."""
    array = np.zeros((20, 16, 12), np.float32)
    array[:4, :4, 8:] = 3000.0  # smallest axis-0 / axis-1 indices = most anterior / most right
    array[8:12, 6:10, 4:8] = -3000.0
    return CTVolume(array=array, affine=NON_RAS_AFFINE, source="synthetic")


def relative_marker_position_ras(volume: CTVolume) -> np.ndarray:
    """Marker centre within the body's extent in RAS world coordinates, per R, A, S axis (0..1)."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in volume.array.shape], indexing="ij")).reshape(3, -1)
    world = (volume.affine[:3, :3] @ corners).T + volume.affine[:3, 3]
    marker = volume.affine[:3, :3] @ np.argwhere(volume.array > 1000).mean(axis=0) + volume.affine[:3, 3]
    return (marker - world.min(axis=0)) / (world.max(axis=0) - world.min(axis=0))


def test_non_ras_volume_shape_range_and_orientation(tmp_path):
    volume = make_volume()
    nib.save(nib.Nifti1Image(volume.array, volume.affine), str(tmp_path / "scan.nii.gz"))
    out = preprocess_ct(tmp_path / "scan.nii.gz", CFG)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert tuple(out.shape) == (1, 24, 32, 20)
    assert out.min().item() == pytest.approx(-1.0) and out.max().item() == pytest.approx(2.0)
    body = out[0] > -1.0 + 1e-4  # padding is out_min (air); the body is 0 HU -> 0.5
    lo = torch.stack([torch.nonzero(body)[:, a].min() for a in range(3)]).numpy()
    hi = torch.stack([torch.nonzero(body)[:, a].max() for a in range(3)]).numpy()
    # Resampled extents: R-L 32 mm / 2 -> 16, A-P 26 mm / 2 -> 13, S-I 30 mm / 3 -> 10 voxels, centred by
    # padding.
    np.testing.assert_allclose(hi - lo + 1, (16, 14, 11), atol=1)
    marker = torch.nonzero(out[0] > 1.9).float().mean(dim=0).numpy()
    relative = (marker - lo) / (hi - lo)
    expected = relative_marker_position_ras(volume)
    assert np.all(expected > 0.8)  # the marker is in the right-anterior-superior corner
    np.testing.assert_allclose(relative, expected, atol=0.1)
    np.testing.assert_allclose(preprocess_ct(volume, CFG).numpy(), out.numpy(), atol=1e-5)


def test_default_merlin_config_shape():
    volume = make_volume()
    out = build_preprocess(PreprocessConfig())({"image": volume})["image"]
    assert tuple(out.shape) == (1, 224, 224, 160)
    assert 0.0 <= out.min().item() and out.max().item() <= 1.0


def test_config_hash_is_stable_and_sensitive():
    assert config_hash(PreprocessConfig()) == config_hash(PreprocessConfig())
    assert len(config_hash(PreprocessConfig())) == 64
    ints = PreprocessConfig(spacing=(6, 6, 6), spatial_size=(64.0, 64.0, 32.0))
    assert config_hash(ints) == config_hash(
        PreprocessConfig(spacing=(6.0, 6.0, 6.0), spatial_size=(64, 64, 32))
    )
    assert config_hash(PreprocessConfig(hu_min=-900.0)) != config_hash(PreprocessConfig())
    assert config_hash(PreprocessConfig(orientation="ras")) == config_hash(PreprocessConfig())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"orientation": "RAR"}, r"orientation: expected 3 axis codes such as 'RAS', got 'RAR'"),
        (
            {"spacing": (1.0, 0.0, 1.0)},
            r"^PreprocessConfig\.spacing: expected 3 mm values > 0, got \[1\.0, 0\.0, 1\.0\]$",
        ),
        ({"spatial_size": (8, 8)}, r"^PreprocessConfig\.spatial_size: expected 3 sizes >= 1, got \[8, 8\]$"),
        ({"hu_min": 100.0, "hu_max": -100.0}, r"^PreprocessConfig\.hu_max: expected hu_min < hu_max"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PreprocessConfig(**kwargs)
