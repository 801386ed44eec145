"""loss.lobe_weight: the tumour's lobe read from the grid summary by a linear read-out, as an auxiliary
cross-entropy of stage 1 (labels from the reference answers, the loss by hand, the config checks, and a tiny
stage-1 run that trains the read-out and saves a model without it)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_inputs, tiny_config
from safetensors.torch import load_file

from vlsurv.config import ConfigError
from vlsurv.data.datasets import Sample
from vlsurv.metrics_clinical import LOBE_NAMES
from vlsurv.model import VisionLanguageSurvivalModel
from vlsurv.model.projector import ProjectorError, build_projector, grid_summary
from vlsurv.model.vlm import VLMOutput
from vlsurv.training.answer_status import lobe_labels
from vlsurv.training.config import LossConfig
from vlsurv.training.loop import Trainer
from vlsurv.training.objective import lobe_loss, step_loss


def _sample(scan_id: str, question_id: str, answer: str | None) -> Sample:
    return Sample(scan_id, "p", question_id, "?", answer, "", 1.0, 1)


def test_grid_summary_is_what_the_grid_projector_adds_to_every_token():
    torch.manual_seed(0)
    projector = build_projector(
        "linear", 8, 16, input_norm="layernorm", num_tokens=4, positions="grid", position_rank=3
    )
    torch.nn.init.normal_(projector[1].up)
    tokens = torch.randn(2, 4, 8)
    summary = grid_summary(projector, tokens)
    assert summary.shape == (2, 16)
    shared = projector[1].shared(projector[0](tokens))
    torch.testing.assert_close(projector(tokens) - shared, summary[:, None].expand(2, 4, 16))
    with pytest.raises(ProjectorError, match="has no grid summary; expected image_positions grid"):
        grid_summary(build_projector("linear", 8, 16), tokens)


def test_lobe_labels_come_from_the_reference_tumour_answer():
    samples = [
        _sample("a", "tumor", "A 31 mm spiculated mass in the right upper lobe."),
        _sample("a", "pleura", "Small left pleural effusion."),
        _sample("b", "tumor", "Present, tumor, left lower lobe: Mass in the LLL."),
        _sample("c", "tumor", "No pulmonary mass."),
        _sample("d", "tumor", "Masses in the right upper lobe and the left upper lobe."),  # two lobes
        _sample("e", "tumor", None),
    ]
    assert lobe_labels(samples) == {
        "a": LOBE_NAMES.index("right upper lobe"),
        "b": LOBE_NAMES.index("left lower lobe"),
    }


def test_lobe_loss_is_the_cross_entropy_of_the_rows_with_a_lobe():
    logits = torch.randn(4, 5, requires_grad=True)
    lobe = torch.tensor([2, -1, 0, -1])
    expected = -(logits.log_softmax(-1)[0, 2] + logits.log_softmax(-1)[2, 0]) / 2
    torch.testing.assert_close(lobe_loss(logits, lobe), expected)
    none = lobe_loss(logits, torch.full((4,), -1))
    none.backward()
    assert float(none.detach()) == 0.0 and logits.grad is not None


def test_stage1_step_adds_the_weighted_lobe_loss():
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[-100, 1, 2], [-100, 3, -100]])
    lobe_logits = torch.randn(2, 5)
    batch = {"labels": labels, "lobe": torch.tensor([1, -1])}
    output = VLMOutput(None, logits, torch.zeros(2, 4), None, lobe_logits=lobe_logits)
    plain = step_loss(output, batch, 1, LossConfig())
    weighted = step_loss(output, batch, 1, LossConfig(lobe_weight=0.5))
    lobe = F.cross_entropy(lobe_logits[:1], torch.tensor([1]))
    assert weighted.parts["lm"] == plain.parts["lm"] == plain.parts["loss"]
    assert weighted.parts["lobe"] == pytest.approx(float(lobe))
    assert float(weighted.to_backpropagate) == pytest.approx(plain.parts["lm"] + 0.5 * float(lobe))


def test_lobe_weight_needs_stage_1_and_the_grid(tiny_decoder_dir, tmp_path):
    inputs = {"manifest": tmp_path / "m.csv", "vqa": tmp_path / "v.jsonl", "cache": tmp_path / "c"}
    with pytest.raises(
        ConfigError, match=r"loss.lobe_weight: 0.3 reads .*image_positions is 'none'; expected stage 1"
    ):
        tiny_config(
            "stage1", inputs, tiny_decoder_dir, tmp_path, "loss.lobe_weight=0.3", "model.image_positions=none"
        )
    with pytest.raises(ValueError, match=r"loss.lobe_weight: expected a weight >= 0"):
        LossConfig(lobe_weight=-1.0)


@pytest.mark.slow
def test_stage1_trains_the_lobe_readout_and_saves_the_model_without_it(tiny_decoder_dir, tmp_path):
    inputs = build_tiny_inputs(tmp_path / "inputs")
    config = tiny_config(
        "stage1",
        inputs,
        tiny_decoder_dir,
        tmp_path / "run",
        "model.image_positions=grid",
        "loss.lobe_weight=1.0",
        "optim.max_steps=6",
    )
    trainer = Trainer(config)
    labels = lobe_labels(trainer.data.train.samples)
    assert labels and all(
        trainer.data.train[i]["lobe"] == labels.get(s.scan_id, -1)
        for i, s in enumerate(trainer.data.train.samples)
    )
    readout = trainer.accelerator.unwrap_model(trainer.model).lobe_readout
    before = readout.weight.detach().clone()
    final = trainer.fit()
    assert not torch.equal(before, readout.weight.detach())
    logged = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(line["train/lobe"] > 0 for line in logged)
    assert not any("lobe_readout" in key for key in load_file(str(final / "projector.safetensors")))
    reloaded = VisionLanguageSurvivalModel.from_pretrained(final)
    assert reloaded.lobe_readout is None
