"""The embedded synthetic CT cohort: ``vlsurv synth`` and ``make_cohort``.

``make_cohort`` draws the table (``cohort.build_cohort_table``), renders each patient's CT in HU on one voxel
grid (``anatomy.render_scan``) and writes the NIfTI files, ``manifest.csv``, ``findings.csv`` and
``oracle.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time as timer
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

from vlsurv.data.synthetic.anatomy import MIN_FOV_MM, STANDARD_FOV_MM, Grid, base_labels, render_scan
from vlsurv.data.synthetic.cohort import (
    CLINICAL_COLUMNS,
    SurvivalModel,
    SyntheticCohortError,
    build_cohort_table,
    oracle_summary,
    patient_rng,
)
from vlsurv.data.synthetic.events import build_events_table

DEFAULT_SHAPE = (128, 128, 64)


def resolve_grid(shape=DEFAULT_SHAPE, spacing=None) -> Grid:
    """The voxel grid; ``spacing=None`` spreads ``shape`` over a 384 mm cube. Raises when the field of
    view is too small for the anatomy (MIN_FOV_MM)."""
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise SyntheticCohortError(f"synthetic cohort: shape must be 3 positive integers, got {shape}")
    spacing = (
        tuple(float(fov / n) for fov, n in zip(STANDARD_FOV_MM, shape))
        if spacing is None
        else tuple(float(v) for v in spacing)
    )
    if len(spacing) != 3 or min(spacing) <= 0:
        raise SyntheticCohortError(
            f"synthetic cohort: spacing must be 3 positive numbers (mm), got {spacing}"
        )
    for axis, n, s, need in zip("xyz", shape, spacing, MIN_FOV_MM):
        if n * s < need:
            raise SyntheticCohortError(
                f"synthetic cohort: field of view along {axis} is {n} x {s:g} mm = {n * s:g} mm, "
                "smaller than the "
                f"{need:g} mm the anatomy needs; raise the shape or the spacing"
            )
    return Grid(shape=shape, spacing=spacing)  # type: ignore[arg-type]


def _write_nifti(hu: np.ndarray, grid: Grid, path: Path) -> None:
    image = nib.Nifti1Image(hu, grid.affine)
    image.set_qform(grid.affine, code=1)
    image.set_sform(grid.affine, code=1)
    image.header.set_xyzt_units("mm")
    image.to_filename(path)


def make_cohort(
    n: int,
    seed: int,
    out_dir,
    *,
    shape=DEFAULT_SHAPE,
    spacing=None,
    model: SurvivalModel = SurvivalModel(),  # noqa: B008 (a frozen dataclass)
) -> Path:
    """Write n synthetic patients to ``out_dir`` and return the path of ``manifest.csv``.

    Writes ``images/<scan_id>.nii.gz`` (int16 HU, shape ``shape``, RAS affine), ``manifest.csv``
    (manifest columns + age, sex, smoking, stage, t_stage, n_stage, m_stage), ``findings.csv``
    (scan_id, the six question flags and detail columns), ``oracle.json`` and the synthetic EHR
    (``events.build_events_table``): ``events.csv`` (patient_id, time, code) and ``scans.csv`` (scan_id,
    patient_id, time, split), times in days.
    """
    grid = resolve_grid(shape, spacing)
    all_findings, table = build_cohort_table(n, seed, model)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    base_labels(grid)  # build the shared anatomy once, before the threads read it

    def write_scan(i: int) -> None:
        hu = render_scan(all_findings[i], grid, patient_rng(seed, 1, i, 1)).hu
        _write_nifti(hu, grid, out_dir / table["image"].iloc[i])

    with ThreadPoolExecutor(
        max_workers=min(2, os.cpu_count() or 1)
    ) as pool:  # zlib and numpy release the GIL
        list(pool.map(write_scan, range(n)))
    manifest_columns = [
        "patient_id",
        "scan_id",
        "image",
        "report",
        "time",
        "event",
        "split",
        *CLINICAL_COLUMNS,
    ]
    manifest_path = out_dir / "manifest.csv"
    table[manifest_columns].to_csv(manifest_path, index=False)
    detail = [
        c
        for c in table.columns
        if c not in manifest_columns and c not in ("linear_predictor", "clinical_predictor")
    ]
    table[["scan_id", *detail]].to_csv(out_dir / "findings.csv", index=False)
    summary = {
        **oracle_summary(table, seed, model),
        "shape": list(grid.shape),
        "spacing_mm": list(grid.spacing),
    }
    (out_dir / "oracle.json").write_text(json.dumps(summary, indent=2) + "\n")
    events, scans = build_events_table(all_findings, table, seed)
    events.to_csv(out_dir / "events.csv", index=False)
    scans.to_csv(out_dir / "scans.csv", index=False)
    return manifest_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlsurv synth", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, required=True, help="number of patients (one scan each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z"))
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=None,
        metavar=("SX", "SY", "SZ"),
        help="voxel size in mm (default: the shape spread over a 384 mm cube)",
    )
    args = parser.parse_args(argv)
    start = timer.perf_counter()
    try:
        manifest = make_cohort(args.n, args.seed, args.out, shape=args.shape, spacing=args.spacing)
    except SyntheticCohortError as err:
        parser.error(str(err))
    oracle = json.loads((args.out / "oracle.json").read_text())
    print(
        f"wrote {args.n} patients to {manifest} in {timer.perf_counter() - start:.1f} s; "
        f"event rate {oracle['event_rate']:.2f}, oracle C {oracle['oracle_c_index']}, "
        f"oracle C (test) {oracle['oracle_c_index_test']}, clinical-only C (test) "
        f"{oracle['clinical_only_oracle_c_index']}"
    )
    return 0
