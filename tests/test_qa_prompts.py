"""vlsurv.prompts: the question files every step reads, and template files."""

from __future__ import annotations

import pytest

from vlsurv.prompts import PROMPTS_DIR, PromptError, Question, load_questions, read_template

LUNG_IDS = ["tumor", "lymph_nodes", "pleura", "metastases", "vessels", "bone"]


def test_lung_questions_have_stable_ids_in_order_and_the_design_texts():
    questions = load_questions("lung")
    assert [q.id for q in questions] == LUNG_IDS
    assert questions[0].text == "What is the location and size of the primary lung tumor?"
    assert questions[2].text == "Is there any pleural involvement or effusion present?"
    assert questions[5].text == "Are there skeleton/bone changes on the scan?"
    assert all(isinstance(q, Question) and q.keywords for q in questions)
    assert load_questions(PROMPTS_DIR / "questions" / "lung.yaml") == questions


def test_read_template_and_a_missing_one():
    assert "{report}" in read_template("extraction/answer.txt")
    with pytest.raises(PromptError, match=r"nope.txt not found; files in .*extraction"):
        read_template("extraction/nope.txt")


@pytest.mark.parametrize(
    "body, message",
    [
        ("questions:\n  - text: What is it?\n", r"questions\[0\]: missing 'id'"),
        (
            "questions:\n  - id: Tumor Size\n    text: x?\n",
            r"questions\[0\]: id 'Tumor Size' must be lowercase",
        ),
        ("questions:\n  - id: a\n    text: x?\n  - id: a\n    text: y?\n", r"question id 'a' appears twice"),
        ("questions:\n  - id: a\n", r"questions\[0\] \(id 'a'\): missing 'text'"),
        ("questions:\n  - id: a\n    text: x?\n    colour: red\n", r"unknown keys \['colour'\]"),
        ("questions: []\n", r"expected a non-empty list under 'questions:'"),
        ("questions: [\n", r"not valid YAML"),
    ],
)
def test_bad_question_files_name_the_file_and_entry(tmp_path, body, message):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(PromptError, match=message) as info:
        load_questions(path)
    assert "bad.yaml" in str(info.value)


def test_unknown_question_set():
    with pytest.raises(PromptError, match=r"no_such_set.yaml not found; expected a path or one of .*'lung'"):
        load_questions("no_such_set")
