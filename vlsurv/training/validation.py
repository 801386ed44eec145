"""Validation during training: LM loss, the C-index of what predict deploys, a few generated answers.

- ``lm_loss``: the token-mean NLL of the reference answers, teacher-forced over every val scan x every
  question of the set (``scan_question_samples``; prompt only where the VQA file has no answer);
- ``c_index`` (stage 2, and only when survival data is loaded): Harrell's C of each scan's risk as ``vlsurv
  predict`` computes it: ``vlsurv.model.ensemble.score_shared_prefix`` over the scan's questions with
  predict's defaults (greedy answers of at most ``eval.max_new_tokens`` tokens, the model's ``pool``), scan
  risk = mean question risk. Reference answers play no part in it. None with a ``c_index_note`` when it is
  undefined (no event, constant risk) or under FSDP, whose sharded parameters the scoring path cannot use
  (score ``final/`` with predict);
- ``clinical_macro_f1`` (``eval.clinical_scans`` > 0): the macro F1 of vlsurv.metrics_clinical on a fixed val
  subset, the first ``eval.clinical_scans`` val scans x every question: greedy answers (stage 2: the scoring
  pass's own) read back to present / absent by the rules reader and compared with the reference answers'
  status; logged with each question's F1 (``val/clinical_f1/<question_id>``). Skipped under FSDP;
- ``samples``: ``eval.sample_answers`` greedy answers of the first val prompts, as {scan_id, question_id,
  answer} (generated text only; reference answers and reports are never logged): in stage 2 the scoring pass's
  own answers. Skipped under FSDP.

When nothing before the survival branch trains (stage 2 at ``optim.lr_lora`` 0: the projector and the decoder
frozen), the LM loss, the answers and the pooled hidden states are the same at every validation; a
``DecoderMemo`` keeps them from the first one, and later validations run the survival branch alone.

The LM-loss passes are sharded over processes, each running the same number of forward passes (a process out
of scans repeats its last batch and drops the result) so that FSDP / ZeRO collectives stay matched. The
scoring pass runs on the unwrapped model (no collectives), each process on its share of the scans.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, send_to_device
from torch import nn

from vlsurv.data.datasets import SampleDataset
from vlsurv.metrics import MetricError, concordance_index
from vlsurv.model.ensemble import DecodeOptions, ScanInput, score_shared_prefix, survival_outputs
from vlsurv.model.vlm import VisionLanguageSurvivalModel
from vlsurv.training.objective import token_nll


@dataclass
class ValidationResult:
    lm_loss: float | None
    c_index: float | None
    c_index_note: str = ""
    samples: list[dict] = field(default_factory=list)
    clinical_macro_f1: float | None = None
    clinical_f1: dict[str, float | None] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Scalars for the trackers (undefined values left out)."""
        values = {"val/lm_loss": self.lm_loss, "val/c_index": self.c_index}
        values["val/clinical_macro_f1"] = self.clinical_macro_f1
        values.update({f"val/clinical_f1/{qid}": f1 for qid, f1 in self.clinical_f1.items()})
        return {key: value for key, value in values.items() if value is not None}


@dataclass
class ScoredScan:
    """What the decoder gave one val scan: pooled hidden states (Q, d), answers, status margins or None."""

    pooled: torch.Tensor
    answers: list[str]
    status_margin: list[float] | None


@dataclass
class DecoderMemo:
    """This process's decoder outputs of the first validation, for a run whose decoder side is frozen
    (``VisionLanguageSurvivalModel.trains_decoder`` False): the LM totals and each scored val scan."""

    lm_totals: tuple[float, int] | None = None
    scans: dict[str, ScoredScan] = field(default_factory=dict)


def _scan_batches(
    dataset: SampleDataset, rank: int, world: int, batch_size: int
) -> tuple[list[list[int]], int]:
    """This process's batches (all questions of a scan stay together) and the largest batch count of any
    process."""
    by_scan: dict[str, list[int]] = defaultdict(list)
    for index, sample in enumerate(dataset.samples):
        by_scan[sample.scan_id].append(index)
    scans = list(by_scan.values())

    def batches_of(r: int) -> list[list[int]]:
        indices = [i for group in scans[r::world] for i in group]
        return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]

    return batches_of(rank), max(len(batches_of(r)) for r in range(world))


@torch.no_grad()
def _lm_totals(
    model: nn.Module,
    unwrapped: VisionLanguageSurvivalModel,
    dataset: SampleDataset,
    accelerator: Accelerator,
    batch_size: int,
) -> tuple[float, int]:
    """This process's (NLL sum, token count) of the teacher-forced reference answers."""
    batches, rounds = _scan_batches(dataset, accelerator.process_index, accelerator.num_processes, batch_size)
    nll_total, tokens = 0.0, 0
    for round_index in range(rounds):
        real = round_index < len(batches)
        indices = batches[round_index] if real else (batches[-1] if batches else [0])
        batch = send_to_device(dataset.collate([dataset[i] for i in indices]), accelerator.device)
        with accelerator.autocast():
            output = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                image_tokens=batch["image_tokens"],
                pool_mask=unwrapped.pool_mask(batch),
                covariates=batch.get("covariates"),
            )
        if not real:
            continue
        nll, count = token_nll(output.logits, batch["labels"])
        nll_total += float(nll)
        tokens += int(count)
    return nll_total, tokens


def scans_and_questions(dataset: SampleDataset) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """[(scan_id, clinical sentence)] in sample order and the question set [(question_id, text)] in its
    order."""
    scans: dict[str, str] = {}
    questions: dict[str, str] = {}
    for sample in dataset.samples:
        scans.setdefault(sample.scan_id, sample.clinical)
        questions.setdefault(sample.question_id, sample.question)
    return list(scans.items()), list(questions.items())


@torch.no_grad()
def score_scans(
    unwrapped: VisionLanguageSurvivalModel,
    dataset: SampleDataset,
    accelerator: Accelerator,
    options: DecodeOptions,
    scans_per_batch: int,
    memo: DecoderMemo | None = None,
) -> list[dict]:
    """This process's share of the val scans scored by predict's path: [{scan_id, risk, answers,
    status_margin}] (risk = mean of the question risks; answers = one per question, in the question set's
    order; status_margin: one per question for a status_first model, else None). With ``memo``, a scan it
    holds runs the survival branch alone on its pooled hidden states; the others are scored and kept."""
    scans, questions = scans_and_questions(dataset)
    mine = scans[accelerator.process_index :: accelerator.num_processes]
    texts = [text for _, text in questions]
    question_ids = [qid for qid, _ in questions]
    records = []
    for start in range(0, len(mine), scans_per_batch):
        chunk = mine[start : start + scans_per_batch]
        if memo is None or any(sid not in memo.scans for sid, _ in chunk):
            batch = [
                ScanInput(sid, clinical, dataset.feature_cache.get(sid), _covariates(dataset, sid))
                for sid, clinical in chunk
            ]
            with accelerator.autocast():
                result = score_shared_prefix(
                    unwrapped,
                    batch,
                    texts,
                    unwrapped.config.pool,
                    options,
                    status_bias=unwrapped.status_bias_for(question_ids),
                    question_ids=question_ids,
                )
            margins = [None] * len(batch) if result.status_margin is None else result.status_margin.tolist()
            scored = [ScoredScan(p, a, m) for p, a, m in zip(result.pooled, result.answers, margins)]
            if memo is not None:
                memo.scans.update({sid: one for (sid, _), one in zip(chunk, scored)})
            risks = result.risks
        else:
            scored = [memo.scans[sid] for sid, _ in chunk]
            pooled = torch.stack([one.pooled for one in scored])
            with accelerator.autocast():
                covariates = None
                if dataset.covariates is not None:
                    covariates = torch.stack([dataset.covariates[sid] for sid, _ in chunk])
                risks, _ = survival_outputs(
                    unwrapped, pooled.flatten(0, 1), tuple(pooled.shape[:2]), covariates
                )
        for (sid, _), risk, one in zip(chunk, risks.mean(1).tolist(), scored):
            records.append(
                {"scan_id": sid, "risk": risk, "answers": one.answers, "status_margin": one.status_margin}
            )
    return records


def _covariates(dataset: SampleDataset, scan_id: str) -> torch.Tensor | None:
    return None if dataset.covariates is None else dataset.covariates[scan_id]


def _c_index(dataset: SampleDataset, records: list[dict]) -> tuple[float | None, str]:
    outcome = {s.scan_id: (s.time, s.event) for s in dataset.samples}
    try:
        value = concordance_index(
            [outcome[r["scan_id"]][0] for r in records],
            [outcome[r["scan_id"]][1] for r in records],
            [r["risk"] for r in records],
        )
    except MetricError as err:
        return None, str(err)
    return value, ""


def _first_answers(dataset: SampleDataset, records: list[dict], count: int) -> list[dict]:
    """The scoring pass's answers to the first ``count`` val prompts, in sample order."""
    _, questions = scans_and_questions(dataset)
    by_scan = {r["scan_id"]: r["answers"] for r in records}
    position = {qid: i for i, (qid, _) in enumerate(questions)}
    return [
        {
            "scan_id": s.scan_id,
            "question_id": s.question_id,
            "answer": by_scan[s.scan_id][position[s.question_id]],
        }
        for s in dataset.samples[:count]
    ]


@torch.no_grad()
def sample_answers(
    unwrapped: VisionLanguageSurvivalModel,
    dataset: SampleDataset,
    count: int,
    max_new_tokens: int,
    device: torch.device,
) -> list[dict]:
    """Greedy answers to the first ``count`` validation prompts, in one batch: [{scan_id, question_id,
    answer}]."""
    indices = list(range(min(count, len(dataset.samples))))
    return subset_answers(unwrapped, dataset, indices, max(len(indices), 1), max_new_tokens, device)


def clinical_subset(dataset: SampleDataset, scans: int) -> list[int]:
    """Indices of the samples of the first ``scans`` val scans (sample order): the fixed clinical subset."""
    chosen = list(dict.fromkeys(s.scan_id for s in dataset.samples))[:scans]
    return [i for i, s in enumerate(dataset.samples) if s.scan_id in set(chosen)]


@torch.no_grad()
def subset_answers(
    unwrapped: VisionLanguageSurvivalModel,
    dataset: SampleDataset,
    indices: list[int],
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
) -> list[dict]:
    """Greedy answers to the samples at ``indices``: [{scan_id, question_id, answer}]."""
    processor, answers = unwrapped.processor, []
    for start in range(0, len(indices), batch_size):
        samples = [dataset.samples[i] for i in indices[start : start + batch_size]]
        encoded = []
        for s in samples:
            item = processor.encode(s.clinical, s.question)
            item["image_tokens"] = dataset.feature_cache.get(s.scan_id)
            encoded.append(item)
        batch = send_to_device(processor.collate(encoded, padding_side="left"), device)
        new_tokens = unwrapped.generate(
            batch["input_ids"], batch["attention_mask"], batch["image_tokens"], max_new_tokens=max_new_tokens
        )
        texts = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        answers += [
            {"scan_id": s.scan_id, "question_id": s.question_id, "answer": text.strip()}
            for s, text in zip(samples, texts)
        ]
    return answers


def clinical_scores(dataset: SampleDataset, answers: list[dict], questions: str) -> tuple[float | None, dict]:
    """(macro F1, {question_id: F1}) of ``answers`` against the val samples' reference answers (rules
    reader); (None, {}) when no answer has a present / absent reference or the macro F1 is undefined."""
    import pandas as pd

    from vlsurv.metrics_clinical import clinical_accuracy
    from vlsurv.prompts import load_questions

    references = [
        {"scan_id": s.scan_id, "question_id": s.question_id, "answer": s.answer}
        for s in dataset.samples
        if s.answer is not None
    ]
    if not answers or not references:
        return None, {}
    try:
        result = clinical_accuracy(
            pd.DataFrame(answers), pd.DataFrame(references), load_questions(questions), bootstrap=1
        )["against_report"]
    except MetricError:
        return None, {}
    if result is None:
        return None, {}
    return result["macro_f1"], {qid: q["f1"] for qid, q in result["per_question"].items()}


def scoring_options(model: VisionLanguageSurvivalModel, max_new_tokens: int) -> dict:
    """The settings the C-index is scored with (recorded with the selected model, read back by predict)."""
    return {"pool": model.config.pool, "generate": True, "max_new_tokens": max_new_tokens, "do_sample": False}


def validate(
    model: nn.Module,
    dataset: SampleDataset,
    accelerator: Accelerator,
    *,
    batch_size: int,
    with_risk: bool,
    answers: int,
    max_new_tokens: int,
    clinical_scans: int = 0,
    questions: str = "lung",
    memo: DecoderMemo | None = None,
) -> ValidationResult:
    """Run validation on every process; the returned ``ValidationResult`` is the same on each.

    ``clinical_scans`` > 0: the clinical macro F1 on the first that many val scans (question set
    ``questions``). ``memo`` (a frozen decoder side only): the decoder's outputs of the first call, reused."""
    unwrapped = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    if memo is not None and memo.lm_totals is not None:
        nll_total, tokens = memo.lm_totals
    else:
        nll_total, tokens = _lm_totals(model, unwrapped, dataset, accelerator, batch_size)
        if memo is not None:
            memo.lm_totals = (nll_total, tokens)
    gathered = gather_object([(nll_total, tokens)])
    total_tokens = sum(part[1] for part in gathered)
    lm_loss = sum(part[0] for part in gathered) / total_tokens if total_tokens else None
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    c_index, note, samples, clinical_answers = None, "", [], []
    if with_risk and fsdp:
        note = (
            "not scored under FSDP: the prediction path needs unsharded parameters; run vlsurv predict "
            "on final/"
        )
    elif with_risk:
        options = DecodeOptions(
            **{k: v for k, v in scoring_options(unwrapped, max_new_tokens).items() if k != "pool"}
        )
        _, questions = scans_and_questions(dataset)
        records = score_scans(
            unwrapped, dataset, accelerator, options, max(1, batch_size // len(questions)), memo
        )
        records = sorted(gather_object(records), key=lambda r: r["scan_id"])
        c_index, note = _c_index(dataset, records)
        samples = _first_answers(dataset, records, answers) if accelerator.is_main_process else []
        if clinical_scans:
            subset = {dataset.samples[i].scan_id for i in clinical_subset(dataset, clinical_scans)}
            clinical_answers = [
                a for a in _first_answers(dataset, records, len(dataset)) if a["scan_id"] in subset
            ]
    else:
        if answers and accelerator.is_main_process and not fsdp:
            samples = sample_answers(unwrapped, dataset, answers, max_new_tokens, accelerator.device)
        if clinical_scans and not fsdp:
            subset = clinical_subset(dataset, clinical_scans)[
                accelerator.process_index :: accelerator.num_processes
            ]
            mine = subset_answers(unwrapped, dataset, subset, batch_size, max_new_tokens, accelerator.device)
            clinical_answers = [a for part in gather_object([mine]) for a in part]
    macro_f1, per_question = clinical_scores(dataset, clinical_answers, questions)
    model.train(was_training)
    return ValidationResult(
        lm_loss=lm_loss,
        c_index=c_index,
        c_index_note=note,
        samples=samples,
        clinical_macro_f1=macro_f1,
        clinical_f1=per_question,
    )
