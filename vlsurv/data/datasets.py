"""Training and validation samples: VQA pairs joined with the manifest (clinical row, time, event, split).

- ``read_vqa(path)``: the VQA JSONL (``{scan_id, question_id, question, answer}`` per line) as a list of
  dicts.
- ``training_samples``: one ``Sample`` per VQA pair of a split's scans (stage 1 and stage 2 training).
- ``scan_question_samples``: every scan of a split x every question of the set, with the reference answer when
  the VQA file has one (else ``answer=None``: prompt only); validation uses them for the mean six-question
  risk.
- ``SampleDataset(samples, feature_cache, processor)``: item = the processor's encoding (1-D ``input_ids``,
  ``attention_mask``, ``labels``, ``prompt_mask`` of one length L) + ``image_tokens`` (T, C) + ``time`` and
  ``event`` (0-d) + ``scan_id``, ``patient_id``, ``question_id``; after ``set_deephit_cuts(cuts)`` also the
  sample's DeepHit labels (0-d): ``bin_index`` long, ``binned_event`` bool, ``censored_credit`` float64;
  after ``set_covariates(by_scan)`` also the scan's (p,) clinical ``covariates``, after ``set_lobes`` its
  ``lobe`` (0-d long). ``collate`` pads (right)
  to (B, L) and stacks ``image_tokens`` (B, T, C), ``time`` (B,) float32, ``event``
  (B,) long, the labels (B,) and ``covariates`` (B, p).

This module imports no model or encoder code: ``feature_cache`` is a ``TokenSource`` (``get(scan_id) ->
(T, C)`` and ``__contains__``; a ``FeatureCache``; only ``in`` where typed ``Container[str]``), ``processor``
a ``PromptProcessor`` (``encode``, ``collate``, ``truncated_answers``; a ``VLMProcessor``), ``cuts`` any
object with ``labels(time, event)`` (a ``DeepHitCuts``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pandas as pd
import torch
from torch.utils.data import Dataset

from vlsurv.errors import InputError
from vlsurv.jsonl import read_jsonl
from vlsurv.metrics_clinical import location_span, named_location
from vlsurv.model.processor import IGNORE_INDEX
from vlsurv.prompts import status_opening_of

if TYPE_CHECKING:
    from vlsurv.model.survival import DeepHitCuts

VQA_KEYS = ("scan_id", "question_id", "question", "answer")


class DatasetError(InputError):
    """A VQA file, manifest or cache that cannot give training samples (the message names file, row and
    field)."""


class TokenSource(Protocol):
    """Image tokens by scan id (a ``vlsurv.encoders.cache.FeatureCache``)."""

    def __contains__(self, scan_id: object) -> bool: ...

    def get(self, scan_id: str) -> torch.Tensor: ...


class PromptProcessor(Protocol):
    """Prompt encoding and padding (a ``vlsurv.model.processor.VLMProcessor``)."""

    truncated_answers: int

    def encode(self, clinical: str, question: str, answer: str | None = None) -> dict[str, torch.Tensor]: ...

    def collate(
        self, encoded: Sequence[dict[str, torch.Tensor]], padding_side: str = "right"
    ) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Sample:
    """One (scan, question) pair; ``answer`` None = prompt only; ``time``/``event`` NaN/-1 without survival
    data."""

    scan_id: str
    patient_id: str
    question_id: str
    question: str
    answer: str | None
    clinical: str
    time: float
    event: int


def _vqa_row_problem(row: dict) -> str | None:
    bad = next((key for key in VQA_KEYS if not isinstance(row.get(key), str) or not row[key].strip()), None)
    return None if bad is None else f"field {bad!r} missing or empty; expected a string"


def read_vqa(path: str | Path) -> list[dict[str, str]]:
    """Rows of a VQA JSONL file; a bad line raises DatasetError naming the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(
            f"data.vqa {path}: file does not exist; expected a JSONL file from qa_extraction to-vqa"
        )
    rows = read_jsonl(path, error=DatasetError, check=_vqa_row_problem)
    if not rows:
        raise DatasetError(f"{path}: no VQA rows; expected one JSON object per line")
    return [{key: row[key] for key in VQA_KEYS} for row in rows]


def _sample(
    row: Mapping, question_id: str, question: str, answer: str | None, clinical: str, require_survival: bool
) -> Sample:
    """One (scan, question) sample of a manifest row; time NaN and event -1 when survival is not needed."""
    time, event = (float(row["time"]), int(row["event"])) if require_survival else (math.nan, -1)
    return Sample(
        scan_id=str(row["scan_id"]),
        patient_id=str(row["patient_id"]),
        question_id=question_id,
        question=question,
        answer=answer,
        clinical=clinical,
        time=time,
        event=event,
    )


def split_rows(
    manifest: pd.DataFrame,
    split: str,
    feature_cache: Container[str],
    where: str,
    error: type[Exception] = DatasetError,
) -> pd.DataFrame:
    """The manifest rows of ``split`` ("all" for every row), each of whose scans must be in
    ``feature_cache``."""
    rows = manifest if split == "all" else manifest[manifest["split"].astype(str) == split]
    if rows.empty:
        raise error(f"{where}: no scan has split == {split!r}; expected at least one")
    missing = [s for s in rows["scan_id"].astype(str) if s not in feature_cache]
    if missing:
        raise error(
            f"{where}: {len(missing)} {split} scans are not in the feature cache (first: {missing[:3]}); "
            "encode them with `vlsurv encode`"
        )
    return rows


def training_samples(
    manifest: pd.DataFrame,
    vqa: Sequence[Mapping[str, str]],
    split: str,
    feature_cache: Container[str],
    clinical: Callable[[Mapping], str],
    require_survival: bool,
    where: str = "manifest",
) -> list[Sample]:
    """Every VQA pair whose scan is in ``split``; VQA rows of scans outside the split are left out."""
    rows = split_rows(manifest, split, feature_cache, where)
    by_scan = {str(r["scan_id"]): (r, clinical(r)) for r in rows.to_dict("records")}
    samples = []
    for pair in vqa:
        if pair["scan_id"] not in by_scan:
            continue
        row, sentence = by_scan[pair["scan_id"]]
        samples.append(
            _sample(row, pair["question_id"], pair["question"], pair["answer"], sentence, require_survival)
        )
    if not samples:
        raise DatasetError(f"{where}: no VQA pair belongs to a {split!r} scan; expected at least one")
    return samples


def scan_question_samples(
    manifest: pd.DataFrame,
    vqa: Sequence[Mapping[str, str]],
    questions: Sequence,
    split: str,
    feature_cache: Container[str],
    clinical: Callable[[Mapping], str],
    require_survival: bool,
    where: str = "manifest",
) -> list[Sample]:
    """Each scan of ``split`` x each question (objects with ``id`` and ``text``), answered from the VQA
    file."""
    rows = split_rows(manifest, split, feature_cache, where)
    answers = {(pair["scan_id"], pair["question_id"]): pair["answer"] for pair in vqa}
    samples = []
    for row in rows.to_dict("records"):
        sentence = clinical(row)
        for question in questions:
            answer = answers.get((str(row["scan_id"]), question.id))
            samples.append(_sample(row, question.id, question.text, answer, sentence, require_survival))
    return samples


class SampleDataset(Dataset):
    """Encoded samples with their image tokens; see the module docstring for the item layout."""

    def __init__(
        self, samples: Sequence[Sample], feature_cache: TokenSource, processor: PromptProcessor
    ) -> None:
        self.samples = list(samples)
        self.feature_cache = feature_cache
        self.processor = processor
        self.deephit_labels: dict[str, torch.Tensor] | None = None
        self.answer_weights: torch.Tensor | None = None
        self.status_weight: tuple[int, float] | None = None
        self.opening_ids: dict[str, list[int]] = {}
        self.location_tokens: dict[tuple[str, str, int], tuple[int, int] | None] = {}
        self.covariates: Mapping[str, torch.Tensor] | None = None
        self.lobes: Mapping[str, int] | None = None

    def set_lobes(self, by_scan: Mapping[str, int]) -> None:
        """The tumour's lobe (an index) per scan id, for ``loss.lobe_weight``; items then carry ``lobe`` (0-d
        long, -1 for a scan without one)."""
        self.lobes = by_scan

    def set_covariates(self, by_scan: Mapping[str, torch.Tensor]) -> None:
        """(p,) clinical covariates per scan id (``vlsurv.data.covariates``); items then carry
        ``covariates``."""
        missing = sorted({s.scan_id for s in self.samples} - set(by_scan))
        if missing:
            raise DatasetError(
                f"clinical covariates: {len(missing)} scans have none (first: {missing[:3]}); expected "
                "covariates for every scan of the dataset"
            )
        self.covariates = by_scan

    def set_deephit_cuts(self, cuts: DeepHitCuts) -> None:
        """Label every sample once with ``cuts.labels`` (a ``DeepHitCuts`` and its censoring scheme) of its
        float32 ``time`` (the value the batch carries) and ``event``; items then carry the labels."""
        time = torch.tensor([s.time for s in self.samples], dtype=torch.float32)
        event = torch.tensor([s.event for s in self.samples], dtype=torch.long)
        labels = cuts.labels(time, event)
        self.deephit_labels = {
            "bin_index": labels.bin_index,
            "binned_event": labels.event,
            "censored_credit": labels.censored_credit,
        }

    def set_answer_weights(self, weights: Sequence[float]) -> None:
        """Per-sample LM-loss weights (N,) (vlsurv.training.answer_status.answer_weights); items then carry
        ``answer_weight``."""
        if len(weights) != len(self.samples):
            raise DatasetError(
                f"answer weights: got {len(weights)} for {len(self.samples)} samples; expected one per sample"
            )
        self.answer_weights = torch.as_tensor(weights, dtype=torch.float32)

    def set_status_weight(self, step: int, weight: float) -> None:
        """``loss.status_weight`` of a model whose answers open with their status, where "Present:" /
        "Absent:" first differ at answer token ``step`` (``VisionLanguageSurvivalModel.status_decision``):
        items then carry ``status_position`` and ``status_end``, the label indices of the opening's tokens
        from that decision token to the opening's end (the status, and the location of a findings_first
        opening), ``location_position`` and ``location_end``, those of the sentence's first naming of a
        location after a findings_first opening that names one, and ``status_weight``."""
        self.status_weight = (step, float(weight))

    def _status_span(self, labels: torch.Tensor, sample: Sample) -> dict[str, torch.Tensor]:
        """``status_position``, ``status_end``, ``location_position``, ``location_end`` and ``status_weight``
        of one item (``set_status_weight``); an item without an answer or an opening gets empty spans [0, 0),
        and one whose sentence names no location after the opening an empty location span."""
        step, weight = self.status_weight
        answer = sample.answer or ""
        opening = status_opening_of(answer)
        positions = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        empty = torch.tensor(0)
        if not opening or len(positions) <= step:
            return {
                "status_position": empty,
                "status_end": empty,
                "location_position": empty,
                "location_end": empty,
                "status_weight": torch.tensor(1.0),
            }
        answer_ids = labels[positions].tolist()
        if opening not in self.opening_ids:  # a few distinct openings: tokenized once each
            self.opening_ids[opening] = self.processor.answer_ids(opening)[:-1]  # without EOS
        opening_ids = self.opening_ids[opening]
        differ = (i for i, (a, b) in enumerate(zip(answer_ids, opening_ids)) if a != b)
        shared = next(differ, min(len(answer_ids), len(opening_ids)))
        key = (sample.question_id, answer, len(answer_ids))
        if key not in self.location_tokens:  # fixed per answer: tokenized once, not every epoch
            self.location_tokens[key] = self._location_tokens(*key[:2], opening, key[2])
        location = self.location_tokens[key]
        return {
            "status_position": torch.tensor(positions[step]),
            "status_end": torch.tensor(positions[0] + max(shared, step + 1)),
            "location_position": torch.tensor(positions[location[0]]) if location else empty,
            "location_end": torch.tensor(positions[location[1] - 1] + 1) if location else empty,
            "status_weight": torch.tensor(weight),
        }

    def _location_tokens(
        self, question_id: str, answer: str, opening: str, kept: int
    ) -> tuple[int, int] | None:
        """[first, last + 1) answer tokens of the sentence's first naming of a location after a findings_first
        opening that names one ("Present, tumor, left lower lobe: A mass in the left lower lobe." -> the
        sentence's "left lower lobe"), within the ``kept`` answer tokens; None otherwise."""
        if not named_location(question_id, opening):
            return None
        text = " " + answer.strip()  # as ``PromptProcessor.answer_ids`` tokenizes it
        body = text.index(opening) + len(opening)
        span = location_span(question_id, text[body:])
        if span is None:
            return None
        start, end = span[0] + body, span[1] + body
        offsets = self.processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        inside = [i for i, (a, b) in enumerate(offsets[: kept - 1]) if a < end and b > start]  # no EOS
        return (inside[0], inside[-1] + 1) if inside else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        item = self.processor.encode(sample.clinical, sample.question, sample.answer)
        item["image_tokens"] = self.feature_cache.get(sample.scan_id)
        item["time"] = torch.tensor(sample.time, dtype=torch.float32)
        item["event"] = torch.tensor(sample.event, dtype=torch.long)
        for key, column in (self.deephit_labels or {}).items():
            item[key] = column[index]
        if self.answer_weights is not None:
            item["answer_weight"] = self.answer_weights[index]
        if self.status_weight is not None:
            item.update(self._status_span(item["labels"], sample))
        if self.covariates is not None:
            item["covariates"] = self.covariates[sample.scan_id]
        if self.lobes is not None:
            item["lobe"] = torch.tensor(self.lobes.get(sample.scan_id, -1), dtype=torch.long)
        item["scan_id"] = sample.scan_id
        item["patient_id"] = sample.patient_id
        item["question_id"] = sample.question_id
        return item

    def collate(self, items: Sequence[dict]) -> dict:
        """Right-padded batch: (B, L) sequences, (B, T, C) image tokens, (B,) time, event (and DeepHit
        labels), id lists."""
        batch = self.processor.collate(list(items), padding_side="right")
        for key in ("scan_id", "patient_id", "question_id"):
            batch[key] = [item[key] for item in items]
        return batch

    def patients(self) -> list[str]:
        """The patient id of every sample, in sample order."""
        return [s.patient_id for s in self.samples]
