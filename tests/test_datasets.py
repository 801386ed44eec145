"""VQA + manifest + feature cache -> training samples (the tiny training inputs:
``conftest.build_tiny_inputs``)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from conftest import build_tiny_inputs

from vlsurv.data.datasets import (
    DatasetError,
    SampleDataset,
    read_vqa,
    scan_question_samples,
    training_samples,
)

IMAGE_TOKENS, IMAGE_DIM = 4, 256


class FakeFeatureCache:
    """``get``/``__contains__`` over a dict of (T, C) tensors."""

    def __init__(self, scan_ids, shape=(2, 3)) -> None:
        self.tensors = {s: torch.full(shape, float(i)) for i, s in enumerate(scan_ids)}

    def __contains__(self, scan_id) -> bool:
        return scan_id in self.tensors

    def get(self, scan_id):
        return self.tensors[scan_id]


class Question:
    def __init__(self, id: str, text: str) -> None:
        self.id, self.text = id, text


def _manifest() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "patient_id": ["p1", "p1", "p2", "p3"],
            "scan_id": ["a", "b", "c", "d"],
            "time": [10.0, 20.0, 30.0, 40.0],
            "event": [1, 0, 1, 0],
            "split": ["train", "train", "train", "val"],
            "age": [60, 60, 70, 80],
        }
    )


VQA = [
    {"scan_id": "a", "question_id": "q1", "question": "Q1?", "answer": "A1."},
    {"scan_id": "c", "question_id": "q2", "question": "Q2?", "answer": "A2."},
    {"scan_id": "d", "question_id": "q1", "question": "Q1?", "answer": "D1."},
    {"scan_id": "zz", "question_id": "q1", "question": "Q1?", "answer": "elsewhere"},
]


def _clinical(row) -> str:
    return f"age {row['age']}"


def test_training_samples_join_vqa_with_manifest_rows():
    samples = training_samples(_manifest(), VQA, "train", FakeFeatureCache("abcd"), _clinical, True)
    assert [(s.scan_id, s.patient_id, s.question_id, s.time, s.event, s.clinical) for s in samples] == [
        ("a", "p1", "q1", 10.0, 1, "age 60"),
        ("c", "p2", "q2", 30.0, 1, "age 70"),
    ]
    stage1 = training_samples(_manifest(), VQA, "train", FakeFeatureCache("abcd"), _clinical, False)
    assert math.isnan(stage1[0].time) and stage1[0].event == -1


def test_validation_samples_cover_every_question_of_every_scan():
    questions = [Question("q1", "Q1?"), Question("q2", "Q2?")]
    samples = scan_question_samples(
        _manifest(), VQA, questions, "val", FakeFeatureCache("abcd"), _clinical, True
    )
    assert [(s.scan_id, s.question_id, s.answer) for s in samples] == [("d", "q1", "D1."), ("d", "q2", None)]


def test_missing_cache_entries_and_empty_splits_are_reported():
    with pytest.raises(
        DatasetError, match=r"manifest: 1 train scans are not in the feature cache \(first: \['b'\]\)"
    ):
        training_samples(_manifest(), VQA, "train", FakeFeatureCache("acd"), _clinical, True)
    with pytest.raises(DatasetError, match=r"manifest: no scan has split == 'test'"):
        training_samples(_manifest(), VQA, "test", FakeFeatureCache("abcd"), _clinical, True)
    only_d = [VQA[2]]
    with pytest.raises(DatasetError, match=r"no VQA pair belongs to a 'train' scan"):
        training_samples(_manifest(), only_d, "train", FakeFeatureCache("abcd"), _clinical, True)


def test_read_vqa_names_the_bad_line_and_field(tmp_path):
    path = tmp_path / "vqa.jsonl"
    path.write_text(json.dumps(VQA[0]) + "\n\n" + json.dumps({**VQA[1], "answer": ""}) + "\n")
    with pytest.raises(DatasetError, match=r"vqa\.jsonl line 3: field 'answer' missing or empty"):
        read_vqa(path)
    path.write_text("{not json\n")
    with pytest.raises(DatasetError, match=r"vqa\.jsonl line 1: not valid JSON"):
        read_vqa(path)
    with pytest.raises(DatasetError, match=r"data\.vqa .*absent\.jsonl: file does not exist"):
        read_vqa(tmp_path / "absent.jsonl")
    path.write_text(json.dumps(VQA[0]) + "\n")
    assert read_vqa(path) == [VQA[0]]


def test_dataset_items_and_collate(tiny_model_config):
    from vlsurv.model import VisionLanguageSurvivalModel

    model = VisionLanguageSurvivalModel(tiny_model_config)
    cache = FakeFeatureCache(
        "abcd", shape=(tiny_model_config.num_image_tokens, tiny_model_config.image_token_dim)
    )
    samples = training_samples(_manifest(), VQA, "train", cache, _clinical, True)
    dataset = SampleDataset(samples, cache, model.processor)
    item = dataset[1]
    assert (
        item["scan_id"] == "c"
        and item["image_tokens"].shape == (4, 16)
        and float(item["image_tokens"][0, 0]) == 2
    )
    assert int((item["labels"] != -100).sum()) >= 2
    batch = dataset.collate([dataset[0], dataset[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["image_tokens"].shape == (2, 4, 16)
    assert batch["time"].tolist() == [10.0, 30.0] and batch["event"].dtype == torch.long
    assert batch["scan_id"] == ["a", "c"] and batch["patient_id"] == ["p1", "p2"]
    assert dataset.patients() == ["p1", "p2"]


@pytest.mark.slow
def test_tiny_inputs_join_into_training_and_validation_sets(tmp_path):
    from vlsurv.data.clinical import clinical_sentence
    from vlsurv.data.manifest import load_manifest
    from vlsurv.encoders.cache import FeatureCache
    from vlsurv.prompts import load_questions

    paths = build_tiny_inputs(tmp_path, n=8)
    cache = FeatureCache(paths["cache"])
    assert cache.token_shape == (IMAGE_TOKENS, IMAGE_DIM)
    manifest = load_manifest(paths["manifest"], check_files=False)
    vqa = read_vqa(paths["vqa"])
    train = training_samples(manifest, vqa, "train", cache, clinical_sentence, True)
    n_train = int((manifest["split"] == "train").sum())
    assert len(train) == 6 * n_train and all(s.clinical.endswith(".") for s in train)
    val = scan_question_samples(manifest, vqa, load_questions("lung"), "val", cache, clinical_sentence, True)
    assert len(val) == 6 * int((manifest["split"] == "val").sum()) and all(s.answer for s in val)


def test_deephit_labels_are_computed_once_per_sample_as_the_step_used_to(tiny_model_config, monkeypatch):
    """whas500 follow-up in years: the collated labels equal ``cuts.labels`` of the batch's own (float32) time
    and event, which the training step computed on every step before; items read them without calling the
    cuts."""
    from sksurv.datasets import load_whas500

    from vlsurv.data.datasets import Sample
    from vlsurv.model import VisionLanguageSurvivalModel
    from vlsurv.model.survival import DeepHitCuts

    _, y = load_whas500()
    years, event = y["lenfol"] / 365.25, y["fstat"].astype(int)
    samples = [
        Sample(
            scan_id=f"s{i}",
            patient_id=f"p{i}",
            question_id="q1",
            question="Q1?",
            answer="A1.",
            clinical="C.",
            time=float(t),
            event=int(e),
        )
        for i, (t, e) in enumerate(zip(years, event))
    ]
    processor = VisionLanguageSurvivalModel(tiny_model_config).processor
    cache = FakeFeatureCache([s.scan_id for s in samples], shape=(4, 16))
    unlabelled = SampleDataset(samples, cache, processor)
    assert not {"bin_index", "binned_event", "censored_credit"} & set(unlabelled[0])
    cuts = DeepHitCuts.from_times(years, event, num_bins=8)
    dataset = SampleDataset(samples, cache, processor)
    dataset.set_deephit_cuts(cuts)
    monkeypatch.setattr(cuts, "labels", lambda *args: pytest.fail("labels recomputed after set_deephit_cuts"))
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    monkeypatch.undo()
    expected = cuts.labels(batch["time"], batch["event"])
    assert batch["bin_index"].dtype == torch.long and batch["binned_event"].dtype == torch.bool
    assert torch.equal(batch["bin_index"], expected.bin_index) and torch.equal(
        batch["binned_event"], expected.event
    )
    assert torch.equal(batch["censored_credit"], expected.censored_credit)
    assert set(batch["bin_index"].tolist()) == set(range(9))  # every bin and the tail bin are used
