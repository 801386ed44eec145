"""The ``tte_pretrain`` stage: the MOTOR head trained on cached features under accelerate.

    accelerate launch scripts/train.py --config configs/tiny/tte_pretrain.yaml [key=value ...] [--resume X]

Data: ``prepare_data`` reads the events and scans (vlsurv.tte.events), selects the tasks on the training
scans, labels training and validation scans, sets the bins and base rates from the training labels. Each
batch's labels (B, K) become ``log_time`` / ``is_event`` (B, bins, K) on the device (``TimeBins.targets``),
and the loss is ``vlsurv.losses.piecewise_exponential_loss``.

Run folder: ``config.yaml``, ``train_log.jsonl`` (one line per step), ``validation.jsonl``,
``checkpoints/step-*/`` (``accelerator.save_state``: model.safetensors, optimizer, RNG; and
``trainer_state.json``, as vlsurv.training.checkpoints), ``final/``: ``projector.safetensors`` (loadable as
stage 1's projector), ``head.safetensors`` (the whole head) and ``tte.json`` (tasks, bin edges, base rates,
the model config). Batches: one seeded permutation of the training scans per epoch, so a resumed run
continues with the batches it would have seen.
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
from vlsurv.tte.config import TTEPretrainConfig
from vlsurv.tte.events import SCAN_COLUMNS, TTEInputError, load_events, read_table
from vlsurv.tte.head import TTEHead
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
    """Items {"image_tokens": (T, C), "time": (K,) float32, "event": (K,) bool} of the labelled scans."""

    def __init__(self, cache: FeatureCache, labels: TTELabels) -> None:
        self.tokens = CachedTokenDataset(cache, labels.scan_ids)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, item: int) -> dict:
        return {
            "image_tokens": self.tokens[item]["image_tokens"],
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
    """The piecewise-exponential loss of one batch {"image_tokens", "time", "event"}."""
    log_time, is_event = bins.targets(batch["time"], batch["event"])
    return piecewise_exponential_loss(model(batch["image_tokens"]), log_time, is_event)


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
        )
        set_seed(config.seed)
        self.data = prepare_data(config)
        cache = FeatureCache(config.data.cache) if cache is None else cache
        self.train_set = LabelledTokens(cache, self.data.train)
        self.val_set = None if self.data.val is None else LabelledTokens(cache, self.data.val)
        model = TTEHead(config.model, self.data.bins.num_bins, len(self.data.tasks.codes))
        model.set_base_rates(self.data.rates)
        standardizer = standardizer_of(model.projector)
        if standardizer is not None:
            standardizer.fit(torch.stack([cache.get(s) for s in self.data.train.scan_ids]))
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        world_batch = config.optim.batch_size * self.accelerator.num_processes
        self.steps_per_epoch = math.ceil(len(self.train_set) / world_batch)
        self.total_steps = config.optim.max_steps or config.optim.epochs * self.steps_per_epoch
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints",
            config.checkpoint.keep_last,
            config.checkpoint.keep_best,
            higher_is_better=False,
        )
        self.step = 0

    def epoch_loader(self, epoch: int, skip: int):
        """This process's batches of ``epoch`` (a permutation seeded by seed and epoch), the first ``skip``
        global batches left out."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train_set), generator=generator).tolist()
        loader = DataLoader(Subset(self.train_set, order), batch_size=self.config.optim.batch_size)
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
            acc.load_state(str(path))
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
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                    self.step += 1
                    bar.update(1)
                    if acc.is_main_process:
                        line = {"step": self.step, "epoch": epoch, "loss": float(loss.detach())}
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
            acc.load_state(str(best[1]))
            selected = {"step": best[0], "metric": self.checkpoints.metric_of(best[1])}
        final = self.run_dir / FINAL_DIR
        if acc.is_main_process:
            final.mkdir(parents=True, exist_ok=True)
            head = acc.unwrap_model(self.model)
            save_module(head.projector, final / PROJECTOR_NAME)
            save_module(head, final / HEAD_NAME)
            info = {
                "tasks": self.data.tasks.codes.tolist(),
                "task_event_fraction": self.data.tasks.event_fraction.tolist(),
                "bin_edges": self.data.bins.edges[:-1].tolist(),
                "base_rates": self.data.rates.tolist(),
                "model": to_dict(self.config.model),
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
    -> (T, C), ``scan_ids``, ``root`` and ``in``); returns the ``final`` folder."""
    return TTETrainer(config, cache).fit(resume)
