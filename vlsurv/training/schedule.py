"""The learning-rate schedule of every training stage: linear warmup, then constant, linear or cosine decay.

``lr_factor`` is the multiplier of a ``torch.optim.lr_scheduler.LambdaLR`` stepped once per optimizer step,
with the formulas of transformers' ``get_{constant,linear,cosine}_schedule_with_warmup`` (a test checks them
against transformers), without importing ``transformers.optimization``, which loads peft and bitsandbytes.
``check_warmup`` refuses a warmup that the run's planned steps never leave.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from vlsurv.config import ConfigError


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Learning-rate multiplier at optimizer ``step`` (0-based) of a ``total``-step run: ``step / warmup``
    during ``warmup``, then 1 (constant), a linear decay to 0 at ``total`` (linear) or a half cosine to 0
    (cosine)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def lr_scheduler(optimizer, warmup: int, total: int, schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` of ``lr_factor`` over ``optimizer`` (every parameter group)."""
    factor = partial(lr_factor, warmup=warmup, total=total, schedule=schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_warmup(warmup: int, total: int, plan: str, remedy: str) -> None:
    """ConfigError when ``warmup`` (optim.warmup_steps) is not below the run's ``total`` planned optimizer
    steps; ``plan`` says where the total comes from and ``remedy`` what to change."""
    if warmup >= total:
        raise ConfigError(
            f"optim.warmup_steps = {warmup} is not below the run's {total} planned optimizer steps ({plan}): "
            f"the learning rate would never leave warmup; {remedy}"
        )
