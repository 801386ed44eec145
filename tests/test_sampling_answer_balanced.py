"""Answer-balanced stage-1 sampling: each question's present and absent answers drawn equally, epoch length
kept, strata read from the reference answers by the rules reader."""

from __future__ import annotations

from collections import Counter

import pytest

from vlsurv.data.datasets import Sample
from vlsurv.training.sampling import BatchPlan, SamplingError, answer_strata


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
