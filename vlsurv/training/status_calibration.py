"""The decision threshold of a ``status_first`` model, per question, fitted on the validation scans.

A ``status_first`` model (``model.answer_format``) opens each answer with "Present:" or "Absent:", so the
answer token where the two openings differ (``VisionLanguageSurvivalModel.status_decision``) is a classifier
with score m = logit("Present") - logit("Absent"). Greedy decoding
answers "Present" when m > 0, a threshold that the training prior sets rather than the use: even with
``loss.answer_balance`` a short run leaves rare findings under the line. ``eval.status_calibration:
max_f1`` fits, when training ends (stage 1 and stage 2 alike, on the selected weights), one offset b_q per
question such that "m + b_q > 0" is the rule of highest F1 (present = positive) over the val scans whose
reference answer is present or absent, among the rules that answer "present" at most
``eval.status_present_cap`` times as often as the references do; the threshold sits halfway between the two
val scores it separates.
A question whose val answers are all of one status keeps b_q = 0. The offsets go into the model config
(``model.status_bias``), which predict, the Python pipeline and validation apply at the first answer token
(``vlsurv.model.ensemble.score_shared_prefix``).
"""

from __future__ import annotations

import numpy as np
from accelerate import Accelerator
from accelerate.utils import gather_object

from vlsurv.data.datasets import SampleDataset
from vlsurv.model.ensemble import DecodeOptions
from vlsurv.model.vlm import VisionLanguageSurvivalModel
from vlsurv.prompts import opening_status
from vlsurv.training.validation import scans_and_questions, score_scans


def max_f1_bias(
    margin: np.ndarray, present: np.ndarray, present_cap: float = 2.0
) -> tuple[float, float | None]:
    """(b, F1 at b) for scores ``margin`` (N,) and labels ``present`` (N,) bool: "margin + b > 0" is the
    rule of highest F1 among those answering "present" for at most ``present_cap`` x the labels' present
    count, its threshold halfway between neighbouring scores; (0.0, None) when ``present`` is all one value.

    The cap keeps a question whose score carries no signal from being fitted to "present for everyone", the
    trivial rule whose F1 is 2p / (1 + p) at prevalence p."""
    margin, present = np.asarray(margin, np.float64), np.asarray(present, bool)
    if present.all() or not present.any():
        return 0.0, None
    order = np.argsort(-margin, kind="stable")
    ranked, hits = margin[order], present[order]
    true_pos = np.cumsum(hits)  # predicting the top k+1 scores present
    k = np.arange(1, len(ranked) + 1)
    f1 = 2 * true_pos / (k + present.sum())
    distinct = np.append(ranked[1:] < ranked[:-1], True)  # cut only between different scores
    distinct &= (k <= max(1.0, present_cap * present.sum())) | (k == k[distinct][0])
    best = int(np.flatnonzero(distinct)[np.argmax(f1[distinct])])
    threshold = ranked[best] - 1.0 if best == len(ranked) - 1 else (ranked[best] + ranked[best + 1]) / 2
    return float(-threshold), float(f1[best])


def reference_present(answer: str | None) -> bool | None:
    """The status a reference answer opens with (``status_first``, ``findings_first``): True, False, or None
    (no status opening)."""
    status = None if answer is None else opening_status(answer)
    return None if status is None else status == "present"


def fit_status_bias(
    unwrapped: VisionLanguageSurvivalModel,
    dataset: SampleDataset,
    accelerator: Accelerator,
    batch_size: int,
    present_cap: float = 2.0,
) -> dict:
    """Fit ``unwrapped.config.status_bias`` on the val ``dataset`` (status_first answers); call on every
    process. Returns {"status_bias": {qid: b}, "val_f1": {qid: F1 or None}, "val_scans": n}."""
    _, questions = scans_and_questions(dataset)
    unwrapped.config.status_bias = {}
    was_training = unwrapped.training
    unwrapped.eval()
    step = unwrapped.status_decision()[0]
    options = DecodeOptions(max_new_tokens=step + 1)
    records = score_scans(unwrapped, dataset, accelerator, options, max(1, batch_size // len(questions)))
    unwrapped.train(was_training)
    margins = {r["scan_id"]: r["status_margin"] for r in gather_object(records)}
    position = {qid: i for i, (qid, _) in enumerate(questions)}
    scores: dict[str, tuple[list[float], list[bool]]] = {qid: ([], []) for qid, _ in questions}
    for sample in dataset.samples:
        present = reference_present(sample.answer)
        if present is not None:
            scores[sample.question_id][0].append(margins[sample.scan_id][position[sample.question_id]])
            scores[sample.question_id][1].append(present)
    fitted = {qid: max_f1_bias(np.array(m), np.array(p), present_cap) for qid, (m, p) in scores.items()}
    unwrapped.config.status_bias = {qid: bias for qid, (bias, _) in fitted.items()}
    return {
        "status_bias": unwrapped.config.status_bias,
        "val_f1": {qid: f1 for qid, (_, f1) in fitted.items()},
        "val_scans": len(margins),
    }
