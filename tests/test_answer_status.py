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
from vlsurv.metrics_clinical import read_statuses
from vlsurv.model import VisionLanguageSurvivalModel
from vlsurv.model.ensemble import DecodeOptions, ScanInput, score_shared_prefix
from vlsurv.prompts import load_questions, strip_status
from vlsurv.training.answer_status import AnswerStatusError, answer_strata, with_status
from vlsurv.training.config import TrainConfig
from vlsurv.training.loop import Trainer
from vlsurv.training.setup import stage1_paths
from vlsurv.training.status_calibration import max_f1_bias, reference_present


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
    ],
)
def test_strip_status_drops_only_a_leading_status_word(text, expected):
    assert strip_status(text) == expected


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
    inputs = build_tiny_inputs(tmp_path / "inputs")
    config = tiny_config(
        "stage1",
        inputs,
        tiny_decoder_dir,
        tmp_path / "run",
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
        r"model.answer_format='as_extracted'; expected the same format in both stages",
    ):
        stage1_paths(config)
    assert (
        stage1_paths(
            dataclasses.replace(config, model=dataclasses.replace(config.model, answer_format="status_first"))
        )[1]
        is None
    )
