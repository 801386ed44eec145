"""``python -m qa_extraction <command> [options]``: one table maps each command to its ``main(argv)``.

A bad input (any ``vlsurv.errors.InputError``: missing column, duplicate id, unreachable server...) is
printed as one line ``python -m qa_extraction <command>: error: <message>`` and exits with status 2;
``python -m qa_extraction --debug <command>`` (or ``VLSURV_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys

from vlsurv.cli import dispatch

COMMANDS: dict[str, tuple[str, str]] = {
    "vocab": ("qa_extraction.vocab:main", "top medical words and the question-drafting prompt"),
    "extract": ("qa_extraction.extract:main", "answer every question for every report (resumable JSONL)"),
    "to-vqa": ("qa_extraction.vqa:main", "extraction + manifest -> VQA training file"),
    "review": ("qa_extraction.review:main", "export a review CSV / import clinicians' decisions"),
    "evaluate": ("qa_extraction.evaluate:main", "precision, recall, F1 of 'present' against binary labels"),
}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qa_extraction").setLevel(logging.INFO)
    argv = list(sys.argv[1:] if argv is None else argv)
    return dispatch(argv, COMMANDS, "python -m qa_extraction")


if __name__ == "__main__":
    sys.exit(main())
