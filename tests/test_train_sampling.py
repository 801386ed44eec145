"""BatchPlan: shards cover every global batch exactly once, patients are balanced, order is a function of
(seed, epoch)."""

from __future__ import annotations

from collections import Counter

import pytest

from vlsurv.training.sampling import BatchPlan, SamplingError, shard


def _patients(n_patients: int, per_patient: int = 6) -> list[str]:
    """Sample -> patient id; patient k has ``per_patient`` (scan, question) samples (the last has fewer)."""
    return [f"p{i // per_patient}" for i in range(n_patients * per_patient - 2)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["pairs", "patient_balanced"])
def test_every_process_gets_a_disjoint_nonempty_part_of_each_global_batch(world, mode):
    patients = _patients(23)
    plan = BatchPlan(patients, global_batch_size=4 * world, mode=mode, seed=3, world=world)
    for epoch in range(3):
        batches = plan.epoch(epoch)
        for batch in batches:
            parts = [shard(batch, rank, world) for rank in range(world)]
            assert sum(parts, []) == batch
            assert all(parts) and max(map(len, parts)) - min(map(len, parts)) <= 1
        seen = Counter(i for batch in batches for i in batch)
        if mode == "pairs":
            assert sorted(seen) == list(range(len(patients))) and set(seen.values()) == {1}
        else:
            picked = [patients[i] for i in seen]
            assert sorted(picked) == sorted(set(patients)) and set(seen.values()) == {1}
            assert all(len({patients[i] for i in batch}) == len(batch) for batch in batches)
        local = [i for rank in range(world) for _, part in plan.local_batches(epoch, rank) for i in part]
        assert Counter(local) == seen


def test_a_short_last_batch_is_merged_when_a_process_would_get_nothing():
    plan = BatchPlan(
        [f"p{i}" for i in range(9)], global_batch_size=4, mode="patient_balanced", seed=0, world=2
    )
    assert [len(b) for b in plan.epoch(0)] == [4, 5]
    plan = BatchPlan(
        [f"p{i}" for i in range(10)], global_batch_size=4, mode="patient_balanced", seed=0, world=2
    )
    assert [len(b) for b in plan.epoch(0)] == [4, 4, 2]


def test_order_is_a_function_of_seed_and_epoch():
    patients = _patients(12)
    plan = BatchPlan(patients, 8, "patient_balanced", seed=1, world=1)
    again = BatchPlan(patients, 8, "patient_balanced", seed=1, world=1)
    assert plan.epoch(2) == again.epoch(2)
    assert plan.epoch(2) != plan.epoch(3)
    assert plan.epoch(2) != BatchPlan(patients, 8, "patient_balanced", seed=2, world=1).epoch(2)
    questions = {
        i for epoch in range(10) for batch in plan.epoch(epoch) for i in batch if patients[i] == "p0"
    }
    assert len(questions) > 1


def test_resuming_at_a_position_gives_the_remaining_batches():
    plan = BatchPlan(_patients(12), 6, "pairs", seed=0, world=2)
    full = list(plan.local_batches(1, rank=1))
    assert list(plan.local_batches(1, rank=1, start=4)) == full[4:]
    assert [position for position, _ in full] == list(range(plan.batches_per_epoch()))


def test_too_few_patients_for_the_processes_is_an_error():
    with pytest.raises(
        SamplingError, match=r"sampling='patient_balanced': 2 training patients for 3 processes"
    ):
        BatchPlan(["a", "a", "b"], 6, "patient_balanced", seed=0, world=3)
    with pytest.raises(
        SamplingError, match=r"sampling: expected one of \['patient_balanced', 'pairs', 'answer_balanced'\]"
    ):
        BatchPlan(["a"], 6, "random", seed=0, world=1)
