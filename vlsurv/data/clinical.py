"""Clinical table row -> one sentence of clinical context, from a template file in prompts/clinical/.

``clinical_sentence(row, template="lung")`` renders ``prompts/clinical/<template>.yaml`` (or a path
to such a file) for a mapping such as a manifest row. The file's format is described in its own
header comment; a part or clause whose field is missing (None, NaN, "", "nan", "None") is dropped,
so the sentence never prints "nan" or "None".

``missing_field_fractions(rows, template)`` gives, per field, the fraction of the rows that need it and lack
it; ``warn_missing_fields`` warns (``MissingClinicalFieldsWarning``) with the field names, their columns and
fractions when one exceeds ``max_fraction``, never with row values or report text. ``sentence_function``
does that check once for a run's rows and returns the per-row sentence function.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from vlsurv.errors import InputError
from vlsurv.files import read_yaml
from vlsurv.prompts import PROMPTS_DIR

_FORMATS = ("int", "text", "decimal", "flag")
_MISSING_STRINGS = {"", "nan", "none", "null", "na", "<na>", "nat"}
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}
_PLACEHOLDER = re.compile(r"{(\w+)}")
DEFAULT_MAX_MISSING_FRACTION = 0.2


class ClinicalTemplateError(InputError):
    """An unknown or malformed clinical template, or a row value the template cannot write."""


class MissingClinicalFieldsWarning(UserWarning):
    """More than the set fraction of rows lack some of a clinical template's fields."""


@dataclass(frozen=True)
class FieldSpec:
    name: str
    columns: tuple[str, ...]
    format: str = "text"
    decimals: int = 1
    prefix: str = ""
    values: tuple[tuple[str, tuple[str, ...]], ...] = ()  # canonical word -> accepted spellings
    words: tuple[tuple[bool, str], ...] = ()  # flag value -> text


@dataclass(frozen=True)
class Clause:
    parts: tuple[str, ...]
    when: tuple[tuple[str, bool], ...] = ()


@dataclass(frozen=True)
class ClinicalTemplate:
    path: Path
    fields: dict[str, FieldSpec]
    head: tuple[str, ...]
    clauses: tuple[Clause, ...]
    article: bool = False


def available_templates() -> list[str]:
    return sorted(path.stem for path in (PROMPTS_DIR / "clinical").glob("*.yaml"))


def _template_path(template: str | Path) -> Path:
    path = Path(template)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ClinicalTemplateError(f"clinical template file {path} does not exist")
        return path
    path = PROMPTS_DIR / "clinical" / f"{template}.yaml"
    if not path.is_file():
        raise ClinicalTemplateError(
            f"unknown clinical template {str(template)!r}: expected one of {available_templates()} "
            f"(files in {PROMPTS_DIR / 'clinical'}) or a path to a .yaml template"
        )
    return path


def _parse_field(name: str, spec: Any, path: Path) -> FieldSpec:
    where = f"{path}: field {name!r}"
    if not isinstance(spec, dict) or not spec.get("columns"):
        raise ClinicalTemplateError(f"{where}: expected a mapping with a non-empty 'columns' list")
    unknown = set(spec) - {"columns", "format", "decimals", "prefix", "values", "words"}
    if unknown:
        raise ClinicalTemplateError(f"{where}: unknown keys {sorted(unknown)}")
    fmt = spec.get("format", "text")
    if fmt not in _FORMATS:
        raise ClinicalTemplateError(f"{where}: format must be one of {list(_FORMATS)}, got {fmt!r}")
    values = tuple(
        (str(word), tuple(str(s).lower() for s in spellings))
        for word, spellings in (spec.get("values") or {}).items()
    )
    words = tuple((bool(flag), str(text)) for flag, text in (spec.get("words") or {}).items())
    return FieldSpec(
        name=name,
        columns=tuple(str(c) for c in spec["columns"]),
        format=fmt,
        decimals=int(spec.get("decimals", 1)),
        prefix=str(spec.get("prefix", "")),
        values=values,
        words=words,
    )


def _parse_clause(item: Any, fields: dict[str, FieldSpec], path: Path) -> Clause:
    if isinstance(item, str):
        clause = Clause(parts=(item,))
    elif isinstance(item, dict) and isinstance(item.get("parts"), list) and set(item) <= {"parts", "when"}:
        clause = Clause(
            parts=tuple(str(p) for p in item["parts"]),
            when=tuple((str(k), bool(v)) for k, v in (item.get("when") or {}).items()),
        )
    else:
        raise ClinicalTemplateError(
            f"{path}: clause {item!r}: expected a string or a mapping with 'parts' "
            f"(a list) and optional 'when'"
        )
    for name in [n for part in clause.parts for n in _PLACEHOLDER.findall(part)] + [
        n for n, _ in clause.when
    ]:
        if name not in fields:
            raise ClinicalTemplateError(
                f"{path}: clause {item!r} names field {name!r}, which is not under 'fields'"
            )
    for name in (n for part in clause.parts for n in _PLACEHOLDER.findall(part)):
        if fields[name].format == "flag" and {flag for flag, _ in fields[name].words} != {True, False}:
            raise ClinicalTemplateError(
                f"{path}: flag field {name!r} is written in a clause, so it needs "
                f"'words' for both true and false"
            )
    for name, _ in clause.when:
        if fields[name].format != "flag":
            raise ClinicalTemplateError(
                f"{path}: clause {item!r}: 'when' field {name!r} must have format flag"
            )
    return clause


@functools.lru_cache(maxsize=16)
def load_template(template: str | Path) -> ClinicalTemplate:
    """Read and validate a clinical template by name ("lung", "pe") or path."""
    path = _template_path(template)
    raw = read_yaml(path, ClinicalTemplateError)
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("fields"), dict)
        or not isinstance(raw.get("clauses"), list)
    ):
        raise ClinicalTemplateError(
            f"{path}: expected a mapping with 'fields' (a mapping) and 'clauses' (a list)"
        )
    fields = {str(name): _parse_field(str(name), spec, path) for name, spec in raw["fields"].items()}
    head = tuple(_parse_clause(str(part), fields, path).parts[0] for part in raw.get("head") or ())
    clauses = tuple(_parse_clause(item, fields, path) for item in raw["clauses"])
    return ClinicalTemplate(
        path=path, fields=fields, head=head, clauses=clauses, article=bool(raw.get("article"))
    )


def is_missing(value: Any) -> bool:
    """None, NaN, pandas NA / NaT, or a blank / "nan" / "None" string."""
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip().lower() in _MISSING_STRINGS
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # not a scalar
        return False


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def format_value(spec: FieldSpec, value: Any, where: str) -> str | bool:
    """The text of ``value`` under ``spec``; a flag gives a bool."""
    if spec.format == "flag":
        key = (
            str(int(value))
            if isinstance(value, (bool, int, float)) and _number(value) is not None
            else str(value)
        )
        key = key.strip().lower()
        if key not in _TRUE | _FALSE:
            raise ClinicalTemplateError(f"{where}: expected a yes/no flag (1/0, true/false), got {value!r}")
        return key in _TRUE
    if spec.format in ("int", "decimal"):
        number = _number(value)
        if number is None:
            raise ClinicalTemplateError(f"{where}: expected a number, got {value!r}")
        return str(int(round(number))) if spec.format == "int" else f"{number:.{spec.decimals}f}"
    number = _number(value)
    text = str(int(number)) if number is not None and number.is_integer() else str(value).strip()
    if spec.values:
        for word, spellings in spec.values:
            if text.lower() in spellings:
                return word
        accepted = ", ".join(word for word, _ in spec.values)
        raise ClinicalTemplateError(
            f"{where}: expected one of {accepted} (or a listed spelling), got {value!r}"
        )
    if spec.prefix:
        return spec.prefix + (
            text[len(spec.prefix) :] if text.upper().startswith(spec.prefix.upper()) else text
        )
    return text


def _row_id(row: Mapping) -> str:
    for key in ("scan_id", "patient_id", "impression_id", "id"):
        if key in row and not is_missing(row[key]):
            return f"row {row[key]}"
    return "row"


def clinical_values(template: ClinicalTemplate, row: Mapping) -> dict[str, str | bool]:
    """The written value of each template field the row has (a flag as a bool); missing fields are left
    out."""
    values: dict[str, str | bool] = {}
    for name, spec in template.fields.items():
        column = next((c for c in spec.columns if c in row and not is_missing(row[c])), None)
        if column is not None:
            where = f"{template.path.name}: {_row_id(row)}, column {column!r} (field {name!r})"
            values[name] = format_value(spec, row[column], where)
    return values


def _render(part: str, values: dict[str, str | bool], fields: dict[str, FieldSpec]) -> str | None:
    """``part`` with its placeholders filled, or None when one of their values is missing."""
    names = _PLACEHOLDER.findall(part)
    if any(name not in values for name in names):
        return None

    def text(match: re.Match) -> str:
        value = values[match.group(1)]
        return dict(fields[match.group(1)].words)[value] if isinstance(value, bool) else value

    return _PLACEHOLDER.sub(text, part)


def _article(head: str) -> str:
    """ "A" or "An" by the sound of the head's first word ("An 81-year-old", "A 61-year-old")."""
    first = re.split(r"[\s-]", head, maxsplit=1)[0].lower()
    vowel_sound = first[:1] in "aeio" or (
        first.isdigit() and (first.startswith("8") or first in ("11", "18"))
    )
    return "An" if vowel_sound else "A"


def clinical_sentence(row: Mapping, template: str | Path = "lung") -> str:
    """One sentence of clinical context for ``row`` (a mapping of column -> value) from ``template``."""
    spec = load_template(template)
    values = clinical_values(spec, row)
    head = " ".join(text for text in (_render(part, values, spec.fields) for part in spec.head) if text)
    clauses = []
    for clause in spec.clauses:
        if any(values.get(name) is not flag for name, flag in clause.when):
            continue
        parts = [text for text in (_render(part, values, spec.fields) for part in clause.parts) if text]
        if parts:
            clauses.append(" ".join(parts))
    if head and spec.article:
        head = f"{_article(head)} {head}"
    text = ", ".join(([head] if head else []) + clauses)
    return text[:1].upper() + text[1:] + "." if text else ""


def _needed_fields(spec: ClinicalTemplate, values: dict[str, str | bool]) -> set[str]:
    """Fields the sentence of a row with ``values`` would use: head fields, ``when`` fields, and the fields
    of the clauses whose ``when`` holds (a "pe_acute" is not needed when "pe_positive" is false)."""
    needed = {name for part in spec.head for name in _PLACEHOLDER.findall(part)}
    for clause in spec.clauses:
        needed.update(name for name, _ in clause.when)
        if all(values.get(name) is flag for name, flag in clause.when):
            needed.update(name for part in clause.parts for name in _PLACEHOLDER.findall(part))
    return needed


def missing_field_fractions(rows: Iterable[Mapping], template: str | Path) -> tuple[dict[str, float], int]:
    """(field -> fraction of the rows needing the field that lack a value in all its columns, number of
    rows)."""
    spec = load_template(template)
    needing = dict.fromkeys(spec.fields, 0)
    lacking = dict.fromkeys(spec.fields, 0)
    count = 0
    for row in rows:
        count += 1
        values = clinical_values(spec, row)
        for name in _needed_fields(spec, values):
            needing[name] += 1
            lacking[name] += name not in values
    return {name: lacking[name] / needing[name] for name in spec.fields if needing[name]}, count


def check_max_missing_fraction(value: float, option: str) -> float:
    """``value`` when it is a fraction in [0, 1]; else ClinicalTemplateError naming ``option``."""
    if not 0.0 <= value <= 1.0:
        raise ClinicalTemplateError(f"{option}: expected a fraction between 0 and 1, got {value!r}")
    return value


def warn_missing_fields(
    rows: Iterable[Mapping],
    template: str | Path,
    *,
    max_fraction: float = DEFAULT_MAX_MISSING_FRACTION,
    where: str = "",
    option: str = "max_fraction",
) -> dict[str, float]:
    """Warn once when more than ``max_fraction`` of the rows lack a field of ``template``; return those
    fields.

    The warning names the template, ``where`` (e.g. the manifest), each such field with its columns and
    fraction; it never holds a row value or report text. ``option`` names the threshold in errors.
    """
    check_max_missing_fraction(max_fraction, option)
    spec = load_template(template)
    fractions, count = missing_field_fractions(rows, template)
    over = {name: fraction for name, fraction in fractions.items() if fraction > max_fraction}
    if over:
        listed = "; ".join(
            f"{name} {fraction:.0%} (columns {', '.join(spec.fields[name].columns)})"
            for name, fraction in over.items()
        )
        place = f"{where}: " if where else ""
        warnings.warn(
            f"{place}clinical template {spec.path.name}: {len(over)} field(s) missing in more than "
            f"{max_fraction:.0%} of the {count} rows that need them: {listed}; those parts of the "
            f"clinical sentence are left out",
            MissingClinicalFieldsWarning,
            stacklevel=2,
        )
    return over


def sentence_function(
    rows: Iterable[Mapping],
    template: str | Path,
    *,
    max_missing_fraction: float = DEFAULT_MAX_MISSING_FRACTION,
    where: str = "",
    option: str = "max_missing_fraction",
) -> Callable[[Mapping], str]:
    """Check ``rows`` once (``warn_missing_fields``), then return ``row -> clinical_sentence(row,
    template)``."""
    warn_missing_fields(rows, template, max_fraction=max_missing_fraction, where=where, option=option)
    return functools.partial(clinical_sentence, template=template)
