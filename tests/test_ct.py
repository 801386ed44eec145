"""load_ct: NIfTI and DICOM series in HU, and clear errors for bad input."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from conftest import write_dicom_series

from vlsurv.data.ct import CTError, load_ct


def write_nifti(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.diag([0.8, 0.9, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


def test_nifti_roundtrip_applies_header_scaling(tmp_path):
    stored = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    image = nib.Nifti1Image(stored, np.diag([0.8, 0.9, 2.0, 1.0]))
    image.header.set_slope_inter(2.0, -1024.0)
    nib.save(image, str(tmp_path / "scan.nii.gz"))
    volume = load_ct(tmp_path / "scan.nii.gz")
    assert volume.array.dtype == np.float32 and volume.array.shape == (4, 5, 6)
    np.testing.assert_allclose(volume.array, stored * 2.0 - 1024.0)
    np.testing.assert_allclose(volume.spacing, (0.8, 0.9, 2.0))
    assert volume.source.endswith("scan.nii.gz")


def test_dicom_series_hu_spacing_and_ras_affine(tmp_path):
    rows, columns, n_slices = 6, 5, 4
    stored = np.random.default_rng(1).integers(0, 3000, size=(rows, columns, n_slices)).astype(np.uint16)
    folder = write_dicom_series(tmp_path / "series", stored)
    (folder / "notes.txt").write_text("not a DICOM file")
    volume = load_ct(folder)
    # NIfTI-style axes: (column index, row index, slice sorted by position).
    assert volume.array.shape == (columns, rows, n_slices)
    np.testing.assert_allclose(volume.array, stored.transpose(1, 0, 2) * 2.0 - 1024.0)
    np.testing.assert_allclose(volume.spacing, (0.6, 0.7, 2.5))
    # LPS (-50, -40, 10) -> RAS (50, 40, 10); the column index runs towards patient left = -R.
    expected = np.array([[-0.6, 0, 0, 50.0], [0, -0.7, 0, 40.0], [0, 0, 2.5, 10.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(volume.affine, expected)


def test_missing_file(tmp_path):
    with pytest.raises(CTError, match=r"absent\.nii\.gz: file or folder not found"):
        load_ct(tmp_path / "absent.nii.gz")


def test_unsupported_suffix(tmp_path):
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(CTError, match=r"scan\.png: unsupported CT input"):
        load_ct(tmp_path / "scan.png")


def test_corrupt_nifti(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", np.zeros((8, 8, 8), np.int16)).read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(CTError, match=r"truncated\.nii\.gz: cannot read NIfTI file"):
        load_ct(tmp_path / "truncated.nii.gz")
    (tmp_path / "garbage.nii.gz").write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    with pytest.raises(CTError, match=r"garbage\.nii\.gz: cannot read NIfTI file"):
        load_ct(tmp_path / "garbage.nii.gz")


def test_2d_image(tmp_path):
    write_nifti(tmp_path / "slice.nii.gz", np.zeros((16, 16), np.int16), np.eye(4))
    with pytest.raises(
        CTError, match=r"slice\.nii\.gz: expected a 3D volume, got an image of shape \(16, 16\)"
    ):
        load_ct(tmp_path / "slice.nii.gz")
    write_nifti(tmp_path / "single.nii.gz", np.zeros((16, 16, 1), np.int16), np.eye(4))
    with pytest.raises(CTError, match=r"single\.nii\.gz: expected a 3D volume"):
        load_ct(tmp_path / "single.nii.gz")


def test_nan_volume(tmp_path):
    array = np.zeros((6, 6, 6), np.float32)
    array[1, 2, 3] = np.nan
    array[0, 0, 0] = np.inf
    write_nifti(tmp_path / "nan.nii.gz", array)
    with pytest.raises(CTError, match=r"nan\.nii\.gz: volume contains 2 NaN or infinite voxel"):
        load_ct(tmp_path / "nan.nii.gz")


def test_empty_dicom_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CTError, match=r"empty: no DICOM image files found"):
        load_ct(tmp_path / "empty")
    (tmp_path / "text_only").mkdir()
    (tmp_path / "text_only" / "readme.txt").write_text("hello")
    with pytest.raises(CTError, match=r"text_only: no DICOM image files found"):
        load_ct(tmp_path / "text_only")


def test_mixed_series_folder(tmp_path):
    stored = np.zeros((4, 4, 3), np.uint16)
    write_dicom_series(tmp_path / "mixed", stored, series_uid="1.2.3.4")
    write_dicom_series(tmp_path / "other", stored, series_uid="1.2.3.5")
    for index, file in enumerate(sorted((tmp_path / "other").iterdir())):
        file.rename(tmp_path / "mixed" / f"B{index}.dcm")
    with pytest.raises(CTError, match=r"mixed: folder mixes 2 DICOM series .*1\.2\.3\.4.*1\.2\.3\.5"):
        load_ct(tmp_path / "mixed")


def test_dicom_single_slice_and_uneven_gaps(tmp_path):
    write_dicom_series(tmp_path / "one", np.zeros((4, 4, 1), np.uint16))
    with pytest.raises(CTError, match=r"one: expected a 3D volume, got a series of 1 slice"):
        load_ct(tmp_path / "one")
    write_dicom_series(tmp_path / "gap", np.zeros((4, 4, 4), np.uint16), z_positions=[0.0, 2.5, 5.0, 12.5])
    with pytest.raises(CTError, match=r"gap: slice positions are not evenly spaced"):
        load_ct(tmp_path / "gap")
