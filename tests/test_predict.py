"""The prompt ensemble (shared prefix vs naive) and `vlsurv predict` (outputs, resume, bad input)."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch
from conftest import TINY_IMAGE_DIM, TINY_IMAGE_TOKENS
from safetensors.torch import save_file

from vlsurv.config import ConfigError
from vlsurv.model import DeepHitCuts, SurvivalConfig, VisionLanguageSurvivalModel
from vlsurv.model.ensemble import DecodeOptions, EnsembleError, ScanInput, score_naive, score_shared_prefix
from vlsurv.predict import PredictConfig, PredictError, main, predict

QUESTIONS = [
    "What is the location and size of the primary lung tumor?",
    "Is there any pleural involvement or effusion present?",
    "Are there skeleton/bone changes on the scan?",
]
CLINICAL = [
    "64 year-old male former smoker lung cancer patient, stage 1, T stage is T2.",
    "71 year-old female never smoker lung cancer patient.",
    "",
]


def _perturb_lora(model, seed=0):
    """LoRA B starts at zero; give it values so the adapter takes part in the comparison."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.language_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.05


def _model(config, head="deepsurv"):
    torch.manual_seed(0)
    config = dataclasses.replace(config, survival=SurvivalConfig(head=head, num_bins=4))
    model = VisionLanguageSurvivalModel(config).eval()
    _perturb_lora(model)
    if head == "deephit":
        model.set_deephit_cuts(DeepHitCuts([100.0, 200.0, 400.0, 800.0]))
    return model


def _scans(n=3):
    generator = torch.Generator().manual_seed(5)
    return [
        ScanInput(
            f"scan{i}",
            CLINICAL[i % len(CLINICAL)],
            torch.randn(TINY_IMAGE_TOKENS, TINY_IMAGE_DIM, generator=generator),
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("head", ["deepsurv", "deephit"])
@pytest.mark.parametrize(("pool", "generate"), [("prompt", False), ("prompt", True), ("all", True)])
def test_shared_prefix_equals_naive_path(tiny_model_config, head, pool, generate):
    model = _model(tiny_model_config, head)
    options = DecodeOptions(generate=generate, max_new_tokens=5)
    fast = score_shared_prefix(model, _scans(), QUESTIONS, pool, options)
    naive = score_naive(model, _scans(), QUESTIONS, pool, options)
    assert fast.risks.shape == (3, len(QUESTIONS))
    torch.testing.assert_close(fast.risks, naive.risks, rtol=1e-4, atol=1e-5)
    assert fast.answers == naive.answers
    if head == "deephit":
        torch.testing.assert_close(fast.survival_curves, naive.survival_curves, rtol=1e-4, atol=1e-5)
    else:
        assert fast.survival_curves is None
    if generate:
        assert any(answer for row in fast.answers for answer in row)


def test_pooling_all_uses_the_generated_answer(tiny_model_config):
    model = _model(tiny_model_config)
    options = DecodeOptions(generate=True, max_new_tokens=5)
    with_answer = score_shared_prefix(model, _scans(), QUESTIONS, "all", options).risks
    prompt_only = score_shared_prefix(model, _scans(), QUESTIONS, "prompt", options).risks
    assert not torch.allclose(with_answer, prompt_only)


def test_sampling_is_seeded(tiny_model_config):
    model = _model(tiny_model_config)
    options = DecodeOptions(generate=True, max_new_tokens=6, do_sample=True, temperature=2.0)
    runs = [
        score_shared_prefix(model, _scans(), QUESTIONS, "prompt", options, torch.Generator().manual_seed(s))
        for s in (1, 1, 2)
    ]
    assert runs[0].answers == runs[1].answers != runs[2].answers


def test_ensemble_rejects_bad_inputs(tiny_model_config):
    model = _model(tiny_model_config)
    wrong = [ScanInput("bad", "x", torch.zeros(TINY_IMAGE_TOKENS + 1, TINY_IMAGE_DIM))]
    with pytest.raises(
        EnsembleError, match=r"scan_id 'bad': image tokens of shape \(5, 16\); .* = \(4, 16\)"
    ):
        score_shared_prefix(model, wrong, QUESTIONS)
    with pytest.raises(EnsembleError, match="pool: expected one of"):
        score_shared_prefix(model, _scans(), QUESTIONS, pool="answer")
    with pytest.raises(EnsembleError, match=r"^max_new_tokens: expected a value >= 1, got 0$"):
        DecodeOptions(max_new_tokens=0)
    with pytest.raises(EnsembleError, match=r"^temperature: expected a value > 0, got 0\.0$"):
        DecodeOptions(temperature=0.0)


# --- vlsurv predict -----------------------------------------------------------------------------------------


def _write_cache(root, tokens: dict[str, torch.Tensor]):
    """A feature cache in the layout of vlsurv.encoders.cache (index.json + one safetensors shard)."""
    root.mkdir(parents=True)
    key = {
        "encoder": "test",
        "token_mode": "mean_depth",
        "checkpoint_sha256": "random-init:0",
        "preprocess_hash": "test",
        "dtype": "float32",
    }
    save_file(tokens, str(root / "shard-00000.safetensors"), metadata=key)
    scans = {
        s: {"shard": "shard-00000.safetensors", "shape": list(t.shape), **key} for s, t in tokens.items()
    }
    (root / "index.json").write_text(json.dumps({"version": 1, "scans": scans}))


@pytest.fixture
def cohort(tmp_path):
    """A 5-scan manifest (4 test, 1 train) with clinical columns, and its feature cache."""
    rows = []
    for i in range(5):
        image = tmp_path / f"scan{i}.nii.gz"
        image.write_bytes(b"")
        rows.append(
            {
                "patient_id": f"p{i}",
                "scan_id": f"scan{i}",
                "image": image.name,
                "report": "Mass.",
                "time": 100.0 * (i + 1),
                "event": i % 2,
                "split": "train" if i == 4 else "test",
                "age": 60 + i,
                "sex": "male" if i % 2 else "female",
                "smoking": "former",
                "stage": str(1 + i % 3),
                "t_stage": "T2",
                "n_stage": "N1",
                "m_stage": "M0",
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    generator = torch.Generator().manual_seed(3)
    _write_cache(
        tmp_path / "cache",
        {f"scan{i}": torch.randn(TINY_IMAGE_TOKENS, TINY_IMAGE_DIM, generator=generator) for i in range(5)},
    )
    return tmp_path


def _saved_model(tiny_model_config, path, head="deepsurv"):
    model = _model(tiny_model_config, head)
    model.save_pretrained(path)
    return path


def _args(cohort, model_dir, out, *extra):
    return [
        "--model",
        str(model_dir),
        "--manifest",
        str(cohort / "manifest.csv"),
        "--cache",
        str(cohort / "cache"),
        "--out",
        str(out),
        "--max-new-tokens",
        "4",
        "--batch-scans",
        "3",
        *extra,
    ]


def test_predict_writes_the_three_outputs(tiny_model_config, cohort, capsys):
    from vlsurv.prompts import load_questions

    model_dir = _saved_model(tiny_model_config, cohort / "model", head="deephit")
    out = cohort / "out"
    assert main(_args(cohort, model_dir, out, "--pool", "all")) == 0
    assert "predictions written to" in capsys.readouterr().out
    questions = load_questions("lung")
    predictions = pd.read_csv(out / "predictions.csv", dtype={"scan_id": str})
    assert list(predictions.columns) == ["scan_id", "risk"] + [f"risk_{q.id}" for q in questions]
    assert predictions["scan_id"].tolist() == ["scan0", "scan1", "scan2", "scan3"]
    per_question = predictions[[f"risk_{q.id}" for q in questions]].to_numpy()
    assert predictions["risk"].to_numpy() == pytest.approx(per_question.mean(1), rel=1e-6)
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 4 * len(questions)
    assert set(answers[0]) == {"scan_id", "question_id", "question", "answer", "risk"}
    assert [a["question_id"] for a in answers[: len(questions)]] == [q.id for q in questions]
    assert answers[1]["risk"] == pytest.approx(per_question[0, 1], rel=1e-6)
    curves = pd.read_csv(out / "survival_curves.csv")
    times = DeepHitCuts.load(model_dir).curve_times()  # 8 per bin: S follows the bins' constant hazard
    assert list(curves.columns) == ["scan_id"] + [f"S@{t:.10g}" for t in times.tolist()]
    assert {"S@100", "S@200", "S@400", "S@800"} <= set(curves.columns) and len(times) == 32
    values = curves.drop(columns="scan_id").to_numpy()
    assert (values[:, 1:] <= values[:, :-1] + 1e-7).all() and ((values >= 0) & (values <= 1)).all()
    assert (out / "predict_config.yaml").is_file()


def test_predict_resumes_without_duplicates(tiny_model_config, cohort):
    model = VisionLanguageSurvivalModel.from_pretrained(_saved_model(tiny_model_config, cohort / "model"))
    config = PredictConfig(
        model="",
        manifest=str(cohort / "manifest.csv"),
        cache=str(cohort / "cache"),
        out=str(cohort / "out"),
        max_new_tokens=4,
        batch_scans=2,
        device="cpu",
    )
    predict(config, model=model, progress=False)
    full_predictions = (cohort / "out" / "predictions.csv").read_text()
    full_answers = (cohort / "out" / "answers.jsonl").read_text()
    lines = full_predictions.splitlines()
    # the last two scans undone, and a kill mid-write left torn last lines in both files
    (cohort / "out" / "predictions.csv").write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:5])
    with (cohort / "out" / "answers.jsonl").open("a") as handle:
        handle.write('{"scan_id": "sc')
    predict(config, model=model, progress=False)
    assert (cohort / "out" / "predictions.csv").read_text() == full_predictions
    assert (cohort / "out" / "answers.jsonl").read_text() == full_answers
    predict(dataclasses.replace(config, split="all"), model=model, progress=False)
    assert pd.read_csv(cohort / "out" / "predictions.csv")["scan_id"].tolist()[-1] == "scan4"


def test_predict_without_generation_has_empty_answers(tiny_model_config, cohort):
    model_dir = _saved_model(tiny_model_config, cohort / "model")
    assert main(_args(cohort, model_dir, cohort / "out", "--no-generate", "--pool", "prompt")) == 0
    answers = [
        json.loads(line)["answer"] for line in (cohort / "out" / "answers.jsonl").read_text().splitlines()
    ]
    assert answers and all(a == "" for a in answers)
    assert not (cohort / "out" / "survival_curves.csv").exists()


def test_predict_bad_inputs_are_named(tiny_model_config, cohort):
    model = _model(tiny_model_config)
    base = PredictConfig(
        manifest=str(cohort / "manifest.csv"), cache=str(cohort / "cache"), out=str(cohort / "o")
    )
    _write_cache(cohort / "small", {"scan0": torch.zeros(TINY_IMAGE_TOKENS, TINY_IMAGE_DIM)})
    with pytest.raises(
        PredictError,
        match=r"manifest.csv with feature cache .*small: 3 test scans are not in the feature cache",
    ):
        predict(dataclasses.replace(base, cache=str(cohort / "small")), model=model, progress=False)
    (cohort / "o").mkdir()
    (cohort / "o" / "predictions.csv").write_text("scan_id,risk,risk_other\n")
    with pytest.raises(PredictError, match="predictions.csv: columns .* differ from this run's"):
        predict(base, model=model, progress=False)
    with pytest.raises(
        ConfigError, match=r"^split: expected one of \['train', 'val', 'test', 'all'\], got 'holdout'"
    ):
        PredictConfig(split="holdout")
    with pytest.raises(ConfigError, match=r"^batch_scans: expected a value >= 1, got 0"):
        PredictConfig(batch_scans=0)
    with pytest.raises(ConfigError, match=r"^max_new_tokens: expected a value >= 1 or null, got -1"):
        PredictConfig(max_new_tokens=-1)
    with pytest.raises(ConfigError, match=r"^pool: expected one of \['all', 'prompt'\] or null, got 'mean'"):
        PredictConfig(pool="mean")
