"""Fine-tune a ``HorizonNet`` with accelerate: masked, class-weighted BCE per horizon, checkpoints, resume.

Loss of a batch of B scans at H horizons, with logits z (B, H), labels y (B, H), known-mask k (B, H) and the
per-horizon positive weight w_h (``class_weighting="balanced"``: negatives / positives of the train split;
``"none"``: 1)::

    L = sum_{i,h} k_ih * [ -w_h * y_ih * log sigmoid(z_ih) - (1 - y_ih) * log(1 - sigmoid(z_ih)) ]
        / max(1, sum_{i,h} k_ih)

so a scan censored before horizon h adds nothing to head h. Checkpoints follow
``vlsurv.training.checkpoints``: ``OUT/checkpoints/step-XXXXXXXXX/`` holds ``accelerator.save_state``
(model.safetensors, optimizer, RNG) and ``trainer_state.json``; ``resume`` restores one and continues at its
step. Epoch e visits the train scans in the order ``randperm(seed + e)``, so a resumed run takes the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time as timer
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from vlsurv.errors import CheckpointError
from vlsurv.horizon.config import HorizonConfig
from vlsurv.horizon.data import HorizonVolumes
from vlsurv.horizon.labels import HorizonLabels, horizon_name
from vlsurv.horizon.models import HorizonNet, build_network, load_backbone_weights
from vlsurv.training.checkpoints import CheckpointManager, read_state

MODEL_DIR, WEIGHTS, MODEL_CONFIG = "model", "model.safetensors", "horizon_model.json"


def masked_bce(logits: torch.Tensor, label: torch.Tensor, known: torch.Tensor, pos_weight: torch.Tensor):
    """The loss L of the module docstring; logits, label, known (B, H), pos_weight (H,) -> scalar."""
    losses = F.binary_cross_entropy_with_logits(logits, label, pos_weight=pos_weight, reduction="none")
    mask = known.to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def positive_weights(labels: HorizonLabels, weighting: str) -> torch.Tensor:
    """(H,) weight of a positive per horizon: negatives / positives ('balanced') or ones ('none')."""
    if weighting == "none":
        return torch.ones(len(labels.horizons))
    counts = labels.counts().values()
    return torch.tensor([c["negatives"] / c["positives"] for c in counts], dtype=torch.float32)


def network_spec(cfg: HorizonConfig) -> dict:
    """What rebuilds the network: model, size and horizons (in checkpoints and horizon_model.json)."""
    return {"model": cfg.model, "size": cfg.size, "horizons": list(cfg.horizons)}


@dataclass
class TrainResult:
    """What ``train`` did: the final step, the unwrapped network, the init message, seconds and last loss."""

    step: int
    network: HorizonNet
    init_message: str
    seconds: float
    last_loss: float | None


def initialise(cfg: HorizonConfig) -> tuple[HorizonNet, str]:
    """The network, from ``cfg.init_checkpoint`` or from scratch, and the sentence that says which."""
    torch.manual_seed(cfg.seed)
    network = build_network(cfg.model, cfg.size, len(cfg.horizons))
    if cfg.init_checkpoint is None:
        return network, (
            f"training {cfg.model} ({cfg.size}) FROM SCRATCH: random initialisation "
            "(pass --init-checkpoint PATH to start from pretrained weights)"
        )
    report = load_backbone_weights(network.backbone, cfg.init_checkpoint, cfg.init_key_prefix)
    return network, report.message(cfg.model)


def _epoch_loader(dataset: HorizonVolumes, cfg: HorizonConfig, epoch: int, skip: int, world: int):
    """The epoch's batches in the order randperm(seed + epoch), without the first ``skip`` global batches."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
    dataset.set_epoch(epoch)
    order = order[skip * cfg.batch_size * world :]
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=order, num_workers=cfg.num_workers)


def train(cfg: HorizonConfig, accelerator, dataset: HorizonVolumes, labels: HorizonLabels, log):
    """Train on ``dataset`` (the train split, ``labels`` its labels); checkpoints in OUT/checkpoints."""
    started = timer.time()
    network, init_message = initialise(cfg)
    if cfg.resume is None:
        log(init_message)
    optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(network, optimizer)
    manager = CheckpointManager(Path(cfg.out) / "checkpoints", cfg.keep_last, False, True)
    if accelerator.is_main_process:
        manager.remove_temporary()
    step = 0
    if cfg.resume is not None:
        path = manager.resolve(cfg.resume)
        recorded = read_state(path).get("network")
        if recorded != network_spec(cfg):
            raise CheckpointError(
                f"--resume {path}: the checkpoint holds {recorded}, this run builds {network_spec(cfg)}; "
                "expected the same model, size and horizons (or a new --out)"
            )
        accelerator.load_state(str(path))
        step = int(read_state(path)["step"])
        init_message = f"resumed from {path} at step {step} (weights, optimizer and RNG from the checkpoint)"
        log(init_message)
    pos_weight = positive_weights(labels, cfg.class_weighting).to(accelerator.device)
    world = accelerator.num_processes
    per_epoch = math.ceil(len(dataset) / (cfg.batch_size * world))
    total = cfg.epochs * per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * per_epoch)
    last_loss, saved = None, step
    model.train()
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        for batch in accelerator.prepare_data_loader(_epoch_loader(dataset, cfg, epoch, skip, world)):
            logits = model(batch["image"])
            loss = masked_bce(logits.float(), batch["label"], batch["known"], pos_weight)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step, last_loss = step + 1, float(loss.detach())
            if step % max(1, per_epoch // 4) == 0 or step == total:
                log(f"step {step}/{total} epoch {epoch + 1} loss {last_loss:.4f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                manager.save(
                    accelerator, step, {"epoch": epoch, "loss": last_loss, "network": network_spec(cfg)}
                )
                saved = step
            if step >= total:
                break
    if saved != step:
        state = {"epoch": (step - 1) // per_epoch, "loss": last_loss, "network": network_spec(cfg)}
        manager.save(accelerator, step, state)
    return TrainResult(step, accelerator.unwrap_model(model), init_message, timer.time() - started, last_loss)


def save_model(accelerator, network: HorizonNet, cfg: HorizonConfig) -> Path:
    """OUT/model/model.safetensors (the whole network) and horizon_model.json (how to rebuild it)."""
    from safetensors.torch import save_file

    folder = Path(cfg.out) / MODEL_DIR
    state = accelerator.get_state_dict(network)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS))
        (folder / MODEL_CONFIG).write_text(json.dumps(network_spec(cfg), indent=2))
    accelerator.wait_for_everyone()
    return folder


@torch.no_grad()
def predict(accelerator, network: HorizonNet, dataset: HorizonVolumes, cfg: HorizonConfig) -> np.ndarray:
    """(N, H) probabilities sigmoid(logits) of every scan of ``dataset``, in its order."""
    network.eval()
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    probabilities, indices = [], []
    for batch in accelerator.prepare_data_loader(loader):
        probability = torch.sigmoid(network(batch["image"].to(accelerator.device)).float())
        gathered = accelerator.gather_for_metrics((probability, batch["index"]))
        probabilities.append(gathered[0].cpu())
        indices.append(gathered[1].cpu())
    result = np.empty((len(dataset), len(cfg.horizons)))
    result[torch.cat(indices).numpy()] = torch.cat(probabilities).numpy()
    return result


def prediction_frame(rows: pd.DataFrame, probabilities: np.ndarray, horizons) -> pd.DataFrame:
    """scan_id, patient_id, split and ``prob@<h>`` per horizon (P(death within h))."""
    frame = rows[["scan_id", "patient_id", "split"]].reset_index(drop=True).copy()
    for j, horizon in enumerate(horizons):
        frame[f"prob@{horizon_name(horizon)}"] = probabilities[:, j]
    return frame
