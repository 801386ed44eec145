"""Clinical accuracy: answers read back by the rules reader (negations, hedges, not mentioned), scored
per question against the report and the ground truth, with scikit-learn as the reference for F1."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from vlsurv.metrics_clinical import (
    ClinicalAccuracyError,
    clinical_accuracy,
    largest_size_mm,
    named_lobes,
    named_side,
    question_risk_gaps,
    read_ground_truth,
    read_statuses,
)
from vlsurv.prompts import load_questions

QUESTIONS = load_questions("lung")

# (question_id, generated answer, status the rules reader must give it)
HAND_WRITTEN = [
    ("pleura", "No pleural effusion.", "absent"),
    ("pleura", "Small right pleural effusion measuring 15 mm in maximal depth.", "present"),
    ("pleura", "The pleural spaces are clear, with no pleural effusion.", "absent"),
    ("pleura", "A small left pleural effusion cannot be excluded.", "present"),  # hedge counts as present
    ("lymph_nodes", "No mediastinal or hilar lymphadenopathy.", "absent"),
    (
        "lymph_nodes",
        "A few subcentimeter mediastinal lymph nodes are present, none pathologically enlarged.",
        "absent",
    ),
    ("lymph_nodes", "Subcarinal lymphadenopathy, with a node of 14 mm short-axis diameter.", "present"),
    ("lymph_nodes", "Enlarged right hilar lymph node, suspicious for nodal metastasis.", "present"),
    ("metastases", "No evidence of distant metastatic disease in the imaged upper abdomen.", "absent"),
    ("metastases", "A 22 mm nodule in the left adrenal gland, suspicious for metastasis.", "present"),
    ("vessels", "No vascular invasion; the pulmonary arteries and superior vena cava are patent.", "absent"),
    ("vessels", "The mass encases the right pulmonary artery.", "present"),
    ("bone", "No lytic or sclerotic osseous lesion.", "absent"),
    (
        "bone",
        "A lytic lesion in the T7 vertebral body measuring 15 mm, suspicious for osseous metastasis.",
        "present",
    ),
    ("tumor", "There is a 42 mm spiculated mass in the right upper lobe.", "present"),
    ("tumor", "No pulmonary mass or suspicious nodule.", "absent"),
    ("tumor", "Not mentioned in the report.", "not_mentioned"),
    ("bone", "The trachea and main bronchi are patent.", "not_mentioned"),
]


def test_rules_reader_reads_negations_hedges_and_silence():
    ids, texts, expected = zip(*HAND_WRITTEN)
    assert read_statuses(ids, texts, QUESTIONS) == list(expected)


def test_details_are_read_from_the_text():
    assert named_lobes("A 4.2 x 3.1 cm mass in the central right upper lobe (RUL).") == {"RUL"}
    assert named_lobes("Lingular nodule") == {"LUL"} and named_lobes("No mass.") == frozenset()
    assert named_side("Bilateral pleural effusions, right 20 mm, left 12 mm in depth.") == "bilateral"
    assert named_side("Pleural effusions on the right and on the left.") == "bilateral"
    assert named_side("There is a small left-sided pleural effusion.") == "left"
    assert named_side("No pleural effusion.") is None
    assert largest_size_mm("A 4.2 x 3.1 cm mass") == 42.0
    assert largest_size_mm("nodes of 12 mm and 1.5 cm") == 15.0 and largest_size_mm("No mass.") is None


def _answers(rows):
    return pd.DataFrame(rows, columns=["scan_id", "question_id", "answer"])


def test_scores_against_report_and_ground_truth_match_scikit_learn():
    pleura_yes = "Small right pleural effusion measuring 15 mm in maximal depth."
    pleura_left = "Moderate left pleural effusion (depth 30 mm)."
    pleura_no = "No pleural effusion."
    tumor_rul = "There is a 42 mm spiculated mass in the right upper lobe."
    tumor_lll = "A 40 mm mass in the left lower lobe."
    generated = _answers(
        [
            ("s1", "pleura", pleura_yes),
            ("s2", "pleura", pleura_no),  # false negative
            ("s3", "pleura", pleura_yes),  # false positive
            ("s4", "pleura", pleura_no),
            ("s5", "pleura", pleura_yes),  # true positive, wrong side
            ("s6", "pleura", "Not mentioned in the report."),  # counts as not present
            ("s1", "tumor", tumor_rul),
            ("s2", "tumor", tumor_rul),  # lobe right, size off by 22 mm
            ("s3", "tumor", tumor_rul),  # report silent: left out against the report
        ]
    )
    reference = _answers(
        [
            ("s1", "pleura", "Small right pleural effusion (depth 18 mm)."),
            ("s2", "pleura", pleura_left),
            ("s3", "pleura", pleura_no),
            ("s4", "pleura", "The pleural spaces are clear, with no pleural effusion."),
            ("s5", "pleura", pleura_left),
            ("s6", "pleura", pleura_left),
            ("s1", "tumor", "A 4.5 cm mass in the right upper lobe."),
            ("s2", "tumor", "A 2.0 cm mass in the right upper lobe."),
        ]
    )
    truth = pd.DataFrame({"scan_id": ["s1", "s2", "s3", "s4", "s5", "s6"], "pleura": [1, 1, 1, 0, 1, 0]})
    truth["tumor"] = [1, 1, 0, 0, 0, 0]
    result = clinical_accuracy(generated, reference, QUESTIONS, ground_truth=truth, bootstrap=50)

    report = result["against_report"]["per_question"]["pleura"]
    predicted, actual = [1, 0, 1, 0, 1, 0], [1, 1, 0, 0, 1, 1]
    assert report["f1"] == pytest.approx(f1_score(actual, predicted))
    assert report["precision"] == pytest.approx(precision_score(actual, predicted))
    assert report["recall"] == pytest.approx(recall_score(actual, predicted))
    assert report["prevalence"] == pytest.approx(4 / 6) and report["answered_not_mentioned"] == 1
    assert result["against_report"]["not_in_reference"] == 1
    tumor = result["against_report"]["per_question"]["tumor"]
    assert tumor["n"] == 2 and tumor["f1"] == 1.0
    assert result["against_report"]["macro_f1"] == pytest.approx((f1_score(actual, predicted) + 1.0) / 2)
    low, high = result["against_report"]["macro_f1_ci"]
    assert low <= result["against_report"]["macro_f1"] <= high

    truth_pleura = result["against_ground_truth"]["per_question"]["pleura"]
    assert truth_pleura["f1"] == pytest.approx(f1_score([1, 1, 1, 0, 1, 0], predicted))
    truth_tumor = result["against_ground_truth"]["per_question"]["tumor"]
    assert truth_tumor["precision"] == pytest.approx(2 / 3) and truth_tumor["recall"] == 1.0

    details = result["details"]
    assert details["pleura_side"] == {"correct": 1, "scored": 2, "accuracy": 0.5}
    assert details["tumor_lobe"] == {"correct": 2, "scored": 2, "accuracy": 1.0}
    assert details["size"]["per_question"]["tumor"] == {"correct": 1, "scored": 2, "accuracy": 0.5}
    assert result["answer_statuses"]["pleura"] == {"present": 3, "absent": 2, "not_mentioned": 1}
    tumor_lll_result = clinical_accuracy(
        _answers([("s1", "tumor", tumor_lll)]), reference, QUESTIONS, bootstrap=10
    )
    assert tumor_lll_result["details"]["tumor_lobe"]["correct"] == 0


def test_an_answer_that_never_says_present_scores_zero_though_it_reads_alike():
    """The issue's failure: always "No ..." gives F1 0 on a question with findings."""
    generated = _answers(
        [(f"s{i}", "vessels", "No encasement or compression of the major vessels.") for i in range(4)]
    )
    reference = _answers(
        [(f"s{i}", "vessels", "The mass encases the superior vena cava.") for i in range(2)]
        + [(f"s{i}", "vessels", "No encasement or compression of the major vessels.") for i in range(2, 4)]
    )
    result = clinical_accuracy(generated, reference, QUESTIONS, bootstrap=20)
    scores = result["against_report"]["per_question"]["vessels"]
    assert scores["recall"] == 0.0 and scores["f1"] == 0.0 and scores["precision"] is None


def test_an_answer_is_read_by_what_it_says_not_by_its_opening():
    """A findings_first opening names the finding ("Absent, lymph nodes:"), which the rules reader alone
    would read as a mention of lymph nodes; the description after it decides, details included."""
    generated = _answers(
        [
            ("s0", "lymph_nodes", "Absent, lymph nodes: No lymphadenopathy."),
            ("s1", "lymph_nodes", "Present, lymph nodes: Right paratracheal lymphadenopathy."),
            ("s2", "tumor", "Present, tumor, left upper lobe: A 3 cm mass in the right upper lobe."),
            ("s3", "tumor", "Absent, tumor: No pulmonary mass."),
            ("s4", "pleura", "Present: Small left pleural effusion."),
        ]
    )
    reference = _answers(
        [
            ("s0", "lymph_nodes", "Absent, lymph nodes: No mediastinal or hilar lymphadenopathy."),
            ("s1", "lymph_nodes", "Subcarinal lymphadenopathy."),
            ("s2", "tumor", "A 3 cm mass in the left upper lobe."),
            ("s3", "tumor", "No focal pulmonary mass is identified."),
            ("s4", "pleura", "Small left pleural effusion (depth 12 mm)."),
        ]
    )
    result = clinical_accuracy(generated, reference, QUESTIONS, bootstrap=20)
    assert result["answer_statuses"]["lymph_nodes"] == {"present": 1, "absent": 1, "not_mentioned": 0}
    assert result["answer_statuses"]["tumor"] == {"present": 1, "absent": 1, "not_mentioned": 0}
    per_question = result["against_report"]["per_question"]
    assert per_question["lymph_nodes"]["f1"] == 1.0 and per_question["tumor"]["f1"] == 1.0
    assert result["details"]["tumor_lobe"]["correct"] == 0  # the sentence says right upper lobe
    assert result["details"]["pleura_side"]["correct"] == 1


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ClinicalAccuracyError, match=r"question_id 'spleen': not in the question set"):
        read_statuses(["spleen"], ["No splenomegaly."], QUESTIONS)
    with pytest.raises(ClinicalAccuracyError, match=r"^answers: missing field\(s\) \['answer'\]"):
        clinical_accuracy(pd.DataFrame({"scan_id": ["s"], "question_id": ["tumor"]}), None, QUESTIONS)
    path = tmp_path / "findings.csv"
    path.write_text("scan_id,pleura\ns1,1\ns2,yes\n")
    with pytest.raises(ClinicalAccuracyError, match=r"findings.csv: row 3, column 'pleura': expected 0 or 1"):
        read_ground_truth(path, ["pleura"])
    path.write_text("scan_id,spleen\ns1,1\n")
    with pytest.raises(ClinicalAccuracyError, match=r"no column named after a question id"):
        read_ground_truth(path, ["pleura"])
    path.write_text("scan_id,pleura\ns1,1\n")
    assert read_ground_truth(path, ["pleura", "tumor"]).columns.tolist() == ["scan_id", "pleura"]
    assert issubclass(ClinicalAccuracyError, ValueError)
    np.testing.assert_equal(read_ground_truth(path, ["pleura"])["pleura"].to_numpy(), [1])


def test_question_risk_gaps_tell_a_risk_that_follows_its_finding_from_a_shared_one():
    rng = np.random.default_rng(0)
    n = 400
    findings = pd.DataFrame(
        {
            "scan_id": [f"s{i}" for i in range(n)],
            "pleura": rng.integers(0, 2, n),
            "bone": rng.integers(0, 2, n),
        }
    )
    shared = rng.normal(size=n)
    risks = pd.DataFrame(
        {
            "scan_id": findings["scan_id"],
            "risk_pleura": shared + 2.0 * findings["pleura"],  # moves with its own finding
            "risk_bone": shared + 0.01 * rng.normal(size=n),  # the same number for every finding
        }
    )
    gaps = question_risk_gaps(risks, findings)["per_question"]
    z = (risks["risk_pleura"] - risks["risk_pleura"].mean()) / risks["risk_pleura"].std()
    present = findings["pleura"] == 1
    assert gaps["pleura"]["own"] == pytest.approx(z[present].mean() - z[~present].mean())
    assert gaps["pleura"]["excess"] > 1.0
    assert abs(gaps["bone"]["own"]) < 0.3 and abs(gaps["bone"]["excess"]) < 0.3
    with pytest.raises(ClinicalAccuracyError, match=r"no question has both a risk_<question_id> column"):
        question_risk_gaps(risks[["scan_id", "risk_bone"]], findings.assign(bone=0))
