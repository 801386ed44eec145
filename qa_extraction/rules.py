"""The offline rules backend: sentence- and section-aware finding matching with negation and hedging.

Each question's ``rules:`` block in its YAML file (see prompts/questions/lung.yaml) says what a
mention of its finding looks like:

- ``terms``: patterns that always name the finding ("pleural effusion", "lymphadenopathy"); earlier
  terms rank first when the answer sentence is chosen;
- ``weak_terms`` + ``context``: patterns that name it only in a clause that also matches ``context``
  ("effusion" next to "pleural" or "hemithorax"; "encasement" next to an artery or vein);
- ``exclude``: text blanked before matching ("pericardial effusion" is not a pleural one);
- ``off_topic`` / ``on_topic``: a sentence about another organ (thyroid, liver, lymph node...) holds no
  mention unless it also matches ``on_topic``;
- ``negated_by``: question-specific negations that hold anywhere in the clause ("none pathologically
  enlarged", "patent");
- ``uncertain``: ``present`` (default) or ``absent``, how a hedged mention counts;
- ``not_mentioned_answer``: the answer written when the report says nothing.

The patterns are case-insensitive regular expressions matched on whole words. Per question, a report is
``present`` when a mention is affirmed, else when one is hedged (and ``uncertain: present``, the answer
then carries the hedge: its sentence is kept whole, and ``uncertain: true`` is added to the row), else
``absent`` when a mention is negated, else ``not_mentioned``. The answer is the report's own sentence
(sizes and sides included), chosen affirmed over hedged, then one that gives a size, then FINDINGS
before IMPRESSION, then by term rank. Generic cues (no, without, not seen, cannot be excluded...) live in
prompts/extraction/negex.yaml.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from qa_extraction.text import Clause, Lexicon, split_report
from vlsurv.errors import InputError
from vlsurv.prompts import Question

RULE_KEYS = (
    "terms",
    "weak_terms",
    "context",
    "exclude",
    "off_topic",
    "on_topic",
    "negated_by",
    "uncertain",
    "not_mentioned_answer",
)
DEFAULT_NOT_MENTIONED = "Not mentioned in the report."
RULES_MODEL = "rules-v1"
_SIZE = re.compile(r"\b\d+(?:\.\d+)?\s*(?:x\s*\d+(?:\.\d+)?\s*){0,2}(?:mm|cm)\b", re.I)


class RuleError(InputError):
    """A question's ``rules:`` block that the rules backend cannot use."""


def _words(patterns: list[str], key: str, where: str) -> re.Pattern | None:
    if not patterns:
        return None
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p.strip() for p in patterns):
        raise RuleError(f"{where}: rules.{key} must be a list of regular expressions")
    try:
        return re.compile("|".join(f"(?<!\\w)(?:{p})(?!\\w)" for p in patterns), re.I)
    except re.error as err:
        raise RuleError(f"{where}: rules.{key} holds a bad regular expression ({err})") from err


@dataclass(frozen=True)
class Mention:
    polarity: str  # "affirmed" | "uncertain" | "negated"
    rank: int  # index of the term that matched (weak terms after the terms)
    clause: Clause

    def sort_key(self) -> tuple:
        sentence = self.clause.sentence
        return (
            self.polarity != "affirmed",
            not _SIZE.search(sentence.text),
            sentence.section != "findings",
            self.rank,
            sentence.index,
        )


@dataclass(frozen=True)
class QuestionRule:
    """The compiled ``rules:`` block of one question."""

    question_id: str
    terms: tuple[re.Pattern, ...]
    weak_terms: tuple[re.Pattern, ...]
    context: re.Pattern | None
    exclude: re.Pattern | None
    off_topic: re.Pattern | None
    on_topic: re.Pattern | None
    negated_by: re.Pattern | None
    uncertain: str
    not_mentioned_answer: str

    @classmethod
    def from_question(cls, question: Question) -> QuestionRule:
        where = f"{question.source or 'questions'} (question {question.id!r})"
        rules = question.rules
        unknown = sorted(set(rules) - set(RULE_KEYS))
        if unknown:
            raise RuleError(f"{where}: unknown rules keys {unknown}; expected some of {list(RULE_KEYS)}")
        if not rules.get("terms") and not rules.get("weak_terms"):
            raise RuleError(
                f"{where}: the rules backend needs rules.terms (or rules.weak_terms with "
                "rules.context): the patterns that name the question's finding"
            )
        if rules.get("weak_terms") and not rules.get("context"):
            raise RuleError(f"{where}: rules.weak_terms needs rules.context")
        uncertain = rules.get("uncertain", "present")
        if uncertain not in ("present", "absent"):
            raise RuleError(f"{where}: rules.uncertain must be 'present' or 'absent', got {uncertain!r}")
        return cls(
            question.id,
            tuple(_words([p], "terms", where) for p in rules.get("terms") or []),
            tuple(_words([p], "weak_terms", where) for p in rules.get("weak_terms") or []),
            *(
                _words(rules.get(key) or [], key, where)
                for key in ("context", "exclude", "off_topic", "on_topic", "negated_by")
            ),
            uncertain,
            str(rules.get("not_mentioned_answer") or DEFAULT_NOT_MENTIONED),
        )

    def mentions(self, clause: Clause, lexicon: Lexicon) -> Iterator[Mention]:
        text = clause.text
        if self.exclude is not None:
            text = self.exclude.sub(lambda m: " " * len(m.group()), text)
        sentence = clause.sentence.text
        if (
            self.off_topic
            and self.off_topic.search(sentence)
            and not (self.on_topic and self.on_topic.search(sentence))
        ):
            return
        has_context = bool(self.context and self.context.search(text))
        patterns = list(self.terms) + (list(self.weak_terms) if has_context else [])
        cues = None
        for rank, pattern in enumerate(patterns):
            for match in pattern.finditer(text):
                cues = cues or lexicon.cues(text)
                polarity = cues.polarity(*match.span())
                if self.negated_by is not None and self.negated_by.search(text):
                    polarity = "negated"
                yield Mention(polarity, rank, clause)


@dataclass(frozen=True)
class RuleAnswer:
    status: str
    answer: str
    uncertain: bool = False


def _sentence_answer(text: str) -> str:
    text = text.strip(" ,;:-\u2022")
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "?", "!")) else text + "."


def decide(mentions: list[Mention], rule: QuestionRule) -> RuleAnswer:
    """The status and answer that a question's mentions in one report add up to."""
    affirmed = [m for m in mentions if m.polarity == "affirmed"]
    hedged = [m for m in mentions if m.polarity == "uncertain"]
    negated = [m for m in mentions if m.polarity == "negated"]
    if affirmed or (hedged and rule.uncertain == "present"):
        best = min(affirmed + hedged, key=Mention.sort_key)
        return RuleAnswer(
            "present", _sentence_answer(best.clause.sentence.text), best.polarity == "uncertain"
        )
    if negated or hedged:
        best = min(negated or hedged, key=lambda m: (m.rank, len(m.clause.sentence.text)))
        return RuleAnswer("absent", _sentence_answer(best.clause.sentence.text), bool(hedged and not negated))
    return RuleAnswer("not_mentioned", rule.not_mentioned_answer)


class RulesExtractor:
    """Answers every question of a question set for a report, offline and deterministically."""

    def __init__(self, questions: Iterable[Question], lexicon: Lexicon | None = None):
        self.questions = list(questions)
        self.rules = {q.id: QuestionRule.from_question(q) for q in self.questions}
        self.lexicon = lexicon or Lexicon.from_file()

    def answer(self, report: str) -> dict[str, RuleAnswer]:
        """{question_id: RuleAnswer} for one report's text."""
        clauses = [c for sentence in split_report(report) for c in self.lexicon.clauses(sentence)]
        return {
            qid: decide([m for c in clauses for m in rule.mentions(c, self.lexicon)], rule)
            for qid, rule in self.rules.items()
        }
