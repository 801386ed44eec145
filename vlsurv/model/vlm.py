"""The vision-language survival model, composed in the manner of transformers' LLaVA.

Parts: ``multi_modal_projector`` (image tokens (B, T, C) -> (B, T, d)), ``language_model`` (a local HF causal
LM wrapped with peft LoRA, optionally 4/8-bit), ``survival_branch`` (adapter + DeepSurv/DeepHit head on the
pooled last hidden state) and an optional frozen ``vision_encoder`` used only when tokens are not given.

Forward: token embeddings, with the projected image tokens scattered over the ``<image>`` placeholders, go
through the decoder; ``lm_loss`` is the causal LM loss on the answer tokens (labels != -100);
``z_pooled`` (B, d) = masked mean of the last hidden states over ``pool_mask`` (default: the attention mask).
The survival branch always runs in float32 (autocast off, its weights cast up when the model is stored in
bf16/fp16), in training, validation and predict alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vlsurv.errors import InputError
from vlsurv.model.processor import IMAGE_TOKEN, VLMProcessor
from vlsurv.model.projector import PROJECTOR_KINDS, PROJECTOR_NORMS, build_projector
from vlsurv.model.survival import (
    DeepHitCuts,
    SurvivalBranch,
    SurvivalConfig,
    SurvivalConfigError,
    SurvivalOutput,
    deephit_risk,
    deephit_survival,
)
from vlsurv.model.vlm_io import (
    ADAPTER_DIR,
    DTYPES,
    PROJECTOR_NAME,
    SURVIVAL_NAME,
    load_language_model,
    load_module,
    prepare_tokenizer,
    read_config,
    require_dir,
    save_model,
)

QUANTIZATIONS = ("none", "4bit", "8bit")
POOLS = ("all", "prompt")


class ModelConfigError(InputError):
    """A model config value that is not what is expected."""


class ImageTokenCountError(InputError):
    """The number of ``<image>`` placeholders differs from the number of image tokens given."""


@dataclass
class LoRAConfig:
    """peft LoRA settings (``lora:`` in the model config)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    """Everything needed to build (and rebuild) a ``VisionLanguageSurvivalModel``."""

    decoder_path: str = ""
    image_token_dim: int = 2048
    num_image_tokens: int = 49
    projector: str = "linear"
    projector_input_norm: str = "none"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    quantization: str = "none"
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    survival: SurvivalConfig = field(default_factory=SurvivalConfig)
    pool: str = "all"
    clinical_template: str = "lung"
    max_answer_tokens: int | None = 256
    max_seq_len: int | None = 1024

    def __post_init__(self) -> None:
        choices = {
            "projector": PROJECTOR_KINDS,
            "projector_input_norm": PROJECTOR_NORMS,
            "quantization": QUANTIZATIONS,
            "dtype": tuple(DTYPES),
            "pool": POOLS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ModelConfigError(
                    f"model.{name}: expected one of {allowed}, got {getattr(self, name)!r}"
                )
        for name in ("image_token_dim", "num_image_tokens", "max_answer_tokens", "max_seq_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ModelConfigError(f"model.{name}: expected >= 1, got {getattr(self, name)}")


@dataclass
class VLMOutput:
    """lm_loss (scalar or None), logits (B, L, V), z_pooled (B, d) float32, survival (``SurvivalOutput``)."""

    lm_loss: torch.Tensor | None
    logits: torch.Tensor
    z_pooled: torch.Tensor
    survival: SurvivalOutput


def masked_sum(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, d), (B, L) -> (B, d) float32 sum over positions where mask is 1; ``torch.where``, so a NaN or inf at
    a masked position stays out (a product with 0 would keep it)."""
    keep = mask.bool().unsqueeze(-1)
    return torch.where(keep, hidden.float(), torch.zeros((), device=hidden.device)).sum(1)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, d), (B, L) -> (B, d) float32 mean over positions where mask is 1."""
    counts = mask.bool().sum(1, keepdim=True).clamp(min=1).to(torch.float32)
    return masked_sum(hidden, mask) / counts


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) position ids counting only attended tokens, so left and right padding give equal outputs."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class VisionLanguageSurvivalModel(nn.Module):
    """Projector + LoRA decoder + survival branch (+ optional frozen vision encoder); see the module docstring."""

    def __init__(
        self,
        config: ModelConfig,
        vision_encoder: nn.Module | None = None,
        *,
        tokenizer=None,
        adapter_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.config = config
        if tokenizer is None:
            decoder = require_dir(Path(config.decoder_path), "model.decoder_path")
            tokenizer = AutoTokenizer.from_pretrained(
                decoder, local_files_only=True, trust_remote_code=config.trust_remote_code
            )
        self.tokenizer = prepare_tokenizer(tokenizer, IMAGE_TOKEN)
        self.processor = VLMProcessor(
            self.tokenizer, config.num_image_tokens, max_answer_tokens=config.max_answer_tokens,
            max_seq_len=config.max_seq_len,
        )
        self.language_model = load_language_model(
            config, self.tokenizer, Path(adapter_dir) if adapter_dir else None
        )
        d_model = self.language_model.get_input_embeddings().weight.shape[1]
        self.multi_modal_projector = build_projector(
            config.projector, config.image_token_dim, d_model, config.projector_input_norm,
            config.num_image_tokens,
        )
        self.survival_branch = SurvivalBranch(d_model, config.survival)
        self.vision_encoder = vision_encoder
        if vision_encoder is not None:
            vision_encoder.requires_grad_(False)
            vision_encoder.eval()
        self.deephit_cuts: DeepHitCuts | None = None
        if config.quantization != "none":
            device = self.language_model.get_input_embeddings().weight.device
            self.multi_modal_projector.to(device)
            self.survival_branch.to(device)

    def train(self, mode: bool = True) -> VisionLanguageSurvivalModel:
        """Train mode for every part except the frozen vision encoder, which stays in eval mode."""
        super().train(mode)
        if self.vision_encoder is not None:
            self.vision_encoder.eval()
        return self

    @property
    def hidden_size(self) -> int:
        return int(self.language_model.get_input_embeddings().weight.shape[1])

    @property
    def device(self) -> torch.device:
        return next(self.multi_modal_projector.parameters()).device

    def set_deephit_cuts(self, cuts: DeepHitCuts) -> None:
        """Attach the training-set cuts of a DeepHit model (saved with it)."""
        if self.config.survival.head != "deephit":
            raise SurvivalConfigError(
                "set_deephit_cuts: the survival head is 'deepsurv'; cuts belong to 'deephit'"
            )
        if cuts.num_bins != self.config.survival.num_bins:
            raise SurvivalConfigError(
                f"DeepHit cuts: got {cuts.num_bins} cuts, expected survival.num_bins = {self.config.survival.num_bins}"
            )
        self.deephit_cuts = cuts

    def require_cuts(self) -> DeepHitCuts:
        if self.deephit_cuts is None:
            raise SurvivalConfigError(
                "this DeepHit model has no time cuts; build them from the training event times with "
                "DeepHitCuts.from_times(time, event, num_bins) and call set_deephit_cuts"
            )
        return self.deephit_cuts

    # --- inputs -------------------------------------------------------------------------------------------
    def image_features(
        self, image_tokens: torch.Tensor | None, pixel_values: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, T, C) image tokens as given, or from the frozen encoder on ``pixel_values`` (B, 1, H, W, D)."""
        if image_tokens is not None:
            return image_tokens
        if pixel_values is None or self.vision_encoder is None:
            raise ModelConfigError(
                "forward: image_tokens not given; expected image_tokens (B, T, C), or pixel_values with a "
                "vision_encoder attached to the model"
            )
        with torch.no_grad():
            return self.vision_encoder(pixel_values)

    def embed_inputs(self, input_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) ids + (B, T, C) image tokens -> (B, L, d) embeddings with images at the placeholders."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        placeholder = input_ids == self.processor.image_token_id
        per_row = placeholder.sum(-1)
        n_images, n_tokens = image_tokens.shape[0], image_tokens.shape[1]
        if image_tokens.dim() != 3 or n_images != input_ids.shape[0] or bool((per_row != n_tokens).any()):
            raise ImageTokenCountError(
                f"image placeholders in input_ids: {int(placeholder.sum())} (per row {per_row.tolist()}); image tokens "
                f"given: {n_images * n_tokens} (shape {tuple(image_tokens.shape)}); expected equal counts"
            )
        weight = next(self.multi_modal_projector.parameters())
        projected = self.multi_modal_projector(image_tokens.to(device=weight.device, dtype=weight.dtype))
        return embeds.masked_scatter(placeholder.unsqueeze(-1), projected.to(embeds.dtype))

    def pool_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mask ``config.pool`` asks for: ``prompt_mask`` ("prompt") or ``attention_mask`` ("all")."""
        return batch["prompt_mask"] if self.config.pool == "prompt" else batch["attention_mask"]

    # --- forward ------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pool_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> VLMOutput:
        embeds = self.embed_inputs(input_ids, self.image_features(image_tokens, pixel_values))
        out = self.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            labels=labels,
            output_hidden_states=True,
            use_cache=False,
        )
        mask = attention_mask if pool_mask is None else pool_mask * attention_mask
        z_pooled = masked_mean(out.hidden_states[-1], mask).to(self.device)
        return VLMOutput(lm_loss=out.loss, logits=out.logits, z_pooled=z_pooled, survival=self.survive(z_pooled))

    def survive(self, z_pooled: torch.Tensor) -> SurvivalOutput:
        """The survival branch on (B, d) ``z_pooled`` in float32: autocast off, and weights stored in bf16/fp16
        cast up for the call (differentiably; the stored parameters are unchanged)."""
        branch = self.survival_branch
        z = z_pooled.to(device=self.device, dtype=torch.float32)
        with torch.autocast(device_type=z.device.type, enabled=False):
            if all(p.dtype == torch.float32 for p in branch.parameters()):
                return branch(z)
            weights = {name: p.float() for name, p in branch.named_parameters()}
            return torch.func.functional_call(branch, weights, (z,))

    def risk(self, survival: SurvivalOutput) -> torch.Tensor:
        """(B,) ranking score (higher = earlier event): DeepSurv log-risk, DeepHit per ``survival.deephit_risk``."""
        if self.config.survival.head == "deepsurv":
            return survival.log_risk
        cfg = self.config.survival
        return deephit_risk(survival.logits, self.require_cuts(), cfg.deephit_risk, cfg.horizon)

    def survival_curve(self, survival: SurvivalOutput) -> torch.Tensor:
        """(B, K) DeepHit survival S(cut_k) at ``deephit_cuts``."""
        if self.config.survival.head != "deephit":
            raise SurvivalConfigError("survival_curve: only a 'deephit' head gives a survival curve")
        self.require_cuts()
        return deephit_survival(survival.logits)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """(B, N) new token ids for left-padded prompts (greedy by default; stops at EOS, then pads).

        The ``<image>`` placeholder is never generated (it would be read back as an image slot).
        """
        embeds = self.embed_inputs(input_ids, image_tokens)
        options = (
            {"temperature": temperature} if do_sample else {"temperature": None, "top_p": None, "top_k": None}
        )
        return self.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            eos_token_id=self.processor.eos_token_id,
            pad_token_id=self.processor.pad_token_id,
            suppress_tokens=[self.processor.image_token_id],
            **options,
        )

    # --- training stages ----------------------------------------------------------------------------------
    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.language_model.named_parameters() if "lora_" in n]

    def set_stage(self, stage: int) -> None:
        """Stage 1: train projector + LoRA. Stage 2: train LoRA + adapter + head. Encoder and base always frozen."""
        if stage not in (1, 2):
            raise ModelConfigError(f"set_stage: expected 1 or 2, got {stage!r}")
        self.requires_grad_(False)
        for p in self.lora_parameters():
            p.requires_grad_(True)
        (self.multi_modal_projector if stage == 1 else self.survival_branch).requires_grad_(True)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part, for separate learning rates."""
        parts = {
            "projector": list(self.multi_modal_projector.parameters()),
            "lora": self.lora_parameters(),
            "survival": list(self.survival_branch.parameters()),
        }
        return {name: [p for p in params if p.requires_grad] for name, params in parts.items()}

    # --- persistence --------------------------------------------------------------------------------------
    def save_pretrained(
        self, directory: str | Path, merge_decoder: bool = False, state_dict: dict | None = None
    ) -> Path:
        """Config JSON, projector + survival safetensors, LoRA adapter, tokenizer, DeepHit cuts (no pickle);
        ``state_dict``: the full state dict gathered under FSDP / ZeRO-3 (see ``vlm_io.save_model``)."""
        return save_model(self, directory, merge_decoder=merge_decoder, state_dict=state_dict)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, vision_encoder: nn.Module | None = None, **config_overrides
    ) -> VisionLanguageSurvivalModel:
        """Rebuild a saved model (in eval mode); ``config_overrides`` replace top-level config fields."""
        from transformers import AutoTokenizer

        directory = require_dir(Path(directory), "model directory")
        config = read_config(ModelConfig, directory)
        for name, value in config_overrides.items():
            if not hasattr(config, name):
                raise ModelConfigError(f"from_pretrained: unknown model config field {name!r}")
            setattr(config, name, value)
        config.__post_init__()
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        adapter = directory / ADAPTER_DIR
        model = cls(
            config, vision_encoder, tokenizer=tokenizer, adapter_dir=adapter if adapter.is_dir() else None
        )
        load_module(model.multi_modal_projector, directory / PROJECTOR_NAME)
        load_module(model.survival_branch, directory / SURVIVAL_NAME)
        if (directory / DeepHitCuts.FILE_NAME).is_file():
            model.set_deephit_cuts(DeepHitCuts.load(directory))
        return model.eval()

    def load_projector(self, path: str | Path) -> None:
        """Load a stage-1 projector: a saved model directory or its ``projector.safetensors``."""
        path = Path(path)
        load_module(self.multi_modal_projector, path / PROJECTOR_NAME if path.is_dir() else path)
