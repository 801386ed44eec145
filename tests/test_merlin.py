"""MerlinImageEncoder: official key layout, shapes, freezing, init and checkpoint loading."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlsurv.config import ConfigError, from_dict
from vlsurv.encoders.merlin import (
    OFFICIAL_PREFIX,
    CheckpointError,
    EncoderConfig,
    MerlinImageEncoder,
    tiny_config,
)

FIXTURE = Path(__file__).parent / "fixtures" / "merlin_i3resnet_keys.json"


@pytest.fixture(scope="module")
def official_keys() -> dict[str, list[int]]:
    data = json.loads(FIXTURE.read_text())
    assert data["prefix_in_official_checkpoint"] == OFFICIAL_PREFIX
    return data["keys"]


@pytest.fixture(scope="module")
def tiny() -> MerlinImageEncoder:
    return MerlinImageEncoder.tiny()


def _official_state(model: MerlinImageEncoder) -> dict[str, torch.Tensor]:
    """A Merlin-style full checkpoint: image keys under the prefix, text encoder and logit_scale beside."""
    state = {OFFICIAL_PREFIX + k: v.clone() for k, v in model.state_dict().items()}
    state["encode_text.text_encoder.embeddings.word_embeddings.weight"] = torch.randn(30, 8)
    state["encode_text.linear_layer.weight"] = torch.randn(16, 8)
    state["logit_scale"] = torch.tensor(2.6592)
    return state


def test_full_architecture_has_every_official_key_and_shape(official_keys):
    with torch.device("meta"):
        model = MerlinImageEncoder()
    state = model.state_dict()
    assert len(official_keys) == 934
    assert list(state) == list(official_keys)
    wrong = {
        k: (list(v.shape), official_keys[k]) for k, v in state.items() if list(v.shape) != official_keys[k]
    }
    assert wrong == {}
    assert model.out_dim == 2048 and model.name == "merlin-i3resnet152"


def test_full_size_official_state_dict_loads_and_gives_merlin_shapes(official_keys):
    state = {
        OFFICIAL_PREFIX + key: torch.empty(
            shape, device="meta", dtype=torch.long if not shape else torch.float32
        )
        for key, shape in official_keys.items()
    }
    state["encode_text.text_encoder.embeddings.word_embeddings.weight"] = torch.empty(
        50000, 768, device="meta"
    )
    state["logit_scale"] = torch.empty((), device="meta")
    model = MerlinImageEncoder.from_state_dict(state, source="fixture")
    assert all(v.is_meta for v in model.state_dict().values())
    x = torch.empty(2, 1, 224, 224, 160, device="meta")
    assert model.feature_map(x).shape == (2, 2048, 10, 7, 7)
    assert model(x).shape == (2, 49, 2048)
    for mode, tokens in (("all", 490), ("global", 1)):
        model.config = dataclasses.replace(model.config, token_mode=mode)
        assert model(x).shape == (2, tokens, 2048)


def test_tiny_feature_map_follows_depth_height_width_of_the_input(tiny):
    x = torch.rand(1, 1, 64, 96, 32)  # H=64, W=96, D=32
    assert tiny.feature_map(x).shape == (1, 256, 2, 2, 3)
    assert tiny.out_dim == 256


def test_token_modes_are_views_of_the_feature_map(tiny):
    x = torch.rand(2, 1, 96, 96, 64)
    fmap = tiny.feature_map(x)
    assert fmap.shape == (2, 256, 4, 3, 3)
    mean_depth = tiny(x)
    assert mean_depth.shape == (2, 9, 256)
    assert torch.allclose(mean_depth[:, 1 * 3 + 2], fmap[:, :, :, 1, 2].mean(dim=2))
    all_tokens = MerlinImageEncoder.tiny(token_mode="all")(x)
    assert all_tokens.shape == (2, 36, 256)
    assert torch.equal(all_tokens[:, 2 * 9 + 0 * 3 + 1], fmap[:, :, 2, 0, 1])
    global_token = MerlinImageEncoder.tiny(token_mode="global")(x)
    assert global_token.shape == (2, 1, 256)
    assert torch.allclose(global_token[:, 0], fmap.mean(dim=(2, 3, 4)), atol=1e-6)


def test_global_heads_are_merlin_classifier_and_contrastive_head(tiny):
    contrastive, logits = tiny.global_outputs(torch.rand(3, 1, 64, 64, 32))
    assert contrastive.shape == (3, 16) and logits.shape == (3, 16)


def test_encoder_is_frozen(tiny):
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not any(m.training for m in tiny.modules())
    before = tiny.bn1.running_mean.clone()
    x = torch.rand(1, 1, 64, 64, 32, requires_grad=True)
    tokens = tiny(x)
    assert not tokens.requires_grad
    assert torch.equal(tiny.bn1.running_mean, before)


def test_random_init_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = MerlinImageEncoder.tiny(seed=7)
    assert torch.equal(torch.rand(3), expected_draw)
    second, other = MerlinImageEncoder.tiny(seed=7), MerlinImageEncoder.tiny(seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first.conv1.weight, other.conv1.weight)
    assert torch.equal(first.layer2[0].bn2.weight, torch.ones(16))
    assert torch.equal(first.layer2[0].bn2.bias, torch.zeros(16))
    assert first.weights_id == "random-init:7"


def test_fake_official_checkpoint_loads(tmp_path, tiny):
    path = tmp_path / "merlin_official.pt"
    torch.save(_official_state(tiny), path)
    loaded = MerlinImageEncoder.from_checkpoint(path, tiny_config(seed=99))
    assert loaded.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), loaded.state_dict().values()))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    x = torch.rand(1, 1, 64, 64, 32)
    assert torch.equal(loaded(x), tiny(x))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_bare_state_dict_loads(tmp_path, tiny, suffix):
    path = tmp_path / f"i3resnet{suffix}"
    state = {k: v.half() if v.is_floating_point() else v for k, v in tiny.state_dict().items()}
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    loaded = MerlinImageEncoder.from_checkpoint(path, tiny_config())
    assert loaded.conv1.weight.dtype == torch.float32
    assert torch.equal(loaded.conv1.weight, tiny.conv1.weight.half().float())


def test_missing_backbone_keys_are_named(tmp_path, tiny):
    state = _official_state(tiny)
    del state[OFFICIAL_PREFIX + "layer1.0.bn1.running_var"]
    path = tmp_path / "missing.pt"
    torch.save(state, path)
    with pytest.raises(
        CheckpointError,
        match=r"missing\.pt: 1 image-encoder keys .* missing \(first: layer1\.0\.bn1\.running_var\)",
    ):
        MerlinImageEncoder.from_checkpoint(path, tiny_config())


def test_wrong_shapes_name_expected_and_got(tmp_path, tiny):
    state = _official_state(tiny)
    state[OFFICIAL_PREFIX + "conv1.weight"] = torch.zeros(8, 3, 1, 7, 7)
    path = tmp_path / "shapes.pt"
    torch.save(state, path)
    with pytest.raises(
        CheckpointError, match=r"conv1\.weight: expected \(8, 3, 3, 7, 7\), got \(8, 3, 1, 7, 7\)"
    ):
        MerlinImageEncoder.from_checkpoint(path, tiny_config())


def test_tiny_checkpoint_into_full_config_names_missing_blocks(tmp_path, tiny):
    path = tmp_path / "tiny.safetensors"
    save_file(tiny.state_dict(), str(path))
    with pytest.raises(
        CheckpointError, match=r"expected by merlin-i3resnet152 are missing \(first: layer1\.1\."
    ):
        MerlinImageEncoder.from_checkpoint(path)


def test_unknown_image_keys_are_named(tmp_path, tiny):
    state = _official_state(tiny)
    state[OFFICIAL_PREFIX + "fc.weight"] = torch.zeros(2, 2)
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"1 image-encoder keys are unknown .* \(first: fc\.weight\)"):
        MerlinImageEncoder.from_checkpoint(path, tiny_config())


def test_checkpoint_without_image_keys_is_rejected(tmp_path):
    path = tmp_path / "text_only.pt"
    torch.save({"encode_text.linear_layer.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(
        CheckpointError, match=r"no image-encoder keys; expected keys under 'encode_image\.i3_resnet\.'"
    ):
        MerlinImageEncoder.from_checkpoint(path, tiny_config())


def test_unreadable_or_absent_checkpoint_is_rejected(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"corrupt\.pt: cannot read it as a state dict"):
        MerlinImageEncoder.from_checkpoint(corrupt, tiny_config())
    with pytest.raises(CheckpointError, match=r"absent\.pt does not exist"):
        MerlinImageEncoder.from_checkpoint(tmp_path / "absent.pt", tiny_config())


def test_bad_input_shape_and_bad_config_are_rejected(tiny):
    with pytest.raises(ValueError, match=r"expected shape \(B, 1, H, W, D\), got \(1, 64, 64, 32\)"):
        tiny(torch.rand(1, 64, 64, 32))
    with pytest.raises(ConfigError, match=r"token_mode in enc\.yaml: expected one of"):
        from_dict(EncoderConfig, {"token_mode": "cls"}, source="enc.yaml")
    with pytest.raises(ConfigError, match=r"layers: expected four block counts >= 1"):
        from_dict(EncoderConfig, {"layers": [1, 0, 1, 1]})
    with pytest.raises(ConfigError, match=r"^layers: expected four block counts >= 1, got \[1, 1, 1\]$"):
        EncoderConfig(layers=(1, 1, 1))
    with pytest.raises(ConfigError, match=r"^contrastive_dim: expected an integer >= 1, got 0$"):
        EncoderConfig(contrastive_dim=0)
