"""The extraction CLI with the rules backend: bad input, resume, to-vqa, review round trip, evaluate,
vocab."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from qa_extraction.__main__ import main as cli
from qa_extraction.evaluate import main as evaluate_main
from qa_extraction.extract import main as extract_main
from qa_extraction.io import ExtractionInputError, read_extractions, read_reports
from qa_extraction.review import main as review_main
from qa_extraction.vocab import count_words
from qa_extraction.vocab import main as vocab_main
from qa_extraction.vqa import main as vqa_main
from vlsurv.prompts import PromptError

FIXTURES = Path(__file__).parent / "fixtures" / "qa"
REPORTS = FIXTURES / "reports.csv"
QIDS = ["tumor", "lymph_nodes", "pleura", "metastases", "vessels", "bone"]
TEXT = ["--text-column", "findings", "--text-column", "impression"]


def extract(out: Path, *extra: str, reports: Path = REPORTS) -> int:
    return extract_main(
        ["--reports", str(reports), "--id-column", "report_id", *TEXT, "--out", str(out), *extra]
    )


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_extract_writes_one_row_per_pair_and_joins_text_columns(tmp_path, caplog):
    out = tmp_path / "x.jsonl"
    with caplog.at_level(logging.INFO, logger="qa_extraction"):
        assert extract(out) == 0
    rows = lines(out)
    assert [(r["report_id"], r["question_id"]) for r in rows] == [
        (f"r{i}", q) for i in range(1, 5) for q in QIDS
    ]
    assert list(rows[0])[:7] == [
        "report_id",
        "question_id",
        "question",
        "answer",
        "status",
        "backend",
        "model",
    ]
    by_pair = {(r["report_id"], r["question_id"]): r for r in rows}
    assert (
        by_pair["r1", "tumor"]["answer"] == "There is a 32 x 25 mm spiculated mass in the right upper lobe."
    )
    assert by_pair["r2", "pleura"]["status"] == "absent"
    assert by_pair["r4", "metastases"]["status"] == "present"  # from the impression column
    assert {r["backend"] for r in rows} == {"rules"}
    assert "spiculated" not in caplog.text and "effusion" not in caplog.text  # no report text in logs


def test_rerun_skips_done_pairs_and_a_torn_last_line_is_redone(tmp_path):
    out = tmp_path / "x.jsonl"
    extract(out)
    full = out.read_bytes()
    extract(out)
    assert out.read_bytes() == full  # nothing redone
    # a killed run: the first 7 rows complete, the 8th torn in the middle of its line
    complete = b"".join(full.splitlines(keepends=True)[:7])
    out.write_bytes(complete + full.splitlines(keepends=True)[7][:25])
    with pytest.raises(ExtractionInputError, match="last line is incomplete"):
        read_extractions(out)
    extract(out)
    rows = read_extractions(out)
    pairs = [(r["report_id"], r["question_id"]) for r in rows]
    assert len(pairs) == len(set(pairs)) == 24
    assert out.read_bytes().startswith(complete)


def test_a_corrupt_line_inside_the_file_is_an_error(tmp_path):
    out = tmp_path / "x.jsonl"
    extract(out)
    data = out.read_text().splitlines()
    data[3] = "{broken"
    out.write_text("\n".join(data) + "\n")
    with pytest.raises(ExtractionInputError, match=r"x.jsonl line 4: not valid JSON"):
        extract(out)


def test_retry_errors_removes_error_rows_before_asking_again(tmp_path):
    out = tmp_path / "x.jsonl"
    extract(out)
    rows = lines(out)
    rows[0].update(status="error", answer="", raw="garbage")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extract(out)
    assert lines(out)[0]["status"] == "error"  # an error row counts as done
    extract(out, "--retry-errors")
    rows = lines(out)
    assert len(rows) == 24 and all(r["status"] != "error" for r in rows)


@pytest.mark.parametrize(
    "content, flags, message",
    [
        (
            "report_id,findings\nr1,No effusion.\n",
            TEXT,
            r"no column 'impression' \(given by --text-column\); columns are",
        ),
        ("id,findings,impression\nr1,a,b\n", TEXT, r"no column 'report_id' \(given by --id-column\)"),
        (
            "report_id,findings,impression\nr1,No effusion.,\nr2,,\n",
            TEXT,
            r"row 2 \(id 'r2'\) has an empty report",
        ),
        (
            "report_id,findings,impression\nr1,a,b\nr2,c,d\nr1,e,f\n",
            TEXT,
            r"duplicate report id 'r1' in rows 1 and 3 of column 'report_id'",
        ),
        ("report_id,findings,impression\n,a,b\n", TEXT, r"row 1 has an empty 'report_id'"),
    ],
)
def test_bad_reports_tables(tmp_path, content, flags, message):
    path = tmp_path / "reports.csv"
    path.write_text(content)
    with pytest.raises(ExtractionInputError, match=message):
        read_reports(path, "report_id", [flags[1], flags[3]])


def test_bad_questions_file_and_cli_error_line(tmp_path, capsys):
    questions = tmp_path / "q.yaml"
    questions.write_text("questions:\n  - text: Is there an effusion?\n")
    with pytest.raises(PromptError, match=r"q.yaml: questions\[0\]: missing 'id'"):
        extract(tmp_path / "x.jsonl", "--questions", str(questions))
    code = cli(
        [
            "extract",
            "--reports",
            str(tmp_path / "none.csv"),
            "--id-column",
            "a",
            "--text-column",
            "b",
            "--out",
            str(tmp_path / "x.jsonl"),
        ]
    )
    assert code == 2
    assert "qa_extraction extract: error:" in capsys.readouterr().err


def test_jsonl_reports_are_read(tmp_path):
    path = tmp_path / "reports.jsonl"
    path.write_text(json.dumps({"id": 7, "text": "Right pleural effusion of 2 cm."}) + "\n")
    out = tmp_path / "x.jsonl"
    extract_main(["--reports", str(path), "--id-column", "id", "--text-column", "text", "--out", str(out)])
    pleura = [r for r in lines(out) if r["question_id"] == "pleura"][0]
    assert pleura["report_id"] == "7" and pleura["status"] == "present"


def write_manifest(path: Path) -> None:
    rows = [
        ("p1", "r1", "r1"),
        ("p2", "r2", "r2"),
        ("p3", "r3", "r3"),
        ("p4", "r4a", "r4"),
        ("p4", "r4b", "r4"),
    ]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "scan_id", "image", "report", "accession", "split"])
        writer.writerows([(p, s, f"images/{s}.nii.gz", "text", a, "train") for p, s, a in rows])


def test_to_vqa_keeps_negative_answers_and_drops_not_mentioned_and_errors(tmp_path, capsys):
    out, manifest, vqa = tmp_path / "x.jsonl", tmp_path / "manifest.csv", tmp_path / "vqa.jsonl"
    extract(out)
    rows = lines(out)
    rows[0].update(status="error", answer="")  # r1 tumor
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_manifest(manifest)
    vqa_main(
        [
            "--extractions",
            str(out),
            "--manifest",
            str(manifest),
            "--report-id-column",
            "accession",
            "--out",
            str(vqa),
        ]
    )
    pairs = lines(vqa)
    assert set(pairs[0]) == {"scan_id", "question_id", "question", "answer"}
    keyed = {(p["scan_id"], p["question_id"]): p["answer"] for p in pairs}
    assert keyed["r2", "pleura"] == "Pleural effusion-thickening was not detected."  # absent kept
    assert ("r1", "tumor") not in keyed  # error dropped
    assert ("r1", "vessels") not in keyed  # not_mentioned dropped
    assert keyed["r4a", "vessels"] == keyed["r4b", "vessels"]  # one report, two scans
    kept = sum(r["status"] in ("present", "absent") for r in rows[1:])
    assert len(pairs) == kept + 5  # r4's 5 kept rows appear twice
    assert "error 1" in capsys.readouterr().out
    vqa_main(
        [
            "--extractions",
            str(out),
            "--manifest",
            str(manifest),
            "--report-id-column",
            "accession",
            "--not-mentioned",
            "keep",
            "--out",
            str(vqa),
        ]
    )
    assert {(p["scan_id"], p["question_id"]): p["answer"] for p in lines(vqa)}[
        "r1", "vessels"
    ] == "Not mentioned in the report."
    with pytest.raises(ExtractionInputError, match=r"no column 'scan_id'"):
        (tmp_path / "m2.csv").write_text("id,report\nr1,x\n")
        vqa_main(["--extractions", str(out), "--manifest", str(tmp_path / "m2.csv"), "--out", str(vqa)])


def test_review_round_trip(tmp_path):
    out, sheet, reviewed = tmp_path / "x.jsonl", tmp_path / "review.csv", tmp_path / "reviewed.jsonl"
    extract(out)
    review_main(
        [
            "export",
            "--extractions",
            str(out),
            "--reports",
            str(REPORTS),
            "--id-column",
            "report_id",
            *TEXT,
            "--status",
            "present,absent",
            "--out",
            str(sheet),
        ]
    )
    with open(sheet, newline="") as handle:
        entries = list(csv.DictReader(handle))
    assert entries and all(e["status"] in ("present", "absent") for e in entries)
    assert all(e["approved"] == "" and e["reviewer"] == "" for e in entries)
    pleura = next(e for e in entries if (e["report_id"], e["question_id"]) == ("r1", "pleura"))
    assert "pleural effusion measuring 12 mm" in pleura["report_excerpt"]
    decisions = {
        ("r1", "tumor"): ("yes", "", "dr_a"),
        ("r1", "pleura"): ("no", "", "dr_b"),
        ("r4", "metastases"): ("no", "Left adrenal metastasis.", "dr_a"),
    }
    for e in entries:
        e["approved"], e["corrected_answer"], e["reviewer"] = decisions.get(
            (e["report_id"], e["question_id"]), ("", "", "")
        )
    with open(sheet, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(entries[0]))
        writer.writeheader()
        writer.writerows(entries)
    review_main(["import", "--extractions", str(out), "--review", str(sheet), "--out", str(reviewed)])
    rows = {(r["report_id"], r["question_id"]): r for r in lines(reviewed)}
    assert rows["r1", "tumor"]["review"]["decision"] == "approved"
    assert rows["r1", "pleura"]["review"] == {
        **rows["r1", "pleura"]["review"],
        "decision": "rejected",
        "reviewer": "dr_b",
    }
    corrected = rows["r4", "metastases"]
    assert (
        corrected["answer"] == "Left adrenal metastasis." and corrected["review"]["decision"] == "corrected"
    )
    assert corrected["review"]["original_answer"].startswith("Left lower lobe carcinoma")
    with open(str(reviewed) + ".review_log.csv", newline="") as handle:
        log = list(csv.DictReader(handle))
    assert {(e["reviewer"], e["question_id"], e["decision"], e["field"]) for e in log} == {
        ("dr_a", "tumor", "approved", ""),
        ("dr_b", "pleura", "rejected", ""),
        ("dr_a", "metastases", "corrected", "answer"),
    }
    manifest, vqa = tmp_path / "manifest.csv", tmp_path / "vqa.jsonl"
    write_manifest(manifest)
    vqa_main(
        [
            "--extractions",
            str(reviewed),
            "--manifest",
            str(manifest),
            "--report-id-column",
            "accession",
            "--out",
            str(vqa),
        ]
    )
    keyed = {(p["scan_id"], p["question_id"]): p["answer"] for p in lines(vqa)}
    assert ("r1", "pleura") not in keyed and ("r1", "tumor") in keyed
    assert keyed["r4a", "metastases"] == "Left adrenal metastasis."


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"approved": "maybe", "reviewer": "dr_a"}, r"line 2: approved is 'maybe'; expected yes or no"),
        ({"approved": "yes", "reviewer": ""}, r"line 2: a decision without a reviewer"),
        (
            {"approved": "yes", "reviewer": "x", "report_id": "zz"},
            r"line 2: \('zz', 'tumor'\) is not in the extraction",
        ),
    ],
)
def test_review_import_rejects_bad_sheets(tmp_path, edit, message):
    out, sheet = tmp_path / "x.jsonl", tmp_path / "review.csv"
    extract(out)
    review_main(
        [
            "export",
            "--extractions",
            str(out),
            "--reports",
            str(REPORTS),
            "--id-column",
            "report_id",
            *TEXT,
            "--out",
            str(sheet),
        ]
    )
    with open(sheet, newline="") as handle:
        entries = list(csv.DictReader(handle))
    entries[0].update(edit)
    with open(sheet, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(entries[0]))
        writer.writeheader()
        writer.writerows(entries)
    with pytest.raises(ExtractionInputError, match=message):
        review_main(
            ["import", "--extractions", str(out), "--review", str(sheet), "--out", str(tmp_path / "r.jsonl")]
        )


def test_evaluate_prints_precision_recall_f1(tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    extract(out)
    capsys.readouterr()
    evaluate_main(
        [
            "--extractions",
            str(out),
            "--labels",
            str(FIXTURES / "labels.csv"),
            "--id-column",
            "report_id",
            "--map",
            "pleura=Pleural effusion",
            "--map",
            "tumor=Lung nodule",
            "--map",
            "lymph_nodes=Lymphadenopathy",
            "--json",
            str(tmp_path / "scores.json"),
        ]
    )
    printed = capsys.readouterr().out
    assert "precision" in printed and "pleura" in printed
    scores = {s["question_id"]: s for s in json.loads((tmp_path / "scores.json").read_text())}
    assert scores["pleura"]["f1"] == 1.0 and scores["tumor"]["f1"] == 1.0
    # r1 has lymphadenopathy and is labelled so; r4's labels say no nodes and the rules say not_mentioned
    assert (scores["lymph_nodes"]["tp"], scores["lymph_nodes"]["fp"], scores["lymph_nodes"]["fn"]) == (
        1,
        0,
        0,
    )
    with pytest.raises(ExtractionInputError, match=r"no column 'Nodules' \(given by --map\)"):
        evaluate_main(
            [
                "--extractions",
                str(out),
                "--labels",
                str(FIXTURES / "labels.csv"),
                "--id-column",
                "report_id",
                "--map",
                "tumor=Nodules",
            ]
        )


def test_vocab_counts_medical_words_and_writes_the_prompt(tmp_path):
    counts = count_words(
        ["No pleural effusion was observed in the right lung.", "Pleural effusion; lung nodule."]
    )
    assert counts["pleural"] == 2 and counts["effusion"] == 2 and counts["nodule"] == 1
    assert "observed" not in counts and "the" not in counts and "right" not in counts
    out = tmp_path / "words.csv"
    vocab_main(
        [
            "--reports",
            str(REPORTS),
            "--text-column",
            "findings",
            "--text-column",
            "impression",
            "--top",
            "5",
            "--out",
            str(out),
        ]
    )
    with open(out, newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0] == ["word", "count"] and len(table) == 6
    prompt = (tmp_path / "words.csv.prompt.txt").read_text()
    assert table[1][0] in prompt and "question templates" in prompt and "{words}" not in prompt
