"""The embedded synthetic CT cohort, in the order a patient is made.

- ``anatomy``: the voxel ``Grid``, the ``Findings`` of one scan and ``render_scan`` (label map -> int16 HU).
- ``reports``: ``write_report(findings, rng)``, a report stating exactly those findings.
- ``cohort``: ``build_cohort_table(n, seed)``, findings, clinical fields, report, survival time and split of
  every patient (no images), and ``oracle_summary`` (the oracle C-indices).
- ``events``: ``build_events_table(findings, table, seed)``, a MEDS-like EHR (events + scan times) whose
  codes' hazards depend on the same image findings as survival, plus noise codes.
- ``write``: ``make_cohort(n, seed, out_dir)``, the table plus one NIfTI per patient on disk, and ``main``
  (``vlsurv synth``).
"""

from vlsurv.data.synthetic.anatomy import LOBES, Findings, Grid, RenderedScan, Tissue, render_scan
from vlsurv.data.synthetic.cohort import (
    CLINICAL_COEFFICIENTS,
    CLINICAL_COLUMNS,
    IMAGE_COEFFICIENTS,
    QUESTION_IDS,
    SurvivalModel,
    SyntheticCohortError,
    build_cohort_table,
    clinical_cox_c_index,
    oracle_summary,
    patient_rng,
    risk_features,
    sample_clinical,
    sample_findings,
)
from vlsurv.data.synthetic.events import EVENT_CODES, build_events_table
from vlsurv.data.synthetic.reports import LOBE_NAMES, write_report
from vlsurv.data.synthetic.write import DEFAULT_SHAPE, main, make_cohort, resolve_grid

__all__ = [
    "CLINICAL_COEFFICIENTS",
    "CLINICAL_COLUMNS",
    "DEFAULT_SHAPE",
    "EVENT_CODES",
    "IMAGE_COEFFICIENTS",
    "LOBES",
    "LOBE_NAMES",
    "QUESTION_IDS",
    "Findings",
    "Grid",
    "RenderedScan",
    "SurvivalModel",
    "SyntheticCohortError",
    "Tissue",
    "build_cohort_table",
    "build_events_table",
    "clinical_cox_c_index",
    "main",
    "make_cohort",
    "oracle_summary",
    "patient_rng",
    "render_scan",
    "resolve_grid",
    "risk_features",
    "sample_clinical",
    "sample_findings",
    "write_report",
]
