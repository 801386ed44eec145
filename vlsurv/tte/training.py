"""The ``tte_pretrain`` stage: the MOTOR head trained on cached features under accelerate.

    accelerate launch scripts/train.py --config configs/tiny/tte_pretrain.yaml [key=value ...] [--resume X]

Data: ``prepare_data`` reads the events and scans (vlsurv.tte.events), selects the tasks on the training
scans, labels training and validation scans, sets the bins and base rates from the training labels. Each
batch's labels (B, K) become ``log_time`` / ``is_event`` (B, bins, K) on the device (``TimeBins.targets``),
and the loss is ``vlsurv.losses.piecewise_exponential_loss``. With ``data.images`` the batches are volumes
and the encoder runs in the loop (vlsurv.tte.images). The learning rate follows ``optim.schedule`` after
``optim.warmup_steps`` (vlsurv.training.schedule), stepped once per optimizer step by a ``LambdaLR`` that
accelerate saves and restores with the checkpoints.

Run folder: ``config.yaml``, ``train_log.jsonl`` (one line per step), ``validation.jsonl``,
``checkpoints/step-*/`` (``accelerator.save_state``: model.safetensors, optimizer, RNG; and
``trainer_state.json``, as vlsurv.training.checkpoints), ``final/``: ``projector.safetensors`` (loadable as
stage 1's projector), ``head.safetensors`` (the whole head) and ``tte.json`` (tasks, bin edges, base rates,
the model config; with ``data.images`` also the fine-tuned encoder, vlsurv.tte.images). Each line of
``train_log.jsonl`` records the step's loss and learning rate. Batches: one seeded permutation of the training
scans per epoch, so a resumed run continues with the batches it would have seen.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, Dataset, Subset

from vlsurv.config import save_config, to_dict
from vlsurv.encoders.cache import CachedTokenDataset, FeatureCache
from vlsurv.jsonl import to_line
from vlsurv.losses import piecewise_exponential_loss
from vlsurv.model.projector import standardizer_of
from vlsurv.model.vlm_io import PROJECTOR_NAME, save_module
from vlsurv.progress import progress_bar
from vlsurv.training.checkpoints import CheckpointManager, read_state
from vlsurv.training.schedule import check_warmup, lr_scheduler
from vlsurv.tte.config import TTEPretrainConfig
from vlsurv.tte.events import SCAN_COLUMNS, TTEInputError, load_events, read_table
from vlsurv.tte.head import TTEHead
from vlsurv.tte.images import (
    ImageTTEModel,
    LabelledVolumes,
    build_image_encoder,
    check_token_shape,
    encoder_tokens,
    frozen_weights_dropper,
    manifest_scans,
    save_image_encoder,
)
from vlsurv.tte.labels import TaskSelection, TimeBins, TTELabels, base_rates, build_labels, select_tasks

FINAL_DIR, HEAD_NAME, INFO_NAME = "final", "head.safetensors", "tte.json"


@dataclass
class TTEData:
    """Labels of the training and validation scans (validation None without a split column), the tasks,
    the bins and the per-task base rates (K,)."""

    train: TTELabels
    val: TTELabels | None
    tasks: TaskSelection
    bins: TimeBins
    rates: np.ndarray


class LabelledTokens(Dataset):
    """Items {"inputs": tokens (T, C), "time": (K,) float32, "event": (K,) bool} of the labelled scans."""

    def __init__(self, cache: FeatureCache, labels: TTELabels) -> None:
        self.tokens = CachedTokenDataset(cache, labels.scan_ids)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, item: int) -> dict:
        return {
            "inputs": self.tokens[item]["image_tokens"],
            "time": torch.from_numpy(self.labels.time[item]),
            "event": torch.from_numpy(self.labels.event[item]),
        }


def prepare_data(config: TTEPretrainConfig) -> TTEData:
    """Events + scans -> tasks chosen on the training scans, labels, bins and base rates."""
    scans = read_table(config.data.scans, str(config.data.scans), SCAN_COLUMNS)
    events, scan_table = load_events(config.data.events, scans)
    if "split" in scans.columns:
        split = scans["split"].astype(str).to_numpy()
        train_rows = np.flatnonzero(split == config.data.train_split)
        val_rows = np.flatnonzero(split == config.data.val_split)
    else:
        train_rows, val_rows = np.arange(len(scans)), np.arange(0)
    if train_rows.size == 0:
        raise TTEInputError(
            f"data.scans {config.data.scans}: no scan of split {config.data.train_split!r} "
            "(data.train_split); expected training scans"
        )
    train_scans = type(scan_table)(
        *(getattr(scan_table, f)[train_rows] for f in ("scan_ids", "patient", "time"))
    )
    tasks = select_tasks(events, train_scans, config.tasks.k, config.tasks.min_event_fraction)
    labels = build_labels(events, scan_table, tasks.codes)
    train = labels.rows(train_rows)
    return TTEData(
        train=train,
        val=labels.rows(val_rows) if val_rows.size else None,
        tasks=tasks,
        bins=TimeBins.from_labels(train, config.tasks.num_bins),
        rates=base_rates(train),
    )


def batch_loss(model: torch.nn.Module, bins: TimeBins, batch: dict) -> torch.Tensor:
    """The piecewise-exponential loss of one batch {"inputs" (tokens or volumes), "time", "event"}."""
    log_time, is_event = bins.targets(batch["time"], batch["event"])
    return piecewise_exponential_loss(model(batch["inputs"]), log_time, is_event)


def planned_warmup(config: TTEPretrainConfig, total: int, steps_per_epoch: int) -> int:
    """``optim.warmup_steps``; ConfigError when it is not below the run's ``total`` planned optimizer steps
    (the learning rate would never leave warmup)."""
    optim = config.optim
    if optim.warmup_steps:
        plan = (
            f"optim.max_steps = {optim.max_steps}"
            if optim.max_steps
            else f"optim.epochs = {optim.epochs} x {steps_per_epoch} batches per epoch"
        )
        check_warmup(optim.warmup_steps, total, plan, f"expected optim.warmup_steps < {total}")
    return optim.warmup_steps


class TTETrainer:
    """One ``tte_pretrain`` run; ``fit(resume)`` trains to the end and returns the ``final`` folder."""

    def __init__(self, config: TTEPretrainConfig, cache: FeatureCache | None = None) -> None:
        self.config = config
        self.run_dir = Path(config.output_dir)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        self.accelerator = Accelerator(
            cpu=launched > 1 and not torch.cuda.is_available(),
            mixed_precision=config.mixed_precision,
            project_config=ProjectConfiguration(project_dir=config.output_dir),
            step_scheduler_with_optimizer=False,
        )
        set_seed(config.seed)
        self.data = prepare_data(config)
        head = TTEHead(config.model, self.data.bins.num_bins, len(self.data.tasks.codes))
        head.set_base_rates(self.data.rates)
        model = self.image_model(head) if config.data.images else self.token_model(head, cache)
        world_batch = config.optim.batch_size * self.accelerator.num_processes
        self.steps_per_epoch = math.ceil(len(self.train_set) / world_batch)
        self.total_steps = config.optim.max_steps or config.optim.epochs * self.steps_per_epoch
        warmup = planned_warmup(config, self.total_steps, self.steps_per_epoch)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.optim.lr,
            weight_decay=config.optim.weight_decay,
        )
        scheduler = lr_scheduler(optimizer, warmup, self.total_steps, config.optim.schedule)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        if config.data.images:
            self.accelerator.register_save_state_pre_hook(frozen_weights_dropper(self.model))
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints",
            config.checkpoint.keep_last,
            config.checkpoint.keep_best,
            higher_is_better=False,
        )
        self.step = 0

    def token_model(self, head: TTEHead, cache: FeatureCache | None) -> TTEHead:
        """The head on cached tokens; sets the datasets and fits a ``standardize`` input norm on the training
        scans' tokens."""
        cache = FeatureCache(self.config.data.cache) if cache is None else cache
        self.train_set = LabelledTokens(cache, self.data.train)
        self.val_set = None if self.data.val is None else LabelledTokens(cache, self.data.val)
        standardizer = standardizer_of(head.projector)
        if standardizer is not None:
            standardizer.fit(torch.stack([cache.get(s) for s in self.data.train.scan_ids]))
        return head

    def image_model(self, head: TTEHead) -> ImageTTEModel:
        """Encoder + head on the volumes (``data.images``); sets the datasets, checks the encoder's token
        shape against the head and fits a ``standardize`` input norm on the training scans' initial tokens."""
        data = self.config.data
        encoder, self.preprocess = build_image_encoder(data)
        model = ImageTTEModel(encoder, head, self.config.model.train_last_block).to(self.accelerator.device)
        train_scans = manifest_scans(data.manifest, self.data.train.scan_ids)
        self.train_set = LabelledVolumes(train_scans, self.preprocess, self.data.train)
        self.val_set = None
        if self.data.val is not None:
            val_scans = manifest_scans(data.manifest, self.data.val.scan_ids)
            self.val_set = LabelledVolumes(val_scans, self.preprocess, self.data.val)
        standardizer = standardizer_of(head.projector)
        subset = self.train_set if standardizer is not None else Subset(self.train_set, [0])
        tokens = encoder_tokens(model, subset, self.config.optim.batch_size)
        check_token_shape(tokens, self.config.model, encoder)
        if standardizer is not None:
            standardizer.fit(tokens.cpu())
        return model

    def epoch_loader(self, epoch: int, skip: int):
        """This process's batches of ``epoch`` (a permutation seeded by seed and epoch), the first ``skip``
        global batches left out."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train_set), generator=generator).tolist()
        loader = DataLoader(
            Subset(self.train_set, order),
            batch_size=self.config.optim.batch_size,
            num_workers=self.config.data.num_workers if self.config.data.images else 0,
        )
        acc = self.accelerator
        loader = prepare_data_loader(
            loader, acc.device, acc.num_processes, acc.process_index, put_on_device=True
        )
        return skip_first_batches(loader, skip) if skip else loader

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """Mean loss over the validation scans (every process computes all of them), or None."""
        if self.val_set is None:
            return None
        model = self.accelerator.unwrap_model(self.model).eval()
        total, count = 0.0, 0
        for batch in DataLoader(self.val_set, batch_size=self.config.optim.batch_size):
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            total += float(batch_loss(model, self.data.bins, batch)) * len(batch["time"])
            count += len(batch["time"])
        model.train()
        return total / count

    def save_checkpoint(self) -> None:
        metric = self.validation_loss()
        if self.accelerator.is_main_process:
            with (self.run_dir / "validation.jsonl").open("a") as handle:
                handle.write(to_line({"step": self.step, "val_loss": metric}))
        self.checkpoints.save(
            self.accelerator, self.step, {"epoch": self.step // self.steps_per_epoch, "metric": metric}
        )

    def start(self, resume: str | None) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / "config.yaml")
            self.checkpoints.remove_temporary()
        acc.wait_for_everyone()
        if resume is not None:
            path = self.checkpoints.resolve(resume)
            acc.load_state(str(path), strict=not self.config.data.images)
            self.step = int(read_state(path)["step"])
            acc.print(f"resumed from {path} at step {self.step}")

    def fit(self, resume: str | None = None) -> Path:
        self.start(resume)
        acc, every = self.accelerator, self.config.checkpoint.every_n_steps
        self.model.train()
        with progress_bar(
            total=self.total_steps,
            initial=self.step,
            desc="tte_pretrain",
            unit="step",
            enabled=self.config.progress and acc.is_main_process,
        ) as bar:
            while self.step < self.total_steps:
                epoch, skip = divmod(self.step, self.steps_per_epoch)
                for batch in self.epoch_loader(epoch, skip):
                    loss = batch_loss(self.model, self.data.bins, batch)
                    acc.backward(loss)
                    if self.config.optim.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.model.parameters(), self.config.optim.max_grad_norm)
                    lr = self.scheduler.get_last_lr()[0]
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad()
                    self.step += 1
                    bar.update(1)
                    if acc.is_main_process:
                        line = {"step": self.step, "epoch": epoch, "loss": float(loss.detach()), "lr": lr}
                        with (self.run_dir / "train_log.jsonl").open("a") as handle:
                            handle.write(to_line(line))
                    if every and self.step % every == 0:
                        self.save_checkpoint()
                    if self.step >= self.total_steps:
                        break
        return self.save_final()

    def save_final(self) -> Path:
        """The best checkpoint's weights when ``checkpoint.keep_best`` and one has a metric, else the last
        step's, into ``final/``."""
        acc = self.accelerator
        best = self.checkpoints.best() if self.config.checkpoint.keep_best else None
        selected = {"step": self.step, "metric": self.validation_loss()}
        if (
            best is not None
            and selected["metric"] is not None
            and self.checkpoints.metric_of(best[1]) < selected["metric"]
        ):
            acc.load_state(str(best[1]), strict=not self.config.data.images)
            selected = {"step": best[0], "metric": self.checkpoints.metric_of(best[1])}
        final = self.run_dir / FINAL_DIR
        if acc.is_main_process:
            final.mkdir(parents=True, exist_ok=True)
            model = acc.unwrap_model(self.model)
            head = model.head if self.config.data.images else model
            save_module(head.projector, final / PROJECTOR_NAME)
            save_module(head, final / HEAD_NAME)
            if self.config.data.images:
                token_shape = [self.config.model.num_image_tokens, self.config.model.image_token_dim]
                save_image_encoder(final, model.encoder, self.preprocess, token_shape)
            info = {
                "tasks": self.data.tasks.codes.tolist(),
                "task_event_fraction": self.data.tasks.event_fraction.tolist(),
                "bin_edges": self.data.bins.edges[:-1].tolist(),
                "base_rates": self.data.rates.tolist(),
                "model": to_dict(self.config.model),
                "images": self.config.data.images,
                "selected": selected,
            }
            (final / INFO_NAME).write_text(json.dumps(info, indent=2))
        acc.wait_for_everyone()
        return final


def train_tte(
    config: TTEPretrainConfig, resume: str | None = None, cache: FeatureCache | None = None
) -> Path:
    """Run the ``tte_pretrain`` stage of ``config`` (resuming from ``resume``: "latest" or a checkpoint
    folder) on the tokens of ``cache`` (default: ``FeatureCache(data.cache)``; anything with ``get(scan_id)``
    -> (T, C), ``scan_ids``, ``root`` and ``in``; unused with ``data.images``); returns the ``final``
    folder."""
    return TTETrainer(config, cache).fit(resume)
