"""`vlsurv predict`: six answers and a risk per scan (the paper's prompt ensemble), written as they are done.

For each scan of the manifest's split: the clinical sentence (``clinical_sentence(row, template)``), the
image tokens from the feature cache, and the questions of ``prompts/questions/<set>.yaml``. Scans are batched
and scored with the shared-prefix path (``vlsurv.model.ensemble.score_shared_prefix``): the clinical sentence
and image tokens run once per scan, the decoder's KV cache is repeated over the questions. The scan's risk is
the mean of its question risks. Unset decoding options (``max_new_tokens``, ``pool``) take what training
validated the model with (``selection.json`` in a model folder written by training), so that predict scores as
validation did.

Outputs in OUT (appended scan by scan; a rerun skips the scan_ids already in predictions.csv):
- ``predictions.csv``: scan_id, risk, risk_<question_id> per question;
- ``answers.jsonl``: one line per (scan, question): scan_id, question_id, question, answer, risk;
- ``survival_curves.csv`` (DeepHit): scan_id, ``S@<time>`` at ``DeepHitCuts.curve_times()`` (within each bin
  as the cuts' censoring scheme assumes, ``survival_between_cuts``), mean over the questions;
- ``predict_config.yaml``: the resolved options.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pandas as pd
import torch

from vlsurv.config import add_config_arguments, bounded, check_fields, config_from_args, save_config
from vlsurv.data.clinical import sentence_function
from vlsurv.data.datasets import split_rows
from vlsurv.data.manifest import load_manifest
from vlsurv.errors import InputError
from vlsurv.files import cut_torn_last_line
from vlsurv.jsonl import read_jsonl, to_line, write_jsonl
from vlsurv.model.ensemble import DecodeOptions, EnsembleOutput, ScanInput, score_shared_prefix
from vlsurv.model.survival import survival_between_cuts
from vlsurv.model.vlm import Pool, VisionLanguageSurvivalModel
from vlsurv.progress import progress_bar
from vlsurv.prompts import load_questions
from vlsurv.training.checkpoints import read_selection

if TYPE_CHECKING:
    from vlsurv.encoders.cache import FeatureCache

PREDICTIONS, ANSWERS, CURVES = "predictions.csv", "answers.jsonl", "survival_curves.csv"
DEFAULT_MAX_NEW_TOKENS = 64


class PredictError(InputError):
    """Inputs or earlier outputs that `vlsurv predict` cannot work with."""


@dataclass
class PredictConfig:
    """Options of `vlsurv predict` (the command's options are these fields)."""

    model: str = ""
    """Model folder written by save_pretrained (training)."""
    manifest: str = ""
    """Cohort manifest (CSV or JSONL)."""
    cache: str = ""
    """Feature cache folder (vlsurv encode)."""
    out: str = ""
    """Output folder (rerun to resume)."""
    pool: Pool | None = None
    """Pooling for the risk; null = the model's."""
    generate: bool = True
    """Generate answers."""
    questions: str = "lung"
    """Question set name or YAML path."""
    split: Literal["train", "val", "test", "all"] = "test"
    """Manifest split to predict."""
    batch_scans: int = bounded(8, ge=1)
    """Scans per batch (x questions sequences)."""
    max_new_tokens: int | None = bounded(None, ge=1)
    """Answer length cap; null = the model folder's validation setting, else 64 (DEFAULT_MAX_NEW_TOKENS)."""
    do_sample: bool = False
    """Sample answers instead of greedy decoding."""
    temperature: float = bounded(1.0, gt=0.0)
    """Sampling temperature."""
    seed: int = 0
    """Seed of the answer sampling."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:1, ..."""
    clinical_missing_warn: float = bounded(0.2, ge=0.0, le=1.0, what="a fraction")
    """Warn when more than this fraction of the scans lack a field of the clinical template."""

    def __post_init__(self) -> None:
        check_fields(self)


def resolve_decoding(config: PredictConfig, model: VisionLanguageSurvivalModel) -> PredictConfig:
    """``config`` with ``pool`` and ``max_new_tokens`` filled in: given values, else the settings the model
    was validated with (its folder's ``selection.json``), else the model's pool and DEFAULT_MAX_NEW_TOKENS."""
    selection = read_selection(config.model) if config.model and Path(config.model).is_dir() else None
    scoring = (selection or {}).get("scoring", {})
    return dataclasses.replace(
        config,
        pool=config.pool or model.config.pool,
        max_new_tokens=config.max_new_tokens or scoring.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
    )


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _select_scans(config: PredictConfig, cache: FeatureCache) -> pd.DataFrame:
    manifest = load_manifest(config.manifest, require_survival=False, check_files=False)
    where = f"{config.manifest} with feature cache {config.cache}"
    return split_rows(manifest, config.split, cache, where, PredictError)


def _resume(out: Path, header: list[str]) -> set[str]:
    """scan_ids finished by an earlier run; drops their partial answer/curve lines of unfinished scans."""
    path = out / PREDICTIONS
    if not path.is_file():
        for name in (ANSWERS, CURVES):
            (out / name).unlink(missing_ok=True)
        return set()
    for name in (PREDICTIONS, ANSWERS, CURVES):
        cut_torn_last_line(out / name)
    done = pd.read_csv(path, dtype={"scan_id": str})
    if list(done.columns) != header:
        raise PredictError(
            f"{path}: columns {list(done.columns)} differ from this run's {header} (another question set?); "
            "use a new --out"
        )
    finished = set(done["scan_id"])
    answers = out / ANSWERS
    if answers.is_file():
        rows = [
            row for row in read_jsonl(answers, ("scan_id",), PredictError) if str(row["scan_id"]) in finished
        ]
        write_jsonl(answers, rows)
    curves = out / CURVES
    if curves.is_file():
        frame = pd.read_csv(curves, dtype={"scan_id": str})
        frame[frame["scan_id"].isin(finished)].to_csv(curves, index=False)
    return finished


def _append_csv(path: Path, header: list[str], rows: list[list]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(header)
        writer.writerows(rows)


def _write_batch(out: Path, scans: list[ScanInput], questions, result: EnsembleOutput, cuts, header) -> None:
    """Answers and curves first, predictions.csv last: a scan counts as done once its prediction row
    exists."""
    with (out / ANSWERS).open("a") as handle:
        for scan, risks, answers in zip(scans, result.risks.tolist(), result.answers):
            for question, risk, answer in zip(questions, risks, answers):
                record = {
                    "scan_id": scan.scan_id,
                    "question_id": question.id,
                    "question": question.text,
                    "answer": answer,
                    "risk": risk,
                }
                handle.write(to_line(record))
    if result.survival_curves is not None:
        times = cuts.curve_times()
        curve_header = ["scan_id"] + [f"S@{t:.10g}" for t in times.tolist()]
        curves = survival_between_cuts(result.survival_curves.double(), cuts, times).mean(1).tolist()
        _append_csv(out / CURVES, curve_header, [[s.scan_id, *c] for s, c in zip(scans, curves)])
    scan_risks = result.risks.mean(1).tolist()
    rows = [[s.scan_id, r, *q] for s, r, q in zip(scans, scan_risks, result.risks.tolist())]
    _append_csv(out / PREDICTIONS, header, rows)


def predict(
    config: PredictConfig, model: VisionLanguageSurvivalModel | None = None, progress: bool = True
) -> Path:
    """Run the prompt ensemble over the manifest's split; returns the output folder (see module docstring)."""
    from vlsurv.encoders.cache import FeatureCache  # loads MONAI (~5 s); `vlsurv predict --help` does not

    device = _device(config.device)
    if model is None:
        model = VisionLanguageSurvivalModel.from_pretrained(config.model)
        if model.config.quantization == "none":
            model.to(device)
    model.eval()
    config = resolve_decoding(config, model)
    cache = FeatureCache(config.cache)
    rows = _select_scans(config, cache)
    questions = load_questions(config.questions)
    pool = config.pool
    options = DecodeOptions(config.generate, config.max_new_tokens, config.do_sample, config.temperature)
    cuts = model.require_cuts() if model.config.survival.head == "deephit" else None
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "predict_config.yaml")
    header = ["scan_id", "risk"] + [f"risk_{q.id}" for q in questions]
    done = _resume(out, header)
    todo = [row for _, row in rows.iterrows() if str(row["scan_id"]) not in done]
    generator = torch.Generator(device=model.language_model.get_input_embeddings().weight.device)
    generator.manual_seed(config.seed)
    texts = [q.text for q in questions]
    clinical = sentence_function(
        rows.to_dict("records"),
        model.config.clinical_template,
        max_missing_fraction=config.clinical_missing_warn,
        where=f"manifest {config.manifest}",
        option="clinical_missing_warn",
    )
    with progress_bar(
        total=len(rows), initial=len(rows) - len(todo), desc="predict", unit="scan", enabled=progress
    ) as bar:
        for start in range(0, len(todo), config.batch_scans):
            batch = todo[start : start + config.batch_scans]
            scans = [
                ScanInput(
                    str(row["scan_id"]),
                    clinical(row.to_dict()),
                    cache.get(str(row["scan_id"])),
                )
                for row in batch
            ]
            result = score_shared_prefix(model, scans, texts, pool, options, generator)
            _write_batch(out, scans, questions, result, cuts, header)
            bar.update(len(batch))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlsurv predict", description=__doc__.splitlines()[0])
    add_config_arguments(parser, PredictConfig, required=("model", "manifest", "cache", "out"))
    config = config_from_args(PredictConfig, parser.parse_args(argv))
    out = predict(config)
    print(f"predictions written to {out / PREDICTIONS}")
    return 0
