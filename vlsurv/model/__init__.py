"""The vision-language survival model: projector, processor, LoRA decoder, survival branch."""

from vlsurv.model.model_config import LoRAConfig, ModelConfig
from vlsurv.model.processor import IMAGE_TOKEN, VLMProcessor
from vlsurv.model.projector import build_projector
from vlsurv.model.survival import DeepHitCuts, ResidualAdapter, SurvivalBranch, SurvivalConfig, SurvivalOutput
from vlsurv.model.vlm import VisionLanguageSurvivalModel, VLMOutput

__all__ = [
    "IMAGE_TOKEN",
    "DeepHitCuts",
    "LoRAConfig",
    "ModelConfig",
    "ResidualAdapter",
    "SurvivalBranch",
    "SurvivalConfig",
    "SurvivalOutput",
    "VLMOutput",
    "VLMProcessor",
    "VisionLanguageSurvivalModel",
    "build_projector",
]
