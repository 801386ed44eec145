"""Answer-balanced stage-1 sampling and answer-status weights of L_LM: each question's present and absent
answers drawn (or weighted) equally, epoch length kept, strata read from the reference answers by the rules
reader."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from vlsurv.data.datasets import Sample
from vlsurv.model.processor import IGNORE_INDEX
from vlsurv.training.answer_status import AnswerStatusError, answer_strata, answer_weights
from vlsurv.training.objective import lm_token_weights, token_nll
from vlsurv.training.sampling import BatchPlan, SamplingError


def _strata() -> list[tuple[str, str]]:
    """60 bone samples (6 present) and 40 pleura samples (30 present)."""
    bone = [("bone", "present")] * 6 + [("bone", "absent")] * 54
    pleura = [("pleura", "present")] * 30 + [("pleura", "absent")] * 10
    return bone + pleura


def test_each_question_draws_its_statuses_equally_and_keeps_its_share():
    strata = _strata()
    plan = BatchPlan(
        [f"p{i}" for i in range(len(strata))], 16, "answer_balanced", seed=1, world=2, strata=strata
    )
    counts = Counter()
    for epoch in range(3):
        drawn = [i for batch in plan.epoch(epoch) for i in batch]
        assert len(drawn) == len(strata)
        epoch_counts = Counter(strata[i] for i in drawn)
        assert epoch_counts == {
            ("bone", "present"): 30,
            ("bone", "absent"): 30,
            ("pleura", "present"): 20,
            ("pleura", "absent"): 20,
        }
        # the common status is drawn without replacement, the rare one with
        absent_bone = [i for i in drawn if strata[i] == ("bone", "absent")]
        assert len(set(absent_bone)) == 30
        counts.update(drawn)
    assert plan.epoch(2) == BatchPlan(
        [f"p{i}" for i in range(len(strata))], 16, "answer_balanced", seed=1, world=2, strata=strata
    ).epoch(2)
    assert plan.epoch(0) != plan.epoch(1)


def test_strata_are_read_from_the_reference_answers():
    def sample(question_id, answer):
        return Sample("s", "p", question_id, "?", answer, "", 1.0, 1)

    samples = [
        sample("pleura", "No pleural effusion."),
        sample("pleura", "Small left pleural effusion (depth 12 mm)."),
        sample("bone", "A lytic lesion in the T7 vertebral body, suspicious for osseous metastasis."),
        sample("bone", None),
    ]
    assert answer_strata(samples, "lung") == [
        ("pleura", "absent"),
        ("pleura", "present"),
        ("bone", "present"),
        ("bone", "prompt_only"),
    ]


def test_answer_balanced_needs_a_stratum_per_sample():
    with pytest.raises(SamplingError, match=r"answer_balanced'.*stratum per sample \(3\), got none"):
        BatchPlan(["a", "b", "c"], 2, "answer_balanced", seed=0, world=1)
    with pytest.raises(SamplingError, match=r"stratum per sample \(3\), got 1"):
        BatchPlan(["a", "b", "c"], 2, "answer_balanced", seed=0, world=1, strata=[("bone", "absent")])


def test_answer_weights_give_each_status_of_a_question_equal_total_weight():
    strata = _strata()
    weights = answer_weights(strata, 1.0)
    assert weights.shape == (100,) and weights.dtype == np.float32
    assert weights.mean() == pytest.approx(1.0)
    totals = Counter()
    for stratum, weight in zip(strata, weights):
        totals[stratum] += float(weight)
    assert totals[("bone", "present")] == pytest.approx(totals[("bone", "absent")], rel=1e-5)
    assert totals[("pleura", "present")] == pytest.approx(totals[("pleura", "absent")], rel=1e-5)
    # each question keeps its share of the total weight (60 : 40)
    bone = totals[("bone", "present")] + totals[("bone", "absent")]
    assert bone / weights.sum() == pytest.approx(0.6, rel=1e-5)
    # a rare present bone answer weighs 9x a common absent one (54 / 6)
    assert weights[0] / weights[10] == pytest.approx(9.0, rel=1e-5)


def test_answer_weights_power_interpolates_from_the_plain_mean():
    strata = _strata()
    np.testing.assert_allclose(answer_weights(strata, 0.0), 1.0)
    half = answer_weights(strata, 0.5)
    assert half[0] / half[10] == pytest.approx(3.0, rel=1e-5)  # sqrt(9)
    with pytest.raises(AnswerStatusError, match=r"answer_balance: expected a power in \[0, 1\], got 1.5"):
        answer_weights(strata, 1.5)


def test_weighted_token_nll_is_the_weighted_token_mean():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.full((3, 6), IGNORE_INDEX)
    labels[0, 2:5] = torch.tensor([1, 2, 3])
    labels[1, 4:6] = torch.tensor([4, 5])
    labels[2, 1:6] = torch.tensor([6, 7, 8, 9, 10])
    weights = torch.tensor([2.0, 0.5, 1.0])
    total, count = token_nll(logits, labels, weights)
    per_row = []
    for b in range(3):
        picks = [
            -torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
            for t in range(1, 6)
            if labels[b, t] != IGNORE_INDEX
        ]
        per_row.append((torch.stack(picks).sum(), len(picks)))
    expected = sum(w * s for w, (s, _) in zip(weights, per_row)) / sum(
        w * n for w, (_, n) in zip(weights, per_row)
    )
    assert float(total / count) == pytest.approx(float(expected), rel=1e-6)
    plain_total, plain_count = token_nll(logits, labels)
    assert int(plain_count) == 10
    ones_total, ones_count = token_nll(logits, labels, torch.ones(3))
    assert float(ones_total) == pytest.approx(float(plain_total)) and float(ones_count) == 10.0


def test_status_weight_multiplies_only_the_opening_and_location_spans():
    torch.manual_seed(1)
    logits = torch.randn(2, 7, 11)
    labels = torch.full((2, 7), IGNORE_INDEX)
    labels[0, 2:6] = torch.tensor([1, 2, 3, 4])
    labels[1, 4:7] = torch.tensor([5, 6, 7])
    batch = {
        "labels": labels,
        "answer_weight": torch.tensor([2.0, 0.5]),
        "status_position": torch.tensor([3, 5]),
        "status_end": torch.tensor([5, 6]),
        "location_position": torch.tensor([0, 6]),  # row 1's sentence names the opening's location at 6
        "location_end": torch.tensor([0, 7]),
        "status_weight": torch.tensor([4.0, 4.0]),
    }
    weights = lm_token_weights(batch)
    expected = torch.tensor([[2.0, 2, 2, 8, 8, 2, 2], [0.5, 0.5, 0.5, 0.5, 0.5, 2.0, 2.0]])
    torch.testing.assert_close(weights, expected)
    total, count = token_nll(logits, labels, weights)
    nll = {
        (b, t): float(-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]])
        for b in range(2)
        for t in range(1, 7)
        if labels[b, t] != IGNORE_INDEX
    }
    weighted = sum(float(expected[b, t]) * v for (b, t), v in nll.items())
    assert float(total) == pytest.approx(weighted, rel=1e-6)
    assert float(count) == pytest.approx(sum(float(expected[b, t]) for b, t in nll))
    assert lm_token_weights({"labels": labels}) is None
    rows_only = {"labels": labels, "answer_weight": batch["answer_weight"]}
    torch.testing.assert_close(lm_token_weights(rows_only), batch["answer_weight"])
    zero = torch.tensor([0, 0])
    empty = dict(batch, status_position=zero, status_end=zero, location_position=zero, location_end=zero)
    torch.testing.assert_close(lm_token_weights(empty), batch["answer_weight"].unsqueeze(1).expand(2, 7))
