"""Status-first answers: training answers open with the status the rules reader reads, the reader still reads
them as before, evaluation compares texts without the opening, and each question's threshold is fitted on
val."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import build_tiny_inputs, tiny_config
from sklearn.metrics import f1_score

from vlsurv.config import ConfigError, load_config
from vlsurv.data.datasets import Sample
from vlsurv.encoders.cache import FeatureCache
from vlsurv.metrics_clinical import named_location, read_statuses
from vlsurv.model import VisionLanguageSurvivalModel
from vlsurv.model.ensemble import DecodeOptions, ScanInput, score_shared_prefix
from vlsurv.prompts import load_questions, opening_status, status_opening_of, strip_status
from vlsurv.training.answer_status import AnswerStatusError, answer_strata, with_status
from vlsurv.training.config import TrainConfig
from vlsurv.training.loop import Trainer
from vlsurv.training.objective import lm_token_weights
from vlsurv.training.setup import stage1_paths
from vlsurv.training.status_calibration import max_f1_bias, reference_present


def _stage1(tiny_decoder_dir, tmp_path, *overrides: str):
    """The tiny inputs and a stage-1 config on them with ``overrides``."""
    inputs = build_tiny_inputs(tmp_path / "inputs")
    return inputs, tiny_config("stage1", inputs, tiny_decoder_dir, tmp_path / "run", *overrides)


def _sample(question_id: str, answer: str | None) -> Sample:
    return Sample("s1", "p1", question_id, "?", answer, "", 1.0, 1)


def test_answers_open_with_their_status_and_others_stay_as_they_are():
    samples = [
        _sample("pleura", "No pleural effusion."),
        _sample("pleura", "There is a large right-sided pleural effusion, approximately 40 mm deep."),
        _sample("bone", None),
        _sample("vessels", "The pulmonary arteries are normal in calibre."),  # no vessel term: not mentioned
    ]
    strata = answer_strata(samples, "lung")
    assert [status for _, status in strata] == ["absent", "present", "prompt_only", "not_mentioned"]
    out = with_status(samples, strata)
    assert [s.answer for s in out] == [
        "Absent: No pleural effusion.",
        "Present: There is a large right-sided pleural effusion, approximately 40 mm deep.",
        None,
        "The pulmonary arteries are normal in calibre.",
    ]
    assert [s.scan_id for s in out] == ["s1"] * 4 and samples[0].answer == "No pleural effusion."
    with pytest.raises(AnswerStatusError, match="status-first answers: 3 strata for 4 samples"):
        with_status(samples, strata[:3])


def test_the_rules_reader_reads_a_status_first_answer_by_its_description():
    questions = load_questions("lung")
    texts = [
        "Absent: No pleural effusion.",
        "Present: Small left pleural effusion (depth 12 mm).",
        "Present: Metastatic disease: liver.",
        "Absent: The liver and adrenal glands show no metastatic lesion.",
    ]
    ids = ["pleura", "pleura", "metastases", "metastases"]
    assert read_statuses(ids, texts, questions) == ["absent", "present", "present", "absent"]
    assert read_statuses(ids, [strip_status(t) for t in texts], questions) == [
        "absent",
        "present",
        "present",
        "absent",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Present: A 3 cm mass in the right upper lobe.", "A 3 cm mass in the right upper lobe."),
        ("  Absent:No pleural effusion.", "No pleural effusion."),
        ("No pleural effusion.", "No pleural effusion."),
        ("The mass is present: 3 cm.", "The mass is present: 3 cm."),
        ("Present", "Present"),
        ("Present, tumor, right lower lobe: A 3 cm mass.", "A 3 cm mass."),
        ("Absent, lymph nodes: No lymphadenopathy.", "No lymphadenopathy."),
        ("Present, left: Small left effusion: 12 mm.", "Small left effusion: 12 mm."),
        ("Presently, no effusion.", "Presently, no effusion."),
    ],
)
def test_strip_status_drops_only_a_leading_status_word(text, expected):
    assert strip_status(text) == expected


def test_findings_first_openings_name_the_location_the_answer_gives():
    samples = [
        _sample("tumor", "30 mm right middle lobe mass, consistent with primary lung carcinoma."),
        _sample("tumor", "A lobulated mass measuring 1.4 cm, consistent with the known primary."),
        _sample("tumor", "Masses in the right upper lobe and the left lower lobe."),
        _sample("pleura", "Small dependent left pleural effusion (depth 19 mm)."),
        _sample("pleura", "Bilateral pleural effusions, larger on the right."),
        _sample("pleura", "No right pleural effusion."),
        _sample("lymph_nodes", "Right paratracheal lymphadenopathy."),
    ]
    strata = answer_strata(samples, "lung")
    openings = [s.answer.split(":")[0] for s in with_status(samples, strata, locations=True)]
    assert openings == [
        "Present, tumor, right middle lobe",
        "Present, tumor",  # no lobe named
        "Present, tumor",  # two lobes: no single location
        "Present, pleura, left",
        "Present, pleura, bilateral",
        "Absent, pleura",  # an absent answer names no location
        "Present, lymph nodes",  # nodes: no location detail is scored
    ]
    plain = [s.answer.split(":")[0] for s in with_status(samples, strata)]
    assert plain == ["Present"] * 5 + ["Absent", "Present"]
    assert [status_opening_of(s.answer) for s in with_status(samples[:1], strata[:1], locations=True)] == [
        "Present, tumor, right middle lobe:"
    ]
    for sample, opened in zip(samples, with_status(samples, strata, locations=True)):
        assert strip_status(opened.answer) == sample.answer
        assert (
            opening_status(opened.answer)
            == {"Present": "present", "Absent": "absent"}[opened.answer[:7].strip(":, ")]
        )
        assert reference_present(opened.answer) == (opening_status(opened.answer) == "present")
    assert [named_location("tumor", "RUL nodule"), named_location("bone", "right 6th rib")] == [
        "right upper lobe",
        "",
    ]


def _brute_force_best_f1(margin: np.ndarray, present: np.ndarray) -> float:
    return max(f1_score(present, margin >= t, zero_division=0.0) for t in np.unique(margin))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fitted_bias_gives_the_best_f1_rule(seed):
    rng = np.random.default_rng(seed)
    present = rng.random(80) < 0.2
    margin = rng.normal(size=80) + 1.5 * present - 2.0  # present answers score higher, all below 0
    margin[:5] = margin[5]  # ties
    bias, f1 = max_f1_bias(margin, present)
    assert f1 == pytest.approx(_brute_force_best_f1(margin, present))
    assert f1_score(present, margin + bias > 0) == pytest.approx(f1)
    assert not np.any(np.isclose(margin + bias, 0.0))  # the cut lies between scores, not on one
    assert bias > 0  # the greedy rule (margin > 0) answers "Absent" to nearly every scan


def test_a_score_without_signal_is_not_fitted_to_present_for_everyone():
    present = np.zeros(100, bool)
    present[-17:] = True
    margin = -np.linspace(0.0, 5.0, 100)  # the present answers score lowest: only "all present" finds them
    uncapped, trivial = max_f1_bias(margin, present, present_cap=100.0)
    assert (margin + uncapped > 0).all() and trivial == pytest.approx(2 * 0.17 / 1.17)
    bias, _ = max_f1_bias(margin, present)
    assert 1 <= (margin + bias > 0).sum() <= 34


def test_a_question_with_one_status_on_val_keeps_the_greedy_rule():
    assert max_f1_bias(np.array([0.3, -1.0]), np.array([False, False])) == (0.0, None)
    assert max_f1_bias(np.array([0.3, -1.0]), np.array([True, True])) == (0.0, None)


def test_reference_status_is_read_from_the_opening():
    assert [reference_present(a) for a in ("Present: x", "Absent: No x.", "No x.", None)] == [
        True,
        False,
        None,
        None,
    ]


@pytest.mark.slow
def test_a_status_first_run_opens_every_answer_with_a_status_and_fits_its_thresholds(
    tiny_decoder_dir, tmp_path
):
    inputs, config = _stage1(
        tiny_decoder_dir,
        tmp_path,
        "optim.epochs=15",
        "optim.lr_lora=1e-2",
        "model.answer_format=status_first",
    )
    trainer = Trainer(config)
    opened = 0
    for sample, (_, status) in zip(trainer.data.train.samples, trainer.data.train_strata):
        word = {"present": "Present: ", "absent": "Absent: "}.get(status)
        assert sample.answer.startswith(word) if word else ":" not in sample.answer.split()[0]
        opened += word is not None
    assert opened > 0.7 * len(trainer.data.train.samples)
    final = trainer.fit()
    selection = json.loads((final / "selection.json").read_text())["status_calibration"]
    questions = [q.id for q in load_questions("lung")]
    model = VisionLanguageSurvivalModel.from_pretrained(final)
    assert model.config.status_bias == selection["status_bias"] and set(model.config.status_bias) == set(
        questions
    )
    cache = FeatureCache(inputs["cache"])
    scans = [ScanInput(s, "60 year-old.", cache.get(s)) for s in cache.scan_ids[:4]]
    options = DecodeOptions(max_new_tokens=6)
    result = score_shared_prefix(
        model,
        scans,
        [q.text for q in load_questions("lung")],
        "all",
        options,
        status_bias=model.status_bias_for(questions),
    )
    texts = [q.text for q in load_questions("lung")]
    plain = score_shared_prefix(model, scans, texts, "all", options, status_bias=[0.0] * len(texts))
    torch.testing.assert_close(
        result.status_margin - plain.status_margin,
        torch.tensor(model.status_bias_for(questions)).expand(4, -1),
    )
    forced = score_shared_prefix(model, scans, texts, "all", options, status_bias=[100.0] * len(texts))
    torch.testing.assert_close(forced.status_margin - plain.status_margin, torch.full((4, 6), 100.0))
    assert all(a.startswith("Present") for answers in forced.answers for a in answers)
    barred = score_shared_prefix(model, scans, texts, "all", options, status_bias=[-100.0] * len(texts))
    assert not any(a.startswith("Present") for answers in barred.answers for a in answers)


def test_stage2_refuses_a_stage1_model_of_another_answer_format(tmp_path):
    stage1 = tmp_path / "final"
    stage1.mkdir()
    (stage1 / "projector.safetensors").write_bytes(b"")
    (stage1 / "config.json").write_text(json.dumps({"answer_format": "status_first"}))
    config = load_config(TrainConfig, None, ["stage=2", f"data.stage1_dir={stage1}"])
    with pytest.raises(
        ConfigError,
        match=r"stage-1 model .*config.json answers with answer_format 'status_first'; stage 2 has "
        r"model.answer_format='as_extracted'; expected the same answer_format in both stages",
    ):
        stage1_paths(config)
    same_format = dataclasses.replace(
        config, model=dataclasses.replace(config.model, answer_format="status_first")
    )
    assert stage1_paths(same_format)[1] is None
    (stage1 / "config.json").write_text(
        json.dumps({"answer_format": "status_first", "image_positions": "learned"})
    )
    with pytest.raises(
        ConfigError,
        match=r"stage-1 model .*config.json has a projector with image_positions 'learned'; stage 2 has "
        r"model.image_positions='none'; expected the same image_positions in both stages",
    ):
        stage1_paths(same_format)
    grid = dataclasses.replace(
        same_format, model=dataclasses.replace(same_format.model, image_positions="grid")
    )
    (stage1 / "config.json").write_text(
        json.dumps({"answer_format": "status_first", "image_positions": "grid", "image_position_rank": 8})
    )
    with pytest.raises(
        ConfigError,
        match=r"has a projector with image_position_rank 8; stage 2 has model.image_position_rank=16; "
        r"expected the same image_position_rank in both stages",
    ):
        stage1_paths(grid)


@pytest.mark.parametrize("answer_format", ["status_first", "findings_first"])
def test_status_weight_marks_each_training_answers_opening(tiny_decoder_dir, tmp_path, answer_format):
    _, config = _stage1(
        tiny_decoder_dir, tmp_path, f"model.answer_format={answer_format}", "loss.status_weight=5"
    )
    trainer = Trainer(config)
    model = trainer.accelerator.unwrap_model(trainer.model)
    step, present_id, absent_id = model.status_decision()
    dataset = trainer.data.train
    processor = dataset.processor
    seen, located = set(), set()
    for index, (_, status) in enumerate(trainer.data.train_strata):
        item = dataset[index]
        start, end = int(item["status_position"]), int(item["status_end"])
        expected = {"present": present_id, "absent": absent_id}.get(status)
        if expected is None:
            assert (start, end, float(item["status_weight"])) == (0, 0, 1.0)
            continue
        assert int(item["labels"][start]) == expected and float(item["status_weight"]) == 5.0
        answer = dataset.samples[index].answer
        opening = processor.tokenizer.decode(item["labels"][start - step : end])
        assert opening.strip() == answer.split(":")[0] + ":"  # the whole opening, location included
        seen.add((status, "," in answer.split(":")[0]))
        first, last = int(item["location_position"]), int(item["location_end"])
        if last > first:  # the sentence's naming of the opening's lobe or side, weighted with it
            question_id = dataset.samples[index].question_id
            sentence_names = processor.tokenizer.decode(item["labels"][first:last])
            assert first >= end and named_location(question_id, sentence_names)
            assert named_location(question_id, sentence_names) == named_location(question_id, opening)
            located.add(question_id)
    named = answer_format == "findings_first"  # "Absent, pleura:" / "Present, tumor, right upper lobe:"
    assert seen == {("present", named), ("absent", named)}
    assert located == ({"tumor", "pleura"} if named else set())
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    weights = lm_token_weights(batch)
    assert weights.shape == batch["labels"].shape
    opening = batch["status_end"] - batch["status_position"]
    spans = opening + batch["location_end"] - batch["location_position"]
    assert torch.equal((weights == 5.0).sum(1), spans)


def test_status_weight_needs_status_first_answers():
    with pytest.raises(
        ConfigError,
        match=r"loss.status_weight: 3.0 weights the token where 'Present:' and 'Absent:' differ, but "
        r"model.answer_format is 'as_extracted'; expected status_first or findings_first, or status_weight 1",
    ):
        load_config(TrainConfig, None, ["loss.status_weight=3"])
    with pytest.raises(ConfigError, match=r"loss.status_weight"):
        load_config(TrainConfig, None, ["loss.status_weight=0.5", "model.answer_format=status_first"])
