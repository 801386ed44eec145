"""Atomic ``accelerate save_state`` checkpoints: the last k, plus the best by the validation metric.

Layout under ``<output_dir>/checkpoints/``: ``step-000000120/`` holds what ``accelerator.save_state`` writes
(model weights, optimizer, scheduler, RNG states, the accumulation step) and ``trainer_state.json`` (optimizer
step, epoch and position of the next global batch, the validation metric of that step when it was evaluated).
Every process writes into ``.tmp-step-000000120/``; when all are done the main process adds
``trainer_state.json`` and renames the folder, so a run killed mid-save leaves only a temporary folder, which
the next start removes.

Single-process and DDP checkpoints hold only the weights that change: the trainable parameters plus the
projector and survival branch (the frozen base decoder is rebuilt from ``model.decoder_path``), loaded back
with ``strict=False``. FSDP and DeepSpeed save through their own writers.

The final model (``save_final``) is gathered on every process and written by the main one; ``selection.json``
beside it records which step it holds and its validation metric.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from vlsurv.errors import CheckpointError

if TYPE_CHECKING:
    from accelerate import Accelerator

STATE_NAME = "trainer_state.json"
SELECTION_NAME = "selection.json"
PREFIX, TMP_PREFIX = "step-", ".tmp-step-"
ALWAYS_SAVED = ("multi_modal_projector.", "survival_branch.")


def step_dir_name(step: int, prefix: str = PREFIX) -> str:
    return f"{prefix}{step:09d}"


def keep_changing_weights(model: nn.Module):
    """A ``register_save_state_pre_hook`` hook that drops the frozen base-decoder weights from the saved
    state.

    ``model`` is the prepared model; a DDP wrapper's ``module.`` prefix is removed, since the saved state
    holds the unwrapped model's keys (with the prefix kept, a DDP checkpoint lost every LoRA weight).
    """
    keep = {name.removeprefix("module.") for name, p in model.named_parameters() if p.requires_grad}

    def hook(models, weights, output_dir) -> None:
        for state in weights:
            for key in list(state):
                if key not in keep and not any(part in key for part in ALWAYS_SAVED):
                    del state[key]

    return hook


class CheckpointManager:
    """Save, list, prune and find checkpoints in ``root``; ``higher_is_better`` orders the metric."""

    def __init__(self, root: str | Path, keep_last: int, keep_best: bool, higher_is_better: bool) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.higher_is_better = higher_is_better

    def completed(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            if path.is_dir() and path.name.startswith(PREFIX) and (path / STATE_NAME).is_file():
                found.append((int(path.name[len(PREFIX) :]), path))
        return sorted(found)

    def remove_temporary(self) -> None:
        """Delete folders of saves that never finished (main process, at start)."""
        if self.root.is_dir():
            for path in self.root.glob(TMP_PREFIX + "*"):
                shutil.rmtree(path, ignore_errors=True)

    def save(self, accelerator, step: int, state: dict) -> Path:
        """``accelerator.save_state`` into a temporary folder, then rename; call on every process."""
        tmp = self.root / step_dir_name(step, TMP_PREFIX)
        final = self.root / step_dir_name(step)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_NAME).write_text(json.dumps({**state, "step": step}, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self.prune()
        accelerator.wait_for_everyone()
        return final

    def metric_of(self, path: Path) -> float | None:
        value = read_state(path).get("metric")
        return None if value is None or math.isnan(value) else float(value)

    def best(self) -> tuple[int, Path] | None:
        """The checkpoint with the best recorded metric (the latest among equals), or None."""
        scored = [(self.metric_of(path), step, path) for step, path in self.completed()]
        scored = [item for item in scored if item[0] is not None]
        if not scored:
            return None
        sign = 1.0 if self.higher_is_better else -1.0
        _, step, path = max(scored, key=lambda item: (sign * item[0], item[1]))
        return step, path

    def best_metric(self) -> float | None:
        best = self.best()
        return None if best is None else self.metric_of(best[1])

    def prune(self) -> None:
        """Keep the last ``keep_last`` checkpoints and, with ``keep_best``, the best one."""
        completed = self.completed()
        keep = {path for _, path in completed[-self.keep_last :]}
        best = self.best() if self.keep_best else None
        if best is not None:
            keep.add(best[1])
        for _, path in completed:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def resolve(self, resume: str) -> Path:
        """``"latest"`` -> the newest complete checkpoint; otherwise the given folder, checked."""
        if resume == "latest":
            completed = self.completed()
            if not completed:
                raise CheckpointError(f"--resume latest: no complete checkpoint in {self.root}")
            return completed[-1][1]
        path = Path(resume)
        if not (path / STATE_NAME).is_file():
            raise CheckpointError(
                f"--resume {path}: not a complete checkpoint; expected a folder with {STATE_NAME} "
                f"(e.g. {self.root / step_dir_name(120)})"
            )
        return path


def read_state(path: str | Path) -> dict:
    """The ``trainer_state.json`` of a checkpoint folder."""
    return json.loads((Path(path) / STATE_NAME).read_text())


def save_final(accelerator: Accelerator, model: nn.Module, directory: str | Path) -> Path:
    """``save_pretrained`` of the prepared ``model`` into ``directory``; call on every process.

    The full state dict is gathered on every process first (``accelerator.get_state_dict``: under FSDP or
    ZeRO-3 an all-gather that each rank must join), then only the main process writes it, so no rank waits in
    a collective that another never enters and no shard is written as if it were the whole model.
    """
    directory = Path(directory)
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(directory, state_dict=state)
    accelerator.wait_for_everyone()
    return directory


def write_selection(directory: str | Path, record: dict) -> Path:
    """``selection.json`` in the final model folder: which checkpoint it holds and by what metric."""
    path = Path(directory) / SELECTION_NAME
    path.write_text(json.dumps(record, indent=2))
    return path


def read_selection(directory: str | Path) -> dict | None:
    """The ``selection.json`` of a model folder written by training, or None when there is none."""
    path = Path(directory) / SELECTION_NAME
    return json.loads(path.read_text()) if path.is_file() else None
