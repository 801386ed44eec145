"""Clinical accuracy of generated answers: does each answer say what the scan shows?

BERTScore compares wording: "No pleural effusion." and "Small right pleural effusion." share most of
their tokens and score high although they say opposite things. Here every generated answer is read back
to a status, ``present``, ``absent`` or ``not_mentioned``, by the extraction backend that turned the
reports into VQA pairs (``qa_extraction``; the offline rules reader by default, so negations, hedges and
the question's own rules count exactly as they did when the training answers were made), and compared per
question with

- the status of the same scan's report-derived answer (the VQA file's reference answer, read back the
  same way; a scan without a reference row for a question was ``not_mentioned`` in its report and is left
  out of that question), and
- where a cohort has it, the ground truth: a table of scan_id and one 0/1 column per question id (the
  synthetic cohort's ``findings.csv``).

An answer that opens with its status (``model.answer_format`` status_first / findings_first: "Present,
tumor, right upper lobe: ...") is read without the opening, which is the model's decision and not what the
answer says. An answer counts as positive when its status is ``present`` (a hedged mention reads as
present, as the rules decide). Per question: precision, recall, F1 (scikit-learn; undefined -> None) and
prevalence; macro F1 = mean over the questions with a defined F1, with a percentile bootstrap CI over scans
(``vlsurv.metrics.bootstrap_ci``, clustered by patient when patient ids are given).

Details a radiologist reads, scored on the true-positive answers whose reference gives them: the tumour's
lobe (question ``tumor``), the effusion's side (``pleura``: right, left or bilateral) and, for every
question, the largest size (mm; cm converted) within ``size_tolerance_mm``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vlsurv.errors import InputError
from vlsurv.metrics import MetricError, bootstrap_ci
from vlsurv.prompts import strip_status

STATUSES = ("present", "absent", "not_mentioned")
LOBE_QUESTION, SIDE_QUESTION = "tumor", "pleura"
_LOBE_WORDS = {
    "RUL": "right upper lobe",
    "RML": "right middle lobe",
    "RLL": "right lower lobe",
    "LUL": "left upper lobe",
    "LLL": "left lower lobe",
}
LOBE_NAMES = tuple(_LOBE_WORDS.values())
#: Other names of a lobe than its words and its code.
_LOBE_ALIASES = {"LUL": (r"lingula\w*",)}


def _lobe_pattern(code: str, words: str) -> re.Pattern:
    """A lobe named by its words (any whitespace between them), its code or an alias, as whole words."""
    names = "|".join((r"\s+".join(words.split()), code, *_LOBE_ALIASES.get(code, ())))
    return re.compile(rf"(?<!\w)(?:{names})(?!\w)", re.I)


_LOBE_PATTERNS = {code: _lobe_pattern(code, words) for code, words in _LOBE_WORDS.items()}
_BILATERAL = re.compile(r"\b(?:bilateral(?:ly)?|both\s+sides)\b", re.I)
_SIDE = re.compile(r"\b(right|left)\b", re.I)
_SIZE = re.compile(r"(\d+(?:\.\d+)?)(?:\s*x\s*(\d+(?:\.\d+)?)){0,2}\s*(mm|cm)\b", re.I)


class ClinicalAccuracyError(InputError):
    """Answers, references or ground truth that cannot be scored (the message names the field)."""


def named_lobes(text: str) -> frozenset[str]:
    """Lobe codes (RUL, RML, RLL, LUL, LLL) named in ``text``."""
    return frozenset(code for code, pattern in _LOBE_PATTERNS.items() if pattern.search(text))


def named_side(text: str) -> str | None:
    """'bilateral', 'right', 'left' or None for the side(s) ``text`` names."""
    if _BILATERAL.search(text):
        return "bilateral"
    sides = {match.lower() for match in _SIDE.findall(text)}
    return "bilateral" if len(sides) == 2 else next(iter(sides), None)


def named_location(question_id: str, text: str) -> str:
    """The location the detail scores read, in words: the tumour's lobe ("right lower lobe") when ``text``
    names exactly one, the effusion's side ("right", "left", "bilateral"); "" for other questions or when
    ``text`` names none."""
    if question_id == LOBE_QUESTION:
        lobes = named_lobes(text)
        return _LOBE_WORDS[next(iter(lobes))] if len(lobes) == 1 else ""
    if question_id == SIDE_QUESTION:
        return named_side(text) or ""
    return ""


def location_span(question_id: str, text: str) -> tuple[int, int] | None:
    """(start, end) characters of the first place ``text`` names what ``named_location`` reads: a lobe for the
    tumour, a side for the effusion; None for other questions or when it names none."""
    if question_id == LOBE_QUESTION:
        patterns = tuple(_LOBE_PATTERNS.values())
    elif question_id == SIDE_QUESTION:
        patterns = (_BILATERAL, _SIDE)
    else:
        return None
    found = [match.span() for match in (pattern.search(text) for pattern in patterns) if match]
    return min(found, default=None)


def largest_size_mm(text: str) -> float | None:
    """The largest measurement in ``text`` in mm ("4.2 x 3.1 cm" -> 42.0), None when it gives none."""
    sizes = [
        float(value) * (10.0 if match.group(3).lower() == "cm" else 1.0)
        for match in _SIZE.finditer(text)
        for value in (match.group(1), match.group(2))
        if value is not None
    ]
    return max(sizes, default=None)


def read_statuses(question_ids: Sequence[str], texts: Sequence[str], questions, backend=None) -> list[str]:
    """The status of each text as an answer to its question: 'present', 'absent', 'not_mentioned' (or
    'error' from an LLM backend), read by ``backend`` (default: ``qa_extraction``'s rules backend).

    ``questions``: the question set (``vlsurv.prompts.load_questions``); ``backend``: any
    ``qa_extraction`` backend (``run(items)`` yielding (item, result) per item).
    """
    from qa_extraction.backends.rules import RulesBackend
    from qa_extraction.io import Report
    from qa_extraction.llm import Item

    by_id = {question.id: question for question in questions}
    unknown = sorted(set(question_ids) - set(by_id))
    if unknown:
        raise ClinicalAccuracyError(
            f"question_id {unknown[0]!r}: not in the question set (expected one of {sorted(by_id)})"
        )
    backend = backend or RulesBackend(list(questions))
    items = [
        Item(Report(str(i), str(text)), by_id[qid]) for i, (qid, text) in enumerate(zip(question_ids, texts))
    ]
    statuses = {int(item.report.id): result.status for item, result in backend.run(items)}
    return [statuses[i] for i in range(len(items))]


def binary_scores(predicted: np.ndarray, reference: np.ndarray) -> dict:
    """Precision, recall, F1 (scikit-learn, None where undefined) and prevalence of 0/1 arrays (N,)."""
    from sklearn.metrics import precision_recall_fscore_support

    predicted, reference = np.asarray(predicted, bool), np.asarray(reference, bool)
    precision, recall, f1, _ = precision_recall_fscore_support(
        reference, predicted, average="binary", zero_division=np.nan
    )

    def defined(value) -> float | None:
        return None if np.isnan(value) else float(value)

    return {
        "n": int(reference.size),
        "n_present": int(reference.sum()),
        "prevalence": float(reference.mean()) if reference.size else None,
        "answered_present": int(predicted.sum()),
        "precision": defined(precision),
        "recall": defined(recall),
        "f1": defined(f1),
    }


def macro_f1(question_codes: np.ndarray, predicted: np.ndarray, reference: np.ndarray) -> float:
    """Mean F1 over the questions (codes (N,)) whose F1 is defined; MetricError when none is."""
    values = []
    for code in np.unique(question_codes):
        mask = question_codes == code
        f1 = binary_scores(predicted[mask], reference[mask])["f1"]
        if f1 is not None:
            values.append(f1)
    if not values:
        raise MetricError("macro F1 is undefined: no question has a present answer or reference")
    return float(np.mean(values))


def status_comparison(
    table: pd.DataFrame, reference_column: str, *, bootstrap: int, seed: int, groups=None
) -> dict:
    """Per-question scores and macro F1 (with bootstrap CI) of ``table.status`` vs ``table[reference_column]``
    (both 0/1-able: True = present); ``table`` has question_id, status, and the reference column."""
    predicted = (table["status"] == "present").to_numpy()
    reference = table[reference_column].to_numpy(bool)
    questions = table["question_id"].astype(str).to_numpy()
    per_question = {
        qid: {
            **binary_scores(predicted[questions == qid], reference[questions == qid]),
            **{
                f"answered_{status}": int((table["status"].to_numpy()[questions == qid] == status).sum())
                for status in STATUSES[1:]
            },
        }
        for qid in dict.fromkeys(questions)
    }
    codes = pd.factorize(questions)[0]
    ci = bootstrap_ci(macro_f1, codes, predicted, reference, n=bootstrap, seed=seed, groups=groups)
    return {"per_question": per_question, "macro_f1": ci.estimate, "macro_f1_ci": ci.as_list()}


@dataclass(frozen=True)
class DetailScore:
    correct: int
    scored: int

    def as_dict(self) -> dict:
        return {
            "correct": self.correct,
            "scored": self.scored,
            "accuracy": self.correct / self.scored if self.scored else None,
        }


def detail_scores(pairs: pd.DataFrame, size_tolerance_mm: float) -> dict:
    """Lobe, side and size of the true-positive answers; ``pairs``: question_id, answer, reference,
    status, reference_status."""
    positive = pairs[(pairs["status"] == "present") & (pairs["reference_status"] == "present")]
    lobe = positive[positive["question_id"] == LOBE_QUESTION]
    lobes = [(named_lobes(a), named_lobes(r)) for a, r in zip(lobe["answer"], lobe["reference"])]
    side = positive[positive["question_id"] == SIDE_QUESTION]
    sides = [(named_side(a), named_side(r)) for a, r in zip(side["answer"], side["reference"])]
    results = {
        "tumor_lobe": DetailScore(
            sum(a == r for a, r in lobes if r), sum(bool(r) for _, r in lobes)
        ).as_dict(),
        "pleura_side": DetailScore(
            sum(a == r for a, r in sides if r), sum(r is not None for _, r in sides)
        ).as_dict(),
    }
    sizes = {}
    for qid, group in positive.groupby("question_id", sort=False):
        measured = [
            (largest_size_mm(a), largest_size_mm(r)) for a, r in zip(group["answer"], group["reference"])
        ]
        measured = [(a, r) for a, r in measured if r is not None]
        close = sum(a is not None and abs(a - r) <= size_tolerance_mm for a, r in measured)
        sizes[str(qid)] = DetailScore(close, len(measured)).as_dict()
    results["size"] = {"tolerance_mm": size_tolerance_mm, "per_question": sizes}
    return results


def read_ground_truth(path, question_ids: Sequence[str]) -> pd.DataFrame:
    """scan_id + one 0/1 column per question id present in the file (e.g. the synthetic findings.csv)."""
    table = pd.read_csv(path, dtype={"scan_id": str})
    if "scan_id" not in table.columns:
        raise ClinicalAccuracyError(
            f"{path}: no scan_id column; expected scan_id and one 0/1 column per question"
        )
    columns = [qid for qid in dict.fromkeys(question_ids) if qid in table.columns]
    if not columns:
        raise ClinicalAccuracyError(
            f"{path}: no column named after a question id; expected some of {sorted(set(question_ids))}"
        )
    for column in columns:
        bad = ~pd.to_numeric(table[column], errors="coerce").isin([0, 1])
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise ClinicalAccuracyError(
                f"{path}: row {row + 2}, column {column!r}: expected 0 or 1, got {table[column].iloc[row]!r}"
            )
        table[column] = table[column].astype(int)
    return table[["scan_id", *columns]]


def clinical_accuracy(
    answers: pd.DataFrame,
    references: pd.DataFrame | None,
    questions,
    *,
    ground_truth: pd.DataFrame | None = None,
    patient_ids: dict[str, str] | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    size_tolerance_mm: float = 5.0,
    backend=None,
) -> dict:
    """The metrics.json block ``clinical_accuracy``.

    ``answers``: scan_id, question_id, answer (generated); ``references``: scan_id, question_id, answer
    (report-derived, the VQA file) or None; ``ground_truth``: ``read_ground_truth``'s table or None;
    ``patient_ids``: {scan_id: patient_id} for a bootstrap clustered by patient.
    """
    for name, frame in (("answers", answers), ("references", references)):
        if frame is not None:
            missing = [c for c in ("scan_id", "question_id", "answer") if c not in frame.columns]
            if missing:
                raise ClinicalAccuracyError(f"{name}: missing field(s) {missing}")
    if answers.empty:
        raise ClinicalAccuracyError("answers: no generated answer to score")
    answers = answers[["scan_id", "question_id", "answer"]].astype(str).reset_index(drop=True)
    # a status opening ("Present, tumor, right upper lobe:") is the model's decision, not what the answer says
    answers["answer"] = answers["answer"].map(strip_status)
    answers["status"] = read_statuses(
        answers["question_id"].tolist(), answers["answer"].tolist(), questions, backend
    )
    counts = answers.groupby("question_id", sort=False)["status"].value_counts().unstack(fill_value=0)
    result: dict = {
        "reader": getattr(backend, "model", None) or "rules-v1",
        "answer_statuses": {qid: {s: int(row.get(s, 0)) for s in STATUSES} for qid, row in counts.iterrows()},
        "against_report": None,
        "against_ground_truth": None,
        "details": None,
    }

    def groups_of(frame: pd.DataFrame):
        return (
            None
            if patient_ids is None
            else frame["scan_id"].map(patient_ids).fillna(frame["scan_id"]).to_numpy()
        )

    options = {"bootstrap": bootstrap, "seed": seed}
    if references is not None:
        refs = (
            references[["scan_id", "question_id", "answer"]]
            .astype(str)
            .drop_duplicates(["scan_id", "question_id"])
        )
        refs["answer"] = refs["answer"].map(strip_status)  # validation's references open with their status
        refs = refs.rename(columns={"answer": "reference"}).merge(  # read back only the answered ones
            answers[["scan_id", "question_id"]].drop_duplicates(), on=["scan_id", "question_id"]
        )
        refs["reference_status"] = read_statuses(
            refs["question_id"].tolist(), refs["reference"].tolist(), questions, backend
        )
        pairs = answers.merge(refs, on=["scan_id", "question_id"])
        pairs = pairs[pairs["reference_status"].isin(("present", "absent"))]
        if not pairs.empty:
            pairs["reference_present"] = pairs["reference_status"] == "present"
            result["against_report"] = {
                **status_comparison(pairs, "reference_present", groups=groups_of(pairs), **options),
                "not_in_reference": int(len(answers) - len(pairs)),
            }
            result["details"] = detail_scores(pairs, size_tolerance_mm)
    if ground_truth is not None:
        truth = ground_truth.melt("scan_id", var_name="question_id", value_name="truth")
        truth = answers.merge(truth.astype({"scan_id": str}), on=["scan_id", "question_id"])
        if truth.empty:
            raise ClinicalAccuracyError("ground truth: no (scan_id, question_id) of the answers is in it")
        result["against_ground_truth"] = status_comparison(truth, "truth", groups=groups_of(truth), **options)
    return result


def question_risk_gaps(risks: pd.DataFrame, findings: pd.DataFrame) -> dict:
    """Does each question's risk move with its own finding, more than the other questions' risks do?

    ``risks``: scan_id and ``risk_<question_id>`` columns (N scans); ``findings``: scan_id and one 0/1 column
    per question id. Each risk is z-scored over the scans; gap(r, f) = mean(z_r | f = 1) - mean(z_r | f = 0).
    Per question q (with both present and absent scans): ``own`` = gap(risk_q, finding q), ``others`` = the
    mean of gap(risk_p, finding q) over the other questions p, ``excess`` = own - others (0 when the six
    risks are the same number; > 0 when q's risk carries its own finding). ``matrix``: gap of every risk
    (rows) for every finding (columns).
    """
    columns = [c[len("risk_") :] for c in risks.columns if c.startswith("risk_")]
    table = risks.astype({"scan_id": str}).merge(findings.astype({"scan_id": str}), on="scan_id")
    questions = [q for q in columns if q in table.columns and table[q].nunique() == 2]
    if not questions:
        raise ClinicalAccuracyError(
            "question risk gaps: no question has both a risk_<question_id> column and present and absent "
            "scans"
        )
    z = {
        p: (table[f"risk_{p}"] - table[f"risk_{p}"].mean()) / (table[f"risk_{p}"].std() or 1.0)
        for p in columns
    }

    def gap(p: str, q: str) -> float:
        present = table[q].to_numpy(bool)
        return float(z[p][present].mean() - z[p][~present].mean())

    matrix = {p: {q: gap(p, q) for q in questions} for p in columns}
    result = {}
    for q in questions:
        others = [matrix[p][q] for p in columns if p != q]
        own = matrix[q][q] if q in matrix else None
        mean_others = float(np.mean(others)) if others else None
        excess = None if own is None or mean_others is None else own - mean_others
        result[q] = {"own": own, "others": mean_others, "excess": excess}
    return {"per_question": result, "matrix": matrix}
