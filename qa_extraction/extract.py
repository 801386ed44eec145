"""``python -m qa_extraction extract``: one answer per (report, question), appended to a JSONL file.

    python -m qa_extraction extract --reports reports.csv --id-column VolumeName \\
        --text-column Findings_EN --text-column Impressions_EN \\
        --questions prompts/questions/lung.yaml --backend rules --out extractions.jsonl

The run is resumable: the (report_id, question_id) pairs already in ``--out`` are skipped, a torn last
line left by a killed run is cut off and redone, and each new row is appended as soon as its batch is
answered. ``error`` rows (an LLM reply that stayed invalid after the repair prompt) count as done;
``--retry-errors`` removes them first so that they are asked again. Logs carry ids and counts only.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from qa_extraction.backends import add_backend_arguments, build_backend
from qa_extraction.io import ExtractionFile, make_row, read_reports
from qa_extraction.llm import Item
from vlsurv.prompts import load_questions

log = logging.getLogger("qa_extraction")


@dataclass(frozen=True)
class ExtractionSummary:
    already_done: int
    written: int
    errors: int
    by_status: dict


def run_extraction(
    reports, questions, backend, out: str | Path, *, retry_errors: bool = False
) -> ExtractionSummary:
    """Answer every pending (report, question) pair with ``backend`` and append the rows to ``out``."""
    store = ExtractionFile(out)
    if retry_errors:
        log.info("%s: removed %d error rows to ask again", out, store.drop_errors())
    done = store.done_pairs()
    items = [Item(r, q) for r in reports for q in questions if (r.id, q.id) not in done]
    log.info(
        "%d reports x %d questions: %d pairs done before, %d to answer with %s",
        len(reports),
        len(questions),
        len(done),
        len(items),
        backend.name,
    )
    by_status: dict[str, int] = {}
    with store.open_for_append() as out_file:
        for item, result in backend.run(items):
            out_file.write(
                make_row(
                    item.report.id,
                    item.question.id,
                    item.question.text,
                    result.status,
                    result.answer,
                    backend.name,
                    backend.model,
                    **result.extra,
                )
            )
            by_status[result.status] = by_status.get(result.status, 0) + 1
    written = sum(by_status.values())
    if written != len(items):
        raise RuntimeError(f"backend {backend.name} answered {written} of {len(items)} pairs")
    return ExtractionSummary(len(done), written, by_status.get("error", 0), by_status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qa_extraction extract",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--reports", required=True, help="CSV or JSONL table with one report per row")
    parser.add_argument("--id-column", required=True)
    parser.add_argument(
        "--text-column",
        action="append",
        required=True,
        help="report text column; repeat to join several (e.g. findings and impression)",
    )
    parser.add_argument("--questions", default="lung", help="a question set name or YAML path")
    parser.add_argument("--out", required=True, help="JSONL output, appended to and resumed")
    parser.add_argument(
        "--retry-errors", action="store_true", help="ask the pairs of earlier error rows again"
    )
    add_backend_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    questions = load_questions(args.questions)
    reports = read_reports(args.reports, args.id_column, args.text_column)
    backend = build_backend(args, questions)
    summary = run_extraction(reports, questions, backend, args.out, retry_errors=args.retry_errors)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.by_status.items())) or "nothing new"
    print(
        f"{args.out}: {summary.written} rows written ({counts}); {summary.already_done} pairs were "
        "done before"
    )
    return 0
