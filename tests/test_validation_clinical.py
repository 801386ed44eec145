"""Validation's clinical macro F1: a fixed subset of val scans, answers read back and scored against the
val samples' reference answers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from sklearn.metrics import f1_score

from vlsurv.data.datasets import Sample
from vlsurv.training.validation import ValidationResult, clinical_scores, clinical_subset

YES, NO = "Small right pleural effusion (depth 12 mm).", "No pleural effusion."


def _dataset(references: list[str | None]):
    samples = []
    for i, reference in enumerate(references):
        samples += [
            Sample(f"s{i}", f"p{i}", "pleura", "Is there any pleural effusion?", reference, "", 1.0, 1),
            Sample(f"s{i}", f"p{i}", "bone", "Bone?", None, "", 1.0, 1),
        ]
    return SimpleNamespace(samples=samples)


def test_the_subset_is_every_question_of_the_first_val_scans():
    dataset = _dataset([YES, NO, YES])
    assert clinical_subset(dataset, 2) == [0, 1, 2, 3]
    assert clinical_subset(dataset, 10) == list(range(6))


def test_clinical_scores_match_scikit_learn_and_are_logged():
    dataset = _dataset([YES, NO, YES, NO])
    generated = [YES, YES, NO, NO]
    answers = [{"scan_id": f"s{i}", "question_id": "pleura", "answer": a} for i, a in enumerate(generated)]
    answers.append({"scan_id": "s0", "question_id": "bone", "answer": "No suspicious osseous lesion."})
    macro, per_question = clinical_scores(dataset, answers, "lung")
    expected = f1_score([1, 0, 1, 0], [1, 1, 0, 0])
    assert per_question == {"pleura": pytest.approx(expected)}  # bone has no reference answer: left out
    assert macro == pytest.approx(expected)
    logged = ValidationResult(lm_loss=0.5, c_index=None, clinical_macro_f1=macro, clinical_f1=per_question)
    assert logged.metrics() == {
        "val/lm_loss": 0.5,
        "val/clinical_macro_f1": pytest.approx(expected),
        "val/clinical_f1/pleura": pytest.approx(expected),
    }
    assert clinical_scores(dataset, [], "lung") == (None, {})
