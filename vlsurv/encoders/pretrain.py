"""Short supervised pretraining of a small Merlin-code encoder on report-derived labels (Merlin-style).

Merlin's image encoder learned from reports and EHR phenotypes before anyone asked it about a scan; a
random-init encoder of the same code carries a finding only by chance (the demo's random-init tokens: a
linear probe reads an effusion at AUROC 1.00 but a bone lesion at 0.65). This gives the demo's tiny
encoder the same kind of start:

- labels: per training scan and question, 1 = ``present`` and 0 = ``absent`` in the report's extraction,
  masked when ``not_mentioned`` (``report_labels``; only the scans it is given: the demo gives the train
  split's);
- the stem and stages 1-3 keep their random init and run once per training scan (``stage3_maps``:
  (N, C3, D/8, H/16, W/16)); stage 4 (``layer4``) and the phenotype head (``classifier``, its first Q
  outputs) are trained on those maps;
- per-token logits: the head on every token of the encoder's ``token_mode`` (B, T, Q), pooled over the
  tokens by max, so that a small finding may light only the tokens where it is:
  L = sum_{b,q} m_{b,q} BCE(max_t s_{b,t,q}, y_{b,q}) / sum m, with mask m (0 where not mentioned).

Stage 4's BatchNorm layers use batch statistics while training (their running statistics are updated and
used afterwards). Afterwards the encoder is frozen again (eval mode, no grad) and its ``weights_id`` becomes
``supervised:<sha256 of the state dict, 16 hex>``, so a feature cache keyed on it is re-encoded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlsurv.config import bounded, check_fields
from vlsurv.encoders.merlin import MerlinImageEncoder, file_sha256, pool_tokens
from vlsurv.errors import InputError


class EncoderPretrainError(InputError):
    """Labels or maps that cannot pretrain the encoder (the message says which and why)."""


@dataclass
class EncoderPretrainConfig:
    """The supervised pretraining of stage 4 and the phenotype head on report-derived labels."""

    epochs: int = bounded(30, ge=1)
    """Passes over the training scans."""
    batch_size: int = bounded(16, ge=1)
    """Scans per step."""
    lr: float = bounded(3e-3, gt=0.0, what="a learning rate")
    """AdamW learning rate."""
    weight_decay: float = bounded(1e-4, ge=0.0)
    """AdamW weight decay."""
    seed: int = 0
    """Seed of the batch order."""

    def __post_init__(self) -> None:
        check_fields(self, "encoder_pretrain")


def report_labels(
    extractions: Sequence[dict], scan_ids: Sequence[str], question_ids: Sequence[str]
) -> np.ndarray:
    """(N, Q) float labels of ``scan_ids`` from extraction rows (report_id = scan_id, question_id, status):
    1 present, 0 absent, NaN not mentioned / error / missing."""
    position = {scan_id: i for i, scan_id in enumerate(scan_ids)}
    column = {qid: j for j, qid in enumerate(question_ids)}
    labels = np.full((len(scan_ids), len(question_ids)), np.nan)
    for row in extractions:
        i, j = position.get(str(row["report_id"])), column.get(row["question_id"])
        if i is not None and j is not None and row["status"] in ("present", "absent"):
            labels[i, j] = float(row["status"] == "present")
    return labels


@torch.no_grad()
def stage3_maps(encoder: MerlinImageEncoder, volumes: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W, D) preprocessed CTs -> the frozen stem + stages 1-3 output (B, C3, D', H', W')."""
    return encoder.stage_maps(volumes, stages=3)[-1]


def token_logits(encoder: MerlinImageEncoder, maps: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Stage-3 maps (B, C3, ...) -> per-token logits (B, T, Q) of the first ``num_labels`` head outputs."""
    tokens = pool_tokens(encoder.layer4(maps), encoder.config.token_mode)
    weight = encoder.classifier.weight[:num_labels].flatten(1)
    return tokens @ weight.T + encoder.classifier.bias[:num_labels]


def _masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    known = ~torch.isnan(labels)
    return F.binary_cross_entropy_with_logits(logits[known], labels[known])


def pretrain_encoder(
    encoder: MerlinImageEncoder, maps: torch.Tensor, labels: np.ndarray, config: EncoderPretrainConfig
) -> list[float]:
    """Train ``layer4`` and the head on stage-3 ``maps`` (N, C3, ...) with ``labels`` (N, Q; NaN = masked);
    return the mean loss of each epoch. The encoder ends frozen with a ``supervised:`` weights id."""
    labels_t = torch.as_tensor(labels, dtype=torch.float32)
    if labels_t.ndim != 2 or labels_t.shape[0] != maps.shape[0]:
        raise EncoderPretrainError(
            f"encoder pretraining: labels have shape {tuple(labels_t.shape)}; expected "
            f"({maps.shape[0]}, Q), one row per training scan"
        )
    if labels_t.shape[1] > encoder.config.num_classes:
        raise EncoderPretrainError(
            f"encoder pretraining: {labels_t.shape[1]} labels but the encoder's head has "
            f"{encoder.config.num_classes} outputs (EncoderConfig.num_classes)"
        )
    if torch.isnan(labels_t).all():
        raise EncoderPretrainError("encoder pretraining: every label is masked (no present / absent status)")
    trained = [*encoder.layer4.parameters(), *encoder.classifier.parameters()]
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    encoder.layer4.train(
        True
    )  # batch statistics while training; the running ones are kept for the frozen use
    try:
        for _ in range(config.epochs):
            order, total = torch.randperm(maps.shape[0], generator=generator), 0.0
            for start in range(0, len(order), config.batch_size):
                index = order[start : start + config.batch_size]
                scores = token_logits(encoder, maps[index], labels_t.shape[1]).amax(dim=1)
                loss = _masked_bce(scores, labels_t[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(index)
            history.append(total / len(order))
    finally:
        encoder.layer4.train(False)
        encoder.requires_grad_(False)
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    encoder.weights_id = f"supervised:{digest.hexdigest()[:16]}"
    return history


def save_encoder(encoder: MerlinImageEncoder, path: str | Path) -> Path:
    """The encoder's state dict as safetensors (bare I3ResNet keys, so that
    ``MerlinImageEncoder.from_checkpoint`` loads it with the same config); its ``weights_id`` becomes the
    file's sha256, as ``from_checkpoint`` gives, so a cache encoded with it records a checkpoint that
    ``vlsurv.pipeline`` can load again."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(path))
    encoder.weights_id = file_sha256(path)
    return path


def pretrain_on_manifest(
    encoder: MerlinImageEncoder,
    manifest: str | Path,
    extractions: str | Path,
    question_ids: Sequence[str],
    preprocess,
    config: EncoderPretrainConfig,
    split: str = "train",
) -> dict:
    """Pretrain ``encoder`` on the ``split`` scans of a manifest with the labels of their reports' extraction
    rows (report_id = scan_id); return {"scans", "labels_known", "loss"}. Only that split's labels are read.
    """
    from qa_extraction.io import read_extractions
    from vlsurv.data.manifest import load_manifest
    from vlsurv.data.transforms import preprocess_ct

    table = load_manifest(manifest, require_survival=False)
    chosen = table[table["split"] == split]
    if chosen.empty:
        raise EncoderPretrainError(f"{manifest}: no scan of split {split!r} to pretrain the encoder on")
    scan_ids = chosen["scan_id"].astype(str).tolist()
    labels = report_labels(read_extractions(extractions), scan_ids, question_ids)
    maps = torch.cat(
        [stage3_maps(encoder, preprocess_ct(image, preprocess)[None]) for image in chosen["image"]]
    )
    history = pretrain_encoder(encoder, maps, labels, config)
    return {"scans": len(scan_ids), "labels_known": int((~np.isnan(labels)).sum()), "loss": history}
