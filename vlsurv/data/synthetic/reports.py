"""Radiology reports for the synthetic cohort: varied phrasing that states exactly the drawn findings.

``write_report(findings, rng) -> str`` returns "FINDINGS: ...\\n\\nIMPRESSION: ...". Every present
finding is described with its size (mm or cm), side and site; every absent one of the six lung
questions is negated explicitly. Phrasing, unit, sentence order and impression style are drawn from
``rng``, so the same findings read differently from patient to patient.
"""

from __future__ import annotations

import re

import numpy as np

from vlsurv.data.synthetic.anatomy import Findings

LOBE_NAMES = {
    "RUL": "right upper lobe",
    "RML": "right middle lobe",
    "RLL": "right lower lobe",
    "LUL": "left upper lobe",
    "LLL": "left lower lobe",
}

_TUMOR = (
    "There is a {size} spiculated mass in the {lobe}.",
    "A lobulated soft-tissue mass measuring {size} is present in the {lobe}.",
    "{Lobe} mass measuring {size}, consistent with the known primary lung carcinoma.",
    "In the {lobe} there is a solid lesion of {size} with irregular margins, highly suspicious for "
    "malignancy.",
    "A {size} solid mass with spiculated margins is seen in the {lobe}, compatible with primary neoplasm.",
)
_TUMOR_ABSENT = (
    "No pulmonary mass or suspicious nodule.",
    "No focal pulmonary mass is identified.",
    "The lung parenchyma shows no nodular or mass lesion.",
    "No suspicious pulmonary nodule or mass is seen.",
)
_VESSEL = (
    "The mass encases the {vessel}.",
    "The tumor abuts and narrows the {vessel}.",
    "The lesion extends to the mediastinum and is inseparable from the {vessel}, consistent with "
    "vascular invasion.",
    "There is encasement of the {vessel} by the central tumor.",
)
_VESSEL_ABSENT_WITH_TUMOR = (
    "No vascular invasion; the pulmonary arteries and superior vena cava are patent.",
    "The mass is separated from the mediastinal vessels by a preserved fat plane, without vascular invasion.",
    "No encasement or compression of the major vessels.",
)
_VESSEL_ABSENT = (
    "The great vessels and pulmonary arteries are normal in caliber without compression.",
    "No encasement or compression of the major vessels.",
    "Mediastinal vascular structures are unremarkable, with no vascular invasion.",
)
_NODE_ONE = (
    "An enlarged {station} lymph node measures {size} in short axis.",
    "{Station} lymphadenopathy, with a node of {size} short-axis diameter.",
    "Pathologically enlarged {station} lymph node ({size} short axis){hedge}.",
)
_NODE_MANY = (
    "Enlarged lymph nodes in the {stations} stations, the largest ({largest}) measuring {size} in "
    "short axis{hedge}.",
    "Lymphadenopathy involving the {stations} stations, up to {size} in short axis.",
    "Pathologically enlarged {stations} lymph nodes are present; the largest {largest} node measures {size}.",
)
_NODE_HEDGES = ("", ", suspicious for nodal metastasis", ", likely metastatic")
_NODE_ABSENT = (
    "No pathologically enlarged mediastinal or hilar lymph nodes.",
    "No mediastinal or hilar lymphadenopathy.",
    "Mediastinal and hilar lymph nodes are not enlarged by CT size criteria.",
    "A few subcentimeter mediastinal lymph nodes are present, none pathologically enlarged.",
)
_EFFUSION_ONE = (
    "{Degree} {side} pleural effusion measuring {size} in maximal depth.",
    "There is a {degree} {side}-sided pleural effusion, approximately {size} thick.",
    "{Degree} dependent {side} pleural effusion (depth {size}).",
)
_EFFUSION_BOTH = (
    "Bilateral pleural effusions measuring {right} on the right and {left} on the left.",
    "Bilateral pleural effusions, right {right}, left {left} in depth.",
    "Pleural effusions on both sides: {right} on the right, {left} on the left.",
)
_EFFUSION_ABSENT = (
    "No pleural effusion.",
    "No pleural effusion or thickening.",
    "The pleural spaces are clear, with no pleural effusion.",
)
_LUNG_METS_ONE = (
    "A {size} solid nodule in the {side} lung, suspicious for metastasis.",
    "Solitary {size} nodule in the contralateral {side} lung, likely a pulmonary metastasis.",
)
_LUNG_METS_MANY = (
    "{Count} solid nodules in the contralateral {side} lung, the largest {size}, consistent with "
    "pulmonary metastases.",
    "Multiple ({count}) nodules in the {side} lung up to {size}, suspicious for metastatic disease.",
)
_ADRENAL_METS = (
    "A {size} nodule in the {side} adrenal gland, suspicious for metastasis.",
    "{Side} adrenal mass measuring {size}, concerning for metastatic disease.",
)
_LIVER_METS = (
    "A {size} hypodense lesion in the right hepatic lobe, suspicious for a metastasis.",
    "Hypoattenuating liver lesion measuring {size}, likely metastatic.",
)
_METS_ABSENT = (
    "No adrenal or hepatic lesion suspicious for metastasis in the imaged upper abdomen.",
    "No evidence of distant metastatic disease in the imaged upper abdomen.",
    "The liver and adrenal glands show no metastatic lesion.",
)
_ABDOMEN_CLEAR = (
    "The liver and adrenal glands are unremarkable.",
    "The imaged upper abdominal organs are unremarkable.",
)
_LUNG_METS_ABSENT = ("No additional pulmonary nodules.", "No contralateral pulmonary nodules.")
_BONE_WORDS = {
    "lytic": ("lytic", "osteolytic", "destructive lytic"),
    "sclerotic": ("sclerotic", "osteoblastic"),
}
_BONE = (
    "A {kind} lesion in the {site} measuring {size}, suspicious for osseous metastasis.",
    "{Kind} focus within the {site} ({size}).",
    "There is a {size} {kind} lesion of the {site}, compatible with metastasis.",
)
_BONE_ABSENT = (
    "No lytic or sclerotic osseous lesion.",
    "No suspicious osseous lesion.",
    "Osseous structures are intact without destructive lesion.",
    "Bones: no lytic or blastic lesions.",
)
_BACKGROUND = (
    "The trachea and main bronchi are patent.",
    "Heart size is normal. No pericardial effusion.",
    "The esophagus is unremarkable.",
    "Mild centrilobular emphysema in both upper lobes.",
    "The visualized thyroid gland is unremarkable.",
)


_AN = re.compile(r"\b([Aa]) (?=[aeiou]|8\b|8\d\b|1[18]\b)")  # "a" -> "an" before a vowel sound


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _size(mm: int, rng: np.random.Generator) -> str:
    return f"{mm / 10:.1f} cm" if rng.random() < 0.35 else f"{mm} mm"


def _tumor_size(mm: int, rng: np.random.Generator) -> str:
    """Longest diameter first: "42 mm", "4.2 cm", "42 x 31 mm" or "4.2 x 3.1 cm"."""
    if rng.random() < 0.5:
        return _size(mm, rng)
    short = max(int(round(mm * rng.uniform(0.65, 0.9))), 1)
    return f"{mm / 10:.1f} x {short / 10:.1f} cm" if rng.random() < 0.35 else f"{mm} x {short} mm"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _pick(options, rng: np.random.Generator) -> str:
    return options[rng.integers(len(options))]


def _degree(mm: int) -> str:
    return "small" if mm < 20 else "moderate" if mm < 45 else "large"


def _tumor_sentences(f: Findings, rng) -> list[str]:
    if not f.tumor_size_mm:
        return [_pick(_TUMOR_ABSENT, rng)]
    lobe = LOBE_NAMES[f.tumor_lobe]
    lobe = ("central " if f.vessel else "") + (f"{lobe} ({f.tumor_lobe})" if rng.random() < 0.2 else lobe)
    text = _pick(_TUMOR, rng).format(size=_tumor_size(f.tumor_size_mm, rng), lobe=lobe, Lobe=_cap(lobe))
    return [text]


def _node_sentences(f: Findings, rng) -> list[str]:
    if not f.nodes:
        return [_pick(_NODE_ABSENT, rng)]
    largest, size = max(f.nodes, key=lambda node: node[1])
    hedge = _pick(_NODE_HEDGES, rng)
    if len(f.nodes) == 1:
        return [
            _pick(_NODE_ONE, rng).format(
                station=largest, Station=_cap(largest), size=_size(size, rng), hedge=hedge
            )
        ]
    stations = _join([station for station, _ in f.nodes])
    return [
        _pick(_NODE_MANY, rng).format(stations=stations, largest=largest, size=_size(size, rng), hedge=hedge)
    ]


def _effusion_sentences(f: Findings, rng) -> list[str]:
    right, left = f.effusion_right_mm, f.effusion_left_mm
    if right and left:
        return [_pick(_EFFUSION_BOTH, rng).format(right=_size(right, rng), left=_size(left, rng))]
    if right or left:
        side, mm = ("right", right) if right else ("left", left)
        return [
            _pick(_EFFUSION_ONE, rng).format(
                side=side, size=_size(mm, rng), degree=_degree(mm), Degree=_cap(_degree(mm))
            )
        ]
    return [_pick(_EFFUSION_ABSENT, rng)]


def _metastasis_sentences(f: Findings, rng) -> tuple[list[str], list[str]]:
    """(sentences about the lungs, sentences about the upper abdomen)."""
    lungs, abdomen = [], []
    if f.lung_metastases_mm:
        side = "left" if f.tumor_side == "right" else "right"
        count = len(f.lung_metastases_mm)
        words = ("One", "Two", "Three", "Four", "Five")
        options = _LUNG_METS_ONE if count == 1 else _LUNG_METS_MANY
        lungs.append(
            _pick(options, rng).format(
                size=_size(max(f.lung_metastases_mm), rng), side=side, count=count, Count=words[count - 1]
            )
        )
    elif f.tumor_size_mm:
        lungs.append(_pick(_LUNG_METS_ABSENT, rng))
    if f.adrenal_metastasis_mm:
        abdomen.append(
            _pick(_ADRENAL_METS, rng).format(
                size=_size(f.adrenal_metastasis_mm, rng), side=f.adrenal_side, Side=_cap(f.adrenal_side)
            )
        )
    if f.liver_metastasis_mm:
        abdomen.append(_pick(_LIVER_METS, rng).format(size=_size(f.liver_metastasis_mm, rng)))
    if not abdomen:  # a metastasis elsewhere must not read as negated
        abdomen.append(_pick(_ABDOMEN_CLEAR if lungs and f.lung_metastases_mm else _METS_ABSENT, rng))
    return lungs, abdomen


def _bone_sentences(f: Findings, rng) -> list[str]:
    if not f.bone_lesion:
        return [_pick(_BONE_ABSENT, rng)]
    kind = _pick(_BONE_WORDS[f.bone_lesion], rng)
    return [
        _pick(_BONE, rng).format(
            kind=kind, Kind=_cap(kind), site=f.bone_site, size=_size(f.bone_size_mm, rng)
        )
    ]


def _impression_items(f: Findings, rng) -> list[str]:
    items = []
    if f.tumor_size_mm:
        item = f"{f.tumor_size_mm} mm {LOBE_NAMES[f.tumor_lobe]} mass, consistent with primary lung carcinoma"
        items.append(item + (f", encasing the {f.vessel}" if f.vessel else ""))
    if f.nodes:
        items.append(f"{_cap(_join([station for station, _ in f.nodes]))} lymphadenopathy")
    if f.effusion_right_mm or f.effusion_left_mm:
        side = (
            "bilateral"
            if f.effusion_right_mm and f.effusion_left_mm
            else "right"
            if f.effusion_right_mm
            else "left"
        )
        items.append(f"{_cap(side)} pleural effusion{'s' if side == 'bilateral' else ''}")
    sites = (
        (["contralateral pulmonary nodules"] if f.lung_metastases_mm else [])
        + ([f"{f.adrenal_side} adrenal"] if f.adrenal_metastasis_mm else [])
        + (["liver"] if f.liver_metastasis_mm else [])
    )
    if sites:
        items.append(f"Metastatic disease: {_join(sites)}")
    if f.bone_lesion:
        items.append(f"{_cap(f.bone_lesion)} lesion of the {f.bone_site}, suspicious for bone metastasis")
    negatives = [
        text
        for flag, text in (
            (f.nodes, "no lymphadenopathy"),
            (f.effusion_right_mm or f.effusion_left_mm, "no pleural effusion"),
            (f.bone_lesion, "no osseous lesion"),
        )
        if not flag
    ]
    if not items:
        items.append("No CT evidence of malignancy in the chest")
    if negatives and rng.random() < 0.5:
        items.append(_cap(_join(negatives)))
    return items


def write_report(findings: Findings, rng: np.random.Generator) -> str:
    """A chest CT report ("FINDINGS: ...\\n\\nIMPRESSION: ...") stating exactly ``findings``."""
    lung_mets, abdomen = _metastasis_sentences(findings, rng)
    vessels = _pick(_VESSEL_ABSENT_WITH_TUMOR if findings.tumor_size_mm else _VESSEL_ABSENT, rng)
    if findings.vessel:
        vessels = _pick(_VESSEL, rng).format(vessel=findings.vessel)
    background = [_BACKGROUND[i] for i in sorted(rng.choice(len(_BACKGROUND), size=2, replace=False))]
    mediastinum = [background[0], *_node_sentences(findings, rng)]
    rng.shuffle(mediastinum)
    lungs = [*_tumor_sentences(findings, rng), vessels, *lung_mets]  # the mass comes before what refers to it
    lungs.insert(int(rng.integers(len(lungs) + 1)), background[1])
    blocks = [mediastinum, lungs, _effusion_sentences(findings, rng), abdomen, _bone_sentences(findings, rng)]
    if rng.random() < 0.5:
        blocks[0], blocks[1] = blocks[1], blocks[0]
    findings_text = " ".join(sentence for block in blocks for sentence in block)
    items = _impression_items(findings, rng)
    if rng.random() < 0.6:
        impression = " ".join(f"{i}. {item}." for i, item in enumerate(items, start=1))
    else:
        impression = " ".join(f"{item}." for item in items)
    return _AN.sub(r"\1n ", f"FINDINGS: {findings_text}\n\nIMPRESSION: {impression}")
