"""Frozen 3D image encoders and the feature cache.

``merlin``: ``MerlinImageEncoder`` (Merlin's I3D ResNet-152, checkpoint-compatible) and its config.
``cache``: ``vlsurv encode`` and ``FeatureCache`` (import it from ``vlsurv.encoders.cache``).
"""

from __future__ import annotations

from vlsurv.encoders.merlin import CheckpointError, EncoderConfig, MerlinImageEncoder, tiny_config

__all__ = ["CheckpointError", "EncoderConfig", "MerlinImageEncoder", "tiny_config"]
