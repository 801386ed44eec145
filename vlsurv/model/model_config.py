"""The model's configuration (``model:`` in a training config, ``config.json`` of a saved model): the decoder,
image tokens, projector, LoRA, precision, survival branch, pooling and answer format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from vlsurv.config import ConfigError, bounded, check_fields
from vlsurv.model.projector import ImagePositions, ProjectorKind, ProjectorNorm
from vlsurv.model.survival import SurvivalConfig
from vlsurv.prompts import STATUS_FORMATS

Quantization = Literal["none", "4bit", "8bit"]
Dtype = Literal["float32", "bfloat16", "float16"]  # the keys of vlm_io.DTYPES
Pool = Literal["all", "prompt"]
POOLS: tuple[str, ...] = get_args(Pool)
AnswerFormat = Literal["as_extracted", "status_first", "findings_first"]
AnswerGuidance = Literal["none", "lobe"]


class ModelConfigError(ConfigError):
    """A model config value that is not what is expected."""


@dataclass
class LoRAConfig:
    """peft LoRA settings (``lora:`` in the model config)."""

    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Decoder modules that get LoRA weights."""


@dataclass
class ModelConfig:
    """Everything needed to build (and rebuild) a ``VisionLanguageSurvivalModel``."""

    decoder_path: str = ""
    """Local folder of the Hugging Face causal LM (decoder and tokenizer)."""
    image_token_dim: int = bounded(2048, ge=1)
    """Channels C of an image token from the encoder."""
    num_image_tokens: int = bounded(49, ge=1)
    """Image tokens T per scan (one ``<image>`` placeholder each)."""
    projector: ProjectorKind = "linear"
    """Multi-modal projector: the paper's linear map or LLaVA-1.5's two-layer GELU MLP."""
    projector_input_norm: ProjectorNorm = "none"
    """Normalisation of the image tokens in front of the projector."""
    image_positions: ImagePositions = "none"
    """"learned": a trainable embedding of each image token's place added after the projector
    (vlsurv.model.projector.LearnedPositions), so that the decoder can read where a finding is (side, lobe)
    and not only what it is; "grid": a linear summary of the whole token grid, with weights per position,
    added to every projected token (vlsurv.model.projector.GridSummary; a side or a lobe is a function of
    where in the grid a finding lies, which a mix of shared projections hardly shows); "none": the paper's
    projector."""
    image_position_rank: int = bounded(16, ge=1)
    """Rank r of the grid summary (image_positions "grid"): the tokens are first mapped to r channels, then
    each position's r channels to d_model; (C + T d_model) r parameters (demo: 16 -> 37k; Merlin's 70 x 2048
    tokens into a 4096-d decoder: 4.6M)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA on the decoder."""
    quantization: Quantization = "none"
    """Load the decoder in 4 or 8 bits (bitsandbytes, CUDA only)."""
    dtype: Dtype = "float32"
    """Storage dtype of the decoder and projector (the survival branch always computes in float32)."""
    gradient_checkpointing: bool = False
    """Recompute the decoder's activations in the backward pass to save memory."""
    trust_remote_code: bool = False
    """Let transformers run the decoder folder's own modelling code."""
    survival: SurvivalConfig = field(default_factory=SurvivalConfig)
    """Survival branch (adapter and head)."""
    pool: Pool = "all"
    """Positions averaged into z_pooled: all, or the prompt's (clinical sentence, image, question)."""
    clinical_template: str = "lung"
    """Clinical sentence template: a name under prompts/clinical or a YAML path."""
    max_answer_tokens: int | None = bounded(256, ge=1)
    """Tokens an answer keeps (a longer answer is cut, its EOS kept); null = no cap."""
    max_seq_len: int | None = bounded(1024, ge=1)
    """Tokens of prompt + answer + EOS; null = no cap."""
    answer_format: AnswerFormat = "as_extracted"
    """Training answers as the VQA file gives them, or "status_first": each opens with its status read by the
    rules reader ("Present: ..." / "Absent: ...", vlsurv.training.answer_status), so that the model's first
    answer token is one present / absent decision; its generated answers open the same way. "findings_first":
    status_first whose openings also name the finding and, when present, the tumour's lobe or the effusion's
    side that the answer gives ("Present, tumor, right lower lobe: ...", "Absent, lymph nodes: ...")."""
    status_bias: dict[str, float] = field(default_factory=dict)
    """status_first: per question id, the offset added to the "Present" opening's logit at the first answer
    token (the decision threshold); fitted on the validation scans when training ends
    (vlsurv.training.status_calibration), 0 for a question not listed."""

    answer_guidance: AnswerGuidance = "none"
    """"lobe" (answer_format findings_first): the lobe that a tumour answer names is the one a linear
    classifier of the image tokens names (vlsurv.model.lobe_guidance; fitted on the training scans' reference
    answers when training starts, saved as lobe_classifier.safetensors); the decoder decides present / absent
    and writes the rest. "none": the decoder writes every token."""

    @property
    def opens_with_status(self) -> bool:
        """Answers open with "Present" / "Absent" (``answer_format`` status_first or findings_first)."""
        return self.answer_format in STATUS_FORMATS

    def __post_init__(self) -> None:
        check_fields(self, "model", ModelConfigError)
        if self.answer_guidance == "lobe" and self.answer_format != "findings_first":
            raise ModelConfigError(
                f"model.answer_guidance 'lobe' names the lobe in findings_first answers, but "
                f"model.answer_format is {self.answer_format!r}; expected 'findings_first'"
            )
