"""``python -m qa_extraction <command> [options]``: one table maps each command to its ``main(argv)``.

A bad input (any ValueError: missing column, duplicate id, unreachable server...) is printed as one
line ``qa_extraction <command>: error: <message>`` and exits with status 2.
"""

from __future__ import annotations

import importlib
import logging
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "vocab": ("qa_extraction.vocab", "top medical words and the question-drafting prompt"),
    "extract": ("qa_extraction.extract", "answer every question for every report (resumable JSONL)"),
    "to-vqa": ("qa_extraction.vqa", "extraction + manifest -> VQA training file"),
    "review": ("qa_extraction.review", "export a review CSV / import clinicians' decisions"),
    "evaluate": ("qa_extraction.evaluate", "precision, recall, F1 of 'present' against binary labels"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m qa_extraction <command> [options]", "", "commands:"]
    return "\n".join(lines + [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"qa_extraction: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qa_extraction").setLevel(logging.INFO)
    try:
        return int(importlib.import_module(COMMANDS[name][0]).main(rest) or 0)
    except ValueError as err:
        print(f"qa_extraction {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
