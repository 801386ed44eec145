"""Report text -> sections -> sentences -> clauses, and the NegEx-style cues inside a clause.

``split_report(text)`` returns the report's ``Sentence`` s outside history / technique / comparison
sections, each cut into ``Clause`` s at the lexicon's terminators ("but", "however", ";" ...).
``Lexicon.from_file()`` reads ``prompts/extraction/negex.yaml``; ``Lexicon.cues(clause)`` finds where
negations, hedges and affirmations sit in a clause, and ``ClauseCues.polarity(start, end)`` says whether
a finding at ``[start, end)`` is negated, uncertain or affirmed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vlsurv.errors import InputError
from vlsurv.files import read_yaml
from vlsurv.prompts import PROMPTS_DIR

LEXICON_FILE = Path("extraction") / "negex.yaml"
LEXICON_KEYS = (
    "pre_negation",
    "post_negation",
    "pseudo_negation",
    "uncertainty",
    "affirmation",
    "normal_body",
    "terminators",
)

#: Headers whose sections describe the scan: FINDINGS (and text before any header) and the
#: IMPRESSION-like ones. A section under any other header (history, technique, comparison,
#: indication) is skipped, so that "evaluate for lung nodule" is not read as a finding.
_READ = (
    ("findings", "findings"),
    ("impression", "impression"),
    ("conclusion", "impression"),
    ("opinion", "impression"),
    ("result", "impression"),
    ("summary", "impression"),
)
_HEADER = re.compile(
    r"(?:^|(?<=[\n.]))\s*(findings|impressions?|conclusions?|opinion|results?|summary|technique|protocol|"
    r"clinical (?:history|information|indication|details)|history|indications?|comparison|reason for "
    r"(?:exam|study))"
    r"\s*:",
    re.I,
)
_SENTENCE_END = re.compile(r"\.\s+|[!?]\s+(?=[A-Z])|\n+|[\"\u201c\u201d\u2022]|\.$")
_ENUMERATOR = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*])\s*")
_LABEL = re.compile(r"^([A-Za-z][A-Za-z /&-]{0,40}?)\s*:\s*(?=\S)")
_ABBREVIATION = re.compile(r"\b(?:approx|e\.g|i\.e|vs|dr|no|fig|max|min|ca|cf|resp|incl)\s*$", re.I)


class LexiconError(InputError):
    """A cue lexicon file that is missing keys or holds a bad regular expression."""


@dataclass(frozen=True)
class Clause:
    text: str
    sentence: Sentence


@dataclass(frozen=True)
class Sentence:
    text: str
    section: str
    index: int


def _section_kind(header: str) -> str:
    """'findings', 'impression' or 'skip' for a section header."""
    header = header.lower()
    return next((kind for prefix, kind in _READ if header.startswith(prefix)), "skip")


def _sections(text: str) -> list[tuple[str, str]]:
    """[(kind, text)] in report order; text before the first header counts as findings."""
    parts, last, kind = [], 0, "findings"
    for match in _HEADER.finditer(text):
        parts.append((kind, text[last : match.start()]))
        kind, last = _section_kind(match.group(1)), match.end()
    parts.append((kind, text[last:]))
    return [(kind, body) for kind, body in parts if body.strip()]


def split_sentences(text: str) -> list[str]:
    """Sentences of a text: split at a full stop before a space (not after an abbreviation), '!' or '?'
    before a capital, line breaks, quotes and bullets; list numbers ("2.") are dropped."""
    pieces, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if match.group().startswith(".") and _ABBREVIATION.search(text[start : match.start()]):
            continue
        end = match.start() + (1 if match.group()[:1] in ".!?" else 0)
        pieces.append(text[start:end])
        start = match.end()
    pieces.append(text[start:])
    pieces = [_ENUMERATOR.sub("", " ".join(piece.split())) for piece in pieces]
    return [piece for piece in pieces if re.search(r"[^\W\d]", piece)]


def split_report(text: str) -> list[Sentence]:
    """The report's sentences that describe the scan, tagged with their section."""
    sentences: list[Sentence] = []
    for kind, body in _sections(text):
        if kind == "skip":
            continue
        for sentence in split_sentences(body):
            sentences.append(Sentence(sentence, kind, len(sentences)))
    return sentences


@dataclass(frozen=True)
class ClauseCues:
    """Character spans of the cues found in one clause."""

    pre: tuple[int, ...]  # end offsets of pre-negation cues
    post: tuple[int, ...]  # start offsets of post-negation cues
    affirmations: tuple[tuple[int, int], ...]
    uncertain: bool

    def polarity(self, start: int, end: int) -> str:
        """'negated', 'uncertain' or 'affirmed' for a finding at ``[start, end)`` of the clause."""
        if any(cue <= start for cue in self.pre):
            return "negated"
        for cue in self.post:
            if cue >= end and not any(
                end <= a_start and a_end <= cue for a_start, a_end in self.affirmations
            ):
                return "negated"
        return "uncertain" if self.uncertain else "affirmed"


def _compile(patterns: list[str], key: str, source: str) -> re.Pattern:
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
        raise LexiconError(f"{source}: '{key}' must be a list of regular expressions")
    try:
        return re.compile("|".join(f"(?:{p})" for p in patterns), re.I)
    except re.error as err:
        raise LexiconError(f"{source}: '{key}' holds a bad regular expression ({err})") from err


def _spans(pattern: re.Pattern, text: str) -> list[tuple[int, int]]:
    return [m.span() for m in pattern.finditer(text) if m.end() > m.start()]


def _inside(span: tuple[int, int], blocks: list[tuple[int, int]]) -> bool:
    return any(b_start <= span[0] < b_end or b_start < span[1] <= b_end for b_start, b_end in blocks)


@dataclass(frozen=True)
class Lexicon:
    pre_negation: re.Pattern
    post_negation: re.Pattern
    pseudo_negation: re.Pattern
    uncertainty: re.Pattern
    affirmation: re.Pattern
    normal_body: re.Pattern
    terminators: re.Pattern

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> Lexicon:
        path = Path(path) if path is not None else PROMPTS_DIR / LEXICON_FILE
        if not path.is_file():
            raise LexiconError(f"cue lexicon {path} not found; expected a YAML file with keys {LEXICON_KEYS}")
        data = read_yaml(path, LexiconError) or {}
        missing = [key for key in LEXICON_KEYS if key not in data]
        if missing:
            raise LexiconError(f"{path}: missing keys {missing}; expected {LEXICON_KEYS}")
        return cls(**{key: _compile(data[key], key, str(path)) for key in LEXICON_KEYS})

    def clauses(self, sentence: Sentence) -> list[Clause]:
        """The sentence cut at the terminators (which are dropped). A leading short label ("PLEURA:") is a
        clause of its own, written as "no <label>" when its body is a negation or a normal finding."""
        text, label = sentence.text, _LABEL.match(sentence.text)
        clauses = []
        if label and len(label.group(1).split()) <= 4:
            text = text[label.end() :]
            body = text.lstrip()
            negative = self.pre_negation.match(body) or self.normal_body.match(body)
            clauses.append(Clause(("no " if negative else "") + label.group(1), sentence))
        pieces = self.terminators.split(text)
        return clauses + [Clause(piece, sentence) for piece in pieces if piece and re.search(r"\w", piece)]

    def cues(self, clause: str) -> ClauseCues:
        hedges = _spans(self.uncertainty, clause)
        blocks = hedges + _spans(self.pseudo_negation, clause)
        pre = tuple(
            end for start, end in _spans(self.pre_negation, clause) if not _inside((start, end), blocks)
        )
        post = tuple(
            start for start, end in _spans(self.post_negation, clause) if not _inside((start, end), blocks)
        )
        return ClauseCues(pre, post, tuple(_spans(self.affirmation, clause)), bool(hedges))
