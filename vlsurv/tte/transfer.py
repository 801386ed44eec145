"""What a ``tte_pretrain`` run gives the rest of vlsurv: its head, features for baselines, hazards.

- ``load_tte_head(final_dir)``: the trained ``TTEHead`` and its ``tte.json`` (tasks, bin edges, base rates).
- ``tte_pretrained_features(final_dir, cache, scan_ids)``: one row of pooled projected features (d,) per scan
  of a feature cache, the input of the baselines' "pre-train" column.
- ``predict_log_hazard``: log-hazards (N, bins, K) per scan, for evaluation (vlsurv.tte.evaluation).
- Stage 1 starts from the pretrained projector with ``data.tte_projector=<final_dir>`` (the folder holds
  ``projector.safetensors`` in stage 1's format).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from vlsurv.config import from_dict
from vlsurv.encoders.cache import FeatureCache
from vlsurv.errors import ModelLoadError
from vlsurv.model.vlm_io import load_module
from vlsurv.tte.config import TTEModelConfig
from vlsurv.tte.head import TTEHead
from vlsurv.tte.training import HEAD_NAME, INFO_NAME


def load_tte_head(final_dir: str | Path) -> tuple[TTEHead, dict]:
    """(the head in eval mode, the run's ``tte.json``) from the ``final`` folder of a tte_pretrain run."""
    final = Path(final_dir)
    if not (final / INFO_NAME).is_file():
        raise ModelLoadError(
            f"{final}: no {INFO_NAME}; expected the `final` folder of a tte_pretrain run (vlsurv train with "
            "stage: tte_pretrain)"
        )
    info = json.loads((final / INFO_NAME).read_text())
    config = from_dict(TTEModelConfig, info["model"], source=str(final / INFO_NAME))
    head = TTEHead(config, len(info["bin_edges"]), len(info["tasks"]))
    load_module(head, final / HEAD_NAME)
    return head.eval(), info


def _batches(cache: FeatureCache, scan_ids: list[str], batch_size: int) -> Iterable[torch.Tensor]:
    for start in range(0, len(scan_ids), batch_size):
        yield torch.stack([cache.get(s) for s in scan_ids[start : start + batch_size]])


def bin_edges(info: dict) -> np.ndarray:
    """The (bins + 1,) bin edges of a run's ``tte.json`` (it stores them without the last, infinity)."""
    return np.asarray([*info["bin_edges"], np.inf], dtype=np.float64)


@torch.no_grad()
def tte_pretrained_features(
    final_dir: str | Path,
    cache: FeatureCache | str | Path,
    scan_ids: Iterable[str] | None = None,
    batch_size: int = 256,
) -> pd.DataFrame:
    """TTE-pretrained features of cached scans: a frame indexed by scan_id with columns tte_0 .. tte_{d-1}
    (the pooled projector output (N, d) of the head in ``final_dir``); all cached scans by default."""
    head, _ = load_tte_head(final_dir)
    cache = FeatureCache(cache) if isinstance(cache, (str, Path)) else cache
    ids = list(cache.scan_ids if scan_ids is None else scan_ids)
    parts = [head.features(tokens) for tokens in _batches(cache, ids, batch_size)]
    values = torch.cat(parts).numpy() if parts else np.zeros((0, head.time_layer.in_features))
    columns = [f"tte_{i}" for i in range(values.shape[1])]
    return pd.DataFrame(values, index=pd.Index(ids, name="scan_id"), columns=columns)


@torch.no_grad()
def predict_log_hazard(
    head: TTEHead, cache: FeatureCache, scan_ids: Iterable[str], batch_size: int = 256
) -> np.ndarray:
    """(N, bins, K) log-hazards per day of the cached scans ``scan_ids``."""
    ids = list(scan_ids)
    parts = [head(tokens).numpy() for tokens in _batches(cache, ids, batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, head.num_bins, head.num_tasks))
