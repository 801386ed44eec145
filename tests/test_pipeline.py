"""The Python front door (`vlsurv.pipeline.SurvivalPipeline`) and `vlsurv predict --image`: the same answers,
risks and survival curves as `vlsurv predict` on the feature cache, and refusal of another encoder."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import build_tiny_inputs, write_dicom_series
from safetensors.torch import save_file

from vlsurv.data.clinical import MissingClinicalFieldsWarning
from vlsurv.data.ct import load_ct
from vlsurv.data.manifest import load_manifest
from vlsurv.data.transforms import PreprocessConfig
from vlsurv.encoders.cache import FeatureCache
from vlsurv.encoders.merlin import MerlinImageEncoder, tiny_config
from vlsurv.encoders.provenance import (
    IMAGE_ENCODER_NAME,
    EncoderMismatchError,
    cache_provenance,
    write_provenance,
)
from vlsurv.model import DeepHitCuts, SurvivalConfig, VisionLanguageSurvivalModel
from vlsurv.pipeline import SurvivalPipeline
from vlsurv.predict import PredictConfig, PredictError, main, predict, read_clinical

ENCODER_TOKENS, ENCODER_DIM = 4, 256  # the tiny Merlin-architecture encoder of build_tiny_inputs
OPTIONS = {"max_new_tokens": 4, "device": "cpu"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_tiny_inputs(tmp_path_factory.mktemp("pipeline_inputs"), n=12)


@pytest.fixture(scope="module")
def model_dir(inputs, tiny_decoder_dir, tmp_path_factory):
    """A tiny DeepHit model (LoRA perturbed so that it takes part) saved with the record of its cache's
    encoder, as training's final folder is."""
    from vlsurv.model import LoRAConfig, ModelConfig

    config = ModelConfig(
        decoder_path=str(tiny_decoder_dir),
        image_token_dim=ENCODER_DIM,
        num_image_tokens=ENCODER_TOKENS,
        lora=LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        survival=SurvivalConfig(head="deephit", num_bins=4),
    )
    torch.manual_seed(0)
    model = VisionLanguageSurvivalModel(config).eval()
    generator = torch.Generator().manual_seed(0)
    for name, param in model.language_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    model.set_deephit_cuts(DeepHitCuts([100.0, 300.0, 700.0, 1500.0]))
    folder = tmp_path_factory.mktemp("pipeline_model")
    model.save_pretrained(folder)
    write_provenance(folder, cache_provenance(FeatureCache(inputs["cache"])))
    return folder


@pytest.fixture(scope="module")
def cache_predictions(inputs, model_dir, tmp_path_factory):
    """`vlsurv predict` over the manifest's test split from the feature cache."""
    out = tmp_path_factory.mktemp("predict_from_cache")
    config = PredictConfig(
        model=str(model_dir),
        manifest=str(inputs["manifest"]),
        cache=str(inputs["cache"]),
        out=str(out),
        batch_scans=3,
        **OPTIONS,
    )
    predict(config, progress=False)
    return out


def _scan(inputs, position=0):
    """(scan_id, image path, clinical fields as JSON gives them) of the ``position``-th test scan."""
    manifest = load_manifest(inputs["manifest"], require_survival=False)
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    fields = json.loads(test.drop(columns=["image"]).iloc[[position]].to_json(orient="records"))[0]
    return str(test.loc[position, "scan_id"]), str(test.loc[position, "image"]), fields


def test_the_pipeline_gives_what_predict_gives_from_the_cache(inputs, model_dir, cache_predictions):
    pipe = SurvivalPipeline.from_pretrained(model_dir, **OPTIONS)
    answers = pd.read_json(cache_predictions / "answers.jsonl", lines=True, dtype={"scan_id": str})
    predictions = pd.read_csv(cache_predictions / "predictions.csv", dtype={"scan_id": str}).set_index(
        "scan_id"
    )
    curves = pd.read_csv(cache_predictions / "survival_curves.csv", dtype={"scan_id": str}).set_index(
        "scan_id"
    )
    for position in (0, 1):
        scan_id, image, fields = _scan(inputs, position)
        got = pipe(image, fields)
        assert got.scan_id == scan_id  # the file name without .nii.gz
        expected = answers[answers["scan_id"] == scan_id]
        assert got.answers == dict(zip(expected["question_id"], expected["answer"]))
        assert list(got.question_risks) == expected["question_id"].tolist()
        assert list(got.question_risks.values()) == pytest.approx(
            expected["risk"].tolist(), rel=1e-5, abs=1e-6
        )
        assert got.risk == pytest.approx(predictions.loc[scan_id, "risk"], rel=1e-5, abs=1e-6)
        assert [f"S@{t:.10g}" for t in got.survival_times] == list(curves.columns)
        assert got.survival == pytest.approx(curves.loc[scan_id].tolist(), abs=1e-6)
        assert len(got.survival_times) == 4 * 8 and got.survival[0] <= 1.0


def test_predict_image_writes_what_predict_writes(inputs, model_dir, cache_predictions, tmp_path, capsys):
    scan_id, image, fields = _scan(inputs, 1)
    clinical = tmp_path / "clinical.json"
    clinical.write_text(json.dumps(fields))
    args = ["--model", str(model_dir), "--image", image, "--clinical", str(clinical), "--out", str(tmp_path)]
    assert main([*args, "--max-new-tokens", "4", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["scan_id"] == scan_id and set(printed["answers"]) == set(printed["question_risks"])
    one = pd.read_csv(tmp_path / "predictions.csv", dtype={"scan_id": str})
    every = pd.read_csv(cache_predictions / "predictions.csv", dtype={"scan_id": str})
    expected = every[every["scan_id"] == scan_id].reset_index(drop=True)
    pd.testing.assert_frame_equal(one, expected, rtol=1e-5, atol=1e-6)
    assert printed["risk"] == pytest.approx(one.loc[0, "risk"], rel=1e-6)
    lines = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    wanted = [json.loads(x) for x in (cache_predictions / "answers.jsonl").read_text().splitlines()]
    assert [x["answer"] for x in lines] == [x["answer"] for x in wanted if x["scan_id"] == scan_id]
    assert main([*args, "--max-new-tokens", "4", "--device", "cpu"]) == 0  # a rerun keeps one row
    assert len(pd.read_csv(tmp_path / "predictions.csv")) == 1


def test_a_dicom_series_folder_is_read_as_the_scan(model_dir, tmp_path):
    stored = np.random.default_rng(0).integers(800, 1400, size=(40, 36, 24)).astype(np.uint16)
    folder = write_dicom_series(tmp_path / "CT_0001", stored)
    pipe = SurvivalPipeline.from_pretrained(model_dir, **OPTIONS)
    with pytest.warns(MissingClinicalFieldsWarning, match=r"clinical fields of CT_0001: .*smoking 100%"):
        got = pipe(folder, {"age": 70, "sex": "female"})
    assert got.scan_id == "CT_0001" and len(got.answers) == 6 and np.isfinite(got.risk)
    tokens = pipe.encode(folder)
    assert tokens.shape == (ENCODER_TOKENS, ENCODER_DIM)
    assert torch.equal(tokens, pipe.encode(load_ct(folder)))  # a loaded CTVolume is the same scan


def test_a_given_encoder_is_checked_against_the_record(model_dir):
    with pytest.raises(EncoderMismatchError, match=r"checkpoint_sha256 'random-init:0'.*'random-init:1'"):
        SurvivalPipeline.from_pretrained(
            model_dir, encoder=MerlinImageEncoder(tiny_config(seed=1)), **OPTIONS
        )
    pipe = SurvivalPipeline.from_pretrained(model_dir, encoder=MerlinImageEncoder.tiny(), **OPTIONS)
    assert pipe.preprocess == PreprocessConfig(spacing=(6.0, 6.0, 6.0), spatial_size=(64, 64, 32))


def _copy_model(model_dir, target, edit):
    """``model_dir``'s files in ``target``, with ``edit(record)`` applied to its image_encoder.json."""
    target.mkdir()
    for path in model_dir.rglob("*"):
        if path.is_file():
            (target / path.relative_to(model_dir)).parent.mkdir(parents=True, exist_ok=True)
            (target / path.relative_to(model_dir)).write_bytes(path.read_bytes())
    record = json.loads((target / IMAGE_ENCODER_NAME).read_text())
    edit(record)
    (target / IMAGE_ENCODER_NAME).write_text(json.dumps(record))
    return target


def test_another_checkpoint_or_preprocessing_is_refused(model_dir, tmp_path):
    trained = _copy_model(
        model_dir, tmp_path / "trained", lambda r: r["key"].update(checkpoint_sha256="ab12")
    )
    with pytest.raises(EncoderMismatchError, match=r"encoder checkpoint 'ab12'; give that checkpoint file"):
        SurvivalPipeline.from_pretrained(trained, **OPTIONS)
    checkpoint = tmp_path / "other.safetensors"
    save_file(MerlinImageEncoder(tiny_config(seed=3)).state_dict(), str(checkpoint))
    with pytest.raises(EncoderMismatchError, match=r"trained with checkpoint_sha256 'ab12', but the encoder"):
        SurvivalPipeline.from_pretrained(trained, encoder_checkpoint=checkpoint, **OPTIONS)

    def other_spacing(record):
        record["preprocess_config"]["spacing"] = [3.0, 3.0, 3.0]

    resampled = _copy_model(model_dir, tmp_path / "resampled", other_spacing)
    with pytest.raises(EncoderMismatchError, match=r"trained with preprocess_hash '[0-9a-f]{64}', but"):
        SurvivalPipeline.from_pretrained(resampled, **OPTIONS)


def test_new_scans_are_encoded_in_the_precision_the_model_was_trained_on(model_dir, inputs, tmp_path):
    from vlsurv.data.transforms import preprocess_ct
    from vlsurv.encoders.cache import encode_volumes

    _, image, _ = _scan(inputs)
    volume = preprocess_ct(image, PreprocessConfig(spacing=(6.0, 6.0, 6.0), spatial_size=(64, 64, 32)))[None]
    encoder = MerlinImageEncoder.tiny()
    full = encode_volumes(encoder, volume, ["x"], "float32")["x"]
    autocast = encode_volumes(encoder, volume, ["x"], "float32", bf16=True)["x"]
    assert not torch.equal(full, autocast)
    bf16_model = _copy_model(model_dir, tmp_path / "bf16", lambda r: r["key"].update(compute="bfloat16"))
    pipe = SurvivalPipeline.from_pretrained(bf16_model, **OPTIONS)
    assert pipe.compute == "bfloat16" and torch.equal(pipe.encode(image), autocast)
    older = _copy_model(model_dir, tmp_path / "older", lambda r: r["key"].pop("compute"))
    pipe = SurvivalPipeline.from_pretrained(older, **OPTIONS)  # recorded before the precision was kept
    assert pipe.compute == "unrecorded" and torch.equal(pipe.encode(image), full)


def test_a_model_folder_without_the_record_says_what_to_do(model_dir, tmp_path):
    bare = _copy_model(model_dir, tmp_path / "bare", lambda r: None)
    (bare / IMAGE_ENCODER_NAME).unlink()
    with pytest.raises(
        EncoderMismatchError, match=r"image_encoder.json: does not exist.*SurvivalPipeline\(model"
    ):
        SurvivalPipeline.from_pretrained(bare, **OPTIONS)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", r"--clinical: expected a JSON object of clinical fields, got list"),
        ('{"age": ', r"--clinical: not valid JSON"),
        ("missing.json", r"--clinical missing.json: expected a JSON object or an existing .json file"),
    ],
)
def test_bad_clinical_json_is_named(text, message):
    with pytest.raises(PredictError, match=message):
        read_clinical(text)


def test_clinical_from_a_file_and_an_empty_value(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("[3]")
    with pytest.raises(PredictError, match=rf"{path}: expected a JSON object of clinical fields, got list"):
        read_clinical(str(path))
    assert read_clinical("") == {} and read_clinical('{"age": 70}') == {"age": 70}


def test_image_mode_takes_no_manifest_and_the_manifest_mode_needs_one(model_dir, tmp_path):
    with pytest.raises(
        PredictError, match="--image predicts one scan: give it without --manifest and --cache"
    ):
        PredictConfig(model=str(model_dir), image="a.nii.gz", manifest="m.csv")
    with pytest.raises(
        PredictError, match=r"--cache: required to predict a manifest's split \(or give --image\)"
    ):
        predict(dataclasses.replace(PredictConfig(model=str(model_dir)), manifest="m.csv", out=str(tmp_path)))
