"""Time-to-event pretraining (MOTOR, seed 000): EHR-derived tasks, a piecewise-exponential head, transfer.

- ``events``: ``load_events`` reads a MEDS-like events table (patient_id, time, code) and the scan times.
- ``labels``: ``select_tasks`` (top-k codes), ``build_labels`` (time to the next code after each scan, (S, K),
  vectorised), ``TimeBins`` (percentile bins and the loss targets (B, bins, K)), ``base_rates``.
- ``head``: ``TTEHead``, tokens (B, T, C) -> log-hazards (B, bins, K).
- ``config`` / ``training``: the ``tte_pretrain`` stage of scripts/train.py (``TTEPretrainConfig``,
  ``train_tte``).
- ``transfer``: ``load_tte_head``, ``tte_pretrained_features`` (features for the baselines),
  ``predict_log_hazard``.
- ``evaluation``: ``task_metrics`` (per-task C-index and AUROC at horizons), ``task_calibration``;
  ``evaluate_cli``: the ``vlsurv tte-evaluate`` command over a split.
- ``images``: the stage on volumes (``data.images``), the encoder's last stage trained with the head.

The loss is ``vlsurv.losses.piecewise_exponential_loss``.
"""

from vlsurv.tte.config import TTEPretrainConfig, is_tte_config, load_tte_config
from vlsurv.tte.events import EventTable, ScanTable, TTEInputError, load_events
from vlsurv.tte.head import TTEHead
from vlsurv.tte.labels import TaskSelection, TimeBins, TTELabels, base_rates, build_labels, select_tasks

__all__ = [
    "EventTable",
    "ScanTable",
    "TTEHead",
    "TTEInputError",
    "TTELabels",
    "TTEPretrainConfig",
    "TaskSelection",
    "TimeBins",
    "base_rates",
    "build_labels",
    "is_tte_config",
    "load_events",
    "load_tte_config",
    "select_tasks",
]
