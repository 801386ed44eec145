"""Global batches that are a pure function of (seed, epoch), sharded over processes, resumable by position.

A ``BatchPlan`` lists an epoch's *global* batches (dataset indices); process ``rank`` of ``world`` takes the
``rank``-th of ``world`` near-equal contiguous slices of each. So a run on P processes with local batch B sees
the same global batches as one process with batch P x B, every sample of the epoch lands on exactly one
process, and a resumed run regenerates the epoch and starts at the saved position (no sampler state besides
(epoch, position)).

- ``"pairs"``: every (scan, question) sample once per epoch, shuffled, cut into global batches.
- ``"patient_balanced"``: one epoch = one pass over the patients; each patient contributes one of its samples,
  drawn at random (a patient with several scans may give any of their pairs); a global batch holds distinct
  patients.
- ``"answer_balanced"`` (stage 1): as many samples per epoch as "pairs", but within each question every answer
  status (present / absent, read from the reference answer by the rules reader:
  ``vlsurv.training.answer_status.answer_strata``) gets an
  equal share of that question's draws: a rare status is drawn with replacement, a common one without. A
  decoder trained on report-derived answers, where "No ..." dominates, otherwise learns the prior and ignores
  the image.

The last global batch of an epoch may be short. When it has fewer samples than processes (some process would
get none, and DDP needs every process in every step) it is merged into the batch before it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from vlsurv.errors import InputError
from vlsurv.training.config import SAMPLINGS


class SamplingError(InputError):
    """A sampling request that cannot give every process a batch."""


def _generator(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, 0x5EED])


def shard(batch: Sequence[int], rank: int, world: int) -> list[int]:
    """The ``rank``-th of ``world`` contiguous near-equal slices of ``batch`` (sizes differ by at most
    one)."""
    base, extra = divmod(len(batch), world)
    start = rank * base + min(rank, extra)
    return list(batch[start : start + base + (1 if rank < extra else 0)])


def _balanced(by_status: dict[str, list[int]], rng: np.random.Generator) -> list[int]:
    """One question's draws for an epoch: its sample count split equally over its statuses (the remainder to
    the first ones), each status drawn without replacement when it has enough samples, else with."""
    total, statuses = sum(len(v) for v in by_status.values()), sorted(by_status)
    base, extra = divmod(total, len(statuses))
    picks = []
    for position, status in enumerate(statuses):
        indices, size = by_status[status], base + (1 if position < extra else 0)
        picks += rng.choice(indices, size=size, replace=size > len(indices)).tolist()
    return picks


class BatchPlan:
    """Deterministic global batches of ``global_batch_size`` over samples grouped by ``patients``."""

    def __init__(
        self,
        patients: Sequence[str],
        global_batch_size: int,
        mode: str,
        seed: int,
        world: int,
        strata: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        """``strata``: (question_id, answer status) per sample, needed by "answer_balanced"."""
        if mode not in SAMPLINGS:
            raise SamplingError(f"sampling: expected one of {list(SAMPLINGS)}, got {mode!r}")
        if mode == "answer_balanced" and (strata is None or len(strata) != len(patients)):
            raise SamplingError(
                f"sampling='answer_balanced': expected a (question_id, status) stratum per sample "
                f"({len(patients)}), got {'none' if strata is None else len(strata)}"
            )
        self.strata: dict[str, dict[str, list[int]]] = {}
        for index, (question_id, status) in enumerate(strata or ()):
            self.strata.setdefault(question_id, {}).setdefault(status, []).append(index)
        self.mode = mode
        self.seed = seed
        self.world = world
        self.global_batch_size = global_batch_size
        groups: dict[str, list[int]] = {}
        for index, patient in enumerate(patients):
            groups.setdefault(patient, []).append(index)
        self.groups = list(groups.values())
        self.num_samples = len(patients)
        units = len(self.groups) if mode == "patient_balanced" else self.num_samples
        if units < world:
            what = "patients" if mode == "patient_balanced" else "samples"
            raise SamplingError(
                f"sampling={mode!r}: {units} training {what} for {world} processes; expected at "
                "least one per process"
            )

    def epoch(self, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch`` (lists of sample indices)."""
        rng = _generator(self.seed, epoch)
        if self.mode == "pairs":
            order = rng.permutation(self.num_samples).tolist()
        elif self.mode == "answer_balanced":
            picks = [index for by_status in self.strata.values() for index in _balanced(by_status, rng)]
            order = [picks[i] for i in rng.permutation(len(picks))]
        else:
            picks = [group[int(rng.integers(len(group)))] for group in self.groups]
            order = [picks[i] for i in rng.permutation(len(picks))]
        size = self.global_batch_size
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        if len(batches) > 1 and len(batches[-1]) < self.world:
            batches[-2].extend(batches.pop())
        return batches

    def batches_per_epoch(self) -> int:
        return len(self.epoch(0))

    def local_batches(self, epoch: int, rank: int, start: int = 0) -> Iterator[tuple[int, list[int]]]:
        """(position, this process's indices) for the epoch's global batches from position ``start`` on."""
        for position, batch in enumerate(self.epoch(epoch)):
            if position >= start:
                yield position, shard(batch, rank, self.world)
