"""Tiny stage-1 and stage-2 runs on the synthetic cohort: the loss falls, frozen parameters stay
bit-identical."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_inputs, tiny_config
from safetensors.torch import load_file

from vlsurv.config import ConfigError, load_config
from vlsurv.encoders.cache import FeatureCache
from vlsurv.encoders.provenance import IMAGE_ENCODER_NAME, cache_provenance
from vlsurv.model import VisionLanguageSurvivalModel
from vlsurv.model.survival import DeepHitCuts
from vlsurv.training.checkpoints import STATE_NAME, step_dir_name
from vlsurv.training.config import TrainConfig
from vlsurv.training.loop import Trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_inputs(tmp_path_factory.mktemp("tiny_inputs"))


def snapshot(model) -> dict[str, tuple[bool, torch.Tensor]]:
    return {name: (p.requires_grad, p.detach().clone()) for name, p in model.named_parameters()}


def check_frozen_and_trained(before, model, trained_prefixes: tuple[str, ...]) -> None:
    """Frozen parameters bit-identical; every trained part moved; trained = exactly the given prefixes."""
    moved = set()
    for name, p in model.named_parameters():
        trainable, old = before[name]
        assert trainable == any(name.startswith(prefix) or prefix in name for prefix in trained_prefixes), (
            name
        )
        if trainable:
            if not torch.equal(old, p.detach()):
                moved.add(
                    next(prefix for prefix in trained_prefixes if name.startswith(prefix) or prefix in name)
                )
        else:
            assert torch.equal(old, p.detach()), f"frozen parameter {name} changed"
    assert moved == set(trained_prefixes)


def losses(run_dir: Path, key: str = "train/loss") -> list[float]:
    return [json.loads(line)[key] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def falls(values: list[float], k: int = 4) -> bool:
    return sum(values[-k:]) / k < sum(values[:k]) / k


@pytest.fixture(scope="module")
def stage1_run(tiny_inputs, tiny_decoder_dir, tmp_path_factory) -> tuple[Trainer, dict, Path]:
    out = tmp_path_factory.mktemp("stage1")
    config = tiny_config("stage1", tiny_inputs, tiny_decoder_dir, out, "optim.epochs=3")
    trainer = Trainer(config)
    before = snapshot(trainer.model)
    final = trainer.fit()
    return trainer, before, final


def test_stage1_trains_projector_and_lora_only(stage1_run):
    trainer, before, final = stage1_run
    check_frozen_and_trained(before, trainer.model, ("multi_modal_projector", "lora_"))
    values = losses(trainer.run_dir)
    assert len(values) == trainer.total_steps and falls(values)
    validation = [
        json.loads(line) for line in (trainer.run_dir / "validation.jsonl").read_text().splitlines()
    ]
    assert [v["epochs_completed"] for v in validation] == [1, 2, 3]
    assert all("val/lm_loss" in v and "val/c_index" not in v for v in validation)
    samples = [json.loads(line) for line in (trainer.run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and set(samples[0]) == {"step", "scan_id", "question_id", "answer"}
    assert load_config(TrainConfig, trainer.run_dir / "config.yaml") == trainer.config


def test_stage1_final_model_is_what_predict_loads(stage1_run):
    trainer, _, final = stage1_run
    loaded = VisionLanguageSurvivalModel.from_pretrained(final)
    trained = trainer.accelerator.unwrap_model(trainer.model)
    for name, p in trained.multi_modal_projector.state_dict().items():
        assert torch.equal(loaded.multi_modal_projector.state_dict()[name], p)
    lora = {n: p for n, p in trained.language_model.named_parameters() if "lora_" in n}
    loaded_lora = {n: p for n, p in loaded.language_model.named_parameters() if "lora_" in n}
    assert lora.keys() == loaded_lora.keys() and all(torch.equal(lora[n], loaded_lora[n]) for n in lora)


def test_the_final_folder_records_the_encoder_of_its_cache(stage1_run, tiny_inputs):
    _, _, final = stage1_run
    record = json.loads((final / IMAGE_ENCODER_NAME).read_text())
    assert record == cache_provenance(FeatureCache(tiny_inputs["cache"]))
    assert record["key"]["checkpoint_sha256"] == "random-init:0" and record["token_shape"] == [4, 256]


def test_stage2_refuses_a_cache_encoded_otherwise_than_stage1(
    stage1_run, tiny_inputs, tiny_decoder_dir, tmp_path
):
    _, _, stage1_final = stage1_run
    other = shutil.copytree(tiny_inputs["cache"], tmp_path / "cache")
    index = json.loads((other / "index.json").read_text())
    for entry in index["scans"].values():
        entry["checkpoint_sha256"] = "random-init:1"
    (other / "index.json").write_text(json.dumps(index))
    config = tiny_config(
        "stage2_deepsurv",
        {**tiny_inputs, "cache": other},
        tiny_decoder_dir,
        tmp_path / "run",
        f"data.stage1_dir={stage1_final}",
    )
    with pytest.raises(
        ConfigError,
        match=r"data.cache .*: encoded with checkpoint_sha256 'random-init:1' \(stage 1: 'random-init:0'\); "
        r"expected the encoder and preprocessing of the stage-1 model",
    ):
        Trainer(config)


def test_a_fresh_run_never_selects_an_earlier_runs_checkpoint(tiny_inputs, tiny_decoder_dir, tmp_path):
    run = tmp_path / "run"
    checkpointing = ("optim.epochs=1", "checkpoint.every_n_steps=2", "checkpoint.keep_best=true")
    config = tiny_config("stage1", tiny_inputs, tiny_decoder_dir, run, *checkpointing, "eval.every_n_steps=2")
    Trainer(config).fit()
    planted = run / "checkpoints" / step_dir_name(999)  # the earlier run's, with the best val LM loss ever
    shutil.copytree(sorted((run / "checkpoints").glob("step-*"))[-1], planted)
    state = json.loads((planted / STATE_NAME).read_text())
    (planted / STATE_NAME).write_text(json.dumps({**state, "metric": -1.0, "step": 999}))
    with pytest.raises(
        ConfigError,
        match=r"output_dir .*run holds an earlier run \(checkpoints up to step 999, final/\); give --resume "
        r"latest to continue it, overwrite_output_dir=true to start over, or another output_dir",
    ):
        Trainer(config).fit()
    fresh = Trainer(dataclasses.replace(config, overwrite_output_dir=True)).fit()
    selection = json.loads((fresh / "selection.json").read_text())
    assert not planted.exists() and selection["step"] <= selection["last_step"] < 999


@pytest.mark.parametrize("head", ["deepsurv", "deephit"])
def test_stage2_keeps_the_stage1_projector_frozen_and_trains_lora_and_survival(
    head, stage1_run, tiny_inputs, tiny_decoder_dir, tmp_path
):
    _, _, stage1_final = stage1_run
    config = tiny_config(
        f"stage2_{head}",
        tiny_inputs,
        tiny_decoder_dir,
        tmp_path,
        f"data.stage1_dir={stage1_final}",
        "optim.epochs=8",
        "checkpoint.keep_best=false",
    )  # final = the last step (best: see below)
    trainer = Trainer(config)
    model = trainer.accelerator.unwrap_model(trainer.model)
    stage1_projector = load_file(str(stage1_final / "projector.safetensors"))
    assert all(
        torch.equal(model.multi_modal_projector.state_dict()[k], v) for k, v in stage1_projector.items()
    )
    if head == "deephit":  # the head starts at the training set's marginal (intercept-only) distribution
        cuts = DeepHitCuts.from_times(trainer.data.train_time, trainer.data.train_event, 4)
        marginal = cuts.marginal_log_probabilities(trainer.data.train_time, trainer.data.train_event)
        assert torch.allclose(model.survival_branch.head.bias.double(), marginal, atol=1e-6)
    before = snapshot(trainer.model)
    final = trainer.fit()
    check_frozen_and_trained(before, trainer.model, ("survival_branch", "lora_"))
    assert falls(losses(tmp_path))
    assert set(json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[0])) >= {
        "train/loss",
        "train/lm",
        "train/surv",
        "train/disp",
        "train/align",
        "lr/lora",
        "lr/survival",
    }
    validation = [json.loads(line) for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert all(0.0 <= v["val/c_index"] <= 1.0 for v in validation)
    if head == "deephit":
        expected = DeepHitCuts.from_times(trainer.data.train_time, trainer.data.train_event, 4)
        assert torch.equal(DeepHitCuts.load(final).cuts, expected.cuts)
    assert VisionLanguageSurvivalModel.from_pretrained(final).config.survival.head == head


def test_a_cpu_run_repeats_exactly(tiny_inputs, tiny_decoder_dir, tmp_path):
    finals = []
    for name in ("a", "b"):
        config = tiny_config(
            "stage1",
            tiny_inputs,
            tiny_decoder_dir,
            tmp_path / name,
            "optim.max_steps=3",
            "model.lora.dropout=0.1",
            "eval.sample_answers=0",
        )
        finals.append(Trainer(config).fit())
    for relative in ("projector.safetensors", "adapter/adapter_model.safetensors"):
        first, second = (load_file(str(f / relative)) for f in finals)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _predict_c_index(model_dir: Path, inputs: dict, out: Path, split: str = "val") -> float:
    """Harrell's C of `vlsurv predict`'s scan risks (its defaults) on ``split`` of the tiny cohort."""
    import pandas as pd

    from vlsurv.metrics import concordance_index
    from vlsurv.predict import PredictConfig, predict

    predict(
        PredictConfig(
            model=str(model_dir),
            manifest=str(inputs["manifest"]),
            cache=str(inputs["cache"]),
            out=str(out),
            split=split,
            device="cpu",
        ),
        progress=False,
    )
    risks = pd.read_csv(out / "predictions.csv", dtype={"scan_id": str})
    manifest = pd.read_csv(inputs["manifest"], dtype={"scan_id": str}).merge(risks, on="scan_id")
    return concordance_index(manifest["time"].tolist(), manifest["event"].tolist(), manifest["risk"].tolist())


def validated_stage2_config(stage1_run, inputs, decoder, out: Path, *overrides: str) -> TrainConfig:
    """A 4-epoch stage 2 from the stage-1 run, validated at every step (answers of at most 6 tokens) into
    ``out``/run."""
    _, _, stage1_final = stage1_run
    return tiny_config(
        "stage2_deepsurv",
        inputs,
        decoder,
        out / "run",
        f"data.stage1_dir={stage1_final}",
        "optim.epochs=4",
        "eval.every_n_steps=1",
        "eval.max_new_tokens=6",
        "checkpoint.keep_last=1",
        *overrides,
    )


def test_stage2_validates_what_predict_deploys_and_final_holds_the_best_checkpoint(
    stage1_run, tiny_inputs, tiny_decoder_dir, tmp_path
):
    config = validated_stage2_config(stage1_run, tiny_inputs, tiny_decoder_dir, tmp_path)
    trainer = Trainer(config)
    final = trainer.fit()
    validation = [
        json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()
    ]
    scored = [(v["val/c_index"], v["step"]) for v in validation]
    best_value = max(value for value, _ in scored)
    assert len({value for value, _ in scored}) > 1, (
        "every validation gave the same C-index: nothing to select"
    )
    selection = json.loads((final / "selection.json").read_text())
    assert selection["selected"] == "best" and selection["metric"] == "val/c_index"
    # a checkpoint is kept on a strict improvement, so the best is the first step that reached the best value
    assert (selection["step"], selection["value"]) == (
        min(s for v, s in scored if v == best_value),
        best_value,
    )
    assert selection["last_step"] == trainer.total_steps
    assert selection["scoring"] == {"pool": "all", "generate": True, "max_new_tokens": 6, "do_sample": False}
    checkpoint = load_file(
        str(tmp_path / "run" / "checkpoints" / f"step-{selection['step']:09d}" / "model.safetensors")
    )
    saved = load_file(str(final / "survival_branch.safetensors"))
    assert all(torch.equal(saved[key], checkpoint[f"survival_branch.{key}"]) for key in saved)
    # predict on final/ with its defaults (pool, answer length from selection.json) gets the validated C-index
    assert _predict_c_index(final, tiny_inputs, tmp_path / "predict") == pytest.approx(best_value, abs=1e-12)
    assert all(v["truncated_answers"] == 0 for v in validation)


def test_answers_over_the_length_cap_are_counted_in_the_validation_log(
    tiny_inputs, tiny_decoder_dir, tmp_path
):
    config = tiny_config(
        "stage1",
        tiny_inputs,
        tiny_decoder_dir,
        tmp_path,
        "optim.max_steps=3",
        "model.max_answer_tokens=3",
        "eval.sample_answers=0",
    )
    Trainer(config).fit()
    lines = (tmp_path / "validation.jsonl").read_text().splitlines()
    counts = [json.loads(line)["truncated_answers"] for line in lines]
    assert counts[-1] > 0 and counts == sorted(counts)
    answers = {json.loads(line)["answer"] for line in tiny_inputs["vqa"].read_text().splitlines()}
    logs = "".join(path.read_text() for path in tmp_path.glob("*.jsonl"))
    assert not any(answer in logs for answer in answers)


def test_stage2_at_lr_lora_0_freezes_the_decoder_and_validates_from_its_first_pass(
    stage1_run, tiny_inputs, tiny_decoder_dir, tmp_path, monkeypatch
):
    """lr_lora 0: LoRA gets no gradient (bit-identical, out of the optimizer); validation runs the decoder
    once and afterwards the survival branch alone on the kept pooled states, with the risks predict gives."""
    import vlsurv.training.validation as validation_module

    _, _, stage1_final = stage1_run
    config = validated_stage2_config(stage1_run, tiny_inputs, tiny_decoder_dir, tmp_path, "optim.lr_lora=0")
    trainer = Trainer(config)
    assert [group["name"] for group in trainer.optimizer.param_groups] == ["survival"]
    calls = []
    scored = validation_module.score_shared_prefix
    monkeypatch.setattr(
        validation_module, "score_shared_prefix", lambda *a, **k: calls.append(1) or scored(*a, **k)
    )
    before = snapshot(trainer.model)
    final = trainer.fit()
    for name, p in trainer.model.named_parameters():  # final = the best step, which may be the first (lr 0)
        trainable, old = before[name]
        assert trainable == name.startswith("survival_branch"), name
        assert trainable or torch.equal(old, p.detach()), f"frozen parameter {name} changed"
    validation = [
        json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()
    ]
    scans, questions = validation_module.scans_and_questions(trainer.data.val)
    batches = -(-len(scans) // max(1, config.eval.batch_size // len(questions)))
    assert len(validation) == trainer.total_steps > 2
    assert len(calls) == batches  # the first validation's decoder passes, none afterwards
    assert len({v["val/lm_loss"] for v in validation}) == 1
    assert len({v["val/c_index"] for v in validation}) > 1
    selection = json.loads((final / "selection.json").read_text())
    assert _predict_c_index(final, tiny_inputs, tmp_path / "predict") == pytest.approx(
        selection["value"], abs=1e-12
    )
    stage1_adapter = load_file(str(stage1_final / "adapter" / "adapter_model.safetensors"))
    final_adapter = load_file(str(final / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(stage1_adapter[k], final_adapter[k]) for k in stage1_adapter)


def test_stage2_with_clinical_covariates_trains_their_term_and_predict_reads_them(
    stage1_run, tiny_inputs, tiny_decoder_dir, tmp_path
):
    """survival.covariates: fitted on the train rows, carried by both datasets' items, trained from zero in
    the survival part, saved with final/, and read by predict, which gives the validated C-index."""
    import pandas as pd

    from vlsurv.data.covariates import ClinicalCovariates

    config = validated_stage2_config(
        stage1_run,
        tiny_inputs,
        tiny_decoder_dir,
        tmp_path,
        "optim.lr_lora=0",
        "model.survival.covariates=[age, smoking, stage]",
    )
    trainer = Trainer(config)
    manifest = pd.read_csv(tiny_inputs["manifest"], dtype={"scan_id": str})
    train_rows = manifest[manifest["split"] == "train"].to_dict("records")
    expected = ClinicalCovariates.fit(train_rows, "lung", ["age", "smoking", "stage"])
    assert trainer.data.covariates.columns == expected.columns
    item = trainer.data.val[0]
    row = manifest.set_index("scan_id").loc[item["scan_id"]].to_dict()
    assert torch.equal(item["covariates"], expected.encode(row))
    head = trainer.accelerator.unwrap_model(trainer.model).survival_branch.covariate_head
    assert not head.weight.any()
    final = trainer.fit()
    assert (final / ClinicalCovariates.FILE_NAME).is_file()
    saved = load_file(str(final / "survival_branch.safetensors"))
    assert saved["covariate_head.weight"].shape == (1, expected.size) and saved["covariate_head.weight"].any()
    selection = json.loads((final / "selection.json").read_text())
    assert _predict_c_index(final, tiny_inputs, tmp_path / "predict") == pytest.approx(
        selection["value"], abs=1e-12
    )


def test_a_stage_whose_every_part_has_learning_rate_0_is_refused(tiny_inputs, tiny_decoder_dir, tmp_path):
    config = tiny_config(
        "stage1", tiny_inputs, tiny_decoder_dir, tmp_path, "optim.lr_projector=0", "optim.lr_lora=0"
    )
    with pytest.raises(
        ConfigError,
        match=r"stage 1: every trainable part has learning rate 0 "
        r"\(optim.lr_projector, optim.lr_lora\); nothing would train",
    ):
        Trainer(config)
