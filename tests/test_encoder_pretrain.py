"""The demo encoder's supervised pretraining (report-derived labels, train scans only) and the depth-keeping
token mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlsurv.encoders.merlin import MerlinImageEncoder, file_sha256
from vlsurv.encoders.pretrain import (
    EncoderPretrainConfig,
    EncoderPretrainError,
    pretrain_encoder,
    report_labels,
    save_encoder,
    stage3_maps,
    token_logits,
)


def test_mean_width_tokens_keep_depth_and_side():
    x = torch.rand(2, 1, 96, 96, 64)
    encoder = MerlinImageEncoder.tiny(token_mode="mean_width")
    fmap = encoder.feature_map(x)  # (B, C, D', H', W') = (2, 256, 4, 3, 3)
    tokens = encoder(x)
    assert tokens.shape == (2, 4 * 3, 256)
    assert torch.allclose(tokens[:, 2 * 3 + 1], fmap[:, :, 2, 1, :].mean(dim=-1))


def test_report_labels_mask_what_the_report_does_not_say():
    rows = [
        {"report_id": "a", "question_id": "bone", "status": "present"},
        {"report_id": "a", "question_id": "pleura", "status": "absent"},
        {"report_id": "b", "question_id": "bone", "status": "not_mentioned"},
        {"report_id": "test_scan", "question_id": "bone", "status": "present"},  # not asked for: never read
    ]
    labels = report_labels(rows, ["a", "b"], ["bone", "pleura"])
    np.testing.assert_array_equal(labels, [[1.0, 0.0], [np.nan, np.nan]])


def _blob_volumes(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """(n, 1, 32, 32, 32) noise; label 1 where a small bright cube sits at a random place."""
    generator = torch.Generator().manual_seed(seed)
    volumes = 0.1 * torch.rand(n, 1, 32, 32, 32, generator=generator)
    labels = (torch.arange(n) % 2).numpy().astype(float)[:, None]
    for i in np.flatnonzero(labels[:, 0]):
        x, y, z = (int(v) for v in torch.randint(2, 26, (3,), generator=generator))
        volumes[i, 0, x : x + 5, y : y + 5, z : z + 5] = 1.0
    return volumes, labels


@pytest.mark.slow
def test_pretraining_learns_a_small_finding_and_leaves_a_frozen_encoder():
    encoder = MerlinImageEncoder.tiny(token_mode="mean_width")
    volumes, labels = _blob_volumes(16, seed=0)
    maps = stage3_maps(encoder, volumes)
    before = encoder.weights_id
    history = pretrain_encoder(encoder, maps, labels, EncoderPretrainConfig(epochs=20, batch_size=8, lr=3e-3))
    assert history[-1] < 0.5 * history[0]
    assert encoder.weights_id.startswith("supervised:") and encoder.weights_id != before
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    # the learned score ranks held-out scans with and without the finding
    held_out, truth = _blob_volumes(16, seed=1)
    with torch.no_grad():
        scores = token_logits(encoder, stage3_maps(encoder, held_out), 1).amax(dim=1)[:, 0]
    assert scores[truth[:, 0] == 1].mean() > scores[truth[:, 0] == 0].mean()


def test_bad_labels_are_named():
    encoder = MerlinImageEncoder.tiny()
    maps = torch.zeros(3, 128, 2, 2, 2)
    config = EncoderPretrainConfig(epochs=1)
    with pytest.raises(EncoderPretrainError, match=r"labels have shape \(2, 1\); expected \(3, Q\)"):
        pretrain_encoder(encoder, maps, np.zeros((2, 1)), config)
    with pytest.raises(EncoderPretrainError, match=r"20 labels but the encoder's head has 16 outputs"):
        pretrain_encoder(encoder, maps, np.zeros((3, 20)), config)
    with pytest.raises(EncoderPretrainError, match=r"every label is masked"):
        pretrain_encoder(encoder, maps, np.full((3, 2), np.nan), config)


def test_a_saved_encoder_is_known_by_its_file_as_from_checkpoint_knows_it(tmp_path):
    encoder = MerlinImageEncoder.tiny(token_mode="mean_width")
    encoder.weights_id = "supervised:0123456789abcdef"
    path = save_encoder(encoder, tmp_path / "encoder.safetensors")
    assert encoder.weights_id == file_sha256(path)
    reloaded = MerlinImageEncoder.from_checkpoint(path, encoder.config)
    assert reloaded.weights_id == encoder.weights_id
    volume = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(volume), encoder(volume))
