"""Inputs of the baselines: the CoxPH covariate design, clinical-sentence embeddings and pooled image tokens.

- ``covariate_design(train, rows, template)`` -> (N, P) float frame: the clinical template's fields encoded
  as ``vlsurv.data.covariates`` says (numbers as they are, stage codes such as ``T2`` as their number, other
  categories one-hot against a reference level; constant train columns dropped), learnt on ``train``.
- ``text_features(sentences, encoder)`` -> (N, H): masked mean of a local HF encoder's last hidden state.
- ``image_features(cache, scan_ids)`` -> (N, C): the cached tokens (T, C) of each scan, averaged over T.
- ``split_fingerprint(manifest)``: a hash of every (scan_id, split), so runs on different splits are told
  apart.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from vlsurv.data.clinical import load_template
from vlsurv.data.covariates import ClinicalCovariates
from vlsurv.errors import InputError

MODALITIES = ("text", "image", "both")


class BaselineError(InputError):
    """A baseline input that cannot be used (the message names the file, option or modality)."""


def covariate_design(train: pd.DataFrame, rows: pd.DataFrame, template: str | Path) -> pd.DataFrame:
    """(N, P) design of ``rows`` with the encoding learnt on ``train`` (``ClinicalCovariates`` over every
    field of the template that the train rows have; see ``vlsurv.data.covariates``)."""
    spec = load_template(template)
    if not any(c in train.columns for field in spec.fields.values() for c in field.columns):
        expected = sorted({c for field in spec.fields.values() for c in field.columns})
        raise BaselineError(
            f"CoxPH: the manifest has none of the clinical columns of template {template!r}; expected "
            f"some of {expected}, found {list(train.columns)}"
        )
    covariates = ClinicalCovariates.fit(train.to_dict("records"), template, where="the train rows")
    design = [covariates.design_row(row) for row in rows.to_dict("records")]
    return pd.DataFrame(design, index=rows.index, columns=covariates.columns, dtype=float)


def resolve_text_encoder(path: str | Path | None) -> Path:
    """``path`` (default: the packaged all-MiniLM-L6-v2) checked to be a local Hugging Face model folder."""
    from vlsurv.metrics_text import default_bertscore_model

    folder = default_bertscore_model() if path is None else Path(path).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise BaselineError(
            f"text_encoder: {folder} does not exist or is not a local Hugging Face model folder (expected a "
            "directory with config.json, tokenizer and weights, e.g. Merlin's Clinical-Longformer)"
        )
    return folder


def text_features(sentences: list[str], encoder: str | Path | None, batch_size: int = 32) -> np.ndarray:
    """(N, H) masked mean over tokens of the encoder's last hidden state (sentence-transformers pooling)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_text_encoder(encoder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    limit = min(int(getattr(tokenizer, "model_max_length", 512)), 4096)
    pooled = []
    with torch.no_grad():
        for start in range(0, len(sentences), batch_size):
            batch = tokenizer(
                sentences[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=limit,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))
    return torch.cat(pooled).numpy().astype(np.float64)


def image_features(
    cache: str | Path | None, scan_ids: list[str], modality: str, tte_model: str | Path | None = None
) -> np.ndarray:
    """(N, C) mean over the T cached tokens of each scan, or with ``tte_model`` (the ``final`` folder of a
    tte_pretrain run) its TTE-pretrained features (N, d) of those tokens; BaselineError when the cache lacks
    them."""
    if cache is None:
        raise BaselineError(f"modality {modality!r} needs the image features: pass --cache (a feature cache)")
    from vlsurv.encoders.cache import FeatureCache

    root = Path(cache)
    if not (root / "index.json").is_file():
        raise BaselineError(
            f"modality {modality!r} needs the image features, but {root} is not a feature cache (no "
            "index.json; run `vlsurv encode` first)"
        )
    store = FeatureCache(root)
    absent = [s for s in scan_ids if s not in store]
    if absent:
        raise BaselineError(
            f"modality {modality!r}: the feature cache {root} lacks {len(absent)} of the manifest's "
            f"{len(scan_ids)} scans (first: {absent[:3]}); encode them with `vlsurv encode` or drop the "
            "modality"
        )
    if tte_model is not None:
        from vlsurv.tte.transfer import tte_pretrained_features  # torch; only when asked for

        return tte_pretrained_features(tte_model, store, scan_ids).to_numpy(np.float64)
    return np.stack([store.get(s).mean(0).numpy() for s in scan_ids]).astype(np.float64)


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Every array z-scored with ``train``'s column mean and sd (sd 0 -> 1)."""
    mean, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return [(a - mean) / sd for a in (train, *others)]


def split_fingerprint(manifest: pd.DataFrame) -> str:
    """sha256 (16 hex digits) of the sorted ``scan_id:split`` lines of a manifest."""
    lines = sorted(f"{s}:{p}" for s, p in zip(manifest["scan_id"].astype(str), manifest["split"].astype(str)))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
