"""Task selection, time-to-event labels per (scan, task) and their piecewise-exponential bins, all vectorised.

- ``select_tasks``: the top-k codes by how many scanned patients have them after their first scan, among the
  codes whose event fraction (those patients / all scanned patients) is at least ``min_event_fraction``.
- ``build_labels``: for every scan i and task j, the time from the scan to the next occurrence of the code
  strictly after it (event), else to the end of the patient's record (censored). One sort of the task events
  by (patient, task, time) and two ``searchsorted`` calls give, for each event, the run of its patient's scans
  that lie between the previous occurrence and it; only those (scan, task) cells are written, so the work is
  O(E log S + S K) with no Python loop per cell.
- ``TimeBins``: bin edges at percentiles of the event times, the first 0 and the last infinity, and
  ``targets`` -> the loss inputs ``log_time`` and ``is_event`` (B, bins, tasks) of a batch, on its device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlsurv.tte.events import BIRTH_CODE, EventTable, ScanTable, TTEInputError


@dataclass
class TaskSelection:
    """The chosen codes (K,) str, each with the number of scanned patients that have it after their first
    scan (K,) and that number's fraction of all scanned patients (K,)."""

    codes: np.ndarray
    patients_with_event: np.ndarray
    event_fraction: np.ndarray


@dataclass
class TTELabels:
    """``time`` (S, K) float32 days from scan to event or censoring, ``event`` (S, K) bool, for ``scan_ids``
    (S,) and ``tasks`` (K,)."""

    scan_ids: np.ndarray
    tasks: np.ndarray
    time: np.ndarray
    event: np.ndarray

    def rows(self, index: np.ndarray) -> TTELabels:
        return TTELabels(self.scan_ids[index], self.tasks, self.time[index], self.event[index])


def dense_rank(values: np.ndarray) -> tuple[np.ndarray, int]:
    """(0-based rank of each value among the distinct values (N,) int64, number of distinct values); a sort
    and a cumulative sum (``np.unique`` with ``return_inverse`` is many times slower on millions of rows)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new = np.empty(ordered.size, dtype=bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    ranks = np.empty(values.size, dtype=np.int64)
    ranks[order] = np.cumsum(new) - 1
    return ranks, int(new.sum())


def select_tasks(events: EventTable, scans: ScanTable, k: int, min_event_fraction: float) -> TaskSelection:
    """The top-``k`` codes by scanned patients with an occurrence after their first scan (ties: the code
    first seen in the table wins), keeping codes with an event fraction of at least ``min_event_fraction``.
    """
    if k < 1:
        raise TTEInputError(f"tasks.k: expected at least 1 task, got {k}")
    num_patients = len(events.patients)
    first_scan = np.full(num_patients, np.inf)
    np.minimum.at(first_scan, scans.patient, scans.time)
    after = events.time > first_scan[events.patient]
    pairs = np.sort(events.code[after] * num_patients + events.patient[after])
    pairs = pairs[np.concatenate([[True], pairs[1:] != pairs[:-1]])] if pairs.size else pairs
    counts = np.bincount(pairs // num_patients, minlength=len(events.codes))
    counts[events.codes == BIRTH_CODE] = 0
    scanned = int(np.count_nonzero(np.bincount(scans.patient, minlength=num_patients)))
    fraction = counts / scanned
    passing = np.flatnonzero((counts > 0) & (fraction >= min_event_fraction))
    if passing.size == 0:
        best = int(counts.argmax())
        raise TTEInputError(
            f"tasks.min_event_fraction = {min_event_fraction:g}: no code passes it (the most frequent, "
            f"{str(events.codes[best])!r}, occurs after the scan in {fraction[best]:.4g} of the {scanned} "
            "scanned patients); expected a lower threshold or more follow-up events"
        )
    chosen = passing[np.argsort(-counts[passing], kind="stable")[:k]]
    return TaskSelection(events.codes[chosen], counts[chosen], fraction[chosen])


def build_labels(events: EventTable, scans: ScanTable, tasks: np.ndarray) -> TTELabels:
    """Time to the next occurrence of each task code strictly after each scan, or censoring at the end of the
    record -> ``TTELabels`` (S, K); see the module docstring for the algorithm."""
    num_tasks = len(tasks)
    task_of_code = np.full(len(events.codes), -1, dtype=np.int64)
    code_index = {code: i for i, code in enumerate(events.codes)}
    unknown = [code for code in tasks if code not in code_index]
    if unknown:
        raise TTEInputError(f"tasks: codes {unknown[:5]} do not occur in the events table")
    task_of_code[[code_index[code] for code in tasks]] = np.arange(num_tasks)
    task = task_of_code[events.code]
    keep = task >= 0
    patient, time, task = events.patient[keep], events.time[keep], task[keep]

    # integer ranks of all times (0 stands for -inf), so (patient, time) order is one int64 per row
    inverse, distinct = dense_rank(np.concatenate([time, scans.time]))
    rank = inverse[: time.size] + 1
    scan_rank = inverse[time.size :] + 1
    span = distinct + 1
    group = patient * num_tasks + task
    order = np.lexsort((rank, group))
    patient, time, task, rank, group = patient[order], time[order], task[order], rank[order], group[order]
    previous_rank = np.zeros_like(rank)
    same_group = group[1:] == group[:-1]
    previous_rank[1:][same_group] = rank[:-1][same_group]

    scan_key = scans.patient * span + scan_rank
    scan_order = np.argsort(scan_key, kind="stable")
    sorted_key = scan_key[scan_order]
    # the scans of this patient with previous occurrence <= scan time < this occurrence
    low = np.searchsorted(sorted_key, patient * span + previous_rank, side="left")
    high = np.searchsorted(sorted_key, patient * span + rank, side="left")
    count = high - low
    starts = np.repeat(low - np.cumsum(count) + count, count)
    scan = scan_order[np.arange(int(count.sum())) + starts]
    cell_task = np.repeat(task, count)
    cell_time = np.repeat(time, count)

    censor = (events.record_end[scans.patient] - scans.time).astype(np.float32)
    label_time = np.empty((scans.time.size, num_tasks), dtype=np.float32)
    label_time[:] = censor[:, None]
    label_event = np.zeros((scans.time.size, num_tasks), dtype=bool)
    label_time[scan, cell_task] = cell_time - scans.time[scan]
    label_event[scan, cell_task] = True
    return TTELabels(scans.scan_ids, np.asarray(tasks), label_time, label_event)


def base_rates(labels: TTELabels, floor: float = 1e-12) -> np.ndarray:
    """(K,) events per day at risk of each task (MOTOR's per-task bias is their log); at least ``floor``."""
    exposure = labels.time.sum(axis=0, dtype=np.float64)
    return np.maximum(labels.event.sum(axis=0) / np.maximum(exposure, floor), floor)


@dataclass
class TimeBins:
    """Bin edges (bins + 1,) in days: 0, percentiles of the event times, infinity; bin k is [e_k, e_{k+1})."""

    edges: np.ndarray

    @classmethod
    def from_labels(cls, labels: TTELabels, num_bins: int) -> TimeBins:
        """``num_bins`` bins cut at the 1/num_bins, ..., (num_bins - 1)/num_bins percentiles of the event
        times (repeated percentiles merge, so there may be fewer)."""
        times = labels.time[labels.event]
        if times.size == 0:
            raise TTEInputError("labels: no event in any task, so no time bins can be set; expected events")
        inner = np.quantile(times, np.linspace(0.0, 1.0, num_bins + 1)[1:-1]) if num_bins > 1 else []
        inner = np.unique(np.asarray(inner, dtype=np.float64))
        inner = inner[inner > 0]
        return cls(np.concatenate([[0.0], inner, [np.inf]]))

    @property
    def num_bins(self) -> int:
        return self.edges.size - 1

    def targets(self, time: torch.Tensor, event: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) times and events -> ``log_time`` (B, bins, K) log of the days at risk in each bin (-inf for
        none) and ``is_event`` (B, bins, K) bool, True in the bin holding an observed event; float times keep
        their dtype."""
        dtype = time.dtype if time.is_floating_point() else torch.float32
        edges = torch.as_tensor(self.edges, dtype=dtype, device=time.device)
        start, end = edges[:-1].view(1, -1, 1), edges[1:].view(1, -1, 1)
        time = time.to(dtype).unsqueeze(1)
        at_risk = torch.minimum(time, end) - start
        log_time = torch.log(at_risk.clamp(min=0.0))
        is_event = event.bool().unsqueeze(1) & (time >= start) & (time < end)
        return log_time, is_event
