"""Validation during training: LM loss, C-index of the mean question risk, a few generated answers.

The validation set is every val scan x every question of the set (``scan_question_samples``), teacher-forced with
the reference answer where the VQA file has one (prompt only where it has none), pooled as ``model.pool`` says.
- ``lm_loss``: the token-mean NLL of the reference answers;
- ``c_index`` (stage 2, and only when survival data is loaded): Harrell's C of each scan's risk = the mean of its
  question risks (the prompt ensemble of predict, with reference instead of generated answers); None with a
  ``c_index_note`` when it is undefined (no event, constant risk);
- ``samples``: ``eval.sample_answers`` greedy answers of the first val prompts, as {scan_id, question_id, answer}
  (generated text only; reference answers and reports are never logged). Skipped under FSDP, whose sharded
  parameters the unwrapped model cannot generate with.

Scans are sharded over processes; every process runs the same number of forward passes (a process out of scans
repeats its last batch and drops the result) so that FSDP / ZeRO collectives stay matched.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from accelerate.utils import DistributedType, gather_object, send_to_device

from vlsurv.metrics import MetricError, concordance_index
from vlsurv.training.objective import token_nll


@dataclass
class ValidationResult:
    lm_loss: float | None
    c_index: float | None
    c_index_note: str = ""
    samples: list[dict] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Scalars for the trackers (undefined values left out)."""
        values = {"val/lm_loss": self.lm_loss, "val/c_index": self.c_index}
        return {key: value for key, value in values.items() if value is not None}


def _scan_batches(dataset, rank: int, world: int, batch_size: int) -> tuple[list[list[int]], int]:
    """This process's batches (all questions of a scan stay together) and the largest batch count of any process."""
    by_scan: dict[str, list[int]] = defaultdict(list)
    for index, sample in enumerate(dataset.samples):
        by_scan[sample.scan_id].append(index)
    scans = list(by_scan.values())

    def batches_of(r: int) -> list[list[int]]:
        indices = [i for group in scans[r::world] for i in group]
        return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]

    return batches_of(rank), max(len(batches_of(r)) for r in range(world))


@torch.no_grad()
def _forward_records(model, unwrapped, dataset, accelerator, batch_size: int, with_risk: bool):
    """Per sample (scan_id, risk or None), and this process's (NLL sum, token count)."""
    batches, rounds = _scan_batches(dataset, accelerator.process_index, accelerator.num_processes, batch_size)
    records, nll_total, tokens = [], 0.0, 0
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
            )
        if not real:
            continue
        nll, count = token_nll(output.logits, batch["labels"])
        nll_total += float(nll)
        tokens += int(count)
        risks = unwrapped.risk(output.survival).float().cpu().tolist() if with_risk else [None] * len(indices)
        records.extend(zip(batch["scan_id"], risks))
    return records, nll_total, tokens


def _c_index(dataset, records) -> tuple[float | None, str]:
    risks: dict[str, list[float]] = defaultdict(list)
    for scan_id, risk in records:
        risks[scan_id].append(risk)
    outcome = {s.scan_id: (s.time, s.event) for s in dataset.samples}
    scan_ids = sorted(risks)
    try:
        value = concordance_index(
            [outcome[s][0] for s in scan_ids],
            [outcome[s][1] for s in scan_ids],
            [sum(risks[s]) / len(risks[s]) for s in scan_ids],
        )
    except MetricError as err:
        return None, str(err)
    return value, ""


@torch.no_grad()
def sample_answers(unwrapped, dataset, count: int, max_new_tokens: int, device) -> list[dict]:
    """Greedy answers to the first ``count`` validation prompts: [{scan_id, question_id, answer}]."""
    samples = dataset.samples[:count]
    if not samples:
        return []
    processor = unwrapped.processor
    encoded = []
    for s in samples:
        item = processor.encode(s.clinical, s.question)
        item["image_tokens"] = dataset.tokens.get(s.scan_id)
        encoded.append(item)
    batch = send_to_device(processor.collate(encoded, padding_side="left"), device)
    new_tokens = unwrapped.generate(
        batch["input_ids"], batch["attention_mask"], batch["image_tokens"], max_new_tokens=max_new_tokens
    )
    texts = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [
        {"scan_id": s.scan_id, "question_id": s.question_id, "answer": text.strip()}
        for s, text in zip(samples, texts)
    ]


def validate(model, dataset, accelerator, *, batch_size: int, with_risk: bool, answers: int, max_new_tokens: int):
    """Run validation on every process; the returned ``ValidationResult`` is the same on each."""
    unwrapped = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    records, nll_total, tokens = _forward_records(model, unwrapped, dataset, accelerator, batch_size, with_risk)
    gathered = gather_object([(records, nll_total, tokens)])
    all_records = [record for part in gathered for record in part[0]]
    total_tokens = sum(part[2] for part in gathered)
    lm_loss = sum(part[1] for part in gathered) / total_tokens if total_tokens else None
    c_index, note = _c_index(dataset, all_records) if with_risk else (None, "")
    samples = []
    if answers and accelerator.is_main_process and accelerator.distributed_type != DistributedType.FSDP:
        samples = sample_answers(unwrapped, dataset, answers, max_new_tokens, accelerator.device)
    model.train(was_training)
    return ValidationResult(lm_loss=lm_loss, c_index=c_index, c_index_note=note, samples=samples)
