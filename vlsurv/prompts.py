"""Questions and prompt templates kept as files under the repository's ``prompts/`` folder.

``load_questions("lung")`` reads ``prompts/questions/lung.yaml``; every later step (extraction, training,
prediction) reads its questions through it, so the question ids and texts live in one place.
A question file is YAML::

    questions:
      - id: tumor                       # stable id: lowercase letters, digits, "_"
        text: What is the location and size of the primary lung tumor?
        keywords: [tumor, mass, nodule] # optional: words that point to the question's sentences
        rules: {...}                    # optional: settings of the offline rules backend
                                        # (qa_extraction.rules)

``read_template("extraction/answer.txt")`` returns a template file's text. ``PROMPTS_DIR`` is the
repository's ``prompts/`` folder (shipped in the wheel as ``vlsurv/_resources/prompts``, see ``resource_dir``)
unless the environment variable ``VLSURV_PROMPTS`` names another one.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlsurv.errors import InputError
from vlsurv.files import read_yaml


def resource_dir(name: str) -> Path:
    """The shipped folder ``name`` ("prompts" or "configs").

    A wheel carries the repository's top-level folder as package data ``vlsurv/_resources/<name>``
    (pyproject.toml maps it there); an editable install or a source checkout reads the top-level folder
    itself.
    """
    packaged = Path(str(importlib.resources.files("vlsurv") / "_resources" / name))
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / name


PROMPTS_DIR = Path(os.environ.get("VLSURV_PROMPTS") or resource_dir("prompts"))

_ID = re.compile(r"^[a-z][a-z0-9_]*$")


class PromptError(InputError):
    """A question file or template that is missing or not in the expected format."""


@dataclass(frozen=True)
class Question:
    """One clinical question: a stable ``id``, the ``text`` asked, and optional extraction hints."""

    id: str
    text: str
    keywords: tuple[str, ...] = ()
    rules: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    source: str = field(default="", compare=False)


def questions_path(name_or_path: str | Path = "lung") -> Path:
    """``prompts/questions/<name>.yaml`` for a bare name, else the path itself."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text:
        return Path(text)
    return PROMPTS_DIR / "questions" / f"{text}.yaml"


def _question(entry: Any, index: int, source: Path) -> Question:
    where = f"{source}: questions[{index}]"
    if not isinstance(entry, dict):
        raise PromptError(f"{where}: expected a mapping with 'id' and 'text', got {entry!r}")
    qid = entry.get("id")
    if qid is None or qid == "":
        raise PromptError(f"{where}: missing 'id'; every question needs a stable id such as 'tumor'")
    if not isinstance(qid, str) or not _ID.match(qid):
        raise PromptError(
            f"{where}: id {qid!r} must be lowercase letters, digits and '_' (e.g. 'lymph_nodes')"
        )
    text = entry.get("text")
    if not isinstance(text, str) or not text.strip():
        raise PromptError(f"{where} (id {qid!r}): missing 'text'; expected the question as a sentence")
    keywords = entry.get("keywords") or []
    if not isinstance(keywords, list) or not all(isinstance(k, str) and k.strip() for k in keywords):
        raise PromptError(f"{where} (id {qid!r}): 'keywords' must be a list of words, got {keywords!r}")
    rules = entry.get("rules") or {}
    if not isinstance(rules, dict):
        raise PromptError(f"{where} (id {qid!r}): 'rules' must be a mapping, got {type(rules).__name__}")
    unknown = sorted(set(entry) - {"id", "text", "keywords", "rules"})
    if unknown:
        raise PromptError(f"{where} (id {qid!r}): unknown keys {unknown}; expected id, text, keywords, rules")
    return Question(qid, text.strip(), tuple(k.strip() for k in keywords), dict(rules), str(source))


def load_questions(name_or_path: str | Path = "lung") -> list[Question]:
    """The questions of ``prompts/questions/<name>.yaml`` (or of a YAML path), in file order."""
    path = questions_path(name_or_path)
    if not path.is_file():
        available = sorted(p.stem for p in (PROMPTS_DIR / "questions").glob("*.yaml"))
        raise PromptError(f"question file {path} not found; expected a path or one of {available}")
    data = read_yaml(path, PromptError)
    entries = data.get("questions") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise PromptError(f"{path}: expected a non-empty list under 'questions:'")
    questions = [_question(entry, i, path) for i, entry in enumerate(entries)]
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            raise PromptError(f"{path}: question id {q.id!r} appears twice; ids must be unique")
        seen.add(q.id)
    return questions


def read_template(relative_path: str | Path) -> str:
    """The text of the template file ``prompts/<relative_path>``."""
    path = PROMPTS_DIR / relative_path
    if not path.is_file():
        folder = path.parent
        available = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
        raise PromptError(f"template {path} not found; files in {folder}: {available}")
    return path.read_text(encoding="utf-8")


#: The opening of a ``status_first`` answer (``model.answer_format``) per reference status.
STATUS_WORDS = {"present": "Present:", "absent": "Absent:"}
#: The values of ``model.answer_format``.
ANSWER_FORMATS = ("as_extracted", "status_first", "findings_first")
#: Answer formats whose answers open with "Present" / "Absent" (``ModelConfig.opens_with_status``).
STATUS_FORMATS = ANSWER_FORMATS[1:]
_STATUS_OPENING = re.compile(r"^\s*(Present|Absent)(?:,[^:]*)?:\s*")


def status_opening(status: str, *details: str) -> str:
    """The opening of an answer that opens with its status: "Present:" / "Absent:", or with details
    (``findings_first``: the finding, then its location) "Present, tumor, right lower lobe:"."""
    word = STATUS_WORDS[status]
    named = [detail for detail in details if detail]
    return f"{word[:-1]}, {', '.join(named)}:" if named else word


def opening_status(text: str) -> str | None:
    """ "present" / "absent" for an answer with a status opening ("Present: ...", "Absent: ...",
    "Present, right: ..."), else None."""
    match = _STATUS_OPENING.match(text)
    return match.group(1).lower() if match else None


def status_opening_of(text: str) -> str:
    """The status opening an answer starts with ("Present, right:"), "" when it has none."""
    match = _STATUS_OPENING.match(text)
    return match.group(0).strip() if match else ""


def strip_status(text: str) -> str:
    """The answer without its status opening ("Present: X" and "Present, right: X" -> "X"); other text
    unchanged."""
    return _STATUS_OPENING.sub("", text, count=1)
