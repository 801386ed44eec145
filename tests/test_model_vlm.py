"""The composed model on the tiny decoder: forward/backward, pooling, stages, save/load, k-bit, encoder
path."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY_IMAGE_DIM, TINY_IMAGE_TOKENS
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from vlsurv.model import DeepHitCuts, LoRAConfig, SurvivalConfig, VisionLanguageSurvivalModel
from vlsurv.model.model_config import ModelConfigError
from vlsurv.model.survival import SurvivalConfigError
from vlsurv.model.vlm import ImageTokenCountError, masked_mean
from vlsurv.model.vlm_io import KbitUnavailableError, ModelLoadError

CLINICAL = ["64 year-old male former smoker lung cancer patient, stage 1.", "71 year-old female, stage 3."]
QUESTIONS = [
    "What is the location and size of the primary lung tumor?",
    "Are major vessels involved or compressed?",
]
ANSWERS = ["A 3.2 cm mass in the right upper lobe.", "No."]


def make_batch(model, answers=ANSWERS, padding_side="right"):
    items = [model.processor.encode(c, q, a) for c, q, a in zip(CLINICAL, QUESTIONS, answers)]
    batch = model.processor.collate(items, padding_side=padding_side)
    batch["image_tokens"] = torch.randn(
        len(items), TINY_IMAGE_TOKENS, TINY_IMAGE_DIM, generator=torch.Generator().manual_seed(1)
    )
    return batch


def run(model, batch, **kwargs):
    return model(batch["input_ids"], batch["attention_mask"], batch["image_tokens"], **kwargs)


@pytest.fixture
def model(tiny_model_config):
    torch.manual_seed(0)
    return VisionLanguageSurvivalModel(tiny_model_config)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train_step(model, stage, lr=1e-2):
    model.set_stage(stage)
    model.train()
    params = [p for group in model.parameter_groups().values() for p in group]
    optimizer = torch.optim.AdamW(params, lr=lr)
    for _ in range(2):
        batch = make_batch(model)
        out = run(model, batch, labels=batch["labels"])
        loss = out.lm_loss + (model.risk(out.survival).sum() if stage == 2 else 0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_forward_backward_reaches_projector_and_lora(model):
    batch = make_batch(model)
    out = run(model, batch, labels=batch["labels"])
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert out.z_pooled.shape == (2, 64) and out.survival.log_risk.shape == (2,)
    assert torch.isfinite(out.lm_loss)
    (out.lm_loss + out.survival.log_risk.sum()).backward()
    assert model.multi_modal_projector.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.lora_parameters())
    assert model.survival_branch.head.weight.grad.abs().sum() > 0


def test_image_token_count_mismatch_names_both_counts(model):
    batch = make_batch(model)
    with pytest.raises(
        ImageTokenCountError,
        match=r"placeholders in input_ids: 8 .*image features given: 6 \(shape \(2, 3, 64\)\)",
    ):
        model(batch["input_ids"], batch["attention_mask"], batch["image_tokens"][:, :3])


def test_prompt_pooling_ignores_the_answer_and_padding(model):
    model.eval()
    full = make_batch(model)
    prompt_only = dict(full)
    prompts = [model.processor.encode(c, q) for c, q in zip(CLINICAL, QUESTIONS)]
    prompt_only.update(model.processor.collate(prompts, padding_side="left"))
    with torch.no_grad():
        pooled_prompt = run(model, full, pool_mask=full["prompt_mask"]).z_pooled
        pooled_alone = run(model, prompt_only).z_pooled
        pooled_all = run(model, full).z_pooled
    torch.testing.assert_close(pooled_prompt, pooled_alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pooled_prompt, pooled_all)
    model.config.pool = "prompt"
    assert torch.equal(model.pool_mask(full), full["prompt_mask"])


def test_left_and_right_padding_give_the_same_outputs(model):
    model.eval()
    right, left = make_batch(model), make_batch(model, padding_side="left")
    with torch.no_grad():
        a, b = run(model, right), run(model, left)
    torch.testing.assert_close(a.z_pooled, b.z_pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.survival.log_risk, b.survival.log_risk, rtol=1e-5, atol=1e-5)


def test_masked_mean_by_hand():
    hidden = torch.arange(12.0).reshape(1, 4, 3)
    assert masked_mean(hidden, torch.tensor([[0, 1, 1, 0]])).tolist() == [[4.5, 5.5, 6.5]]


@pytest.mark.parametrize("stage", [1, 2])
def test_stage_freezing_after_optimizer_steps(model, stage):
    allowed = {1: ("multi_modal_projector.", "lora_"), 2: ("lora_", "survival_branch.")}[stage]
    before = snapshot(model)
    train_step(model, stage)
    after = snapshot(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, "nothing was trained"
    assert all(any(tag in name for tag in allowed) for name in changed), sorted(changed)
    assert any("lora_" in name for name in changed)
    assert any(allowed[0 if stage == 1 else 1] in name for name in changed)
    groups = model.parameter_groups()
    assert bool(groups["projector"]) == (stage == 1) and bool(groups["survival"]) == (stage == 2)
    assert len(groups["lora"]) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_save_and_reload_reproduce_outputs_exactly(model, tmp_path):
    train_step(model, 2)
    model.save_pretrained(tmp_path / "saved")
    reloaded = VisionLanguageSurvivalModel.from_pretrained(tmp_path / "saved")
    batch = make_batch(model)
    with torch.no_grad():
        a, b = run(model, batch, labels=batch["labels"]), run(reloaded, batch, labels=batch["labels"])
    assert torch.equal(a.logits, b.logits) and torch.equal(a.z_pooled, b.z_pooled)
    assert torch.equal(a.survival.log_risk, b.survival.log_risk) and torch.equal(a.lm_loss, b.lm_loss)
    assert (tmp_path / "saved" / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "saved").rglob("*.bin")) and not list((tmp_path / "saved").rglob("*.pt"))


def test_merged_decoder_reloads_to_the_same_outputs(model, tmp_path):
    train_step(model, 1)
    model.save_pretrained(tmp_path / "merged", merge_decoder=True)
    reloaded = VisionLanguageSurvivalModel.from_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "decoder").is_dir() and not (tmp_path / "merged" / "adapter").exists()
    batch = make_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(
            run(model, batch).logits, run(reloaded, batch).logits, rtol=1e-4, atol=1e-4
        )


def test_deephit_cuts_are_saved_and_required(tiny_model_config, tmp_path):
    config = dataclasses.replace(tiny_model_config, survival=SurvivalConfig(head="deephit", num_bins=3))
    model = VisionLanguageSurvivalModel(config).eval()
    batch = make_batch(model)
    with torch.no_grad():
        out = run(model, batch)
    with pytest.raises(SurvivalConfigError, match="no time cuts; build them .*DeepHitCuts.from_times"):
        model.risk(out.survival)
    with pytest.raises(SurvivalConfigError, match="got 2 cuts, expected survival.num_bins = 3"):
        model.set_deephit_cuts(DeepHitCuts([1.0, 2.0]))
    model.set_deephit_cuts(
        DeepHitCuts.from_times([30.0, 60.0, 90.0, 120.0, 150.0, 400.0], [1, 1, 1, 1, 1, 0], 3)
    )
    assert model.survival_curve(out.survival).shape == (2, 3)
    model.save_pretrained(tmp_path / "deephit")
    reloaded = VisionLanguageSurvivalModel.from_pretrained(tmp_path / "deephit")
    assert torch.equal(reloaded.deephit_cuts.cuts, model.deephit_cuts.cuts)
    with torch.no_grad():
        assert torch.equal(model.risk(out.survival), reloaded.risk(run(reloaded, batch).survival))


def test_load_projector_takes_the_stage1_projector(model, tiny_model_config, tmp_path):
    train_step(model, 1)
    model.save_pretrained(tmp_path / "stage1")
    stage2 = VisionLanguageSurvivalModel(tiny_model_config)
    stage2.load_projector(tmp_path / "stage1")
    assert torch.equal(stage2.multi_modal_projector.weight, model.multi_modal_projector.weight)
    wrong = dataclasses.replace(tiny_model_config, image_token_dim=8)
    with pytest.raises(ModelLoadError, match=r"projector.safetensors: weights do not fit .*wrong shape"):
        VisionLanguageSurvivalModel(wrong).load_projector(tmp_path / "stage1" / "projector.safetensors")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_kbit_without_cuda_raises_naming_the_option(tiny_model_config, quantization):
    config = dataclasses.replace(tiny_model_config, quantization=quantization)
    with pytest.raises(
        KbitUnavailableError, match=f"model.quantization='{quantization}' needs a CUDA GPU.*quantization=none"
    ):
        VisionLanguageSurvivalModel(config)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_config):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = VisionLanguageSurvivalModel(
            dataclasses.replace(tiny_model_config, gradient_checkpointing=checkpointing)
        )
        model.set_stage(1)
        model.train()
        batch = make_batch(model)
        run(model, batch, labels=batch["labels"]).lm_loss.backward()
        grads.append(model.multi_modal_projector.weight.grad)
    decoder = model.language_model.base_model.model
    assert getattr(decoder, "is_activation_checkpointing", None) or decoder.is_gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1])


def test_bfloat16_decoder(tiny_model_config):
    model = VisionLanguageSurvivalModel(dataclasses.replace(tiny_model_config, dtype="bfloat16"))
    assert model.language_model.get_input_embeddings().weight.dtype == torch.bfloat16
    out = run(model, make_batch(model))
    assert out.z_pooled.dtype == torch.float32 and torch.isfinite(out.survival.log_risk).all()


def test_pixel_values_go_through_the_frozen_vision_tower(tiny_model_config):
    from vlsurv.encoders.merlin import MerlinImageEncoder

    encoder = MerlinImageEncoder.tiny()
    config = dataclasses.replace(tiny_model_config, image_token_dim=encoder.out_dim)
    model = VisionLanguageSurvivalModel(config, vision_tower=encoder).eval()
    batch = make_batch(model)
    pixels = torch.rand(2, 1, 64, 64, 32)
    with torch.no_grad():
        from_pixels = model(batch["input_ids"], batch["attention_mask"], pixel_values=pixels)
        from_tokens = model(batch["input_ids"], batch["attention_mask"], encoder(pixels))
    assert torch.equal(from_pixels.z_pooled, from_tokens.z_pooled)
    model.set_stage(1)
    model.train()
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    assert not model.vision_tower.training and model.multi_modal_projector.training
    with pytest.raises(ModelConfigError, match="image_tokens not given"):
        model(batch["input_ids"], batch["attention_mask"])


def test_decoder_without_image_token_gets_one(tmp_path, tiny_model_config):
    source = AutoTokenizer.from_pretrained(tiny_model_config.decoder_path)
    vocab = {token: i for token, i in source.get_vocab().items() if token not in ("<image>", "<pad>")}
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(sorted(vocab, key=vocab.get))}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    decoder = LlamaForCausalLM.from_pretrained(tiny_model_config.decoder_path)
    decoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    decoder.save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    model = VisionLanguageSurvivalModel(
        dataclasses.replace(tiny_model_config, decoder_path=str(tmp_path / "plain"))
    )
    embeddings = model.language_model.get_input_embeddings().weight
    assert embeddings.shape[0] == len(tokenizer) + 1 == len(model.tokenizer)
    assert model.processor.pad_token_id == model.processor.eos_token_id
    torch.testing.assert_close(embeddings[-1], embeddings[:-1].mean(0))
    model.save_pretrained(tmp_path / "saved")
    reloaded = VisionLanguageSurvivalModel.from_pretrained(tmp_path / "saved")
    batch = make_batch(model)
    with torch.no_grad():
        assert torch.equal(run(model.eval(), batch).logits, run(reloaded, batch).logits)


def test_bad_paths_and_stages_are_named(model, tiny_model_config, tmp_path):
    with pytest.raises(
        ModelLoadError, match=f"model.decoder_path {tmp_path / 'nope'}: directory does not exist"
    ):
        VisionLanguageSurvivalModel(
            dataclasses.replace(tiny_model_config, decoder_path=str(tmp_path / "nope"))
        )
    with pytest.raises(ModelLoadError, match="config.json: model config does not exist"):
        VisionLanguageSurvivalModel.from_pretrained(tmp_path)
    with pytest.raises(ModelConfigError, match="set_stage: expected 1 or 2, got 3"):
        model.set_stage(3)
    with pytest.raises(SurvivalConfigError, match="only a 'deephit' head"):
        model.survival_curve(run(model, make_batch(model)).survival)


def test_from_pretrained_takes_config_overrides(model, tmp_path):
    model.save_pretrained(tmp_path / "saved")
    reloaded = VisionLanguageSurvivalModel.from_pretrained(tmp_path / "saved", pool="prompt")
    assert reloaded.config.pool == "prompt"
    with pytest.raises(ModelConfigError, match="unknown model config field 'pooling'"):
        VisionLanguageSurvivalModel.from_pretrained(tmp_path / "saved", pooling="prompt")
    with pytest.raises(ModelConfigError, match="model.quantization: expected one of"):
        VisionLanguageSurvivalModel.from_pretrained(tmp_path / "saved", quantization="3bit")


def test_load_adapter_puts_a_saved_lora_into_a_model_built_from_its_config(
    model, tiny_model_config, tmp_path
):
    with torch.no_grad():  # LoRA B starts at zero; move it so that a load that does nothing shows
        for name, p in model.language_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(tmp_path / "saved")
    fresh = VisionLanguageSurvivalModel(tiny_model_config)
    fresh.load_adapter(tmp_path / "saved" / "adapter")
    saved = dict(model.language_model.named_parameters())
    loaded = {n: p for n, p in fresh.language_model.named_parameters() if "lora_" in n}
    assert loaded and all(torch.equal(p, saved[n]) and p.requires_grad for n, p in loaded.items())
    wider = VisionLanguageSurvivalModel(
        dataclasses.replace(
            tiny_model_config, lora=LoRAConfig(r=8, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
        )
    )
    with pytest.raises(
        ModelLoadError, match=r"LoRA adapter .*saved/adapter: its weights do not fit the model's LoRA"
    ):
        wider.load_adapter(tmp_path / "saved" / "adapter")
    more_modules = VisionLanguageSurvivalModel(
        dataclasses.replace(
            tiny_model_config,
            lora=LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"]),
        )
    )
    with pytest.raises(ModelLoadError, match=r"do not fit the model's LoRA \(missing \['[^']*k_proj.lora_A"):
        more_modules.load_adapter(tmp_path / "saved" / "adapter")
    with pytest.raises(ModelLoadError, match=r"LoRA adapter .*nowhere: directory does not exist"):
        fresh.load_adapter(tmp_path / "nowhere")


def test_learned_image_positions_start_at_zero_train_in_stage1_and_are_saved(tiny_model_config, tmp_path):
    config = dataclasses.replace(tiny_model_config, image_positions="learned")
    torch.manual_seed(0)
    model = VisionLanguageSurvivalModel(config)
    plain = VisionLanguageSurvivalModel(tiny_model_config)
    plain.multi_modal_projector.load_state_dict(model.multi_modal_projector[0].state_dict())
    same = torch.randn(1, TINY_IMAGE_DIM).expand(TINY_IMAGE_TOKENS, -1)[None]
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(same), plain.get_image_features(same))
        fresh = model.get_image_features(same)[0]
    assert torch.equal(fresh, fresh[:1].expand_as(fresh))  # one content everywhere: no place told apart yet
    before = snapshot(model)
    train_step(model, 1)
    after = dict(model.named_parameters())
    moved = "multi_modal_projector.1.embedding"
    assert not torch.equal(before[moved], after[moved])
    with torch.no_grad():
        trained = model.get_image_features(same)[0]
    assert not torch.allclose(trained, trained[:1].expand_as(trained))  # places now differ
    model.save_pretrained(tmp_path / "saved")
    reloaded = VisionLanguageSurvivalModel.from_pretrained(tmp_path / "saved")
    assert reloaded.config.image_positions == "learned"
    with torch.no_grad():
        torch.testing.assert_close(reloaded.get_image_features(same), model.get_image_features(same))
    with pytest.raises(ValueError, match="model.image_positions: expected one of"):
        dataclasses.replace(tiny_model_config, image_positions="sinusoidal")


def test_grid_summary_trains_in_stage1_and_is_saved(tiny_model_config, tmp_path):
    config = dataclasses.replace(tiny_model_config, image_positions="grid", image_position_rank=4)
    torch.manual_seed(0)
    model = VisionLanguageSurvivalModel(config)
    projector = model.multi_modal_projector
    grid = projector[-1] if isinstance(projector, torch.nn.Sequential) else projector
    tokens = torch.randn(1, TINY_IMAGE_TOKENS, TINY_IMAGE_DIM)
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(tokens), grid.shared(tokens).to(torch.float32))
    before = grid.up.detach().clone()
    train_step(model, 1)
    assert not torch.equal(before, grid.up)
    with torch.no_grad():
        summary = model.get_image_features(tokens) - grid.shared(tokens)
    assert summary.abs().max() > 0  # the grid's summary, the same on every token
    torch.testing.assert_close(summary, summary[:, :1].expand_as(summary))
    model.save_pretrained(tmp_path / "saved")
    reloaded = VisionLanguageSurvivalModel.from_pretrained(tmp_path / "saved")
    assert (reloaded.config.image_positions, reloaded.config.image_position_rank) == ("grid", 4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.get_image_features(tokens), model.get_image_features(tokens))


def test_clinical_covariates_are_saved_with_the_model_and_required(tiny_model_config, tmp_path):
    from vlsurv.data.covariates import ClinicalCovariates

    fields = ["age", "sex", "stage"]
    config = dataclasses.replace(tiny_model_config, survival=SurvivalConfig(covariates=fields))
    torch.manual_seed(0)
    model = VisionLanguageSurvivalModel(config)
    rows = [
        {"age": 64, "sex": "male", "stage": 1},
        {"age": 71, "sex": "female", "stage": 3},
        {"age": 58, "sex": "female", "stage": 2},
    ]
    with pytest.raises(
        SurvivalConfigError, match=r"fitted on fields \['age'\], expected survival.covariates"
    ):
        model.set_clinical_covariates(ClinicalCovariates.fit(rows, "lung", ["age"]))
    model.set_clinical_covariates(ClinicalCovariates.fit(rows, "lung", fields))
    covariates = torch.stack([model.covariates_of(row) for row in rows[:2]])
    batch = make_batch(model)
    with pytest.raises(SurvivalConfigError, match="reads 3 clinical covariate columns"):
        run(model, batch)
    model.set_stage(2)  # the covariate term trains with the survival branch
    head = model.survival_branch.covariate_head
    assert model.parameter_groups()["survival"][-1] is head.weight and not head.weight.any()
    optimizer = torch.optim.AdamW(model.parameter_groups()["survival"], lr=1e-2)
    model.risk(run(model, batch, covariates=covariates).survival).sum().backward()
    optimizer.step()
    assert head.weight.any()
    model.eval()
    with torch.no_grad():
        risk = model.risk(run(model, batch, covariates=covariates).survival)
    model.save_pretrained(tmp_path / "saved")
    reloaded = VisionLanguageSurvivalModel.from_pretrained(tmp_path / "saved")
    assert torch.equal(torch.stack([reloaded.covariates_of(row) for row in rows[:2]]), covariates)
    with torch.no_grad():
        assert torch.equal(reloaded.risk(run(reloaded, batch, covariates=covariates).survival), risk)
    (tmp_path / "saved" / ClinicalCovariates.FILE_NAME).unlink()
    with pytest.raises(SurvivalConfigError, match=r"survival.covariates is \['age', 'sex', 'stage'\] but"):
        VisionLanguageSurvivalModel.from_pretrained(tmp_path / "saved")
