"""What the LLM backends share: prompts from files, JSON answer validation, one repair round.

A backend only turns chat conversations into reply texts (``generate(list of messages) -> list of str``).
``answer_items(generate, items, batch_size)`` builds one conversation per (report, question) from
prompts/extraction/{system,answer}.txt, parses each reply as ``{"status": ..., "answer": ...}``, sends
every invalid reply back once with prompts/extraction/repair.txt, and turns a reply that is still
invalid into an ``error`` result that keeps the raw text. Every item gets exactly one result.
The report comes before the question in the prompt, so a server with prefix caching (vLLM) reuses the
report's tokens across a report's questions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from qa_extraction.io import Report
from vlsurv.errors import InputError
from vlsurv.prompts import PromptError, Question, read_template

Messages = list[dict[str, str]]
Generate = Callable[[list[Messages]], list[str]]
ANSWER_STATUSES = ("present", "absent", "not_mentioned")
NOT_MENTIONED = "Not mentioned in the report."
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.I)


class AnswerFormatError(InputError):
    """A model reply that is not the JSON answer the prompt asks for."""


@dataclass(frozen=True)
class Item:
    report: Report
    question: Question


@dataclass(frozen=True)
class Result:
    status: str
    answer: str
    extra: dict


def render(template: str, name: str, **values: str) -> str:
    """``template`` with each ``{key}`` replaced; other braces (JSON examples) are left alone."""
    missing = sorted(set(values) - set(_PLACEHOLDER.findall(template)))
    if missing:
        raise PromptError(f"template {name} lacks the placeholder(s) {['{' + m + '}' for m in missing]}")
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


@dataclass(frozen=True)
class ExtractionPrompts:
    system: str
    answer: str
    repair: str

    @classmethod
    def load(cls, folder: str = "extraction") -> ExtractionPrompts:
        return cls(*(read_template(f"{folder}/{name}.txt") for name in ("system", "answer", "repair")))

    def conversation(self, item: Item) -> Messages:
        user = render(
            self.answer,
            "answer.txt",
            report=item.report.text,
            question=item.question.text,
            question_id=item.question.id,
        )
        return [{"role": "system", "content": self.system.strip()}, {"role": "user", "content": user}]

    def repair_conversation(self, item: Item, raw: str, error: str) -> Messages:
        repair = render(self.repair, "repair.txt", error=error)
        return [
            *self.conversation(item),
            {"role": "assistant", "content": raw},
            {"role": "user", "content": repair},
        ]


def parse_answer(text: str) -> tuple[str, str]:
    """(status, answer) from a reply holding one JSON object; raises AnswerFormatError otherwise."""
    body = _FENCE.sub("", text.strip())
    start = body.find("{")
    if start < 0:
        raise AnswerFormatError("no JSON object found")
    try:
        data, _ = json.JSONDecoder().raw_decode(body[start:])
    except json.JSONDecodeError as err:
        raise AnswerFormatError(f"invalid JSON ({err.msg} at character {err.pos})") from err
    if not isinstance(data, dict):
        raise AnswerFormatError("the JSON value is not an object")
    status = str(data.get("status", "")).strip().lower().replace(" ", "_").replace("-", "_")
    if status not in ANSWER_STATUSES:
        raise AnswerFormatError(f"status must be one of {list(ANSWER_STATUSES)}, got {data.get('status')!r}")
    answer = data.get("answer")
    if status == "not_mentioned" and not answer:
        answer = NOT_MENTIONED
    if not isinstance(answer, str) or not answer.strip():
        raise AnswerFormatError("answer must be a non-empty string")
    return status, " ".join(answer.split())


def _try(raw: str) -> tuple[tuple[str, str] | None, str]:
    try:
        return parse_answer(raw), ""
    except AnswerFormatError as err:
        return None, str(err)


def answer_items(
    generate: Generate, items: Sequence[Item], batch_size: int, prompts: ExtractionPrompts | None = None
) -> Iterator[tuple[Item, Result]]:
    """One Result per item, yielded batch by batch in item order."""
    prompts = prompts or ExtractionPrompts.load()
    for start in range(0, len(items), batch_size):
        batch = list(items[start : start + batch_size])
        raws = generate([prompts.conversation(item) for item in batch])
        parsed = [_try(raw) for raw in raws]
        retry = [i for i, (answer, _) in enumerate(parsed) if answer is None]
        repaired = (
            dict(
                zip(
                    retry,
                    generate([prompts.repair_conversation(batch[i], raws[i], parsed[i][1]) for i in retry]),
                )
            )
            if retry
            else {}
        )
        for i, item in enumerate(batch):
            answer, error = parsed[i]
            if answer is not None:
                yield item, Result(answer[0], answer[1], {})
                continue
            second, second_error = _try(repaired[i])
            if second is not None:
                yield item, Result(second[0], second[1], {"repaired": True})
            else:
                yield (
                    item,
                    Result("error", "", {"raw": repaired[i], "first_raw": raws[i], "error": second_error}),
                )
