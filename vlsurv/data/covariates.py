"""A clinical template's fields as numbers, with the encoding fitted on training rows.

One encoding serves the clinical-only CoxPH baseline (``vlsurv.baselines.features.covariate_design``) and
the survival head's clinical covariates (``survival.covariates``). Per field, learnt on the training rows:

- numbers as they are (a missing value: the training median);
- stage codes such as ``T2`` / ``N1`` / ``M0`` (one letter prefix, shared by every training value) as their
  number (missing: the median code);
- other categories one-hot against a reference level: the first of the template's listed words (``never``
  smoker), else the most frequent training level; the template's canonical word stands for each spelling
  (a flag's yes / TRUE / True for "true"), "missing" for a missing value, and a level not seen in training
  is all 0;
- a field constant over the training rows is left out.

``design(rows)`` gives those columns as they are (the baseline's CoxPH reads them); ``encode(row)`` gives one
row's (p,) float32 vector standardised with the training mean and sd of each column, which the survival head
reads as a linear term (``vlsurv.model.survival.SurvivalBranch``):

    log-risk = w . z_surv + b + beta . x   (DeepSurv),   logits = W z_surv + b + B x   (DeepHit).

The clinical sentence gives the decoder the same fields as text; a decoder must then carry "64 year-old"
through its pooled hidden state as a number, and a small one does not (README, "The risk and the clinical
fields"). The fitted encoding is saved with a model as ``clinical_covariates.json`` (``save`` / ``load``).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from vlsurv.data.clinical import (
    ClinicalTemplate,
    ClinicalTemplateError,
    FieldSpec,
    format_value,
    is_missing,
    load_template,
)

if TYPE_CHECKING:
    import torch

STAGE_CODE = re.compile(r"^([A-Za-z]*)(\d+)$")
MISSING_LEVEL = "missing"


@dataclass(frozen=True)
class Covariate:
    """One field's encoding: ``kind`` "number" or "code" (one column, ``fill`` for a missing value) or
    "levels" (one column per non-reference level); ``mean``/``sd`` per column over the training rows."""

    field: str
    kind: str
    fill: float = 0.0
    levels: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    sd: tuple[float, ...] = ()

    @property
    def columns(self) -> list[str]:
        return [f"{self.field}={level}" for level in self.levels] if self.kind == "levels" else [self.field]


def _raw(spec: FieldSpec, row: Mapping):
    """The row's value of a field (its first listed column that the row has and is not missing), or None."""
    return next((row[c] for c in spec.columns if c in row and not is_missing(row[c])), None)


def _number(value) -> float | None:
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _level(spec: FieldSpec, value) -> str:
    if value is None:
        return MISSING_LEVEL
    if spec.format == "flag":  # TRUE / True / yes / 1 are one level
        return str(format_value(spec, value, f"clinical field {spec.name!r}")).lower()
    text = str(value).strip()
    number = _number(text)
    text = str(int(number)) if number is not None and number.is_integer() else text
    canonical = {s: word for word, spellings in spec.values for s in (word, *spellings)}
    return canonical.get(text.lower(), text)


def _code(value) -> float | None:
    match = None if value is None else STAGE_CODE.match(str(value).strip())
    return None if match is None else float(match.group(2))


def _fit_field(name: str, spec: FieldSpec, values: list) -> Covariate | None:
    """The encoding of one field from its training values (None: missing); None when constant."""
    present = [v for v in values if v is not None]
    numbers = [_number(v) for v in present]
    if present and all(n is not None for n in numbers):
        covariate = Covariate(name, "number", fill=float(statistics.median(numbers)))
    else:
        matches = [STAGE_CODE.match(str(v).strip()) for v in present]
        if present and all(matches) and len({m.group(1) for m in matches}) == 1:
            covariate = Covariate(name, "code", fill=float(statistics.median(_code(v) for v in present)))
        else:
            counts = Counter(_level(spec, v) for v in values)
            listed = [word for word, _ in spec.values if word in counts]
            top = max(counts.values())
            reference = listed[0] if listed else sorted(w for w, c in counts.items() if c == top)[0]
            covariate = Covariate(name, "levels", levels=tuple(sorted(set(counts) - {reference})))
    columns = list(zip(*(_columns(covariate, spec, v) for v in values))) if values else []
    means = tuple(statistics.fmean(c) for c in columns)
    sds = tuple(statistics.pstdev(c) for c in columns)
    kept = [i for i, sd in enumerate(sds) if sd > 0]  # constant columns are left out
    if not kept:
        return None

    def pick(values: Sequence) -> tuple:
        return tuple(values[i] for i in kept)

    levels = pick(covariate.levels) if covariate.kind == "levels" else ()
    return replace(covariate, levels=levels, mean=pick(means), sd=pick(sds))


def _columns(covariate: Covariate, spec: FieldSpec, value) -> list[float]:
    """The raw design columns of one value under ``covariate``."""
    if covariate.kind == "levels":
        level = _level(spec, value)
        return [float(level == known) for known in covariate.levels]
    parsed = (_number if covariate.kind == "number" else _code)(value)
    return [covariate.fill if parsed is None else parsed]


class ClinicalCovariates:
    """Template fields -> design columns; ``fit`` on training rows, then ``design`` / ``encode`` any rows."""

    FILE_NAME = "clinical_covariates.json"

    def __init__(self, template: str | Path, covariates: Sequence[Covariate]) -> None:
        self.template = str(template)
        self.covariates = tuple(covariates)
        self._spec: ClinicalTemplate = load_template(self.template)
        self._mean = [m for c in self.covariates for m in c.mean]
        self._sd = [s for c in self.covariates for s in c.sd]

    @property
    def fields(self) -> list[str]:
        return [c.field for c in self.covariates]

    @property
    def columns(self) -> list[str]:
        """The p column names, e.g. ["age", "sex=male", "smoking=current", "smoking=former"]."""
        return [column for covariate in self.covariates for column in covariate.columns]

    @property
    def size(self) -> int:
        return len(self.columns)

    @classmethod
    def fit(
        cls,
        rows: Iterable[Mapping],
        template: str | Path,
        fields: Sequence[str] | None = None,
        where: str = "the training rows",
    ) -> ClinicalCovariates:
        """Fit ``fields`` (names of the template's fields; None: each field that some row has) on ``rows``.
        An unknown field, or a named field that no row has, raises ClinicalTemplateError naming it; a named
        field that is constant over the rows is left out, as is every such field of ``None``."""
        spec = load_template(template)
        rows = list(rows)
        named = fields is not None
        fields = list(dict.fromkeys(spec.fields if fields is None else fields))
        unknown = [name for name in fields if name not in spec.fields]
        if unknown:
            raise ClinicalTemplateError(
                f"survival.covariates: field {unknown[0]!r} is not in the clinical template "
                f"{spec.path.name}; expected some of {sorted(spec.fields)}"
            )
        covariates = []
        for name in fields:
            values = [_raw(spec.fields[name], row) for row in rows]
            if all(v is None for v in values):
                if named:
                    raise ClinicalTemplateError(
                        f"survival.covariates: field {name!r} (columns {list(spec.fields[name].columns)}) is "
                        f"missing in all {len(rows)} of {where}; expected a value in at least one"
                    )
                continue
            covariate = _fit_field(name, spec.fields[name], values)
            if covariate is not None:
                covariates.append(covariate)
        if not covariates:
            raise ClinicalTemplateError(
                f"clinical covariates: none of the fields {fields} of template {spec.path.name} varies over "
                f"the {len(rows)} rows of {where}; expected at least one that does"
            )
        return cls(template, covariates)

    def design_row(self, row: Mapping) -> list[float]:
        """The row's p design columns as they are (not standardised)."""
        return [
            x
            for c in self.covariates
            for x in _columns(c, self._spec.fields[c.field], _raw(self._spec.fields[c.field], row))
        ]

    def encode(self, row: Mapping) -> torch.Tensor:
        """(p,) float32: the design columns standardised with the training mean and sd."""
        import torch  # the CoxPH baseline (and `vlsurv demo --help`) use this module without torch

        raw = self.design_row(row)
        return torch.tensor([(x - m) / s for x, m, s in zip(raw, self._mean, self._sd)], dtype=torch.float32)

    def by_scan(self, rows: Iterable[Mapping]) -> dict[str, torch.Tensor]:
        """scan_id -> (p,) encoded covariates of manifest rows."""
        return {str(row["scan_id"]): self.encode(row) for row in rows}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / self.FILE_NAME
        state = {"template": self.template, "covariates": [asdict(c) for c in self.covariates]}
        path.write_text(json.dumps(state, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ClinicalCovariates:
        path = Path(directory) / cls.FILE_NAME
        try:
            state = json.loads(path.read_text())
            covariates = [
                Covariate(
                    c["field"], c["kind"], c["fill"], tuple(c["levels"]), tuple(c["mean"]), tuple(c["sd"])
                )
                for c in state["covariates"]
            ]
            template = state["template"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ClinicalTemplateError(
                f"{path}: cannot read the clinical covariates ({err}); expected the JSON that "
                "ClinicalCovariates.save writes"
            ) from err
        return cls(template, covariates)
