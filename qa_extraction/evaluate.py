"""``python -m qa_extraction evaluate``: precision, recall and F1 of ``status == present`` against labels.

    python -m qa_extraction evaluate --extractions x.jsonl --labels labels.csv --id-column AccessionNo \\
        --map pleura="Pleural effusion" --map lymph_nodes=Lymphadenopathy --map tumor="Lung nodule"

``--map question_id=label_column`` pairs a question with a 0/1 label column. Reports present in both
files are scored; ``error`` rows count as "not present" and are reported. ``--json`` also writes the
numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from qa_extraction.io import ExtractionInputError, read_extractions, read_table, require_columns


@dataclass(frozen=True)
class Score:
    question_id: str
    label: str
    n: int
    tp: int
    fp: int
    fn: int
    tn: int
    errors: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def _label(value, where: str) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "1.0", "true", "yes"):
        return True
    if text in ("0", "0.0", "false", "no"):
        return False
    raise ExtractionInputError(f"{where}: label {value!r} is not 0/1")


def score(rows: list[dict], labels: dict[str, dict[str, bool]], question_id: str, label: str) -> Score:
    """Confusion counts of ``status == present`` for ``question_id`` against ``labels[report][label]``."""
    predicted = {r["report_id"]: r["status"] for r in rows if r["question_id"] == question_id}
    ids = [i for i in labels if i in predicted]
    if not ids:
        raise ExtractionInputError(
            f"no report has both a {question_id!r} extraction and a label; "
            "check --id-column and the question id"
        )
    pairs = [(predicted[i] == "present", labels[i][label]) for i in ids]
    return Score(
        question_id,
        label,
        len(ids),
        sum(p and t for p, t in pairs),
        sum(p and not t for p, t in pairs),
        sum(t and not p for p, t in pairs),
        sum(not p and not t for p, t in pairs),
        sum(predicted[i] == "error" for i in ids),
    )


def _mapping(items: list[str]) -> dict[str, str]:
    mapping = {}
    for item in items:
        question_id, sep, label = item.partition("=")
        if not sep or not question_id.strip() or not label.strip():
            raise ExtractionInputError(f"--map {item!r}: expected question_id=label_column")
        mapping[question_id.strip()] = label.strip()
    return mapping


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qa_extraction evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--extractions", required=True)
    parser.add_argument("--labels", required=True, help="CSV/JSONL with an id column and 0/1 label columns")
    parser.add_argument("--id-column", default="report_id")
    parser.add_argument("--map", action="append", required=True, metavar="QUESTION_ID=LABEL_COLUMN")
    parser.add_argument("--json", default=None, help="also write the scores to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mapping = _mapping(args.map)
    rows = read_extractions(args.extractions)
    table = read_table(args.labels)
    require_columns(table, [args.id_column], args.labels, "--id-column")
    require_columns(table, list(mapping.values()), args.labels, "--map")
    labels = {
        str(rec[args.id_column]): {
            c: _label(rec[c], f"{args.labels}: row {n}, column {c!r}") for c in mapping.values()
        }
        for n, rec in enumerate(table.to_dict("records"), start=1)
    }
    scores = [score(rows, labels, qid, label) for qid, label in mapping.items()]
    print(
        f"{'question':<14}{'label':<22}{'n':>5}{'tp':>5}{'fp':>5}{'fn':>5}{'errors':>7}"
        f"{'precision':>11}{'recall':>8}{'F1':>7}"
    )
    for s in scores:
        print(
            f"{s.question_id:<14}{s.label[:21]:<22}{s.n:>5}{s.tp:>5}{s.fp:>5}{s.fn:>5}{s.errors:>7}"
            f"{s.precision:>11.3f}{s.recall:>8.3f}{s.f1:>7.3f}"
        )
    if args.json:
        payload = [{**asdict(s), "precision": s.precision, "recall": s.recall, "f1": s.f1} for s in scores]
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0
