"""The ``rules`` backend: qa_extraction.rules on each report, no model, no network."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from qa_extraction.llm import Item, Result
from qa_extraction.rules import RULES_MODEL, RulesExtractor
from vlsurv.prompts import Question


class RulesBackend:
    name = "rules"
    model = RULES_MODEL

    def __init__(self, questions: Sequence[Question]):
        self.extractor = RulesExtractor(questions)

    def run(self, items: Sequence[Item]) -> Iterator[tuple[Item, Result]]:
        """Items of one report are answered from one pass over it (items arrive grouped by report)."""
        answers, current = {}, None
        for item in items:
            if item.report.id != current:
                current, answers = item.report.id, self.extractor.answer(item.report.text)
            answer = answers[item.question.id]
            yield item, Result(answer.status, answer.answer, {"uncertain": True} if answer.uncertain else {})
