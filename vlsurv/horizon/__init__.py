"""Fixed-horizon mortality from CT (seed 002): fine-tuned MONAI 3D networks and one horizon-AUROC table.

- ``labels``: ``horizon_labels(time, event, horizons) -> HorizonLabels`` (positive / negative / excluded when
  censored before the horizon), ``HorizonError``;
- ``models``: ``build_network(model, size, n_horizons) -> HorizonNet`` (ResNet-18, DenseNet-121, Swin encoder;
  (B, 1, H, W, D) -> logits (B, n_horizons)), ``load_backbone_weights``;
- ``data``: ``HorizonVolumes`` (PersistentDataset of preprocessed volumes, seeded augmentations);
- ``train``: ``masked_bce``, ``train`` (accelerate, checkpoints, resume), ``predict``, ``save_model``;
- ``table``: ``model_rows`` (AUROC per horizon with a bootstrap CI), ``RiskSource`` / ``read_risks`` for other
  models' risks;
- ``config``: ``HorizonConfig``; ``cli``: ``main`` (`vlsurv horizon`).
"""

from vlsurv.horizon.labels import HorizonError, HorizonLabels, horizon_labels

__all__ = ["HorizonError", "HorizonLabels", "horizon_labels"]
