"""tte_pretrain on volumes (data.images): the tiny encoder runs in the loop on a few synthetic scans at 32^3,
its last stage trains with the head, the rest stays as loaded; the fine-tuned encoder is saved with its
provenance and reloads to the same tokens; a resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from vlsurv.config import ConfigError, save_config
from vlsurv.data.synthetic import make_cohort
from vlsurv.data.transforms import PreprocessConfig
from vlsurv.encoders.merlin import MerlinImageEncoder
from vlsurv.encoders.provenance import load_recorded_encoder, read_provenance
from vlsurv.tte.config import load_tte_config
from vlsurv.tte.events import TTEInputError
from vlsurv.tte.images import ENCODER_WEIGHTS_NAME
from vlsurv.tte.training import TTETrainer, train_tte


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """12 synthetic patients at 32 x 32 x 24 voxels, and a preprocessing to 32^3 at 6 mm."""
    root = tmp_path_factory.mktemp("tte_images")
    make_cohort(12, 0, root / "cohort", shape=(32, 32, 24))
    save_config(
        PreprocessConfig(spacing=(6.0, 6.0, 6.0), spatial_size=(32, 32, 32)), root / "preprocess.yaml"
    )
    return root


def image_config(cohort, out, *overrides: str):
    return load_tte_config(
        None,
        [
            f"data.events={cohort / 'cohort' / 'events.csv'}",
            f"data.scans={cohort / 'cohort' / 'scans.csv'}",
            "data.images=true",
            f"data.manifest={cohort / 'cohort' / 'manifest.csv'}",
            "data.encoder=tiny",
            f"data.preprocess_config={cohort / 'preprocess.yaml'}",
            "model.image_token_dim=256",
            "model.num_image_tokens=1",
            "model.projection_dim=8",
            "model.final_dim=8",
            "model.train_last_block=true",
            "tasks.k=8",
            "tasks.num_bins=3",
            "tasks.min_event_fraction=0.05",
            "optim.lr=1e-2",
            "optim.batch_size=4",
            "checkpoint.every_n_steps=2",
            "checkpoint.keep_last=3",
            "checkpoint.keep_best=false",
            "progress=false",
            f"output_dir={out}",
            *overrides,
        ],
    )


def test_the_last_block_trains_and_the_saved_encoder_gives_the_same_tokens(cohort, tmp_path):
    trainer = TTETrainer(image_config(cohort, tmp_path / "run", "optim.max_steps=3"))
    final = trainer.fit()
    start = MerlinImageEncoder.tiny().state_dict()
    saved = load_file(str(final / ENCODER_WEIGHTS_NAME))
    assert saved.keys() == start.keys()
    changed = {name for name in saved if not torch.equal(saved[name], start[name])}
    trained = {f"layer4.{name}" for name, p in MerlinImageEncoder.tiny().layer4.named_parameters()}
    assert changed and changed <= trained  # BatchNorm statistics and every earlier stage as loaded

    record, _, preprocess = read_provenance(final)
    assert record["token_shape"] == [1, 256] and preprocess.spatial_size == (32, 32, 32)
    encoder, _, _ = load_recorded_encoder(final, final / ENCODER_WEIGHTS_NAME)
    model = trainer.accelerator.unwrap_model(trainer.model)
    volumes = torch.stack([trainer.train_set[i]["inputs"] for i in range(2)])
    with torch.no_grad():
        torch.testing.assert_close(encoder(volumes), model.tokens(volumes))
    assert (final / "head.safetensors").is_file() and (final / "encoder.yaml").is_file()

    checkpoint = load_file(str(tmp_path / "run" / "checkpoints" / "step-000000002" / "model.safetensors"))
    assert "encoder.layer4.0.conv1.weight" in checkpoint and "head.task_layer.weight" in checkpoint
    assert "encoder.layer1.0.conv1.weight" not in checkpoint  # frozen weights come from the encoder config
    assert "encoder.layer1.0.bn1.running_mean" in checkpoint


def test_a_resumed_image_run_ends_with_the_weights_of_an_uninterrupted_one(cohort, tmp_path):
    whole = train_tte(image_config(cohort, tmp_path / "whole", "optim.max_steps=4"))
    train_tte(image_config(cohort, tmp_path / "parts", "optim.max_steps=2"))
    resumed = train_tte(image_config(cohort, tmp_path / "parts", "optim.max_steps=4"), resume="latest")
    for name in ("head.safetensors", ENCODER_WEIGHTS_NAME):
        expected, got = load_file(str(whole / name)), load_file(str(resumed / name))
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_bad_image_settings_name_the_field(cohort, tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_tte_config(None, ["model.train_last_block=true"])
    assert str(raised.value) == (
        "model.train_last_block: needs data.images=true (cached tokens have passed the last block already); "
        "expected false or data.images=true with data.manifest"
    )
    with pytest.raises(
        ConfigError, match=r"^data.manifest: expected the cohort manifest \(scan_id, image\) when"
    ):
        load_tte_config(None, ["data.images=true"])
    with pytest.raises(TTEInputError) as raised:
        TTETrainer(image_config(cohort, tmp_path / "wide", "model.image_token_dim=64"))
    assert str(raised.value) == (
        "model.num_image_tokens, model.image_token_dim = (1, 64): the encoder (i3resnet-1-1-1-1-w8, "
        "token_mode mean_depth) gives 1 tokens of width 256 at this preprocessing; expected the same numbers "
        "in the config"
    )
    manifest = pd.read_csv(cohort / "cohort" / "manifest.csv").head(3)
    manifest["image"] = [str(cohort / "cohort" / image) for image in manifest["image"]]
    manifest.to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(
        TTEInputError, match=r"short.csv: \d+ scans of data.scans are not in it \(first: \['syn"
    ):
        TTETrainer(image_config(cohort, tmp_path / "short", f"data.manifest={tmp_path / 'short.csv'}"))


def test_tte_evaluate_takes_a_cache_of_the_fine_tuned_encoder_only(cohort, tmp_path, capsys):
    from vlsurv.cli import main
    from vlsurv.encoders.cache import encode_manifest

    final = train_tte(image_config(cohort, tmp_path / "run", "optim.max_steps=2"))
    encoder, preprocess, _ = load_recorded_encoder(final, final / ENCODER_WEIGHTS_NAME)
    manifest = cohort / "cohort" / "manifest.csv"
    encode_manifest(manifest, tmp_path / "tuned", encoder, preprocess, progress=False)
    encode_manifest(manifest, tmp_path / "stock", MerlinImageEncoder.tiny(), preprocess, progress=False)
    common = [
        "tte-evaluate",
        "--model",
        str(final),
        "--split",
        "all",
        "--min-events",
        "2",
        "--horizons",
        "100",
    ]
    assert main([*common, "--cache", str(tmp_path / "tuned"), "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "per_task.csv").is_file()
    capsys.readouterr()
    assert main([*common, "--cache", str(tmp_path / "stock"), "--out", str(tmp_path / "eval")]) == 2
    assert capsys.readouterr().err.startswith(
        f"vlsurv tte-evaluate: error: --cache {tmp_path / 'stock'}: its tokens come from checkpoint_sha256 "
        "'random-init:0' but the model was trained with '"
    )
