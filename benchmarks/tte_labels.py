"""Benchmark: time-to-event labels (vlsurv.tte) at 20,000 scans x 8,192 tasks; seconds and peak memory.

Synthetic events: ``--patients`` patients with ``--scans-per-patient`` scans each, ``--events-per-patient``
events each at uniform days in [0, 3650] (the first at day 0, where the record starts), codes drawn from a
Zipf-like law over ``--codes`` codes (so a few are common and most rare, as in an EHR). Timed stages:
``load_events`` (checks, ids, record bounds), ``select_tasks`` (top ``--tasks`` codes with threshold 0) and
``build_labels`` (the (scans, tasks) time and event matrices). Peak memory: the largest traced allocation
(``tracemalloc``, which sees numpy's buffers) during each stage, and the process's peak resident size. Wall
and CPU seconds are both printed: on a shared machine the CPU time does not depend on the other processes.

``--reference-scans`` > 0 also times a per-cell Python reference (the next occurrence of each task code after
each scan, looked up per cell) on that many scans x 64 tasks, checks it against the vectorised labels and
prints the per-cell time of both and their ratio.

    python benchmarks/tte_labels.py [--patients 10000] [--scans-per-patient 2] [--tasks 8192]
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc

import numpy as np
import pandas as pd

from vlsurv.tte.events import load_events
from vlsurv.tte.labels import build_labels, select_tasks


def synthetic_events(args) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(args.seed)
    n = args.patients * args.events_per_patient
    weights = 1.0 / np.arange(1, args.codes + 1) ** 0.8
    codes = rng.choice(args.codes, size=n, p=weights / weights.sum())
    days = np.round(rng.uniform(0.0, 3650.0, size=n), 2)
    days[:: args.events_per_patient] = 0.0
    events = pd.DataFrame(
        {
            "patient_id": np.repeat(np.arange(args.patients), args.events_per_patient),
            "time": days,
            "code": pd.Series(codes).map({i: f"CODE/{i:05d}" for i in range(args.codes)}),
        }
    )
    scans = pd.DataFrame(
        {
            "scan_id": [f"s{i}" for i in range(args.patients * args.scans_per_patient)],
            "patient_id": np.repeat(np.arange(args.patients), args.scans_per_patient),
            "time": np.round(rng.uniform(0.0, 3000.0, size=args.patients * args.scans_per_patient), 2),
        }
    )
    return events, scans


def timed(label: str, function, *arguments):
    tracemalloc.reset_peak()
    start, start_cpu = time.perf_counter(), time.process_time()
    result = function(*arguments)
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    print(f"{label:<14} {seconds:8.2f} s wall {cpu:8.2f} s CPU   peak traced {peak:8.0f} MiB")
    return result, seconds


def reference_cells(events: pd.DataFrame, scans: pd.DataFrame, tasks: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-cell Python reference: for each (scan, task) the next occurrence after the scan, or censoring."""
    by_patient = {p: group for p, group in events.groupby("patient_id")}
    start = time.perf_counter()
    out = np.empty((len(scans), len(tasks)), dtype=np.float64)
    for i, (patient, scan_time) in enumerate(zip(scans["patient_id"], scans["time"])):
        own = by_patient[patient]
        end = max(own["time"].max(), scan_time)
        for j, code in enumerate(tasks):
            later = own["time"][(own["code"] == code) & (own["time"] > scan_time)]
            out[i, j] = (later.min() if len(later) else end) - scan_time
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--scans-per-patient", type=int, default=2)
    parser.add_argument("--events-per-patient", type=int, default=1_000)
    parser.add_argument("--codes", type=int, default=20_000)
    parser.add_argument("--tasks", type=int, default=8_192)
    parser.add_argument("--reference-scans", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    events, scans = synthetic_events(args)
    print(f"{len(events):,} events, {len(scans):,} scans, {args.codes:,} codes")
    tracemalloc.start()
    (event_table, scan_table), load_s = timed("load_events", load_events, events, scans)
    chosen, select_s = timed("select_tasks", select_tasks, event_table, scan_table, args.tasks, 0.0)
    labels, build_s = timed("build_labels", build_labels, event_table, scan_table, chosen.codes)
    tracemalloc.stop()
    cells = labels.time.size
    resident = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(
        f"labels {labels.time.shape[0]:,} scans x {labels.time.shape[1]:,} tasks: "
        f"{load_s + select_s + build_s:.2f} s in all, build_labels {1e9 * build_s / cells:.2f} ns per cell; "
        f"event fraction {labels.event.mean():.3f}; peak resident {resident:.0f} MiB"
    )
    if args.reference_scans:
        rows = np.arange(args.reference_scans)
        tasks = chosen.codes[:64]
        expected, reference_s = reference_cells(events, scans.iloc[rows], tasks)
        np.testing.assert_allclose(labels.time[rows, :64], expected, rtol=1e-6, atol=1e-2)
        per_cell_reference = reference_s / expected.size
        per_cell_vectorised = build_s / cells
        print(
            f"per-cell reference on {args.reference_scans} scans x 64 tasks: "
            f"{1e6 * per_cell_reference:.1f} us per cell (labels agree); vectorised "
            f"{1e9 * per_cell_vectorised:.2f} ns per cell; ratio reference / vectorised = "
            f"{per_cell_reference / per_cell_vectorised:,.0f}"
        )


if __name__ == "__main__":
    main()
