"""The baseline models: lifelines CoxPH on a covariate design, and DeepSurv / DeepHit MLPs on features.

``fit_coxph(design, time, event, penalizer)`` -> a lifelines ``CoxPHFitter``; the log partial
hazard of a design (N, P) is its risk. ``fit_mlp(head, x, time, event, train, val, options, seed)`` trains an
MLP (P -> hidden -> 1 for DeepSurv, -> K + 1 logits for DeepHit) with the paper's baseline settings (AdamW,
betas (0.9, 0.999), lr 1e-4, batch 32), keeps the epoch with the lowest validation loss and stops after
``patience`` epochs without improvement; it returns the risk (N,) of every row (higher = earlier event).

Losses (``vlsurv.losses``): DeepSurv the negative Cox partial log-likelihood (Breslow ties, mean per event);
DeepHit ``deephit_nll`` + ``deephit_ranking_weight`` * ``deephit_ranking_loss`` on ``DeepHitCuts.from_times``
cuts of the train split, risk = minus the expected time (``deephit_risk(..., "expected_time")``).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from vlsurv.baselines.features import BaselineError

Head = Literal["deepsurv", "deephit"]


def fit_coxph(design: pd.DataFrame, time, event, penalizer: float):
    """lifelines ``CoxPHFitter(penalizer)`` fitted on ``design`` (N, P) with ``time``, ``event`` (N,)."""
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    if int(np.sum(event)) < 5:
        raise BaselineError(f"CoxPH: the train split has {int(np.sum(event))} events; expected at least 5")
    fitter = CoxPHFitter(penalizer=penalizer)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fitter.fit(design.assign(time=np.asarray(time), event=np.asarray(event)), "time", "event")
    except ConvergenceError as err:
        raise BaselineError(
            f"CoxPH did not converge on {design.shape[1]} covariates {list(design.columns)}; raise "
            f"--penalizer (now {penalizer})"
        ) from err
    return fitter


@dataclass(frozen=True)
class MLPOptions:
    """Architecture and optimisation of a DeepSurv / DeepHit MLP (``BaselinesConfig`` holds the defaults)."""

    hidden: tuple[int, ...]
    dropout: float
    lr: float
    weight_decay: float
    batch_size: int
    max_epochs: int
    patience: int
    num_bins: int
    deephit_ranking_weight: float


@dataclass(frozen=True)
class MLPFit:
    """The risk (N,) of every row, the epoch kept and the epochs run."""

    risk: np.ndarray
    best_epoch: int
    epochs: int


def _network(inputs: int, outputs: int, options: MLPOptions):
    import torch

    layers: list = []
    for width in options.hidden:
        layers += [torch.nn.Linear(inputs, width), torch.nn.ReLU(), torch.nn.Dropout(options.dropout)]
        inputs = width
    return torch.nn.Sequential(*layers, torch.nn.Linear(inputs, outputs))


def fit_mlp(
    head: Head, x: np.ndarray, time: np.ndarray, event: np.ndarray, train, val, options: MLPOptions, seed: int
) -> MLPFit:
    """Train on the rows ``train`` (bool (N,)), stop early on the loss of the rows ``val``; risk of all N.

    Runs on one CPU thread: batches of 32 rows through a small MLP are too small for intra-op threads, which
    only add synchronisation (measured 6-16x slower with 2 threads on a busy 2-core machine).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit_mlp(head, x, time, event, train, val, options, seed)
    finally:
        torch.set_num_threads(threads)


def _fit_mlp(head, x, time, event, train, val, options: MLPOptions, seed: int) -> MLPFit:
    import torch

    from vlsurv import losses
    from vlsurv.model.survival import DeepHitCuts, deephit_risk

    torch.manual_seed(seed)
    features = torch.as_tensor(x, dtype=torch.float32)
    times = torch.as_tensor(time, dtype=torch.float32)
    events = torch.as_tensor(event, dtype=torch.float32)
    cuts = DeepHitCuts.from_times(time[train], event[train], options.num_bins) if head == "deephit" else None
    labels = cuts.labels(time, event) if cuts is not None else None

    def loss_of(rows: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if labels is None:
            with warnings.catch_warnings():  # a batch without an event adds a zero loss
                warnings.simplefilter("ignore")
                return losses.cox_loss(output[:, 0], times[rows], events[rows])
        bins, binned, credit = labels.bin_index[rows], labels.event[rows], labels.censored_credit[rows]
        nll = losses.deephit_nll(output, bins, binned, credit.float())
        return nll + options.deephit_ranking_weight * losses.deephit_ranking_loss(output, bins, binned)

    network = _network(x.shape[1], 1 if cuts is None else cuts.num_bins + 1, options)
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=options.lr, betas=(0.9, 0.999), weight_decay=options.weight_decay
    )
    train_rows, val_rows = torch.as_tensor(np.flatnonzero(train)), torch.as_tensor(np.flatnonzero(val))
    generator = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch, epoch = float("inf"), copy.deepcopy(network.state_dict()), 0, 0
    for epoch in range(1, options.max_epochs + 1):
        network.train()
        for batch in train_rows[torch.randperm(len(train_rows), generator=generator)].split(
            options.batch_size
        ):
            optimizer.zero_grad()
            loss_of(batch, network(features[batch])).backward()
            optimizer.step()
        network.eval()
        with torch.no_grad():
            val_loss = float(loss_of(val_rows, network(features[val_rows])))
        if val_loss < best:
            best, best_state, best_epoch = val_loss, copy.deepcopy(network.state_dict()), epoch
        elif epoch - best_epoch >= options.patience:
            break
    network.load_state_dict(best_state)
    network.eval()
    with torch.no_grad():
        output = network(features)
        risk = output[:, 0] if cuts is None else deephit_risk(output, cuts, "expected_time")
    return MLPFit(risk.double().numpy(), best_epoch, epoch)
