"""The offline rules backend on hand-written sentences and on the synthetic cohort, whose truth is known."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from qa_extraction.rules import QuestionRule, RuleError, RulesExtractor
from qa_extraction.text import Lexicon, LexiconError, split_report, split_sentences
from vlsurv.prompts import Question, load_questions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def extractor() -> RulesExtractor:
    return RulesExtractor(load_questions("lung"))


def answer(extractor, text, question):
    return extractor.answer(text)[question]


# --- the issue's examples, exactly -------------------------------------------------------------------


def test_issue_examples(extractor):
    nodes = answer(
        extractor,
        "No lymph node was detected in mediastinal and bilateral hilar pathological size",
        "lymph_nodes",
    )
    assert nodes.status == "absent"
    effusion = answer(extractor, "Pleural effusion measuring 14 mm on the right", "pleura")
    assert effusion.status == "present"
    assert "14 mm" in effusion.answer and "right" in effusion.answer
    assert answer(extractor, "no pleural effusion or thickening", "pleura").status == "absent"


@pytest.mark.parametrize(
    "text, question, status",
    [
        # negation, before and after the finding
        ("No pleural effusion.", "pleura", "absent"),
        ("Pleural effusion-thickening was not detected.", "pleura", "absent"),
        ("The lungs are free of nodules.", "tumor", "absent"),
        ("Negative for pulmonary nodules.", "tumor", "absent"),
        ("No evidence of distant metastatic disease.", "metastases", "absent"),
        ("Bilateral pleural effusion was not observed in this examination.", "pleura", "absent"),
        ("The previously seen right pleural effusion has resolved.", "pleura", "absent"),
        ("Mediastinal and hilar lymph nodes are not enlarged.", "lymph_nodes", "absent"),
        (
            "A few subcentimeter mediastinal lymph nodes are present, none pathologically enlarged.",
            "lymph_nodes",
            "absent",
        ),
        ("Osseous structures are intact without destructive lesion.", "bone", "absent"),
        ("Interval resolution of the left pleural effusion.", "pleura", "absent"),
        # structured reports: a short label takes the polarity of its body
        ("LYMPH NODES: No lymphadenopathy.", "lymph_nodes", "absent"),
        ("Lymph nodes: Enlarged right hilar node measuring 15 mm.", "lymph_nodes", "present"),
        ("Metastatic disease: liver and adrenal.", "metastases", "present"),
        ("BONES: No suspicious osseous lesions.", "bone", "absent"),
        ("No encasement or compression of the major vessels.", "vessels", "absent"),
        # pseudo-negation: a comparison, not a negation
        (
            "There was no significant change in the size of the mediastinal lymph nodes.",
            "lymph_nodes",
            "present",
        ),
        ("No interval change in the 6 mm nodule in the right middle lobe.", "tumor", "present"),
        # a negation ends at "but"; affirmations stop a negation that follows
        ("No pleural effusion, but a 3 cm mass in the left upper lobe.", "tumor", "present"),
        ("No pleural effusion, but a 3 cm mass in the left upper lobe.", "pleura", "absent"),
        ("Left pleural effusion is seen, pericardial effusion was not detected.", "pleura", "present"),
        ("Pericardial effusion is present.", "pleura", "not_mentioned"),
        # another organ's nodule is not a lung tumour
        ("A 9 mm hypodense nodule in the right thyroid lobe.", "tumor", "not_mentioned"),
        ("Enlarged subcarinal lymph node, suspicious for nodal metastasis.", "metastases", "not_mentioned"),
        ("A 2 cm lesion of the left adrenal gland consistent with metastasis.", "metastases", "present"),
        ("The tumor abuts and narrows the right pulmonary artery.", "vessels", "present"),
        ("A sclerotic focus in the T8 vertebral body.", "bone", "present"),
        ("Nothing about the chest here.", "pleura", "not_mentioned"),
    ],
)
def test_status(extractor, text, question, status):
    assert answer(extractor, text, question).status == status


@pytest.mark.parametrize(
    "text, question, hedge",
    [
        ("Possible small left pleural effusion.", "pleura", "Possible"),
        ("A right pleural effusion cannot be excluded.", "pleura", "cannot be excluded"),
        ("Right hilar lymph node, suspicious for metastasis.", "lymph_nodes", "suspicious"),
        ("Intrapulmonary lymph node? A 5 mm nodule in the lingula?", "tumor", "?"),
    ],
)
def test_uncertain_counts_as_present_and_keeps_the_hedge(extractor, text, question, hedge):
    result = answer(extractor, text, question)
    assert result.status == "present" and result.uncertain
    assert hedge in result.answer


def test_answer_keeps_size_side_and_prefers_the_measured_findings_sentence(extractor):
    report = (
        "FINDINGS: Enlarged lymph nodes in the right paratracheal and subcarinal stations, the largest "
        "measuring 1.8 cm in short axis. Bilateral pleural effusions, right 22 mm, left 9 mm.\n\n"
        "IMPRESSION: Mediastinal lymphadenopathy. Bilateral effusions."
    )
    result = extractor.answer(report)
    assert (
        result["lymph_nodes"].answer.startswith("Enlarged lymph nodes")
        and "1.8 cm" in result["lymph_nodes"].answer
    )
    assert "right 22 mm" in result["pleura"].answer and "left 9 mm" in result["pleura"].answer
    assert result["pleura"].answer.endswith(".")


def test_absent_answer_is_the_negative_sentence(extractor):
    result = answer(extractor, "Heart size is normal. No pleural effusion or thickening.", "pleura")
    assert result.answer == "No pleural effusion or thickening."


def test_history_section_is_not_read(extractor):
    report = "CLINICAL HISTORY: Rule out pulmonary nodule.\nFINDINGS: Clear lungs. Heart normal."
    assert answer(extractor, report, "tumor").status == "not_mentioned"
    report = "INDICATION: cough. FINDINGS: A 7 mm nodule in the right upper lobe."
    assert answer(extractor, report, "tumor").status == "present"


def test_sentence_splitting_keeps_decimals_and_drops_list_numbers():
    assert split_sentences("A 1.5 cm mass. 2. Right effusion; approx. 4 mm nodule") == [
        "A 1.5 cm mass.",
        "Right effusion; approx. 4 mm nodule",
    ]
    sections = {s.section for s in split_report("FINDINGS: a. IMPRESSION: b. TECHNIQUE: c.")}
    assert sections == {"findings", "impression"}


def test_rules_block_errors_name_the_question():
    bad = Question("pleura", "Effusion?", rules={"terms": ["effusion("]}, source="q.yaml")
    with pytest.raises(RuleError, match=r"q.yaml \(question 'pleura'\): rules.terms holds a bad regular"):
        QuestionRule.from_question(bad)
    with pytest.raises(RuleError, match=r"'pleura'.*unknown rules keys \['term'\]"):
        QuestionRule.from_question(Question("pleura", "Effusion?", rules={"term": ["x"]}))
    with pytest.raises(RuleError, match=r"'pleura'.*needs rules.terms"):
        QuestionRule.from_question(Question("pleura", "Effusion?"))


# --- the synthetic cohort: status == present must match findings.csv ---------------------------------


def test_synthetic_cohort_reports_match_their_findings(extractor):
    synthetic = pytest.importorskip("vlsurv.data.synthetic")
    findings, table = synthetic.build_cohort_table(300, 7)
    wrong = []
    for _, row in table.iterrows():
        result = extractor.answer(row["report"])
        for qid in ("tumor", "lymph_nodes", "pleura", "metastases", "vessels", "bone"):
            if (result[qid].status == "present") != bool(row[qid]):
                wrong.append((row["scan_id"], qid))
    assert wrong == []


def test_synthetic_cohort_files_through_the_cli(tmp_path):
    synthetic = pytest.importorskip("vlsurv.data.synthetic")
    cohort = tmp_path / "cohort"
    synthetic.make_cohort(6, 3, cohort, shape=(48, 48, 32))
    out = tmp_path / "x.jsonl"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "qa_extraction",
            "extract",
            "--reports",
            str(cohort / "manifest.csv"),
            "--id-column",
            "scan_id",
            "--text-column",
            "report",
            "--out",
            str(out),
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    rows = pd.read_json(out, lines=True)
    truth = pd.read_csv(cohort / "findings.csv").set_index("scan_id")
    assert len(rows) == 6 * 6
    for row in rows.itertuples():
        assert (row.status == "present") == bool(truth.loc[row.report_id, row.question_id])


def test_a_lexicon_that_is_not_valid_yaml_names_its_file_and_line(tmp_path):
    path = tmp_path / "negex.yaml"
    path.write_text("negation:\n  - no\n  - [not\nuncertainty: []\n")
    with pytest.raises(LexiconError, match=r"negex\.yaml line 4: not valid YAML"):
        Lexicon.from_file(path)
