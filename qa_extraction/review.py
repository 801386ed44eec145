"""``python -m qa_extraction review export|import``: clinicians approve, correct or reject answers.

    python -m qa_extraction review export --extractions x.jsonl --reports reports.csv --id-column C \\
        --text-column T [--status present,absent] [--sample 500 --seed 0] --out review.csv
    python -m qa_extraction review import --extractions x.jsonl --review review.csv --out reviewed.jsonl

The export CSV has ``report_id, question_id, question, status, answer, report_excerpt`` (the report's
sentences that hold the question's keywords) and empty ``approved, corrected_answer, corrected_status,
reviewer, comment`` columns. On import, per filled row: ``approved`` yes/no (also y/n, true/false, 1/0,
approve/reject); a ``corrected_answer`` (and/or ``corrected_status``) replaces the row's answer and makes
the decision "corrected" whatever ``approved`` says; "no" without a correction rejects the row, which
``to-vqa`` then leaves out of the training file. A decision needs a ``reviewer``. Rows left blank stay
unreviewed. Every decision and change is appended to the log CSV (``--log``, default
``<out>.review_log.csv``: time, reviewer, report_id, question_id, decision, field, old, new).
"""

from __future__ import annotations

import argparse
import csv
import random
import re
from datetime import datetime, timezone
from pathlib import Path

from qa_extraction.io import ExtractionInputError, read_extractions, read_reports, read_table, require_columns
from qa_extraction.text import split_sentences
from vlsurv.jsonl import write_jsonl
from vlsurv.prompts import load_questions

REVIEW_COLUMNS = (
    "report_id",
    "question_id",
    "question",
    "status",
    "answer",
    "report_excerpt",
    "approved",
    "corrected_answer",
    "corrected_status",
    "reviewer",
    "comment",
)
LOG_COLUMNS = ("time", "reviewer", "report_id", "question_id", "decision", "field", "old", "new")
YES = {"yes", "y", "true", "1", "approve", "approved", "ok"}
NO = {"no", "n", "false", "0", "reject", "rejected"}
EXCERPT_CHARS = 600


def excerpt(report: str, keywords: tuple[str, ...]) -> str:
    """The report's sentences that contain one of ``keywords`` (word starts), up to ~600 characters."""
    if not keywords:
        return report[:EXCERPT_CHARS]
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(k) for k in keywords) + ")", re.I)
    picked, size = [], 0
    for sentence in split_sentences(report):
        if pattern.search(sentence) and size + len(sentence) <= EXCERPT_CHARS:
            picked.append(sentence)
            size += len(sentence) + 1
    return " ".join(picked) or report[:EXCERPT_CHARS]


def export_review(args: argparse.Namespace) -> int:
    rows = read_extractions(args.extractions)
    reports = {r.id: r.text for r in read_reports(args.reports, args.id_column, args.text_column)}
    keywords = {q.id: q.keywords for q in load_questions(args.questions)}
    statuses = set(args.status.split(",")) if args.status else None
    rows = [r for r in rows if statuses is None or r["status"] in statuses]
    if args.sample and args.sample < len(rows):
        rows = random.Random(args.seed).sample(rows, args.sample)
    missing = sorted({r["report_id"] for r in rows} - set(reports))
    if missing:
        raise ExtractionInputError(
            f"{args.reports}: no report with id {missing[0]!r} "
            f"({len(missing)} extraction report ids are missing)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=REVIEW_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    **{k: row[k] for k in ("report_id", "question_id", "question", "status", "answer")},
                    "report_excerpt": excerpt(
                        reports[row["report_id"]], keywords.get(row["question_id"], ())
                    ),
                    **{k: "" for k in REVIEW_COLUMNS[6:]},
                }
            )
    print(f"{out}: {len(rows)} rows to review")
    return 0


def _decision(entry: dict, where: str) -> tuple[str, str, str]:
    """(decision, corrected answer, corrected status) of one filled review row."""
    approved = entry["approved"].strip().lower()
    answer, status = entry["corrected_answer"].strip(), entry.get("corrected_status", "").strip().lower()
    if approved and approved not in YES | NO:
        raise ExtractionInputError(
            f"{where}: approved is {entry['approved']!r}; expected yes or no (or empty)"
        )
    if status and status not in ("present", "absent", "not_mentioned"):
        raise ExtractionInputError(
            f"{where}: corrected_status is {status!r}; expected present, absent or not_mentioned"
        )
    if not entry["reviewer"].strip():
        raise ExtractionInputError(f"{where}: a decision without a reviewer; fill the reviewer column")
    if answer or status:
        return "corrected", answer, status
    return ("approved" if approved in YES else "rejected"), "", ""


def apply_review(rows: list[dict], entries: list[dict], source: str) -> tuple[list[dict], list[dict]]:
    """(rows with decisions applied, log lines)."""
    index = {(r["report_id"], r["question_id"]): r for r in rows}
    seen: dict[tuple[str, str], int] = {}
    log, now = [], datetime.now(timezone.utc).isoformat(timespec="seconds")
    for line, entry in enumerate(entries, start=2):
        if not (
            entry["approved"].strip()
            or entry["corrected_answer"].strip()
            or entry.get("corrected_status", "").strip()
        ):
            continue
        key, where = (entry["report_id"], entry["question_id"]), f"{source}: line {line}"
        if key not in index:
            raise ExtractionInputError(f"{where}: ({key[0]!r}, {key[1]!r}) is not in the extraction file")
        if key in seen:
            raise ExtractionInputError(
                f"{where}: ({key[0]!r}, {key[1]!r}) was already decided on line {seen[key]}"
            )
        seen[key] = line
        decision, answer, status = _decision(entry, where)
        row, reviewer = index[key], entry["reviewer"].strip()
        base = {
            "time": now,
            "reviewer": reviewer,
            "report_id": key[0],
            "question_id": key[1],
            "decision": decision,
        }
        changes = [("answer", answer), ("status", status)] if decision == "corrected" else []
        changed = [(field, row[field], new) for field, new in changes if new and new != row[field]]
        log += [{**base, "field": field, "old": old, "new": new} for field, old, new in changed]
        if not changed:
            log.append({**base, "field": "", "old": "", "new": ""})
        row["review"] = {
            "decision": decision,
            "reviewer": reviewer,
            "time": now,
            **{f"original_{field}": old for field, old, _ in changed},
        }
        for field, _, new in changed:
            row[field] = new
    return rows, log


def import_review(args: argparse.Namespace) -> int:
    rows = read_extractions(args.extractions)
    table = read_table(args.review)
    require_columns(
        table,
        ["report_id", "question_id", "approved", "corrected_answer", "reviewer"],
        args.review,
        "the review export",
    )
    entries = [{k: ("" if v is None else str(v)) for k, v in rec.items()} for rec in table.to_dict("records")]
    rows, log = apply_review(rows, entries, str(args.review))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, rows)
    log_path = Path(args.log) if args.log else out.with_name(out.name + ".review_log.csv")
    new_log = not log_path.exists()
    with open(log_path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
        if new_log:
            writer.writeheader()
        writer.writerows(log)
    decisions = {}
    for r in rows:
        if "review" in r:
            decisions[r["review"]["decision"]] = decisions.get(r["review"]["decision"], 0) + 1
    print(f"{out}: {len(rows)} rows, decisions {decisions}; log {log_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qa_extraction review",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True)
    export = sub.add_parser("export", help="write the review CSV")
    export.add_argument("--extractions", required=True)
    export.add_argument("--reports", required=True)
    export.add_argument("--id-column", required=True)
    export.add_argument("--text-column", action="append", required=True)
    export.add_argument("--questions", default="lung", help="question set whose keywords pick the excerpt")
    export.add_argument("--status", default="", help="comma-separated statuses to review (default all)")
    export.add_argument("--sample", type=int, default=0, help="review a random sample of this many rows")
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--out", required=True)
    imp = sub.add_parser("import", help="apply a filled review CSV")
    imp.add_argument("--extractions", required=True)
    imp.add_argument("--review", required=True)
    imp.add_argument("--out", required=True, help="reviewed JSONL (may be the --extractions file itself)")
    imp.add_argument("--log", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return export_review(args) if args.action == "export" else import_review(args)
