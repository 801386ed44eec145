"""What the status of each reference answer (present / absent, read by the rules reader) changes in training.

Report-derived answers are skewed twice over: most are negative ("No pleural effusion."), and the negatives
share one opening word while the positives open with many ("There is ...", "Large ...", "Bilateral ...").
A decoder that reads the image well can still answer "No ..." to every scan, since at the first answer token
"No" holds most of the probability unless the image moves it a long way. Two options address this, each with
the strata of ``answer_strata``:

- ``loss.answer_balance`` (``answer_weights``): L_LM weights that give a question's present and absent
  answers equal total weight (or a power in between), so the loss no longer teaches the prior;
- ``model.answer_format: status_first`` (``with_status``): every training answer opens with its status,
  "Present: There is a large right pleural effusion." / "Absent: No pleural effusion.", so the decoder's
  first decision is one binary choice that the image settles, and the description follows from it. The
  clinical reader and BERTScore read the description only (``vlsurv.prompts.strip_status``);
- ``model.answer_format: findings_first``: the opening also names the finding, and for a present one the
  location the reference gives: "Present, pleura, right: There is a large right pleural effusion." /
  "Absent, lymph nodes: No lymphadenopathy.". Right after the decision the decoder names what the question
  asks about, so the description that follows has its topic a few tokens back rather than in the question;
  a small decoder otherwise lets the commonest positive sentence of another question follow "Present:".
  Then it names the side or lobe from the image, before greedy decoding settles on a wording.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from vlsurv.errors import InputError
from vlsurv.metrics_clinical import LOBE_NAMES, LOBE_QUESTION, named_location
from vlsurv.prompts import STATUS_WORDS, status_opening


class AnswerStatusError(InputError):
    """Strata or weights that cannot be computed from what was given."""


def answer_strata(samples, questions: str) -> list[tuple[str, str]]:
    """(question_id, status of the reference answer) per sample (``Sample``s with question_id and answer):
    the status as the rules reader of vlsurv.metrics_clinical reads the answer; 'prompt_only' without one."""
    from vlsurv.metrics_clinical import read_statuses
    from vlsurv.prompts import load_questions

    answered = [s for s in samples if s.answer is not None]
    statuses = iter(
        read_statuses(
            [s.question_id for s in answered], [s.answer for s in answered], load_questions(questions)
        )
    )
    return [(s.question_id, "prompt_only" if s.answer is None else next(statuses)) for s in samples]


def answer_weights(strata: Sequence[tuple[str, str]], power: float) -> np.ndarray:
    """(N,) float32 LM-loss weight per sample from its (question_id, answer status) stratum.

    Within question q with :math:`N_q` samples over :math:`S_q` statuses, a sample of status s weighs
    :math:`w = (N_q / (S_q n_{q,s}))^p`, then all weights are scaled to mean 1. ``power`` p = 0 gives 1
    everywhere (the plain token mean); p = 1 gives each status of a question the same total weight, so the
    answer prior the loss teaches is 50 / 50; between them the prior is softened. The rows of a prompt-only
    sample (no answer, no label) weigh nothing either way.
    """
    if not 0.0 <= power <= 1.0:
        raise AnswerStatusError(f"loss.answer_balance: expected a power in [0, 1], got {power}")
    counts: dict[str, dict[str, int]] = {}
    for question_id, status in strata:
        by_status = counts.setdefault(question_id, {})
        by_status[status] = by_status.get(status, 0) + 1
    weights = np.array(
        [(sum(counts[q].values()) / (len(counts[q]) * counts[q][status])) ** power for q, status in strata],
        dtype=np.float64,
    )
    return (weights / weights.mean()).astype(np.float32) if len(weights) else weights.astype(np.float32)


def with_status(samples: Sequence, strata: Sequence[tuple[str, str]], locations: bool = False) -> list:
    """``Sample``s whose answer opens with its status (``opened_answer``); answers of other statuses and
    prompt-only samples unchanged. ``locations``: the ``findings_first`` opening."""
    if len(samples) != len(strata):
        raise AnswerStatusError(f"status-first answers: {len(strata)} strata for {len(samples)} samples")
    return [
        sample
        if sample.answer is None or status not in STATUS_WORDS
        else dataclasses.replace(sample, answer=opened_answer(question_id, sample.answer, status, locations))
        for sample, (question_id, status) in zip(samples, strata)
    ]


def opened_answer(question_id: str, answer: str, status: str, locations: bool = False) -> str:
    """``answer`` behind the opening of its ``status`` ("present" / "absent",
    ``vlsurv.prompts.status_opening``): "Present: ...", or with ``locations`` (``findings_first``) the finding
    (the question id in words) and, for a present answer, the location its text gives
    (``vlsurv.metrics_clinical.named_location``: the tumour's lobe, the effusion's side), "Present, tumor,
    right lower lobe: ..." / "Absent, lymph nodes: ...". A status without an opening ("not_mentioned") leaves
    ``answer`` as it is."""
    if status not in STATUS_WORDS:
        return answer
    details = ()
    if locations:
        where = named_location(question_id, answer) if status == "present" else ""
        details = (question_id.replace("_", " "), where)
    return f"{status_opening(status, *details)} {answer}"


def lobe_labels(samples: Sequence) -> dict[str, int]:
    """scan_id -> index in ``LOBE_NAMES`` of the lobe that the scan's reference tumour answer names (one lobe,
    ``named_location``), for ``loss.lobe_weight``; scans whose answer names none, or several, are left out."""
    labels = {}
    for sample in samples:
        if sample.question_id == LOBE_QUESTION and sample.answer:
            name = named_location(LOBE_QUESTION, sample.answer)
            if name:
                labels[sample.scan_id] = LOBE_NAMES.index(name)
    return labels
