"""Load a CT volume in Hounsfield units from a NIfTI file or a DICOM series folder.

``load_ct(path) -> CTVolume`` with ``array`` float32 of shape (X, Y, Z) in HU and ``affine`` (4, 4)
mapping voxel indices to RAS millimetres, as nibabel gives for NIfTI. For DICOM the slices are
sorted by ImagePositionPatient projected on the slice normal, RescaleSlope/RescaleIntercept are
applied, the spacing comes from PixelSpacing and the slice positions, and the LPS patient
coordinates of DICOM are turned into RAS. Bad input raises ``CTError`` naming the file.

``load_ct(path, ScanOverrides(...))`` applies a manifest's per-scan overrides (raw CT-RATE read in place):
``spacing`` (mm per array axis) replaces the header's voxel size, keeping its axis directions and origin;
``slope``/``intercept`` turn the file's stored (unscaled) values into HU = stored * slope + intercept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from vlsurv.errors import InputError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SLICE_SPACING_TOLERANCE = 0.01  # relative deviation allowed between consecutive slice gaps


class CTError(InputError):
    """A CT file or folder that cannot be read as a 3D volume in HU."""


@dataclass
class CTVolume:
    """A CT volume: ``array`` float32 (X, Y, Z) in HU, ``affine`` (4, 4) voxel -> RAS mm, ``source`` path."""

    array: np.ndarray
    affine: np.ndarray
    source: str

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


@dataclass(frozen=True)
class ScanOverrides:
    """Per-scan geometry and intensity that replace a file's header: ``spacing`` mm along array axes
    (0, 1, 2); HU = stored * ``slope`` + ``intercept`` (NIfTI only; both or neither)."""

    spacing: tuple[float, float, float] | None = None
    slope: float | None = None
    intercept: float | None = None

    def __post_init__(self) -> None:
        if (self.slope is None) != (self.intercept is None):
            raise CTError(
                f"ScanOverrides: expected slope and intercept both set or both None, got {self.slope} and "
                f"{self.intercept}"
            )
        if self.spacing is not None and (len(self.spacing) != 3 or not all(v > 0 for v in self.spacing)):
            raise CTError(f"ScanOverrides.spacing: expected 3 mm values > 0, got {self.spacing}")


def load_ct(path: str | Path, overrides: ScanOverrides | None = None) -> CTVolume:
    """Load ``.nii``/``.nii.gz`` or a DICOM series folder as a :class:`CTVolume` in HU."""
    path = Path(path).expanduser()
    overrides = overrides or ScanOverrides()
    rescale = None if overrides.slope is None else (overrides.slope, overrides.intercept)
    if not path.exists():
        raise CTError(f"{path}: file or folder not found")
    if path.is_dir():
        if rescale is not None:
            raise CTError(f"{path}: a rescale override applies to NIfTI files; DICOM slices carry their own")
        volume = _load_dicom_series(path)
    elif path.name.lower().endswith((".nii", ".nii.gz")):
        volume = _load_nifti(path, rescale)
    else:
        raise CTError(f"{path}: unsupported CT input; expected a .nii/.nii.gz file or a DICOM series folder")
    if overrides.spacing is not None:
        volume = CTVolume(volume.array, with_spacing(volume.affine, overrides.spacing), volume.source)
    return check_volume(volume)


def with_spacing(affine: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """``affine`` (4, 4) with voxel size ``spacing`` mm: the header's axis directions (identity when they are
    degenerate) and origin are kept."""
    affine = np.asarray(affine, dtype=np.float64)
    lengths = np.linalg.norm(affine[:3, :3], axis=0)
    directions = affine[:3, :3] / np.where(lengths > 0, lengths, 1.0)
    if abs(np.linalg.det(directions)) < 1e-6:
        directions = np.eye(3)
    out = np.eye(4)
    out[:3, :3] = directions * np.asarray(spacing, dtype=np.float64)
    out[:3, 3] = affine[:3, 3]
    return out


def check_volume(volume: CTVolume) -> CTVolume:
    """Check that ``volume`` is a finite 3D volume with an invertible affine; return it as float32."""
    array = np.asarray(volume.array)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3 or min(array.shape) < 2:
        raise CTError(
            f"{volume.source}: expected a 3D volume, got an image of shape {tuple(volume.array.shape)}"
        )
    non_finite = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if non_finite:
        raise CTError(
            f"{volume.source}: volume contains {non_finite} NaN or infinite voxel(s); expected finite HU"
        )
    affine = np.asarray(volume.affine, dtype=np.float64)
    if (
        affine.shape != (4, 4)
        or not np.all(np.isfinite(affine))
        or abs(np.linalg.det(affine[:3, :3])) < 1e-12
    ):
        raise CTError(f"{volume.source}: affine is not an invertible finite 4x4 matrix")
    return CTVolume(array=array.astype(np.float32, copy=False), affine=affine, source=volume.source)


def _load_nifti(path: Path, rescale: tuple[float, float] | None = None) -> CTVolume:
    """The header's scaling, or stored values * slope + intercept when ``rescale`` is given."""
    try:
        image = nib.load(str(path))
        if rescale is None:
            array = image.get_fdata(dtype=np.float32)
        else:
            proxy = image.dataobj
            stored = proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else np.asanyarray(proxy)
            array = np.asarray(stored, dtype=np.float32) * np.float32(rescale[0]) + np.float32(rescale[1])
        affine = image.affine
    except Exception as error:  # nibabel raises many types (gzip, EOF, header) for broken files
        raise CTError(f"{path}: cannot read NIfTI file ({type(error).__name__}: {error})") from error
    return CTVolume(array=array, affine=np.asarray(affine, dtype=np.float64), source=str(path))


def _read_slices(folder: Path) -> list[pydicom.Dataset]:
    slices = []
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            dataset = pydicom.dcmread(str(file))
        except (InvalidDicomError, OSError):
            continue
        if "PixelData" in dataset:
            slices.append(dataset)
    if not slices:
        raise CTError(f"{folder}: no DICOM image files found in the folder")
    return slices


def _load_dicom_series(folder: Path) -> CTVolume:
    slices = _read_slices(folder)
    series = sorted({str(getattr(s, "SeriesInstanceUID", "")) for s in slices})
    if len(series) > 1:
        raise CTError(
            f"{folder}: folder mixes {len(series)} DICOM series (SeriesInstanceUID {series}); "
            "expected one series per folder"
        )
    try:
        orientation = np.asarray([float(v) for v in slices[0].ImageOrientationPatient], dtype=np.float64)
        row_spacing, column_spacing = (float(v) for v in slices[0].PixelSpacing)
        positions = np.asarray([[float(v) for v in s.ImagePositionPatient] for s in slices], dtype=np.float64)
    except AttributeError as error:
        raise CTError(f"{folder}: DICOM header is missing a geometry tag ({error})") from error
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    order = np.argsort(positions @ normal)
    slices = [slices[i] for i in order]
    positions = positions[order]
    if len(slices) < 2:
        raise CTError(f"{folder}: expected a 3D volume, got a series of 1 slice")
    gaps = np.diff(positions @ normal)
    if np.any(gaps <= 1e-6) or np.ptp(gaps) > _SLICE_SPACING_TOLERANCE * np.mean(gaps):
        raise CTError(
            f"{folder}: slice positions are not evenly spaced (gaps {np.round(gaps, 3).tolist()} mm)"
        )
    pixels = []
    for dataset in slices:
        slope = float(getattr(dataset, "RescaleSlope", 1.0))
        intercept = float(getattr(dataset, "RescaleIntercept", 0.0))
        pixels.append(dataset.pixel_array.astype(np.float32) * slope + intercept)
    # pixel_array is (Rows, Columns); the column index runs along row_direction -> NIfTI axis 0.
    array = np.stack(pixels, axis=-1).transpose(1, 0, 2)
    slice_step = (positions[-1] - positions[0]) / (len(slices) - 1)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_direction * column_spacing
    affine_lps[:3, 1] = column_direction * row_spacing
    affine_lps[:3, 2] = slice_step
    affine_lps[:3, 3] = positions[0]
    return CTVolume(array=array, affine=_LPS_TO_RAS @ affine_lps, source=str(folder))
