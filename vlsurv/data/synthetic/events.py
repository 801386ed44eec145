"""A synthetic EHR for the cohort: a MEDS-like events table and each scan's time (``vlsurv synth``).

Per patient i, drawn from its own stream ``patient_rng(seed, 3, i)`` (so the cohort's findings, images,
reports and survival are unchanged): the record starts with a first visit at day 0 and ``MEDS_BIRTH`` at
``-age`` years before the scan; the scan is at a uniform day in [30, 720]; noise codes occur before and after
the scan; after the scan every code of ``EVENT_CODES`` occurs as a Poisson process with the per-year rate
``base x exp(sum_f beta_f x_f)`` over the image features x of ``risk_features`` (those that also drive
survival: effusion depth, tumor size, vessel invasion, bone lesion, metastases, nodes); noise codes
(``NOISE/...``) ignore the image. The record ends at the survival time with ``DEATH`` when the event was
observed, else with a last follow-up visit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vlsurv.data.synthetic.anatomy import Findings
from vlsurv.data.synthetic.cohort import patient_rng, risk_features

DAYS_PER_YEAR = 365.25
#: code -> (base events per year, {image feature of risk_features: log-rate coefficient})
EVENT_CODES: dict[str, tuple[float, dict[str, float]]] = {
    "ICD10/J91.8": (0.15, {"effusion_per_cm": 0.7}),  # pleural effusion
    "CPT/32555": (0.05, {"effusion_per_cm": 0.9}),  # thoracentesis
    "ICD10/R06.02": (0.4, {"effusion_per_cm": 0.4, "log_tumor_size": 0.4}),  # shortness of breath
    "ICD10/C78.01": (0.1, {"log_tumor_size": 1.0, "metastases": 0.6}),  # secondary malignancy of lung
    "ICD10/R04.2": (0.08, {"vessel_invasion": 1.6}),  # hemoptysis
    "ICD10/I87.1": (0.05, {"vessel_invasion": 1.4, "log_tumor_size": 0.4}),  # compression of vein
    "CPT/77427": (0.2, {"log_tumor_size": 0.7, "bone_lesion": 0.8}),  # radiation treatment management
    "ICD10/C79.51": (0.04, {"bone_lesion": 1.6, "metastases": 0.5}),  # secondary malignancy of bone
    "ICD10/C77.1": (0.08, {"node_short_axis_per_cm": 0.9}),  # secondary malignancy of thoracic nodes
}
NOISE_CODES = 24
BIRTH, FIRST_VISIT, DEATH = "MEDS_BIRTH", "VISIT/OUTPATIENT", "DEATH"


def _noise_rates() -> dict[str, float]:
    """Fixed per-year rates of the noise codes, log-spaced from 0.05 to 1."""
    rates = np.geomspace(0.05, 1.0, NOISE_CODES)
    return {f"NOISE/{k:03d}": float(rate) for k, rate in enumerate(rates)}


def _poisson_times(rng: np.random.Generator, rate_per_year: float, start: float, end: float) -> np.ndarray:
    count = rng.poisson(rate_per_year * max(end - start, 0.0) / DAYS_PER_YEAR)
    return np.sort(rng.uniform(start, end, size=count))


def patient_events(f: Findings, row: dict, seed: int, index: int) -> tuple[list[tuple[float, str]], float]:
    """([(day, code)], scan day) of patient ``index`` with findings ``f`` and cohort row ``row``."""
    rng = patient_rng(seed, 3, index)
    _, image = risk_features(f, row)
    scan_day = float(np.round(rng.uniform(30.0, 720.0)))
    end = scan_day + float(row["time"])
    events = [(0.0, FIRST_VISIT), (scan_day - row["age"] * DAYS_PER_YEAR, BIRTH)]
    for code, rate in _noise_rates().items():
        events += [(float(t), code) for t in _poisson_times(rng, rate, 0.0, end)]
    for code, (base, coefficients) in EVENT_CODES.items():
        rate = base * np.exp(sum(beta * image[name] for name, beta in coefficients.items()))
        events += [(float(t), code) for t in _poisson_times(rng, rate, scan_day, end)]
    events.append((end, DEATH if row["event"] else FIRST_VISIT))  # death, or the last follow-up visit
    return events, scan_day


def build_events_table(
    findings: list[Findings], table: pd.DataFrame, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(events: patient_id, time (day, float), code; scans: scan_id, patient_id, time, split) of the cohort
    ``table`` (``build_cohort_table``) with its ``findings``."""
    event_rows, scan_rows = [], []
    for i, (f, row) in enumerate(zip(findings, table.to_dict("records"))):
        events, scan_day = patient_events(f, row, seed, i)
        event_rows += [(row["patient_id"], round(day, 2), code) for day, code in events]
        scan_rows.append((row["scan_id"], row["patient_id"], scan_day, row["split"]))
    events = pd.DataFrame(event_rows, columns=["patient_id", "time", "code"])
    events = events.sort_values(["patient_id", "time"], kind="stable", ignore_index=True)
    scans = pd.DataFrame(scan_rows, columns=["scan_id", "patient_id", "time", "split"])
    return events, scans
