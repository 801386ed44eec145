"""The synthetic patients as a table: findings, clinical fields, report, survival time and split.

Per patient: findings drawn by ``sample_findings`` (rendered to a CT by ``anatomy``), a report stating
exactly them (``reports``), clinical fields partly tied to the findings (TNM read from them with
misclassification), and a survival time in days from a Weibull proportional-hazards model whose linear
predictor mixes clinical terms with image terms that the clinical table does not carry (tumor size beyond T,
vessel invasion, effusion depth, bone lesion).

Everything is drawn from ``numpy.random.SeedSequence(seed, spawn_key=(1, i, k))`` per patient i
(``patient_rng``), so a cohort is deterministic per seed and patient i is the same in a cohort of any size.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from vlsurv.data.synthetic.anatomy import LOBES, NODE_STATIONS, VERTEBRAE, Findings
from vlsurv.data.synthetic.reports import write_report
from vlsurv.errors import InputError
from vlsurv.metrics import MetricError, concordance_index

QUESTION_IDS = ("tumor", "lymph_nodes", "pleura", "metastases", "vessels", "bone")
CLINICAL_COLUMNS = ("age", "sex", "smoking", "stage", "t_stage", "n_stage", "m_stage")
#: Log-hazard coefficients of the survival model; features are defined in ``risk_features``. Most image risk
#: sits on findings large enough to see on the demo's 3 x 3 x 6 mm grid (effusion depth, vessel invasion,
#: tumor size); a 1 cm bone lesion is a few voxels there, so it carries less.
CLINICAL_COEFFICIENTS = {
    "age_per_decade": 0.3,
    "male": 0.2,
    "former_smoker": 0.1,
    "current_smoker": 0.3,
    "stage": 0.25,
    "m1": 0.3,
}
IMAGE_COEFFICIENTS = {
    "log_tumor_size": 0.8,
    "vessel_invasion": 1.0,
    "effusion_per_cm": 0.5,
    "bone_lesion": 0.5,
    "metastases": 0.3,
    "node_short_axis_per_cm": 0.2,
}


@dataclass(frozen=True)
class SurvivalModel:
    """Weibull PH: S(t | lp) = exp(-(t / scale_days) ** shape * exp(lp - lp_reference)); exponential
    random censoring with mean ``censor_mean_days`` and administrative censoring at ``followup_days``."""

    shape: float = 1.3
    scale_days: float = 1500.0
    lp_reference: float = 1.55
    censor_mean_days: float = 6000.0
    followup_days: float = 2920.0


class SyntheticCohortError(InputError):
    """A synthetic-cohort argument that cannot produce a valid cohort."""


def patient_rng(seed: int, *key: int) -> np.random.Generator:
    """The generator of stream ``key`` of a cohort; patient i draws from ``(1, i, k)`` with k = 0 findings,
    1 scan noise, 2 report, 3 survival, 4 clinical fields, and the splits from ``(2,)``."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _sample_nodes(rng, tumor_side: str, tumor_size_mm: int, vessel: str) -> tuple[tuple[str, int], ...]:
    if rng.random() >= (0.25 + 0.35 * tumor_size_mm / 70.0 if tumor_size_mm else 0.2):
        return ()
    side_code = tumor_side[:1].upper()
    weights = {}
    for station, (_, side) in NODE_STATIONS.items():
        ipsilateral = side == side_code or side == "M" or not side_code
        if vessel and "hilar" in station and side == side_code:
            continue  # the invading mass occupies the ipsilateral hilum
        weights[station] = (3.0 if "hilar" in station else 2.0) if ipsilateral else 0.6
    count = 1 + int(rng.random() < 0.4) + int(rng.random() < 0.2)
    names = list(weights)
    p = np.array([weights[name] for name in names])
    chosen = rng.choice(len(names), size=min(count, len(names)), replace=False, p=p / p.sum())
    return tuple((names[i], int(rng.integers(10, 31))) for i in sorted(chosen))


def sample_findings(rng: np.random.Generator) -> Findings:
    """Draw one patient's findings (see docs/DESIGN.md, "The embedded synthetic cohort")."""
    has_tumor = rng.random() < 0.9
    lobe = str(rng.choice(LOBES, p=[0.3, 0.08, 0.22, 0.25, 0.15])) if has_tumor else ""
    size = int(np.clip(round(rng.lognormal(np.log(28.0), 0.45)), 8, 70)) if has_tumor else 0
    side = {"R": "right", "L": "left"}.get(lobe[:1], "")
    vessel = ""
    if size >= 35 and rng.random() < 0.45:
        vessel = (
            "left pulmonary artery"
            if side == "left"
            else "superior vena cava"
            if lobe == "RUL" and rng.random() < 0.5
            else "right pulmonary artery"
        )
    nodes = _sample_nodes(rng, side, size, vessel)
    effusion = {"right": 0, "left": 0}
    if rng.random() < 0.3:
        depth = int(rng.integers(10, 81))
        draw = rng.random()
        if draw < 0.2:
            effusion = {"right": depth, "left": int(rng.integers(10, depth + 1))}
        else:
            other = "left" if side == "right" else "right"
            effusion[(side or "right") if draw < 0.8 else other] = depth
    lung_mets, adrenal_mm, adrenal_side, liver_mm = (), 0, "", 0
    if rng.random() < 0.15 + 0.15 * bool(nodes):
        kinds = rng.random(3) < (0.5 if has_tumor else 0.0, 0.35, 0.35)
        if not kinds.any():
            kinds[1 + int(rng.integers(2))] = True
        if kinds[0]:
            lung_mets = tuple(int(v) for v in rng.integers(8, 17, size=int(rng.integers(1, 5))))
        if kinds[1]:
            adrenal_mm, adrenal_side = int(rng.integers(15, 41)), str(rng.choice(["right", "left"]))
        if kinds[2]:
            liver_mm = int(rng.integers(12, 36))
    bone_lesion, bone_site, bone_mm = "", "", 0
    if rng.random() < 0.15 + 0.1 * bool(lung_mets or adrenal_mm or liver_mm):
        bone_lesion = "lytic" if rng.random() < 0.65 else "sclerotic"
        bone_mm = int(rng.integers(10, 29))
        if rng.random() < 0.6:
            bone_site = f"{VERTEBRAE[int(rng.integers(2, 13))]} vertebral body"
        else:
            number = int(rng.integers(3, 11))
            bone_site = f"{rng.choice(['right', 'left'])} {number}{'rd' if number == 3 else 'th'} rib"
    return Findings(
        tumor_size_mm=size,
        tumor_lobe=lobe,
        nodes=nodes,
        effusion_right_mm=effusion["right"],
        effusion_left_mm=effusion["left"],
        lung_metastases_mm=lung_mets,
        adrenal_metastasis_mm=adrenal_mm,
        adrenal_side=adrenal_side,
        liver_metastasis_mm=liver_mm,
        vessel=vessel,
        bone_lesion=bone_lesion,
        bone_site=bone_site,
        bone_size_mm=bone_mm,
    )


def _misclassify(value: int, low: int, high: int, p: float, rng) -> int:
    if rng.random() < p:
        value += 1 if rng.random() < 0.5 else -1
    return int(np.clip(value, low, high))


def sample_clinical(f: Findings, rng: np.random.Generator) -> dict:
    """Age, sex, smoking and TNM / stage read from the findings with misclassification."""
    male = rng.random() < 0.58
    smoking = str(
        rng.choice(["never", "former", "current"], p=[0.1, 0.5, 0.4] if male else [0.25, 0.45, 0.3])
    )
    size = f.tumor_size_mm
    t = 4 if f.vessel else 1 if size <= 30 else 2 if size <= 50 else 3
    sides = {NODE_STATIONS[station][1] for station, _ in f.nodes}
    tumor_code = f.tumor_side[:1].upper()
    if not f.nodes:
        n = 0
    elif tumor_code and (sides - {tumor_code, "M"}):
        n = 3
    elif tumor_code and all("hilar" in station for station, _ in f.nodes):
        n = 1
    else:
        n = 2
    t = _misclassify(t, 1, 4, 0.2, rng)
    n = _misclassify(n, 0, 3, 0.2, rng)
    m = int(f.flags["metastases"]) if rng.random() >= 0.1 else 1 - f.flags["metastases"]
    stage = 4 if m else 3 if (n >= 2 or t == 4) else 2 if (n == 1 or t == 3) else 1
    return {
        "age": int(np.clip(round(rng.normal(67.0, 9.0)), 35, 90)),
        "sex": "male" if male else "female",
        "smoking": smoking,
        "stage": stage,
        "t_stage": f"T{t}",
        "n_stage": f"N{n}",
        "m_stage": f"M{m}",
    }


def risk_features(f: Findings, clinical: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(clinical features, image features) keyed like CLINICAL_COEFFICIENTS / IMAGE_COEFFICIENTS."""
    clinical_features = {
        "age_per_decade": (clinical["age"] - 65.0) / 10.0,
        "male": float(clinical["sex"] == "male"),
        "former_smoker": float(clinical["smoking"] == "former"),
        "current_smoker": float(clinical["smoking"] == "current"),
        "stage": clinical["stage"] - 2.0,
        "m1": float(clinical["m_stage"] == "M1"),
    }
    image_features = {
        "log_tumor_size": float(np.log(max(f.tumor_size_mm, 10) / 25.0)),
        "vessel_invasion": float(bool(f.vessel)),
        "effusion_per_cm": max(f.effusion_right_mm, f.effusion_left_mm) / 10.0,
        "bone_lesion": float(bool(f.bone_lesion)),
        "metastases": float(f.flags["metastases"]),
        "node_short_axis_per_cm": max((size for _, size in f.nodes), default=0) / 10.0,
    }
    return clinical_features, image_features


def _findings_row(f: Findings) -> dict:
    right, left = f.effusion_right_mm, f.effusion_left_mm
    sites = (
        (["contralateral lung"] if f.lung_metastases_mm else [])
        + ([f"{f.adrenal_side} adrenal"] if f.adrenal_metastasis_mm else [])
        + (["liver"] if f.liver_metastasis_mm else [])
    )
    return {
        **f.flags,
        "tumor_size_mm": f.tumor_size_mm or None,
        "tumor_lobe": f.tumor_lobe,
        "node_size_mm": max((size for _, size in f.nodes), default=None),
        "node_station": ";".join(station for station, _ in f.nodes),
        "effusion_side": "bilateral" if right and left else "right" if right else "left" if left else "",
        "effusion_mm": max(right, left) or None,
        "effusion_right_mm": right or None,
        "effusion_left_mm": left or None,
        "metastasis_sites": ";".join(sites),
        "vessel": f.vessel,
        "bone_lesion_type": f.bone_lesion,
        "bone_site": f.bone_site,
        "bone_size_mm": f.bone_size_mm or None,
    }


def _assign_splits(n: int, seed: int) -> list[str]:
    order = patient_rng(seed, 2).permutation(n)
    n_test = n_val = int(round(0.2 * n))
    splits = np.full(n, "train", dtype=object)
    splits[order[:n_test]] = "test"
    splits[order[n_test : n_test + n_val]] = "val"
    return list(splits)


def build_cohort_table(
    n: int, seed: int, model: SurvivalModel = SurvivalModel()
) -> tuple[list[Findings], pd.DataFrame]:
    """Findings, clinical fields, report, survival and split of n patients (no images) -> (findings,
    table)."""
    if n < 1:
        raise SyntheticCohortError(f"synthetic cohort: n must be at least 1, got {n}")
    all_findings, rows = [], []
    for i in range(n):
        f = sample_findings(patient_rng(seed, 1, i, 0))
        clinical = sample_clinical(f, patient_rng(seed, 1, i, 4))
        clinical_x, image_x = risk_features(f, clinical)
        clinical_lp = sum(CLINICAL_COEFFICIENTS[k] * v for k, v in clinical_x.items())
        lp = clinical_lp + sum(IMAGE_COEFFICIENTS[k] * v for k, v in image_x.items())
        survival_rng = patient_rng(seed, 1, i, 3)
        event_time = model.scale_days * (survival_rng.exponential() / np.exp(lp - model.lp_reference)) ** (
            1.0 / model.shape
        )
        censor_time = min(survival_rng.exponential(model.censor_mean_days), model.followup_days)
        scan_id = f"syn{i:05d}_ct"
        rows.append(
            {
                "patient_id": f"syn{i:05d}",
                "scan_id": scan_id,
                "image": f"images/{scan_id}.nii.gz",
                "report": write_report(f, patient_rng(seed, 1, i, 2)),
                "time": float(max(round(min(event_time, censor_time)), 1)),
                "event": int(event_time <= censor_time),
                **clinical,
                "linear_predictor": lp,
                "clinical_predictor": clinical_lp,
                **_findings_row(f),
            }
        )
        all_findings.append(f)
    table = pd.DataFrame(rows)
    for column in (
        "tumor_size_mm",
        "node_size_mm",
        "effusion_mm",
        "effusion_right_mm",
        "effusion_left_mm",
        "bone_size_mm",
    ):
        table[column] = table[column].astype("Int64")
    table["split"] = _assign_splits(n, seed)
    return all_findings, table


def _c_index(time, event, risk) -> float | None:
    """Harrell's C (:func:`vlsurv.metrics.concordance_index`); None where it is undefined (no event, no
    comparable pair, constant risk)."""
    try:
        return concordance_index(time, event, risk)
    except MetricError:
        return None


def _clinical_design(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "age": table["age"].astype(float),
            "male": (table["sex"] == "male").astype(float),
            "former": (table["smoking"] == "former").astype(float),
            "current": (table["smoking"] == "current").astype(float),
            "stage": table["stage"].astype(float),
            "t": table["t_stage"].str[1].astype(float),
            "n": table["n_stage"].str[1].astype(float),
            "m": table["m_stage"].str[1].astype(float),
        }
    )


def clinical_cox_c_index(table: pd.DataFrame) -> float | None:
    """C on the test split of a lifelines CoxPH fit on the train split's clinical columns."""
    # lifelines (~1.5 s) loads when the oracle is computed, not when the demo or a test imports the cohort
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    train, test = table[table["split"] == "train"], table[table["split"] == "test"]
    if train["event"].sum() < 5 or test.empty:
        return None
    design = _clinical_design(train)
    design = design.loc[:, design.std() > 0]
    fitter = CoxPHFitter(penalizer=0.05)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fitter.fit(design.assign(time=train["time"].values, event=train["event"].values), "time", "event")
    except ConvergenceError:
        return None
    risk = fitter.predict_log_partial_hazard(_clinical_design(test)[design.columns])
    return _c_index(test["time"], test["event"], risk)


def oracle_summary(table: pd.DataFrame, seed: int, model: SurvivalModel) -> dict:
    """The oracle.json content: C-indices of the true and clinical-only predictors, plus the model."""
    test = table[table["split"] == "test"]
    return {
        "oracle_c_index": _c_index(table["time"], table["event"], table["linear_predictor"]),
        "oracle_c_index_test": _c_index(test["time"], test["event"], test["linear_predictor"]),
        "clinical_only_oracle_c_index": clinical_cox_c_index(table),
        "clinical_only_method": "lifelines CoxPHFitter (penalizer 0.05) on the train split's age, "
        "sex, smoking, "
        "stage, T, N, M; Harrell's C on the test split",
        "clinical_terms_c_index_test": _c_index(test["time"], test["event"], test["clinical_predictor"]),
        "n": len(table),
        "n_test": len(test),
        "seed": seed,
        "event_rate": float(table["event"].mean()),
        "clinical_coefficients": CLINICAL_COEFFICIENTS,
        "image_coefficients": IMAGE_COEFFICIENTS,
        "survival_model": asdict(model),
        "time_unit": "days",
    }
