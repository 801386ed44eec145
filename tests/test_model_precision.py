"""Precision and options: an fp32 survival head under bf16, NaN-safe masked means, answer/sequence length
caps, and a stage-2 LoRA config that must agree with the stage-1 adapter."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import TINY_IMAGE_DIM, TINY_IMAGE_TOKENS

from vlsurv.config import ConfigError
from vlsurv.model import LoRAConfig, VisionLanguageSurvivalModel
from vlsurv.model.ensemble import ScanInput, score_shared_prefix
from vlsurv.model.processor import ProcessorError, VLMProcessor
from vlsurv.model.vlm import masked_mean, masked_sum
from vlsurv.training.config import DataConfig, TrainConfig
from vlsurv.training.setup import build_model

QUESTIONS = [
    "What is the location and size of the primary lung tumor?",
    "Are major vessels involved or compressed?",
]
CLINICAL = "64 year-old male former smoker lung cancer patient, stage 1."
LONG_ANSWER = (
    "A 3.2 cm spiculated mass in the right upper lobe. Enlarged subcarinal lymph node measuring 1.4 cm."
)


def _scans(n: int = 2) -> list[ScanInput]:
    generator = torch.Generator().manual_seed(5)
    return [
        ScanInput(f"scan{i}", CLINICAL, torch.randn(TINY_IMAGE_TOKENS, TINY_IMAGE_DIM, generator=generator))
        for i in range(n)
    ]


def _head_dtypes(model) -> list[tuple[torch.dtype, torch.dtype]]:
    """(input dtype, output dtype) of every survival-head call, recorded by a forward hook."""
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    model.survival_branch.head.register_forward_hook(
        lambda m, inputs, out: seen.append((inputs[0].dtype, out.dtype))
    )
    return seen


def test_masked_mean_ignores_nan_at_masked_positions():
    hidden = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    hidden[0, 3:] = float("nan")
    hidden[1, 0] = float("inf")
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
    pooled = masked_mean(hidden, mask)
    assert torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1, 1:].mean(0))
    summed = masked_sum(hidden, mask)
    assert torch.isfinite(summed).all()
    torch.testing.assert_close(summed[0], hidden[0, :3].sum(0))


def test_nan_in_a_padded_hidden_state_does_not_reach_z_pooled(tiny_model_config):
    torch.manual_seed(0)
    model = VisionLanguageSurvivalModel(tiny_model_config).eval()
    processor = model.processor
    items = [
        processor.encode(CLINICAL, QUESTIONS[0], LONG_ANSWER),
        processor.encode(CLINICAL, QUESTIONS[1], "No."),
    ]
    batch = processor.collate(items)
    assert int(batch["attention_mask"][1].sum()) < batch["attention_mask"].shape[1]  # row 1 is padded
    padded = batch["attention_mask"] == 0

    def poison(module, inputs, output):
        return torch.where(padded.unsqueeze(-1), torch.full_like(output, float("nan")), output)

    model.language_model.base_model.model.model.norm.register_forward_hook(poison)
    images = torch.randn(2, TINY_IMAGE_TOKENS, TINY_IMAGE_DIM, generator=torch.Generator().manual_seed(1))
    out = model(batch["input_ids"], batch["attention_mask"], images)
    assert torch.isfinite(out.z_pooled).all()
    assert torch.isfinite(out.survival.log_risk).all()


def test_bf16_model_scores_the_survival_head_in_fp32(tiny_model_config):
    torch.manual_seed(0)
    model = VisionLanguageSurvivalModel(tiny_model_config).eval()
    model.to(torch.bfloat16)
    reference_branch = copy.deepcopy(
        model.survival_branch
    ).float()  # the stored bf16 weights, fp32 arithmetic
    seen = _head_dtypes(model)
    pooled: list[torch.Tensor] = []
    model.survival_branch.register_forward_hook(lambda m, inputs, out: pooled.append(inputs[0]))
    result = score_shared_prefix(model, _scans(), QUESTIONS, pool="prompt")
    assert seen and all(dtypes == (torch.float32, torch.float32) for dtypes in seen)
    expected = reference_branch(pooled[0].float()).log_risk.reshape(2, 2)
    torch.testing.assert_close(result.risks, expected)
    with torch.autocast(
        "cpu", dtype=torch.bfloat16
    ):  # validation and training run under accelerate's autocast
        score_shared_prefix(model, _scans(), QUESTIONS, pool="all")
    assert all(dtypes == (torch.float32, torch.float32) for dtypes in seen)


def test_survival_head_is_fp32_under_autocast_in_forward(tiny_model_config):
    torch.manual_seed(0)
    model = VisionLanguageSurvivalModel(tiny_model_config)
    seen = _head_dtypes(model)
    batch = model.processor.collate([model.processor.encode(CLINICAL, q, "No.") for q in QUESTIONS])
    images = torch.randn(2, TINY_IMAGE_TOKENS, TINY_IMAGE_DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch["input_ids"], batch["attention_mask"], images)
    assert seen == [(torch.float32, torch.float32)] and out.survival.log_risk.dtype == torch.float32
    out.survival.log_risk.sum().backward()
    assert model.survival_branch.head.weight.grad is not None


def test_processor_truncates_long_answers_and_counts_them(tiny_decoder_dir):
    from transformers import AutoTokenizer

    from vlsurv.model.vlm_io import prepare_tokenizer

    tokenizer = prepare_tokenizer(
        AutoTokenizer.from_pretrained(tiny_decoder_dir, local_files_only=True), "<image>"
    )
    full = VLMProcessor(tokenizer, 4)
    n_answer = len(full.answer_ids(LONG_ANSWER)) - 1
    assert n_answer > 5
    capped = VLMProcessor(tokenizer, 4, max_answer_tokens=5)
    item = capped.encode(CLINICAL, QUESTIONS[0], LONG_ANSWER)
    answer = item["labels"][item["labels"] != -100].tolist()
    assert answer == full.answer_ids(LONG_ANSWER)[:5] + [tokenizer.eos_token_id]
    capped.encode(CLINICAL, QUESTIONS[0], "No.")
    assert capped.truncated_answers == 1
    n_prompt = len(full.prompt_ids(CLINICAL, QUESTIONS[0]))
    by_length = VLMProcessor(tokenizer, 4, max_seq_len=n_prompt + 3)
    item = by_length.encode(CLINICAL, QUESTIONS[0], LONG_ANSWER)
    assert item["input_ids"].shape[0] == n_prompt + 3 and by_length.truncated_answers == 1
    assert item["input_ids"][-1].item() == tokenizer.eos_token_id
    with pytest.raises(ProcessorError, match=rf"max_seq_len={n_prompt}: the prompt .* has {n_prompt} tokens"):
        VLMProcessor(tokenizer, 4, max_seq_len=n_prompt).encode(CLINICAL, QUESTIONS[0], "No.")
    with pytest.raises(ProcessorError, match="max_answer_tokens: expected >= 1, got 0"):
        VLMProcessor(tokenizer, 4, max_answer_tokens=0)


def test_model_config_carries_the_length_caps(tiny_model_config):
    config = dataclasses.replace(tiny_model_config, max_answer_tokens=3, max_seq_len=200)
    model = VisionLanguageSurvivalModel(config)
    assert (model.processor.max_answer_tokens, model.processor.max_seq_len) == (3, 200)
    item = model.processor.encode(CLINICAL, QUESTIONS[0], LONG_ANSWER)
    assert int((item["labels"] != -100).sum()) == 4 and model.processor.truncated_answers == 1


def _stage2_config(stage1_dir, model_config) -> TrainConfig:
    return TrainConfig(
        stage=2, data=DataConfig(stage1_dir=str(stage1_dir)), model=model_config, tracker="none"
    )


def test_stage2_lora_that_disagrees_with_the_stage1_adapter_is_an_error(tiny_model_config, tmp_path):
    torch.manual_seed(0)
    VisionLanguageSurvivalModel(tiny_model_config).save_pretrained(tmp_path / "stage1")
    same = build_model(_stage2_config(tmp_path / "stage1", tiny_model_config))
    assert same.language_model.peft_config["default"].r == 4
    other = dataclasses.replace(
        tiny_model_config, lora=LoRAConfig(r=8, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj"])
    )
    with pytest.raises(ConfigError) as error:
        build_model(_stage2_config(tmp_path / "stage1", other))
    message = str(error.value)
    assert "adapter_config.json" in message and "stage1" in message
    assert "model.lora.r=8 (adapter: 4)" in message
    assert "model.lora.target_modules=['k_proj', 'q_proj'] (adapter: ['q_proj', 'v_proj'])" in message
    assert "alpha" not in message
    other = dataclasses.replace(
        tiny_model_config, lora=LoRAConfig(r=4, alpha=32, target_modules=["v_proj", "q_proj"])
    )
    with pytest.raises(ConfigError, match=r"model.lora.alpha=32 \(adapter: 8\)"):
        build_model(_stage2_config(tmp_path / "stage1", other))
