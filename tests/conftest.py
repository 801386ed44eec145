"""Shared fixtures: a tiny Llama decoder directory built once per session, and a model config for it."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_TEXTS = [
    "64 year-old male former smoker lung cancer patient, stage 1, T stage is T2, N stage is N1, M stage is M0.",
    "71 year-old female never smoker lung cancer patient, stage 3, T stage is T4, N stage is N2, M stage is M1.",
    "What is the location and size of the primary lung tumor?",
    "Which lymph nodes are involved, and what are their size and location?",
    "Is there any pleural involvement or effusion present?",
    "Are metastases or involvement of other organs observed?",
    "Are major vessels involved or compressed?",
    "Are there skeleton/bone changes on the scan?",
    "A 3.2 cm spiculated mass in the right upper lobe.",
    "Enlarged subcarinal lymph node measuring 1.4 cm.",
    "Small left pleural effusion. No pleural thickening.",
    "No distant metastases. No bone lesions. The aorta is not involved.",
]

TINY_IMAGE_DIM = 16
TINY_IMAGE_TOKENS = 4


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-hidden Llama + byte-level BPE tokenizer saved with ``save_pretrained`` (plain prompts)."""
    from vlsurv.model.tiny import build_tiny_decoder

    return build_tiny_decoder(
        tmp_path_factory.mktemp("tiny_decoder"),
        TINY_TEXTS * 4,
        num_layers=2,
        hidden_size=64,
        num_heads=4,
        vocab_size=400,
    )


@pytest.fixture
def tiny_model_config(tiny_decoder_dir):
    """A ``ModelConfig`` over the tiny decoder with 4 image tokens of width 16 and LoRA on q/v."""
    from vlsurv.model import LoRAConfig, ModelConfig

    return ModelConfig(
        decoder_path=str(tiny_decoder_dir),
        image_token_dim=TINY_IMAGE_DIM,
        num_image_tokens=TINY_IMAGE_TOKENS,
        lora=LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
