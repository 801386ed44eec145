"""``python -m qa_extraction vocab``: the most frequent medical words and the question-drafting prompt.

    python -m qa_extraction vocab --reports reports.csv --text-column Findings_EN --top 100 --out words.csv \\
        [--backend openai --model NAME]   # optional: let an LLM draft the question templates

The paper's first step (section 2.2): count word frequencies over all reports, keep the top ``--top``
medical words, and ask an LLM to draft question templates from them. Words are lowercase letter runs of
3+ characters; English stop words (scikit-learn's list) and the non-medical report words of
prompts/extraction/nonmedical_words.txt (reporting verbs, sizes, sides, time words) are dropped.
Writes ``word,count`` to ``--out`` and the prompt (prompts/extraction/question_templates.txt filled in)
to ``--prompt-out`` (default ``<out>.prompt.txt``). With ``--backend transformers|openai`` the prompt is
also answered and the reply written to ``--draft-out`` (default ``<out>.questions.txt``) for clinicians to
edit into a prompts/questions/*.yaml file.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from qa_extraction.backends import add_backend_arguments, build_backend
from qa_extraction.io import ExtractionInputError, cell_text, read_table, require_columns
from qa_extraction.llm import render
from vlsurv.prompts import read_template

NONMEDICAL_FILE = "extraction/nonmedical_words.txt"
PROMPT_FILE = "extraction/question_templates.txt"
_WORD = re.compile(r"[a-z]{3,}")


def nonmedical_words() -> set[str]:
    lines = read_template(NONMEDICAL_FILE).splitlines()
    return {line.strip().lower() for line in lines if line.strip() and not line.startswith("#")}


def count_words(texts: Iterable[str], dropped: set[str] | None = None) -> Counter:
    """Word counts over ``texts`` without stop words and ``dropped`` words."""
    dropped = (nonmedical_words() if dropped is None else dropped) | set(ENGLISH_STOP_WORDS)
    counts: Counter = Counter()
    for text in texts:
        counts.update(w for w in _WORD.findall(text.lower()) if w not in dropped)
    return counts


def drafting_prompt(words: list[tuple[str, int]], domain: str) -> str:
    listed = "\n".join(f"{word} ({count})" for word, count in words)
    return render(read_template(PROMPT_FILE), PROMPT_FILE, top=str(len(words)), words=listed, domain=domain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qa_extraction vocab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--reports", required=True)
    parser.add_argument("--text-column", action="append", required=True)
    parser.add_argument("--top", type=int, default=100)
    parser.add_argument(
        "--domain", default="chest CT", help="named in the prompt, e.g. 'lung cancer chest CT'"
    )
    parser.add_argument("--out", required=True, help="word,count CSV")
    parser.add_argument("--prompt-out", default=None)
    parser.add_argument("--draft-out", default=None)
    add_backend_arguments(parser, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top < 1:
        raise ExtractionInputError(f"--top must be >= 1, got {args.top}")
    table = read_table(args.reports)
    require_columns(table, args.text_column, args.reports, "--text-column")
    texts = [
        " ".join(cell_text(v) for v in row)
        for row in table[args.text_column].itertuples(index=False, name=None)
    ]
    top = count_words(texts).most_common(args.top)
    if not top:
        raise ExtractionInputError(f"{args.reports}: no medical words found in {args.text_column}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["word", "count"])
        writer.writerows(top)
    prompt = drafting_prompt(top, args.domain)
    prompt_out = Path(args.prompt_out or out.with_name(out.name + ".prompt.txt"))
    prompt_out.write_text(prompt, encoding="utf-8")
    print(f"{out}: {len(top)} words from {len(texts)} reports; prompt {prompt_out}")
    if args.backend:
        reply = build_backend(args).generate([[{"role": "user", "content": prompt}]])[0]
        draft_out = Path(args.draft_out or out.with_name(out.name + ".questions.txt"))
        draft_out.write_text(reply.strip() + "\n", encoding="utf-8")
        print(f"{draft_out}: question templates drafted by {args.backend}")
    return 0
