"""`vlsurv demo` end to end on a small synthetic cohort: every output, and a model that learned the signal."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from vlsurv.config import ConfigError
from vlsurv.demo import DemoConfig, main, run_demo

pytestmark = pytest.mark.slow
STAGES = ("stage1", "stage2")

REQUIRED = (
    "c_index",
    "c_index_ci",
    "c_index_clinical_only",
    "oracle_c_index",
    "td_auc",
    "logrank_p",
    "bertscore_f1",
    "clinical_accuracy",
    "wall_seconds",
)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # the demo's defaults (300 patients, seed 0: the README's numbers), with fewer bootstrap resamples
    config = DemoConfig(out=str(out), bootstrap=100, bertscore_samples=200, progress=False)
    return out, run_demo(config)


def test_demo_writes_every_output(small_demo):
    out, summary = small_demo
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(REQUIRED) <= set(metrics) and metrics["c_index"] == summary["c_index"]
    low, high = metrics["c_index_ci"]
    assert low <= metrics["c_index"] <= high
    assert "<img" in (out / "report.html").read_text()
    for step in (
        "stage1/final",
        "stage2/final",
        "predictions/predictions.csv",
        "eval/km.png",
        "demo_config.yaml",
    ):
        assert (out / step).exists(), step
    assert set(metrics["step_seconds"]) and metrics["wall_seconds"] > 0


def test_demo_model_learned_the_risk_and_the_answers(small_demo):
    out, summary = small_demo
    # The training scans: a model that learned nothing ranks them at C = 0.5 (sd about 0.03 at this size).
    assert summary["c_index_train"] > 0.65
    # Held-out scans (60 patients, so noisy: 95% CI about 0.15 wide): measured 0.732 at seed 0, 0.608 for the
    # clinical-only CoxPH on the same split (0.750 on the random-init encoder; 0.730 before the head read the
    # clinical fields as numbers). Training scans: 0.815.
    assert summary["c_index"] > 0.66
    assert summary["c_index"] > summary["c_index_clinical_only"] + 0.05
    covariates = json.loads((out / "stage2" / "final" / "clinical_covariates.json").read_text())
    assert [c["field"] for c in covariates["covariates"]] == [
        "age",
        "sex",
        "smoking",
        "stage",
        "t_stage",
        "n_stage",
        "m_stage",
    ]
    assert summary["bertscore_f1"] > 0.4
    # Each question is answered about its own finding.
    answers = pd.read_json(out / "predictions" / "answers.jsonl", lines=True, dtype={"scan_id": str})
    topic = {
        "tumor": ("mass", "nodul", "lesion", "tumou?r"),
        "lymph_nodes": ("lymph",),
        "pleura": ("pleura",),
        "metastases": ("metasta",),
        "vessels": ("vascul", "vessel", "arter", "vena"),
        "bone": ("osseous", "bone", "lytic", "sclerotic", "rib", "vertebra"),
    }
    for question_id, words in topic.items():
        said = answers[answers["question_id"] == question_id]["answer"].str.lower()
        assert said.str.contains("|".join(words)).mean() > 0.8, question_id
    # stage 2 (optim.lr_lora 0 in the demo) trains the survival branch and keeps stage 1's answers
    adapter = Path("final") / "adapter" / "adapter_model.safetensors"
    adapters = [load_file(out / stage / adapter) for stage in STAGES]
    assert set(adapters[0]) == set(adapters[1])
    assert all(torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])


def test_demo_scores_what_the_answers_say(small_demo):
    """Clinical accuracy (answers read back to present / absent) beside BERTScore, in metrics.json, the report
    and the per-question risk gaps."""
    out, summary = small_demo
    questions = {"tumor", "lymph_nodes", "pleura", "metastases", "vessels", "bone"}
    truth = summary["clinical_accuracy"]["against_ground_truth"]
    assert set(truth["per_question"]) == questions
    low, high = truth["macro_f1_ci"]
    assert low <= truth["macro_f1"] <= high
    report = summary["clinical_accuracy"]["against_report"]
    assert set(report["per_question"]) == questions and report["not_in_reference"] == 0
    # Measured at seed 0 (README): macro F1 0.82; tumor 0.98, nodes 0.88, pleura 1.00, metastases 0.50,
    # vessels 0.93, bone 0.62 (on the random-init encoder, --encoder-weights random: 0.73, and bone 0.27;
    # before status_first answers and balanced weights: 0.20, and 0.00 for nodes, metastases, vessels, bone).
    # Each bound sits below its measurement, above what "No ..." to every scan gives.
    f1 = {question_id: scores["f1"] or 0.0 for question_id, scores in truth["per_question"].items()}
    assert truth["macro_f1"] > 0.72
    minimum = {
        "tumor": 0.85,
        "lymph_nodes": 0.75,
        "pleura": 0.85,
        "metastases": 0.4,
        "vessels": 0.75,
        "bone": 0.45,
    }
    assert all(f1[q] > bound for q, bound in minimum.items()), f1
    # Where: the tumour's lobe right in 52 of 54 true-positive answers and the effusion's side in 23 of 23
    # (on the random-init encoder 39 of 54 and 21 of 21; without the lobe guidance 35 of 54; before the grid
    # summary and the decoder pretrained on the openings: 11 of 50 and 11 of 20; naming the commonest lobe to
    # every tumour gives about a third).
    details = summary["clinical_accuracy"]["details"]
    lobe, side = details["tumor_lobe"], details["pleura_side"]
    assert lobe["correct"] / lobe["scored"] > 0.8 and side["correct"] / side["scored"] > 0.85, (lobe, side)
    assert (out / "stage2" / "final" / "lobe_classifier.safetensors").is_file()
    answers = pd.read_json(out / "predictions" / "answers.jsonl", lines=True)["answer"]
    assert answers.str.match(r"(Present|Absent), [a-z ]+(, [a-z ]+)?: ").mean() > 0.95  # findings_first
    fitted = json.loads((out / "stage2" / "final" / "config.json").read_text())["status_bias"]
    assert set(fitted) == questions
    assert truth["per_question"]["pleura"]["prevalence"] == pytest.approx(
        pd.read_csv(out / "cohort" / "findings.csv")
        .merge(pd.read_csv(out / "cohort" / "manifest.csv")[["scan_id", "split"]], on="scan_id")
        .query("split == 'test'")["pleura"]
        .mean()
    )
    assert "Clinical accuracy" in (out / "report.html").read_text()
    assert set(summary["question_risk_gaps"]["per_question"]) <= questions


def test_bad_demo_options_are_named(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^n_patients: expected a value >= 30 \(train, val and test need events\), got 10"
    ):
        DemoConfig(n_patients=10)
    with pytest.raises(ConfigError, match=r"^head: expected one of \['deepsurv', 'deephit'\], got 'cox'"):
        DemoConfig(head="cox")
    with pytest.raises(ConfigError, match=r"^status_weight: expected a weight >= 1, got 0.5"):
        DemoConfig(status_weight=0.5)
    with pytest.raises(ConfigError, match=r"^stage2_lr_lora: expected a learning rate >= 0, got -1.0"):
        DemoConfig(stage2_lr_lora=-1.0)
    with pytest.raises(
        ConfigError, match=r"^encoder_weights: expected one of \['pretrained', 'random'\], got 'imagenet'"
    ):
        DemoConfig(encoder_weights="imagenet")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--n-patients", "5"])
