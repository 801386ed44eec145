"""Benchmark: `vlsurv demo` wall time and peak RSS against its targets (5 minutes, 6 GB on 2 CPU cores).

Runs the demo in a child process (so its peak RSS is the child's alone), then prints each step's seconds from
``DIR/metrics.json``, the wall time and the peak RSS, each as a ratio of its target (< 1 meets it), and the
headline results: the C-indices, BERTScore and the clinical macro F1 (answers read back to present / absent,
against the cohort's findings.csv) with each question's F1, and how often the tumour's lobe and the effusion's
side are right.

    python benchmarks/demo.py [--n-patients 300] [--seed 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vlsurv.demo import DETAIL_LABELS

WALL_TARGET_S = 300.0
RSS_TARGET_MIB = 6 * 1024.0


def run(n_patients: int, seed: int, out: Path) -> tuple[float, float, dict]:
    """(wall seconds, peak RSS MiB of the child, DIR/metrics.json)."""
    command = [
        sys.executable,
        "-m",
        "vlsurv.cli",
        "demo",
        "--out",
        str(out),
        "--n-patients",
        str(n_patients),
        "--seed",
        str(seed),
        "--no-progress",
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0  # Linux: KiB
    return wall, peak_mib, json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-patients", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="demo folder (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wall, peak, metrics = run(args.n_patients, args.seed, args.out or Path(tmp) / "demo")
    for step, seconds in metrics["step_seconds"].items():
        print(f"  {step:<40} {seconds:7.1f} s")
    print(f"wall time  {wall:7.1f} s    target {WALL_TARGET_S:.0f} s     ratio {wall / WALL_TARGET_S:.2f}")
    print(f"peak RSS   {peak:7.0f} MiB  target {RSS_TARGET_MIB:.0f} MiB  ratio {peak / RSS_TARGET_MIB:.2f}")
    print(
        f"c_index {metrics['c_index']:.3f}  clinical-only {metrics['c_index_clinical_only']:.3f}  "
        f"oracle {metrics['oracle_c_index']:.3f}  bertscore_f1 {metrics['bertscore_f1']:.3f}"
    )
    truth = (metrics.get("clinical_accuracy") or {}).get("against_ground_truth")
    if truth:
        low, high = truth["macro_f1_ci"]
        per_question = "  ".join(
            f"{q} {'n/a' if s['f1'] is None else format(s['f1'], '.2f')}"
            for q, s in truth["per_question"].items()
        )
        print(
            f"clinical macro F1 {truth['macro_f1']:.2f} [{low:.2f}, {high:.2f}] beside wall {wall:.0f} s and "
            f"peak RSS {peak:.0f} MiB; per question: {per_question}"
        )
    details = (metrics.get("clinical_accuracy") or {}).get("details") or {}
    located = [
        f"{label} {d['correct']}/{d['scored']} ({d['correct'] / d['scored']:.0%})"
        for key, label in DETAIL_LABELS.items()
        if (d := details.get(key)) and d.get("scored")
    ]
    if located:
        print("right in the true-positive answers: " + ", ".join(located) + " (target 70%)")


if __name__ == "__main__":
    main()
