"""Projector, residual adapter, survival heads and DeepHit cuts (no decoder needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlsurv.config import ConfigError, from_dict
from vlsurv.model.model_config import ModelConfig
from vlsurv.model.projector import ProjectorError, build_projector
from vlsurv.model.survival import (
    DeepHitCuts,
    ResidualAdapter,
    SurvivalBranch,
    SurvivalConfig,
    SurvivalConfigError,
    deephit_risk,
    deephit_survival,
)


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_projector_maps_last_axis(kind):
    projector = build_projector(kind, 16, 32)
    assert projector(torch.randn(2, 5, 16)).shape == (2, 5, 32)


def test_layernorm_input_gives_the_same_output_at_any_feature_scale():
    torch.manual_seed(0)
    projector = build_projector("linear", 16, 32, input_norm="layernorm")
    tokens = torch.randn(2, 5, 16)
    torch.testing.assert_close(projector(tokens * 1e-2), projector(tokens), atol=2e-2, rtol=0)
    assert isinstance(projector[0], torch.nn.LayerNorm)


def test_standardize_uses_training_statistics_floors_rare_entries_and_must_be_fitted():
    torch.manual_seed(0)
    projector = build_projector("linear", 4, 8, input_norm="standardize", num_tokens=3)
    with pytest.raises(ProjectorError, match="statistics were never fitted"):
        projector(torch.randn(2, 3, 4))
    tokens = 5.0 + 0.01 * torch.randn(200, 3, 4)
    tokens[:, 0, 0] = 5.0  # constant: only centred
    tokens[:, 0, 1] = 5.0 + 1e-5 * torch.randn(200)  # nearly constant: std floored, not blown up
    standardizer = projector[0]
    standardizer.fit(tokens)
    z = standardizer(tokens)
    assert z[:, 1:].std(0).sub(1).abs().max() < 1e-3 and z.mean(0).abs().max() < 1e-4
    assert z[:, 0, 0].abs().max() == 0 and z[:, 0, 1].abs().max() < 0.1
    with pytest.raises(ProjectorError, match=r"expected training tokens \(N >= 2, 3, 4\), got \(5, 2, 4\)"):
        standardizer.fit(torch.randn(5, 2, 4))


def test_unknown_projector_is_rejected():
    with pytest.raises(ProjectorError, match="expected one of .*'linear'.*got 'conv'"):
        build_projector("conv", 16, 32)
    with pytest.raises(ProjectorError, match="projector_input_norm: expected one of .*got 'batchnorm'"):
        build_projector("linear", 16, 32, input_norm="batchnorm")
    with pytest.raises(ValueError, match="model.projector_input_norm: expected one of"):
        ModelConfig(decoder_path="x", projector_input_norm="rms")


def test_residual_adapter_mixes_mlp_and_identity():
    torch.manual_seed(0)
    adapter = ResidualAdapter(16, ratio=0.2, reduction=4)
    assert adapter.mlp[0].out_features == 4
    z = torch.randn(3, 16)
    expected = 0.2 * torch.relu(adapter.mlp[2](torch.relu(adapter.mlp[0](z)))) + 0.8 * z
    torch.testing.assert_close(adapter(z), expected)


def test_survival_heads_have_the_documented_shapes():
    z = torch.randn(3, 16)
    deepsurv = SurvivalBranch(16, SurvivalConfig(head="deepsurv"))(z)
    assert deepsurv.log_risk.shape == (3,) and deepsurv.logits is None and deepsurv.z_surv.shape == (3, 16)
    deephit = SurvivalBranch(16, SurvivalConfig(head="deephit", num_bins=5))(z)
    assert deephit.logits.shape == (3, 6) and deephit.log_risk is None


def test_cuts_are_quantiles_of_event_times_only():
    time = [1.0, 2.0, 3.0, 4.0, 100.0, 200.0]
    event = [1, 1, 1, 1, 0, 0]
    with_tail = DeepHitCuts.from_times(time, event, num_bins=2)  # the 1/3 and 2/3 quantiles of 1, 2, 3, 4
    assert with_tail.cuts.tolist() == [2.0, 3.0] and with_tail.placement == "event_quantiles_with_tail"
    original = DeepHitCuts.from_times(time, event, num_bins=2, placement="event_quantiles")
    assert original.cuts.tolist() == [2.5, 4.0] == np.quantile([1.0, 2.0, 3.0, 4.0], [0.5, 1.0]).tolist()


def test_bin_index_is_searchsorted_with_a_tail_bin():
    cuts = DeepHitCuts([10.0, 20.0, 30.0])
    time = np.array([0.5, 10.0, 10.1, 20.0, 29.0, 30.0, 31.0, 1000.0])
    expected = np.searchsorted(cuts.cuts.numpy(), time)
    assert cuts.bin_index(torch.tensor(time)).tolist() == expected.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize(
    ("censoring", "credit"),
    [
        ("interpolate", [0.5, 1.0, 0.01, 0.5, 0.0, 0.0]),
        ("life_table", [0.5, 0.5, 0.5, 0.5, 0.0, 0.0]),
        ("deephit", [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]),
        ("pycox", [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
    ],
)
def test_labels_credit_per_scheme_and_censor_events_after_the_last_cut(censoring, credit):
    cuts = DeepHitCuts([10.0, 20.0, 30.0], censoring=censoring)
    labels = cuts.labels(torch.tensor([5.0, 10.0, 10.1, 25.0, 31.0, 40.0]), torch.tensor([0, 1, 0, 1, 1, 0]))
    assert labels.bin_index.tolist() == [0, 0, 1, 2, 3, 3]
    assert labels.event.tolist() == [
        False,
        True,
        False,
        True,
        False,
        False,
    ]  # the event at 31 is censored at 30
    torch.testing.assert_close(labels.censored_credit, torch.tensor(credit, dtype=torch.float64))


def test_interpolated_credit_has_no_nan_when_the_first_cut_is_zero():
    labels = DeepHitCuts([0.0, 5.0]).labels(torch.tensor([0.0, 2.0]), torch.tensor([0, 0]))
    assert labels.bin_index.tolist() == [0, 1] and labels.censored_credit.tolist() == [1.0, 0.4]


def test_cut_errors_name_the_problem(tmp_path):
    with pytest.raises(SurvivalConfigError, match="no event"):
        DeepHitCuts.from_times([1.0, 2.0], [0, 0], 2)
    with pytest.raises(SurvivalConfigError, match="only 1 distinct quantiles .* lower it"):
        DeepHitCuts.from_times([5.0, 5.0, 5.0], [1, 1, 1], 3)
    with pytest.raises(SurvivalConfigError, match="strictly increasing"):
        DeepHitCuts([3.0, 1.0])
    with pytest.raises(SurvivalConfigError, match=r"DeepHit censoring: expected one of \('interpolate'"):
        DeepHitCuts([1.0, 2.0], censoring="half")
    with pytest.raises(SurvivalConfigError, match="DeepHit cut placement: expected one of .*got 'uniform'"):
        DeepHitCuts.from_times([1.0, 2.0, 3.0], [1, 1, 1], 2, placement="uniform")
    for text in ("{}", "[1, 2]", "{"):
        (tmp_path / DeepHitCuts.FILE_NAME).write_text(text)
        with pytest.raises(SurvivalConfigError, match=r'deephit_cuts.json: expected JSON \{"cuts": \[times'):
            DeepHitCuts.load(tmp_path)
    (tmp_path / DeepHitCuts.FILE_NAME).write_text('{"cuts": [1, 2], "censoring": "half"}')
    with pytest.raises(SurvivalConfigError, match="deephit_cuts.json: DeepHit censoring: expected one of"):
        DeepHitCuts.load(tmp_path)


@pytest.mark.parametrize(
    ("placement", "censoring"), [("event_quantiles_with_tail", "interpolate"), ("event_quantiles", "pycox")]
)
def test_cuts_and_scheme_round_trip_exactly(tmp_path, placement, censoring):
    time = np.random.default_rng(0).exponential(300.0, 50)
    cuts = DeepHitCuts.from_times(time, np.ones(50), 7, placement=placement, censoring=censoring)
    cuts.save(tmp_path)
    loaded = DeepHitCuts.load(tmp_path)
    assert torch.equal(loaded.cuts, cuts.cuts)
    assert (loaded.censoring, loaded.placement) == (censoring, placement)


def test_cuts_saved_before_the_schemes_load_with_the_original_deephit_credit(tmp_path):
    (tmp_path / DeepHitCuts.FILE_NAME).write_text('{"cuts": [30.0, 90.0, 400.0]}')
    loaded = DeepHitCuts.load(tmp_path)
    assert loaded.cuts.tolist() == [30.0, 90.0, 400.0]
    assert (loaded.censoring, loaded.placement) == ("deephit", None)


def test_deephit_risk_and_survival_curve_by_hand():
    cuts = DeepHitCuts([10.0, 20.0])
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    logits = probs.log()
    torch.testing.assert_close(deephit_survival(logits), torch.tensor([[0.5, 0.2], [0.9, 0.8]]))
    expected_time = torch.tensor([0.5 * 10 + 0.3 * 20 + 0.2 * 20, 0.1 * 10 + 0.1 * 20 + 0.8 * 20])
    torch.testing.assert_close(deephit_risk(logits, cuts, "expected_time"), -expected_time)
    torch.testing.assert_close(
        deephit_risk(logits, cuts, "cif_at_horizon", horizon=15.0), torch.tensor([0.5, 0.1])
    )
    with pytest.raises(SurvivalConfigError, match="3 columns; expected 3 cuts"):
        deephit_risk(logits, DeepHitCuts([1.0, 2.0, 3.0]), "expected_time")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"projector": "conv"},
            r"^projector in model.yaml: expected one of \['linear', 'mlp2x_gelu'\], got 'conv'",
        ),
        (
            {"quantization": "2bit"},
            r"^quantization in model.yaml: expected one of \['none', '4bit', '8bit'\]",
        ),
        ({"dtype": "int8"}, r"^dtype in model.yaml: expected one of \['float32', 'bfloat16', 'float16'\]"),
        ({"pool": "answer"}, r"^pool in model.yaml: expected one of \['all', 'prompt'\], got 'answer'"),
        ({"num_image_tokens": 0}, "^num_image_tokens in model.yaml: expected a value >= 1, got 0"),
        ({"max_seq_len": 0}, "^max_seq_len in model.yaml: expected a value >= 1 or null, got 0"),
        (
            {"survival": {"head": "cox"}},
            r"^survival.head in model.yaml: expected one of \['deepsurv', 'deephit'\]",
        ),
        (
            {"survival": {"head": "deephit", "deephit_risk": "cif_at_horizon"}},
            "^survival.horizon in model.yaml: required when deephit_risk is 'cif_at_horizon'",
        ),
        (
            {"survival": {"adapter_ratio": 1.5}},
            r"^survival.adapter_ratio in model.yaml: expected a value in \[0, 1\]",
        ),
        (
            {"survival": {"deephit_censoring": "half"}},
            r"survival.deephit_censoring.*expected one of \['interp",
        ),
        ({"survival": {"deephit_cut_placement": "km"}}, r"survival.deephit_cut_placement.*expected one of"),
        ({"lora": {"rank": 8}}, "unknown key lora.rank"),
    ],
)
def test_model_config_rejects_bad_values(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, data, source="model.yaml")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "deephit_censoring",
            "half",
            r"survival.deephit_censoring: expected one of \['interpolate', .*got 'half'",
        ),
        ("deephit_cut_placement", "km", r"survival.deephit_cut_placement: expected one of .*got 'km'"),
    ],
)
def test_survival_config_rejects_unknown_deephit_schemes(field, value, message):
    with pytest.raises(SurvivalConfigError, match=message):
        SurvivalConfig(head="deephit", **{field: value})


def test_grid_summary_starts_as_the_shared_projector_and_learns_what_a_token_mean_cannot():
    """The label is whether token 0 or token 1 holds more of channel 0: a readout of the token mean (what a
    decoder's uniform attention over a shared projection sees) is blind to it, the grid summary is not."""
    torch.manual_seed(0)
    tokens = torch.randn(512, 4, 8)
    label = (tokens[:, 0, 0] > tokens[:, 1, 0]).float()
    shared = build_projector("linear", 8, 16, num_tokens=4)
    grid = build_projector("linear", 8, 16, num_tokens=4, positions="grid", position_rank=2)
    grid.shared.load_state_dict(shared.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(grid(tokens), shared(tokens))  # B = 0 at the start
    accuracy = {}
    for name, projector in (("shared", shared), ("grid", grid)):
        readout = torch.nn.Linear(16, 1)
        optimizer = torch.optim.Adam([*projector.parameters(), *readout.parameters()], lr=1e-2)
        for _ in range(300):
            logit = readout(projector(tokens).mean(1)).squeeze(1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        accuracy[name] = ((logit > 0).float() == label).float().mean().item()
    assert accuracy["grid"] > 0.95 and accuracy["shared"] < 0.65, accuracy
    assert grid.up.shape == (4, 2, 16) and grid.down.weight.shape == (2, 8)


def test_grid_summary_sits_behind_the_input_norm():
    projector = build_projector(
        "linear", 8, 16, input_norm="standardize", num_tokens=4, positions="grid", position_rank=3
    )
    assert type(projector[0]).__name__ == "TokenStandardizer"
    assert type(projector[1]).__name__ == "GridSummary"
    with pytest.raises(ValueError, match=r"model.image_position_rank: expected .*>= 1"):
        ModelConfig(decoder_path="x", image_positions="grid", image_position_rank=0)
