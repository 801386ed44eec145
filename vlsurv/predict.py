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

``vlsurv predict --model M --image PATH [--clinical JSON] [--encoder-checkpoint CKPT]`` predicts one NIfTI
file or DICOM folder through ``vlsurv.pipeline.SurvivalPipeline`` (the model's recorded encoder and
preprocessing) and prints its ``ScanPrediction`` as JSON; with ``--out`` it also writes the files above.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from collections.abc import Mapping, Sequence
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
from vlsurv.inference import ScanPrediction, load_model, predict_scans, resolve_device, validated_decoding
from vlsurv.jsonl import read_jsonl, to_line, write_jsonl
from vlsurv.model.ensemble import DecodeOptions, ScanInput
from vlsurv.model.model_config import Pool
from vlsurv.model.vlm import VisionLanguageSurvivalModel
from vlsurv.progress import progress_bar
from vlsurv.prompts import Question, load_questions

if TYPE_CHECKING:
    from vlsurv.encoders.cache import FeatureCache
    from vlsurv.pipeline import SurvivalPipeline

PREDICTIONS, ANSWERS, CURVES = "predictions.csv", "answers.jsonl", "survival_curves.csv"


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
    """Output folder (rerun to resume); optional with --image."""
    image: str = ""
    """One NIfTI file or DICOM folder instead of --manifest/--cache, encoded with the model's encoder."""
    clinical: str = ""
    """With --image: the clinical fields, as a JSON object or a .json file ({} when not given)."""
    encoder_checkpoint: str = ""
    """With --image: the encoder checkpoint the model was trained with (none for a random-init encoder)."""
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
        if self.image and (self.manifest or self.cache):
            raise PredictError("--image predicts one scan: give it without --manifest and --cache")

    def with_decoding(self, model: VisionLanguageSurvivalModel) -> PredictConfig:
        """``pool`` and ``max_new_tokens`` filled in (``validated_decoding``: given, else as training
        validated the model folder, else the defaults)."""
        pool, max_new_tokens = validated_decoding(self.model, model, self.pool, self.max_new_tokens)
        return dataclasses.replace(self, pool=pool, max_new_tokens=max_new_tokens)

    def decode_options(self) -> DecodeOptions:
        """Answer generation options (after ``with_decoding``)."""
        return DecodeOptions(self.generate, self.max_new_tokens, self.do_sample, self.temperature)

    def require(self, *fields: str, mode: str) -> None:
        """PredictError naming the first of ``fields`` that is empty."""
        for name in fields:
            if not getattr(self, name):
                raise PredictError(f"--{name.replace('_', '-')}: required to predict {mode}")


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


def _write_batch(
    out: Path, predictions: Sequence[ScanPrediction], questions: Sequence[Question], header: list[str]
) -> None:
    """Answers and curves first, predictions.csv last: a scan counts as done once its prediction row
    exists."""
    with (out / ANSWERS).open("a") as handle:
        for prediction in predictions:
            for question in questions:
                record = {
                    "scan_id": prediction.scan_id,
                    "question_id": question.id,
                    "question": question.text,
                    "answer": prediction.answers[question.id],
                    "risk": prediction.question_risks[question.id],
                }
                handle.write(to_line(record))
    curved = [p for p in predictions if p.survival is not None]
    if curved:
        curve_header = ["scan_id"] + [f"S@{t:.10g}" for t in curved[0].survival_times]
        _append_csv(out / CURVES, curve_header, [[p.scan_id, *p.survival] for p in curved])
    rows = [[p.scan_id, p.risk, *(p.question_risks[q.id] for q in questions)] for p in predictions]
    _append_csv(out / PREDICTIONS, header, rows)


def _open_output(config: PredictConfig, questions: Sequence[Question]) -> tuple[Path, list[str], set[str]]:
    """(output folder, predictions.csv header, scan_ids done by an earlier run); saves the resolved config."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "predict_config.yaml")
    header = ["scan_id", "risk"] + [f"risk_{q.id}" for q in questions]
    return out, header, _resume(out, header)


def predict(
    config: PredictConfig, model: VisionLanguageSurvivalModel | None = None, progress: bool = True
) -> Path:
    """Run the prompt ensemble over the manifest's split; returns the output folder (see module docstring)."""
    from vlsurv.encoders.cache import FeatureCache  # loads MONAI (~5 s); `vlsurv predict --help` does not

    config.require("manifest", "cache", "out", mode="a manifest's split (or give --image)")
    model = (model or load_model(config.model, resolve_device(config.device))).eval()
    config = config.with_decoding(model)
    cache = FeatureCache(config.cache)
    rows = _select_scans(config, cache)
    questions = load_questions(config.questions)
    out, header, done = _open_output(config, questions)
    todo = [row for _, row in rows.iterrows() if str(row["scan_id"]) not in done]
    generator = torch.Generator(device=model.language_model.get_input_embeddings().weight.device)
    generator.manual_seed(config.seed)
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
                    model.covariates_of(row.to_dict()),
                )
                for row in batch
            ]
            predictions = predict_scans(
                model, scans, questions, config.pool, config.decode_options(), generator
            )
            _write_batch(out, predictions, questions, header)
            bar.update(len(batch))
    return out


def read_clinical(text: str) -> dict:
    """``--clinical``: a JSON object, or a .json file holding one; {} for an empty string."""
    if not text.strip():
        return {}
    source = "--clinical"
    if not text.lstrip().startswith(("{", "[")):
        path = Path(text)
        if not path.is_file():
            raise PredictError(f"--clinical {text}: expected a JSON object or an existing .json file")
        source, text = str(path), path.read_text()
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as err:
        raise PredictError(f"{source}: not valid JSON ({err})") from err
    if not isinstance(fields, dict):
        raise PredictError(
            f"{source}: expected a JSON object of clinical fields, got {type(fields).__name__}"
        )
    return fields


def predict_image(
    config: PredictConfig, clinical: Mapping | None = None, pipeline: SurvivalPipeline | None = None
) -> ScanPrediction:
    """One scan (``config.image``) through ``SurvivalPipeline``; with ``config.out``, also written (and
    resumed) as predict writes a manifest's scans. ``clinical`` defaults to
    ``read_clinical(config.clinical)``."""
    from vlsurv.pipeline import SurvivalPipeline  # loads MONAI and the encoder only for --image

    config.require("model", "image", mode="one scan")
    pipeline = pipeline or SurvivalPipeline.from_config(config)
    prediction = pipeline(config.image, read_clinical(config.clinical) if clinical is None else clinical)
    if config.out:
        out, header, done = _open_output(pipeline.config, pipeline.questions)
        if prediction.scan_id not in done:
            _write_batch(out, [prediction], pipeline.questions, header)
    return prediction


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlsurv predict", description=__doc__.splitlines()[0])
    add_config_arguments(parser, PredictConfig, required=("model",))
    config = config_from_args(PredictConfig, parser.parse_args(argv))
    if config.image:
        print(json.dumps(dataclasses.asdict(predict_image(config)), indent=2))
        return 0
    out = predict(config)
    print(f"predictions written to {out / PREDICTIONS}")
    return 0
