"""The demo's pretrained tiny encoder: the deeply supervised loss, the generator's batches, resuming, and the
shipped checkpoint (its record, its loading by sha256, and the findings it carries on fresh scans)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlsurv.config import to_dict
from vlsurv.data.ct import CTVolume
from vlsurv.data.synthetic.anatomy import render_scan
from vlsurv.data.synthetic.cohort import patient_rng, sample_findings
from vlsurv.data.synthetic.write import resolve_grid
from vlsurv.data.transforms import PreprocessConfig, preprocess_ct
from vlsurv.encoders.cache import cache_key
from vlsurv.encoders.generator_pretrain import (
    BUILTIN_CHECKPOINT,
    BUILTIN_RECORD,
    MASKED,
    PRETRAIN_STREAM,
    QUESTIONS,
    GeneratorPretrainConfig,
    PretrainedGridWarning,
    builtin_sha256,
    check_builtin_grid,
    dense_mask_loss,
    evaluate_encoder,
    generator_batch,
    load_builtin_encoder,
    pretrain_on_generator,
)
from vlsurv.encoders.merlin import file_sha256, tiny_config
from vlsurv.encoders.pretrain import EncoderPretrainError, save_encoder
from vlsurv.encoders.provenance import load_recorded_encoder, write_provenance
from vlsurv.errors import CheckpointError

SMALL = (48, 48, 24)  # 8 x 8 x 16 mm voxels: enough for the loop, not for small findings


def _bce(z, t):
    return max(z, 0) - z * t + np.log1p(np.exp(-abs(z)))


def test_dense_mask_loss_weighs_each_finding_and_the_hardest_negatives():
    # one scan, two findings, a 1 x 2 x 2 logit grid against a 2 x 4 x 4 mask (max-pooled 2 x 2 x 2)
    logits = torch.tensor([[[[[2.0, -1.0], [0.5, -3.0]]], [[[1.0, 0.0], [-2.0, 4.0]]]]])
    masks = torch.zeros(1, 2, 2, 4, 4)
    masks[0, 0, 1, 0, 1] = 1.0  # one voxel of finding 0 in cell (0, 0)
    masks[0, 1, :, 2:, :] = 1.0  # finding 1 fills the cells (1, 0) and (1, 1)
    z = logits.numpy()[0, :, 0]
    positive = (_bce(z[0, 0, 0], 1) + (_bce(z[1, 1, 0], 1) + _bce(z[1, 1, 1], 1)) / 2) / 2
    negatives = [[_bce(v, 0) for v in (z[0, 0, 1], z[0, 1, 0], z[0, 1, 1])], [_bce(v, 0) for v in z[1, 0]]]
    # k = 4 of the 4 cells, zeros at the positive cells included
    hard = (sum(negatives[0]) / 4 + sum(negatives[1]) / 4) / 2
    mean_negative = (sum(negatives[0]) + sum(negatives[1])) / 8
    assert dense_mask_loss(logits, masks).item() == pytest.approx(positive + hard + mean_negative, rel=1e-5)
    # finding_weights scale a finding's positive and hard-negative terms, not the plain negative mean
    weighted = (_bce(z[0, 0, 0], 1) + 3 * (_bce(z[1, 1, 0], 1) + _bce(z[1, 1, 1], 1)) / 2) / 2
    weighted += (sum(negatives[0]) / 4 + 3 * sum(negatives[1]) / 4) / 2
    got = dense_mask_loss(logits, masks, torch.tensor([1.0, 3.0])).item()
    assert got == pytest.approx(weighted + mean_negative, rel=1e-5)


def test_the_hardest_negatives_are_the_top_k_cells():
    logits = torch.linspace(-4.0, 4.0, 1024).reshape(1, 1, 4, 16, 16)
    got = dense_mask_loss(logits, torch.zeros(1, 1, 4, 16, 16)).item()
    losses = F.softplus(logits.flatten())  # BCE against 0
    assert got == pytest.approx(losses.topk(4).values.mean().item() + losses.mean().item(), rel=1e-5)


def test_generator_batches_are_what_the_encoder_reads_with_their_masks():
    volumes, masks, flags = generator_batch(3, (PRETRAIN_STREAM, 0), 2, SMALL, bone_enrich=1.0)
    assert volumes.shape == (2, 1, *SMALL) and masks.shape == (2, len(MASKED), SMALL[2], *SMALL[:2])
    assert flags.shape == (2, len(QUESTIONS)) and flags[:, QUESTIONS.index("bone")].tolist() == [1.0, 1.0]
    # the same scan through the pipeline's preprocessing gives the same volume
    grid = resolve_grid(SMALL)
    findings = sample_findings(patient_rng(3, PRETRAIN_STREAM, 0, 0, 0))
    plain = generator_batch(3, (PRETRAIN_STREAM, 0), 1, SMALL)[0][0]
    scan = render_scan(findings, grid, patient_rng(3, PRETRAIN_STREAM, 0, 0, 1_000_000))
    expected = preprocess_ct(
        CTVolume(scan.hu.astype(np.float32), grid.affine, "x"),
        PreprocessConfig(spacing=grid.spacing, spatial_size=SMALL),
    )
    torch.testing.assert_close(plain, expected.float(), atol=1e-6, rtol=0)
    # masks sit where their finding is: the effusion's voxels read as fluid (10 HU: 0.505)
    pleura = masks[:, MASKED.index("pleura")].permute(0, 2, 3, 1).bool()  # back to (B, H, W, D)
    if pleura.any():
        assert volumes[:, 0][pleura].mean().item() == pytest.approx(0.505, abs=0.03)


def _run(tmp_path, stop_at=None, **overrides):
    config = GeneratorPretrainConfig(steps=4, batch_size=2, volume_shape=SMALL, **overrides)

    def log(entry):
        if stop_at is not None and entry["step"] > stop_at:
            raise KeyboardInterrupt

    return pretrain_on_generator(config, resume_dir=tmp_path, save_every=2, log=log, log_every=1)


def test_a_stopped_pretraining_resumes_to_the_same_weights(tmp_path):
    straight, history = _run(tmp_path / "straight")
    assert [entry["step"] for entry in history] == [1, 2, 3, 4]
    assert all(np.isfinite(entry["dense"]) and np.isfinite(entry["scan"]) for entry in history)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "stopped", stop_at=2)
    resumed, resumed_history = _run(tmp_path / "stopped")
    assert [entry["step"] for entry in resumed_history] == [1, 2, 3, 4]
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, msg=name)
    assert not resumed.training and not any(p.requires_grad for p in resumed.parameters())
    with pytest.raises(
        EncoderPretrainError, match=r"state.pt: written by a run with lr=0.002, this run has 0.01"
    ):
        _run(tmp_path / "stopped", lr=1e-2)


def test_a_phase_starts_from_the_checkpoint_it_is_given(tmp_path):
    first, _ = _run(tmp_path / "first")
    save_encoder(first, tmp_path / "first.safetensors")
    second, _ = _run(tmp_path / "second", init=str(tmp_path / "first.safetensors"), lr=1e-9, first_step=100)
    for name, tensor in first.state_dict().items():
        if "bn" not in name and "downsample.1" not in name:  # BatchNorm's running statistics move on
            torch.testing.assert_close(second.state_dict()[name], tensor, atol=1e-6, rtol=0, msg=name)
    with pytest.raises(CheckpointError, match=r"checkpoint .*absent.safetensors does not exist"):
        _run(tmp_path / "third", init=str(tmp_path / "absent.safetensors"))


def test_bad_pretraining_settings_are_named():
    with pytest.raises(ValueError, match=r"generator_pretrain.bone_enrich: expected a fraction"):
        GeneratorPretrainConfig(bone_enrich=1.5)
    with pytest.raises(ValueError, match=r"generator_pretrain.steps: expected a value >= 1"):
        GeneratorPretrainConfig(steps=0)
    with pytest.raises(
        ValueError,
        match=r"generator_pretrain.finding_weights: weights > 0 of \['tumor', 'lymph_nodes', 'pleura', "
        r"'metastases', 'bone'\], got vessels: 2",
    ):
        GeneratorPretrainConfig(finding_weights={"vessels": 2})
    with pytest.raises(
        ValueError, match=r"generator_pretrain.schedule_steps: 0 or at least steps \(10\), got 5"
    ):
        GeneratorPretrainConfig(steps=10, schedule_steps=5)


def test_the_shipped_checkpoint_is_the_recorded_one_and_loads_as_merlin_code():
    record = json.loads(BUILTIN_RECORD.read_text())
    assert builtin_sha256() == record["sha256"] == file_sha256(BUILTIN_CHECKPOINT)
    assert record["config"]["encoder"] == {"token_mode": "mean_width"}
    encoder = load_builtin_encoder("mean_depth")
    assert encoder.weights_id == record["sha256"] and encoder.config == tiny_config(token_mode="mean_depth")
    assert not encoder.training


def test_a_model_on_the_shipped_encoder_finds_it_without_a_checkpoint_path(tmp_path):
    encoder = load_builtin_encoder()
    preprocess = PreprocessConfig(spacing=(3.0, 3.0, 6.0), spatial_size=(128, 128, 64))
    record = {
        "key": cache_key(encoder, preprocess, "float16"),
        "token_shape": [16, encoder.out_dim],
        "encoder_config": to_dict(encoder.config),
        "preprocess_config": to_dict(preprocess),
    }
    write_provenance(tmp_path, record)
    loaded, _, key = load_recorded_encoder(tmp_path)
    assert key["checkpoint_sha256"] == builtin_sha256()
    for name, tensor in encoder.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)


def test_the_shipped_encoder_carries_every_finding_on_fresh_scans():
    """Scans of a stream that neither the pretraining nor any cohort drew from (evaluate_encoder's)."""
    config = GeneratorPretrainConfig(**{**json.loads(BUILTIN_RECORD.read_text())["config"], "eval_scans": 60})
    scores = evaluate_encoder(load_builtin_encoder(), config)
    head = {question: result["head_auroc"] for question, result in scores.items()}
    assert all(head[q] > 0.75 for q in MASKED), head


def test_the_shipped_encoder_on_another_grid_is_warned_about():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_builtin_grid((128, 128, 64), (3.0, 3.0, 6.0))  # the demo's defaults: silent
    expected = (
        r"the pretrained tiny encoder \(tiny_generator.safetensors\) was trained on \[128, 128, 64\] "
        r"voxels of \[3.0, 3.0, 6.0\] mm, not \[64, 64, 32\] of \[6.0, 6.0, 12.0\] mm; its findings may "
        r"not carry over"
    )
    with pytest.warns(PretrainedGridWarning, match=expected):
        check_builtin_grid((64, 64, 32), (6.0, 6.0, 12.0))
    with pytest.warns(PretrainedGridWarning, match=r"not \[128, 128, 64\] of \[1.5, 1.5, 3.0\] mm"):
        check_builtin_grid((128, 128, 64), (1.5, 1.5, 3.0))
