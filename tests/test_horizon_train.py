"""`vlsurv horizon` training: tiny ResNet / DenseNet / Swin train a step on CPU and resume exactly; backbone
initialisation from a local checkpoint; the from-scratch message; label counts in the output."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from vlsurv.errors import CheckpointError
from vlsurv.horizon.cli import run
from vlsurv.horizon.config import HorizonConfig
from vlsurv.horizon.data import HorizonVolumes
from vlsurv.horizon.labels import HorizonError, horizon_labels
from vlsurv.horizon.models import build_network, load_backbone_weights
from vlsurv.horizon.train import masked_bce, train

SMALL = {"size": "tiny", "spacing": (12.0, 12.0, 12.0), "spatial_size": (32, 32, 32), "cpu": True}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """12 synthetic patients on a 48 x 48 x 32 grid (8 mm voxels), resampled to 32^3 at 12 mm."""
    from vlsurv.data.synthetic import make_cohort

    return make_cohort(12, 3, tmp_path_factory.mktemp("horizon_cohort"), shape=(48, 48, 32))


def _train_set(cohort, cache, horizons=(365.0, 1095.0)):
    from vlsurv.data.manifest import load_manifest

    table = load_manifest(cohort)
    labels = horizon_labels(table.time, table.event, horizons)
    config = HorizonConfig(manifest=str(cohort), horizons=horizons, **SMALL)
    return HorizonVolumes(list(table.image), labels, config.preprocess(), cache, augment=True), labels


def _train(cohort, out, cache, model, steps, resume=None):
    from accelerate import Accelerator

    dataset, labels = _train_set(cohort, cache)
    cfg = HorizonConfig(
        manifest=str(cohort), out=str(out), horizons=(365.0, 1095.0), model=model, max_steps=steps,
        batch_size=2, lr=1e-2, checkpoint_every=1, resume=resume, **SMALL,
    )  # fmt: skip
    return train(cfg, Accelerator(cpu=True), dataset, labels, log=lambda message: None)


@pytest.mark.parametrize("model", ["resnet18", "densenet121", "swin"])
def test_tiny_network_trains_a_step_and_resumes_exactly(cohort, tmp_path, model):
    straight = _train(cohort, tmp_path / "straight", tmp_path / "cache", model, steps=2)
    first = _train(cohort, tmp_path / "resumed", tmp_path / "cache", model, steps=1)
    assert (tmp_path / "resumed" / "checkpoints" / "step-000000001" / "model.safetensors").is_file()
    resumed = _train(cohort, tmp_path / "resumed", tmp_path / "cache", model, steps=2, resume="latest")
    assert (first.step, resumed.step, straight.step) == (1, 2, 2)
    assert resumed.init_message.startswith("resumed from")
    one_step = first.network.state_dict()
    changed = [k for k, v in straight.network.state_dict().items() if not torch.equal(v, one_step[k])]
    assert changed, "the second step changed no weight"
    for name, value in straight.network.state_dict().items():
        torch.testing.assert_close(resumed.network.state_dict()[name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_resuming_with_another_network_names_the_checkpoint(cohort, tmp_path):
    _train(cohort, tmp_path / "run", tmp_path / "cache", "densenet121", steps=1)
    with pytest.raises(
        CheckpointError, match=r"--resume .*step-000000001: the checkpoint holds .*'densenet121'"
    ):
        _train(cohort, tmp_path / "run", tmp_path / "cache", "resnet18", steps=2, resume="latest")


def test_volumes_are_preprocessed_once_into_the_persistent_cache(cohort, tmp_path):
    dataset, _ = _train_set(cohort, tmp_path / "cache")
    item = dataset[0]
    assert item["image"].shape == (1, 32, 32, 32) and item["label"].shape == (2,)
    cached = list((tmp_path / "cache").rglob("*.pt"))
    assert len(cached) == 1
    dataset.set_epoch(0)
    again = dataset[0]["image"]
    dataset.set_epoch(1)
    assert torch.equal(again, item["image"])  # same (seed, epoch, index): same augmentation
    assert not torch.equal(dataset[0]["image"], item["image"])  # another epoch draws another one
    assert list((tmp_path / "cache").rglob("*.pt")) == cached


def test_masked_bce_ignores_excluded_scans_and_weights_positives():
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    label = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    known = torch.tensor([[True, False], [True, True]])
    weight = torch.tensor([3.0, 1.0])
    expected = 3.0 * -np.log(torch.sigmoid(logits[0, 0]).item())
    expected += -np.log(1 - torch.sigmoid(logits[1, 0]).item()) - np.log(
        1 - torch.sigmoid(logits[1, 1]).item()
    )
    assert masked_bce(logits, label, known, weight).item() == pytest.approx(expected / 3, rel=1e-6)


def test_backbone_initialises_from_a_medicalnet_style_torch_file_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = build_network("resnet18", "tiny", 3).backbone
    nested = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    torch.save(nested, tmp_path / "resnet_tiny.pth")
    save_file(source.state_dict(), str(tmp_path / "resnet_tiny.safetensors"))
    for name in ("resnet_tiny.pth", "resnet_tiny.safetensors"):
        target = build_network("resnet18", "tiny", 2).backbone
        report = load_backbone_weights(target, tmp_path / name)
        assert (report.loaded, report.missing, report.unused) == (len(source.state_dict()), 0, 0)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), key
        assert f"from {tmp_path / name}" in report.message("resnet18")


def test_swin_loads_a_swinunetr_state_dict_and_densenet_a_monai_densenet_one(tmp_path):
    """The backbones keep MONAI's parameter names: SwinUNETR's encoder (less ``swinViT.``) and DenseNet's
    features load; the segmentation decoder and DenseNet's output layer are reported unused."""
    from monai.networks.nets import DenseNet, SwinUNETR

    torch.manual_seed(1)
    unetr = SwinUNETR(1, 2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)
    torch.save(unetr.state_dict(), tmp_path / "swin_unetr.pt")
    swin = build_network("swin", "tiny", 1).backbone
    report = load_backbone_weights(swin, tmp_path / "swin_unetr.pt", strip_prefix="swinViT.")
    encoder = {
        k.removeprefix("swinViT."): v for k, v in unetr.state_dict().items() if k.startswith("swinViT.")
    }
    assert (report.loaded, report.missing) == (len(encoder), 0) == (len(swin.state_dict()), 0)
    assert report.unused == len(unetr.state_dict()) - len(encoder) > 0
    assert all(torch.equal(swin.state_dict()[k], v) for k, v in encoder.items())
    dense = DenseNet(3, 1, 5, init_features=8, growth_rate=4, block_config=(1, 1, 1, 1), bn_size=2)
    torch.save({"model": dense.state_dict()}, tmp_path / "densenet_bundle.pt")
    report = load_backbone_weights(
        build_network("densenet121", "tiny", 2).backbone, tmp_path / "densenet_bundle.pt"
    )
    assert (report.missing, report.unused) == (0, 2)  # class_layers.out.weight and .bias


def test_an_unknown_architecture_is_named():
    with pytest.raises(
        HorizonError, match=r"model: expected one of \['resnet18', 'densenet121', 'swin'\], got 'vit'"
    ):
        build_network("vit", "tiny", 1)


def test_backbone_checkpoint_of_another_network_is_refused(tmp_path):
    save = {k: v for k, v in build_network("densenet121", "tiny", 1).backbone.state_dict().items()}
    torch.save(save, tmp_path / "densenet.pt")
    with pytest.raises(
        CheckpointError, match=r"densenet\.pt: none of its \d+ tensor names match the backbone"
    ):
        load_backbone_weights(build_network("resnet18", "tiny", 1).backbone, tmp_path / "densenet.pt")
    wide = {"conv1.weight": torch.zeros(8, 3, 7, 7, 7)}
    torch.save(wide, tmp_path / "rgb.pt")
    with pytest.raises(CheckpointError, match=r"rgb\.pt: tensor 'conv1.weight' has shape \[8, 3, 7, 7, 7\]"):
        load_backbone_weights(build_network("resnet18", "tiny", 1).backbone, tmp_path / "rgb.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes\.txt: cannot read it as a state dict"):
        load_backbone_weights(build_network("resnet18", "tiny", 1).backbone, tmp_path / "notes.txt")


def test_run_writes_label_counts_and_says_when_it_trains_from_scratch(cohort, tmp_path):
    lines = []
    cfg = HorizonConfig(
        manifest=str(cohort), out=str(tmp_path / "run"), horizons=(365.0, 1095.0), model="densenet121",
        max_steps=1, batch_size=4, bootstrap=20, eval_split="all", **SMALL,
    )  # fmt: skip
    metrics = run(cfg, log=lines.append)
    assert any("FROM SCRATCH" in line for line in lines)
    table = pd.read_csv(cohort)
    written = json.loads((tmp_path / "run" / "label_counts.json").read_text())["counts"]
    for split in ("train", "val", "test"):
        rows = table[table.split == split]
        for horizon in (365, 1095):
            count = written[split][str(horizon)]
            assert count["excluded"] == int(((rows.event == 0) & (rows.time < horizon)).sum())
            assert count["positives"] == int(((rows.event == 1) & (rows.time <= horizon)).sum())
            assert count["positives"] + count["negatives"] + count["excluded"] == len(rows)
    assert metrics["label_counts"] == written
    predictions = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert list(predictions.columns) == ["scan_id", "patient_id", "split", "prob@365", "prob@1095"]
    assert len(predictions) == len(table) and predictions["prob@365"].between(0, 1).all()
    auroc = pd.read_csv(tmp_path / "run" / "auroc.csv")
    assert list(auroc.excluded) == [sum(written[s][h]["excluded"] for s in written) for h in ("365", "1095")]


def test_a_horizon_without_positives_in_the_train_split_stops_before_training(cohort, tmp_path):
    cfg = HorizonConfig(manifest=str(cohort), out=str(tmp_path / "run"), horizons=(0.5, 1095.0), **SMALL)
    with pytest.raises(HorizonError, match=r"manifest.csv, train split: horizon 0.5 has no positives"):
        run(cfg, log=lambda message: None)
