"""``python -m qa_extraction to-vqa``: extraction rows + a manifest -> the VQA training file.

    python -m qa_extraction to-vqa --extractions extractions.jsonl --manifest manifest.csv --out vqa.jsonl

Each output line is ``{"scan_id", "question_id", "question", "answer"}``. Rows are matched to scans by
the manifest column ``--report-id-column`` (default ``scan_id``: the extraction was run with the scan id as
report id); a report shared by several scans gives a row for each. Statuses:

- ``present`` and ``absent`` rows are kept; an ``absent`` row keeps its negative answer ("No pleural
  effusion."), which is training signal;
- ``not_mentioned`` rows are dropped by default (the report is silent, so the image cannot be said to
  show or not show the finding); ``--not-mentioned keep`` keeps them with their answer
  ("Not mentioned in the report.");
- ``error`` rows are always dropped and counted (rerun ``extract --retry-errors`` to ask them again);
- rows a clinician rejected in review (``review.decision == "rejected"``) are dropped; corrected answers
  were already written into the rows by ``review import``.

Extraction rows whose report id is not in the manifest are counted and skipped.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from qa_extraction.io import ExtractionInputError, read_extractions, read_table, require_columns
from vlsurv.jsonl import write_jsonl


def _manifest_ids(path: str | Path, column: str) -> dict[str, list[str]]:
    """{report id: [scan_id, ...]} from the manifest (CSV or JSONL)."""
    table = read_table(path)
    require_columns(
        table, ["scan_id", column], path, "--report-id-column" if column != "scan_id" else "manifest"
    )
    scans: dict[str, list[str]] = {}
    for scan_id, report_id in zip(table["scan_id"].astype(str), table[column].astype(str)):
        scans.setdefault(report_id, []).append(scan_id)
    return scans


def vqa_rows(
    extractions: list[dict], scans_by_report: dict[str, list[str]], *, keep_not_mentioned: bool = False
):
    """(VQA rows, Counter of what was dropped and why)."""
    rows, dropped = [], Counter()
    for row in extractions:
        review = row.get("review") or {}
        if review.get("decision") == "rejected":
            dropped["rejected in review"] += 1
        elif row["status"] == "error":
            dropped["error"] += 1
        elif row["status"] == "not_mentioned" and not keep_not_mentioned:
            dropped["not_mentioned"] += 1
        elif row["report_id"] not in scans_by_report:
            dropped["report id not in manifest"] += 1
        else:
            for scan_id in scans_by_report[row["report_id"]]:
                rows.append(
                    {
                        "scan_id": scan_id,
                        "question_id": row["question_id"],
                        "question": row["question"],
                        "answer": row["answer"],
                    }
                )
    return rows, dropped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qa_extraction to-vqa",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--extractions", required=True, help="JSONL from `extract` (or `review import`)")
    parser.add_argument("--manifest", required=True, help="manifest CSV/JSONL with a scan_id column")
    parser.add_argument(
        "--report-id-column",
        default="scan_id",
        help="manifest column that holds the extraction's report_id (default scan_id)",
    )
    parser.add_argument("--not-mentioned", choices=("drop", "keep"), default="drop")
    parser.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    extractions = read_extractions(args.extractions)
    rows, dropped = vqa_rows(
        extractions,
        _manifest_ids(args.manifest, args.report_id_column),
        keep_not_mentioned=args.not_mentioned == "keep",
    )
    if not rows:
        raise ExtractionInputError(
            f"{args.extractions}: no row became a VQA pair (dropped: {dict(dropped)}); "
            f"check that --report-id-column matches the extraction's report ids"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, rows)
    summary = ", ".join(f"{why} {n}" for why, n in sorted(dropped.items())) or "none"
    print(f"{out}: {len(rows)} VQA pairs; dropped: {summary}")
    return 0
