"""The vision-language survival model, composed and named as transformers' LLaVA.

Parts: ``multi_modal_projector`` (image tokens (B, T, C) -> (B, T, d)), ``language_model`` (a local HF causal
LM wrapped with peft LoRA, optionally 4/8-bit), ``survival_branch`` (adapter + DeepSurv/DeepHit head on the
pooled last hidden state) and an optional frozen ``vision_tower`` used only when image tokens are not given.

``get_image_features`` gives the projected image features (B, T, d); ``embed_inputs`` scatters them over the
``<image>`` placeholders of the token embeddings (``masked_scatter``), and the embeddings go through the
decoder; ``lm_loss`` is the causal LM loss on the answer tokens (labels != -100);
``z_pooled`` (B, d) = masked mean of the last hidden states over ``pool_mask`` (default: the attention mask).
The survival branch always runs in float32 (autocast off, its weights cast up when the model is stored in
bf16/fp16), in training, validation and predict alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlsurv.data.covariates import ClinicalCovariates
from vlsurv.errors import InputError
from vlsurv.metrics_clinical import LOBE_NAMES
from vlsurv.model.lobe_guidance import LobeClassifier, LobeGuide, LobeWords, guided_lobes
from vlsurv.model.model_config import ModelConfig, ModelConfigError
from vlsurv.model.processor import IMAGE_TOKEN, VLMProcessor
from vlsurv.model.projector import build_projector, grid_summary
from vlsurv.model.survival import (
    DeepHitCuts,
    SurvivalBranch,
    SurvivalConfigError,
    SurvivalOutput,
    deephit_risk,
    deephit_survival,
)
from vlsurv.model.vlm_io import (
    ADAPTER_DIR,
    PROJECTOR_NAME,
    SURVIVAL_NAME,
    load_adapter,
    load_language_model,
    load_module,
    prepare_tokenizer,
    read_config,
    require_dir,
    save_model,
)
from vlsurv.prompts import STATUS_WORDS


class ImageTokenCountError(InputError):
    """The number of ``<image>`` placeholders differs from the number of image tokens given."""


@dataclass
class VLMOutput:
    """lm_loss (scalar or None), logits (B, L, V), z_pooled (B, d) float32, survival (``SurvivalOutput``),
    lobe_logits."""

    lm_loss: torch.Tensor | None
    logits: torch.Tensor
    z_pooled: torch.Tensor
    survival: SurvivalOutput
    lobe_logits: torch.Tensor | None = None
    """(B, 5) logits of the tumour's lobe (``LOBE_NAMES`` order) read from the grid summary, when the model
    has a ``lobe_readout`` (``loss.lobe_weight``)."""


def masked_sum(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, d), (B, L) -> (B, d) float32 sum over positions where mask is 1; ``torch.where``, so a NaN or
    inf at a masked position stays out (a product with 0 would keep it)."""
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
    """Projector + LoRA decoder + survival branch (+ optional frozen vision tower); see the module
    docstring."""

    def __init__(self, config: ModelConfig, vision_tower: nn.Module | None = None, *, tokenizer=None) -> None:
        """A new model built from ``config``: the base decoder of ``config.decoder_path`` with a fresh LoRA, a
        fresh projector and survival branch; ``tokenizer`` defaults to the decoder's. A saved model loads with
        ``from_pretrained``, stage-1 parts with ``load_adapter`` and ``load_projector``."""
        super().__init__()
        # transformers loads with a model, not when `vlsurv predict --help` imports this module
        from transformers import AutoTokenizer

        self.config = config
        if tokenizer is None:
            decoder = require_dir(Path(config.decoder_path), "model.decoder_path")
            tokenizer = AutoTokenizer.from_pretrained(
                decoder, local_files_only=True, trust_remote_code=config.trust_remote_code
            )
        self.tokenizer = prepare_tokenizer(tokenizer, IMAGE_TOKEN)
        self.processor = VLMProcessor(
            self.tokenizer,
            config.num_image_tokens,
            max_answer_tokens=config.max_answer_tokens,
            max_seq_len=config.max_seq_len,
        )
        self.language_model = load_language_model(config, self.tokenizer)
        d_model = self.language_model.get_input_embeddings().weight.shape[1]
        self.multi_modal_projector = build_projector(
            config.projector,
            config.image_token_dim,
            d_model,
            config.projector_input_norm,
            config.num_image_tokens,
            config.image_positions,
            config.image_position_rank,
        )
        self.survival_branch = SurvivalBranch(d_model, config.survival)
        self.vision_tower = vision_tower
        if vision_tower is not None:
            vision_tower.requires_grad_(False)
            vision_tower.eval()
        self.deephit_cuts: DeepHitCuts | None = None
        self.clinical_covariates: ClinicalCovariates | None = None
        self.lobe_readout: nn.Linear | None = None
        self.lobe_classifier: LobeClassifier | None = None
        self.lobe_words: LobeWords | None = None
        if config.quantization != "none":
            device = self.language_model.get_input_embeddings().weight.device
            self.multi_modal_projector.to(device)
            self.survival_branch.to(device)

    def train(self, mode: bool = True) -> VisionLanguageSurvivalModel:
        """Train mode for every part except the frozen vision tower, which stays in eval mode."""
        super().train(mode)
        if self.vision_tower is not None:
            self.vision_tower.eval()
        return self

    @property
    def hidden_size(self) -> int:
        return int(self.language_model.get_input_embeddings().weight.shape[1])

    @property
    def device(self) -> torch.device:
        return next(self.multi_modal_projector.parameters()).device

    def status_decision(self) -> tuple[int, int, int] | None:
        """(step k, token id of "Present", token id of "Absent") when answers open with their status
        (``ModelConfig.opens_with_status``), else None: k is the answer token at which the tokenizer's
        " Present:" and " Absent:" first differ (0 unless both start with a shared token, such as a lone
        space), and the two ids are their tokens there."""
        if not self.config.opens_with_status:
            return None
        present, absent = (self.processor.answer_ids(STATUS_WORDS[s]) for s in ("present", "absent"))
        step = next((i for i, (p, a) in enumerate(zip(present, absent)) if p != a), None)
        if step is None:
            raise ModelConfigError(
                f"answer_format status_first: the tokenizer gives 'Present:' and 'Absent:' the same tokens "
                f"{present}; expected them to differ"
            )
        return step, present[step], absent[step]

    def status_bias_for(self, question_ids: Sequence[str]) -> list[float]:
        """``config.status_bias`` of each question id (0 where not fitted)."""
        return [float(self.config.status_bias.get(question_id, 0.0)) for question_id in question_ids]

    def set_deephit_cuts(self, cuts: DeepHitCuts) -> None:
        """Attach the training-set cuts of a DeepHit model (saved with it)."""
        if self.config.survival.head != "deephit":
            raise SurvivalConfigError(
                "set_deephit_cuts: the survival head is 'deepsurv'; cuts belong to 'deephit'"
            )
        if cuts.num_bins != self.config.survival.num_bins:
            raise SurvivalConfigError(
                f"DeepHit cuts: got {cuts.num_bins} cuts, expected survival.num_bins = "
                f"{self.config.survival.num_bins}"
            )
        self.deephit_cuts = cuts

    def set_clinical_covariates(self, covariates: ClinicalCovariates) -> None:
        """Attach the fitted encoding of ``survival.covariates`` (saved with the model) and give the survival
        branch its covariate term (``SurvivalBranch.add_covariates``)."""
        fields = [c.field for c in covariates.covariates]
        if fields != list(dict.fromkeys(self.config.survival.covariates)):
            raise SurvivalConfigError(
                f"clinical covariates: fitted on fields {fields}, expected survival.covariates = "
                f"{self.config.survival.covariates}"
            )
        self.clinical_covariates = covariates
        self.survival_branch.add_covariates(covariates.size)

    def add_lobe_readout(self) -> None:
        """A linear read-out (d -> 5 lobes, ``LOBE_NAMES``) of the grid summary for ``loss.lobe_weight``; it
        trains with the projector and is not saved with the model."""
        if self.config.image_positions != "grid":
            raise ModelConfigError(
                f"add_lobe_readout: reads the grid summary, but image_positions is "
                f"{self.config.image_positions!r}; expected 'grid'"
            )
        self.lobe_readout = nn.Linear(self.hidden_size, len(LOBE_NAMES)).to(self.device)

    def set_lobe_classifier(self, classifier: LobeClassifier) -> None:
        """Attach the fitted classifier of ``answer_guidance`` "lobe" (saved with the model)."""
        if self.config.answer_guidance != "lobe":
            raise ModelConfigError(
                f"set_lobe_classifier: answer_guidance is {self.config.answer_guidance!r}; expected 'lobe'"
            )
        expected = self.config.num_image_tokens * self.config.image_token_dim
        if classifier.num_features != expected:
            raise ModelConfigError(
                f"lobe classifier: fitted on {classifier.num_features} features; expected num_image_tokens x "
                f"image_token_dim = {expected}"
            )
        self.lobe_classifier = classifier.to(self.device)
        self.lobe_words = LobeWords(self.tokenizer)

    def lobe_guide(self, image_tokens: torch.Tensor, question_ids: Sequence[str] | None) -> LobeGuide | None:
        """The guided decoding of S scans' (S, T, C) image tokens x Q question ids (scan-major) that
        ``answer_guidance`` asks for (``vlsurv.model.lobe_guidance.LobeGuide``); None without guidance."""
        if self.config.answer_guidance == "none":
            return None
        if self.lobe_classifier is None or self.lobe_words is None or question_ids is None:
            raise ModelConfigError(
                "answer_guidance 'lobe' needs the fitted lobe classifier (set_lobe_classifier) and the "
                "questions' ids"
            )
        log_probs, guided = guided_lobes(self.lobe_classifier, image_tokens, question_ids)
        return LobeGuide(self.lobe_words, log_probs, guided)

    def covariates_of(self, row: Mapping) -> torch.Tensor | None:
        """(p,) clinical covariates of a clinical row (manifest row or field mapping) when the survival head
        reads them, else None."""
        return None if self.clinical_covariates is None else self.clinical_covariates.encode(row)

    def require_cuts(self) -> DeepHitCuts:
        if self.deephit_cuts is None:
            raise SurvivalConfigError(
                "this DeepHit model has no time cuts; build them from the training event times with "
                "DeepHitCuts.from_times(time, event, num_bins) and call set_deephit_cuts"
            )
        return self.deephit_cuts

    # --- inputs -------------------------------------------------------------------------------------------
    def get_image_features(
        self, image_tokens: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T, d) projected image features: ``multi_modal_projector`` on the image tokens (B, T, C), given
        as ``image_tokens`` (the feature cache) or computed by the frozen ``vision_tower`` on ``pixel_values``
        (B, 1, H, W, D)."""
        return self.multi_modal_projector(self.image_tokens_of(image_tokens, pixel_values))

    def image_tokens_of(
        self, image_tokens: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T, C) image tokens on the projector's device and dtype: ``image_tokens``, or the vision tower's
        tokens of ``pixel_values``."""
        if image_tokens is None:
            if pixel_values is None or self.vision_tower is None:
                raise ModelConfigError(
                    "forward: image_tokens not given; expected image_tokens (B, T, C), or "
                    "pixel_values with a "
                    "vision_tower attached to the model"
                )
            with torch.no_grad():
                image_tokens = self.vision_tower(pixel_values)
        weight = next(self.multi_modal_projector.parameters())
        return image_tokens.to(device=weight.device, dtype=weight.dtype)

    def get_placeholder_mask(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """(B, L, 1) bool mask of the ``<image>`` placeholders in ``input_ids`` (B, L); ImageTokenCountError
        unless every row has as many as ``image_features`` (B, T, d) has tokens."""
        placeholder = input_ids == self.processor.image_token_id
        per_row = placeholder.sum(-1)
        n_images, n_tokens = image_features.shape[0], image_features.shape[1]
        if image_features.dim() != 3 or n_images != input_ids.shape[0] or bool((per_row != n_tokens).any()):
            raise ImageTokenCountError(
                f"image placeholders in input_ids: {int(placeholder.sum())} (per row "
                f"{per_row.tolist()}); image "
                f"features given: {n_images * n_tokens} (shape {tuple(image_features.shape)}); "
                "expected equal counts"
            )
        return placeholder.unsqueeze(-1)

    def embed_inputs(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """(B, L) ids + (B, T, d) projected image features (``get_image_features``) -> (B, L, d) token
        embeddings with the features scattered over the ``<image>`` placeholders."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        mask = self.get_placeholder_mask(input_ids, image_features)
        return embeds.masked_scatter(mask, image_features.to(embeds.dtype))

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
        covariates: torch.Tensor | None = None,
    ) -> VLMOutput:
        tokens = self.image_tokens_of(image_tokens, pixel_values)
        embeds = self.embed_inputs(input_ids, self.multi_modal_projector(tokens))
        lobe_logits = None
        if self.lobe_readout is not None:
            lobe_logits = self.lobe_readout(grid_summary(self.multi_modal_projector, tokens))
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
        return VLMOutput(
            lm_loss=out.loss,
            logits=out.logits,
            z_pooled=z_pooled,
            survival=self.survive(z_pooled, covariates),
            lobe_logits=lobe_logits,
        )

    def survive(self, z_pooled: torch.Tensor, covariates: torch.Tensor | None = None) -> SurvivalOutput:
        """The survival branch on (B, d) ``z_pooled`` (and (B, p) clinical ``covariates`` when the model has
        them) in float32: autocast off, and weights stored in bf16/fp16 cast up for the call
        (differentiably; the stored parameters are unchanged)."""
        branch = self.survival_branch
        z = z_pooled.to(device=self.device, dtype=torch.float32)
        if covariates is not None:
            covariates = covariates.to(device=self.device, dtype=torch.float32)
        with torch.autocast(device_type=z.device.type, enabled=False):
            if all(p.dtype == torch.float32 for p in branch.parameters()):
                return branch(z, covariates)
            weights = {name: p.float() for name, p in branch.named_parameters()}
            return torch.func.functional_call(branch, weights, (z, covariates))

    def risk(self, survival: SurvivalOutput) -> torch.Tensor:
        """(B,) ranking score (higher = earlier event): DeepSurv log-risk, DeepHit per
        ``survival.deephit_risk``."""
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
        embeds = self.embed_inputs(input_ids, self.get_image_features(image_tokens))
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
        """Stage 1: train projector + LoRA. Stage 2: train LoRA + adapter + head. Encoder and base always
        frozen."""
        if stage not in (1, 2):
            raise ModelConfigError(f"set_stage: expected 1 or 2, got {stage!r}")
        self.requires_grad_(False)
        for p in self.lora_parameters():
            p.requires_grad_(True)
        (self.multi_modal_projector if stage == 1 else self.survival_branch).requires_grad_(True)
        if stage == 1 and self.lobe_readout is not None:
            self.lobe_readout.requires_grad_(True)

    def _parts(self) -> dict[str, list[nn.Parameter]]:
        return {
            "projector": [
                *self.multi_modal_projector.parameters(),
                *(self.lobe_readout.parameters() if self.lobe_readout is not None else ()),
            ],
            "lora": self.lora_parameters(),
            "survival": list(self.survival_branch.parameters()),
        }

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part, for separate learning rates."""
        return {name: [p for p in params if p.requires_grad] for name, params in self._parts().items()}

    def trains_decoder(self) -> bool:
        """Whether any parameter before the survival branch (projector, LoRA) trains."""
        parts = self._parts()
        return any(p.requires_grad for name in ("projector", "lora") for p in parts[name])

    def freeze_parts(self, names: list[str]) -> None:
        """Freeze the named parts of ``parameter_groups`` (e.g. the LoRA of a stage 2 at lr_lora 0): no
        gradient is computed for them, so a frozen decoder costs its forward pass only."""
        parts = self._parts()
        for name in names:
            for p in parts[name]:
                p.requires_grad_(False)

    # --- persistence --------------------------------------------------------------------------------------
    def save_pretrained(
        self, directory: str | Path, merge_decoder: bool = False, state_dict: dict | None = None
    ) -> Path:
        """Config JSON, projector + survival safetensors, LoRA adapter, tokenizer, DeepHit cuts (no pickle);
        ``state_dict``: the full state dict gathered under FSDP / ZeRO-3 (see ``vlm_io.save_model``)."""
        return save_model(self, directory, merge_decoder=merge_decoder, state_dict=state_dict)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, vision_tower: nn.Module | None = None, **config_overrides
    ) -> VisionLanguageSurvivalModel:
        """Load a saved model (in eval mode): its config, with ``config_overrides`` replacing top-level
        fields, tokenizer, LoRA adapter (when saved), projector, survival branch and DeepHit cuts (when
        saved)."""
        # transformers loads with a model, not when `vlsurv predict --help` imports this module
        from transformers import AutoTokenizer

        directory = require_dir(Path(directory), "model directory")
        config = read_config(ModelConfig, directory)
        unknown = sorted(set(config_overrides) - {f.name for f in dataclasses.fields(config)})
        if unknown:
            raise ModelConfigError(f"from_pretrained: unknown model config field {unknown[0]!r}")
        config = dataclasses.replace(config, **config_overrides)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = cls(config, vision_tower, tokenizer=tokenizer)
        if (directory / ADAPTER_DIR).is_dir():
            model.load_adapter(directory / ADAPTER_DIR)
        model.load_projector(directory / PROJECTOR_NAME)
        if (directory / ClinicalCovariates.FILE_NAME).is_file():
            model.set_clinical_covariates(ClinicalCovariates.load(directory))
        elif config.survival.covariates:
            raise SurvivalConfigError(
                f"{directory}: survival.covariates is {config.survival.covariates} but "
                f"{ClinicalCovariates.FILE_NAME} is missing; expected the file that save_pretrained writes"
            )
        load_module(model.survival_branch, directory / SURVIVAL_NAME)
        if config.answer_guidance == "lobe":  # answer_guidance="none" loads a guided model unguided
            model.set_lobe_classifier(LobeClassifier.load(directory))
        if (directory / DeepHitCuts.FILE_NAME).is_file():
            model.set_deephit_cuts(DeepHitCuts.load(directory))
        return model.eval()

    def load_adapter(self, adapter_dir: str | Path) -> None:
        """Load a saved LoRA adapter folder (a saved model's ``adapter/``) into the decoder's LoRA."""
        load_adapter(self.language_model, Path(adapter_dir), kbit=self.config.quantization != "none")

    def load_projector(self, path: str | Path) -> None:
        """Load a stage-1 projector: a saved model directory or its ``projector.safetensors``."""
        path = Path(path)
        load_module(self.multi_modal_projector, path / PROJECTOR_NAME if path.is_dir() else path)
