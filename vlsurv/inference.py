"""What `vlsurv predict` and the Python pipeline share: loading a model folder for inference, the decoding
settings training validated it with, and the prompt ensemble's output per scan (``ScanPrediction``).

Both paths call ``predict_scans`` on ``ScanInput``s, so a scan gets the same answers and risks whether it
comes from a manifest + feature cache or from a NIfTI / DICOM path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vlsurv.model.ensemble import DecodeOptions, ScanInput, score_shared_prefix
from vlsurv.model.model_config import Pool
from vlsurv.model.survival import survival_between_cuts
from vlsurv.model.vlm import VisionLanguageSurvivalModel
from vlsurv.prompts import Question
from vlsurv.training.checkpoints import read_selection

DEFAULT_MAX_NEW_TOKENS = 64


@dataclass
class ScanPrediction:
    """One scan's six answers (Q in general), each question's risk, their mean and, for DeepHit, S(t).

    ``survival`` (len T) is the mean over the questions of S at ``survival_times``
    (``DeepHitCuts.curve_times``), under the cuts' within-bin assumption; both None for DeepSurv.
    """

    scan_id: str
    answers: dict[str, str]
    question_risks: dict[str, float]
    risk: float
    survival_times: list[float] | None = None
    survival: list[float] | None = None


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; any other name as given."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def load_model(model_dir: str | Path, device: torch.device) -> VisionLanguageSurvivalModel:
    """``from_pretrained`` in eval mode, on ``device`` unless k-bit (bitsandbytes places those)."""
    model = VisionLanguageSurvivalModel.from_pretrained(model_dir)
    if model.config.quantization == "none":
        model.to(device)
    return model.eval()


def validated_decoding(
    model_dir: str | Path | None,
    model: VisionLanguageSurvivalModel,
    pool: Pool | None,
    max_new_tokens: int | None,
) -> tuple[Pool, int]:
    """(pool, max_new_tokens): the given values, else those training validated the model with (the folder's
    ``selection.json``), else the model's pool and DEFAULT_MAX_NEW_TOKENS."""
    selection = read_selection(model_dir) if model_dir and Path(model_dir).is_dir() else None
    scoring = (selection or {}).get("scoring", {})
    return (
        pool or model.config.pool,
        max_new_tokens or scoring.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
    )


def predict_scans(
    model: VisionLanguageSurvivalModel,
    scans: Sequence[ScanInput],
    questions: Sequence[Question],
    pool: Pool,
    options: DecodeOptions,
    generator: torch.Generator | None = None,
) -> list[ScanPrediction]:
    """The prompt ensemble (``score_shared_prefix``) over S scans x Q questions, one ScanPrediction per
    scan."""
    result = score_shared_prefix(
        model,
        scans,
        [q.text for q in questions],
        pool,
        options,
        generator,
        status_bias=model.status_bias_for([q.id for q in questions]),
        question_ids=[q.id for q in questions],
    )
    times = curves = None
    if result.survival_curves is not None:
        cuts = model.require_cuts()
        times = cuts.curve_times()
        curves = survival_between_cuts(result.survival_curves.double(), cuts, times).mean(1).tolist()
    return [
        ScanPrediction(
            scan_id=scan.scan_id,
            answers={q.id: answer for q, answer in zip(questions, answers)},
            question_risks={q.id: risk for q, risk in zip(questions, risks)},
            risk=risk,
            survival_times=None if times is None else times.tolist(),
            survival=None if curves is None else curves[i],
        )
        for i, (scan, risk, risks, answers) in enumerate(
            zip(scans, result.risks.mean(1).tolist(), result.risks.tolist(), result.answers)
        )
    ]
