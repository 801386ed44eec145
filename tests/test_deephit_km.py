"""An intercept-only DeepHit, fitted with vlsurv's own cuts, labels and NLL, reproduces Kaplan-Meier at the
cuts.

K + 1 free logits (K = 10) are fitted to convergence (LBFGS, float64) on real censored data sets that ship
with scikit-survival; its survival at the cuts is compared with sksurv's Kaplan-Meier estimate at the same
times.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from sksurv.datasets import load_flchain, load_gbsg2, load_whas500
from sksurv.nonparametric import kaplan_meier_estimator

from vlsurv import losses
from vlsurv.model.survival import (
    DeepHitCuts,
    SurvivalBranch,
    SurvivalConfig,
    SurvivalConfigError,
    deephit_survival,
    survival_between_cuts,
)

LOADERS = {"whas500": load_whas500, "gbsg2": load_gbsg2, "flchain": load_flchain}
NUM_BINS = 10
TARGET = 0.03


@functools.cache
def _time_event(name: str) -> tuple[np.ndarray, np.ndarray]:
    _, outcome = LOADERS[name]()
    event_field, time_field = outcome.dtype.names
    return outcome[time_field].astype(np.float64), outcome[event_field].astype(bool)


def _fit_intercept_only(cuts: DeepHitCuts, time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, float]:
    """(S at the cuts (K,), gradient norm at the optimum) of K+1 free logits under ``deephit_nll``."""
    labels = cuts.labels(torch.from_numpy(time), torch.from_numpy(event))
    logits = torch.zeros(1, NUM_BINS + 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [logits], max_iter=1000, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        rows = logits.expand(len(time), -1)
        loss = losses.deephit_nll(rows, labels.bin_index, labels.event, labels.censored_credit)
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    closure()
    survival = deephit_survival(logits.detach())[0].double().numpy()
    return survival, float(logits.grad.norm())


def _kaplan_meier_at(time: np.ndarray, event: np.ndarray, at: np.ndarray) -> np.ndarray:
    km_time, km_survival = kaplan_meier_estimator(event, time)
    index = np.searchsorted(km_time, at, side="right") - 1
    return np.where(index >= 0, km_survival[np.maximum(index, 0)], 1.0)


def _largest_gap(name: str, placement: str, censoring: str) -> float:
    time, event = _time_event(name)
    cuts = DeepHitCuts.from_times(time, event, NUM_BINS, placement=placement, censoring=censoring)
    survival, gradient_norm = _fit_intercept_only(cuts, time, event)
    assert gradient_norm < 1e-6, f"LBFGS did not converge on {name}: |grad| = {gradient_norm}"
    return float(np.abs(survival - _kaplan_meier_at(time, event, cuts.cuts.numpy())).max())


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_default_scheme_reproduces_kaplan_meier_at_the_cuts(name):
    default = SurvivalConfig()
    gap = _largest_gap(name, default.deephit_cut_placement, default.deephit_censoring)
    assert gap <= TARGET, f"{name}: largest |S_deephit - S_KM| at the cuts = {gap:.4f}"


@pytest.mark.parametrize(
    ("name", "placement", "censoring"),
    [
        ("whas500", "event_quantiles", "deephit"),  # the original scheme: measured 0.50
        ("gbsg2", "event_quantiles", "deephit"),  # 0.13
        ("flchain", "event_quantiles", "pycox"),  # pycox's credit: 0.37
    ],
)
def test_the_check_catches_the_biased_conventions(name, placement, censoring):
    assert _largest_gap(name, placement, censoring) > TARGET


def test_fitted_hazards_are_the_closed_form_of_the_nll_docstring():
    """h_k = d_k / (n_k - sum over the censored rows of bin k of (1 - w_i)), on gbsg2 with the default
    scheme."""
    time, event = _time_event("gbsg2")
    cuts = DeepHitCuts.from_times(time, event, NUM_BINS)
    labels = cuts.labels(torch.from_numpy(time), torch.from_numpy(event))
    bins, events, credit = labels.bin_index.numpy(), labels.event.numpy(), labels.censored_credit.numpy()
    hazards = [
        events[bins == k].sum() / ((bins >= k).sum() - (1.0 - credit[(bins == k) & ~events]).sum())
        for k in range(NUM_BINS)
    ]
    survival, _ = _fit_intercept_only(cuts, time, event)
    np.testing.assert_allclose(survival, np.cumprod(1.0 - np.array(hazards)), atol=1e-6)


@pytest.mark.parametrize("censoring", ["interpolate", "life_table", "deephit", "pycox"])
@pytest.mark.parametrize("name", sorted(LOADERS))
def test_marginal_log_probabilities_are_the_intercept_only_fit(name, censoring):
    """The closed form that starts a DeepHit head equals the fitted optimum of the NLL, for every scheme."""
    time, event = _time_event(name)
    cuts = DeepHitCuts.from_times(time, event, NUM_BINS, censoring=censoring)
    fitted, _ = _fit_intercept_only(cuts, time, event)
    closed = deephit_survival(cuts.marginal_log_probabilities(time, event)[None])[0].double().numpy()
    np.testing.assert_allclose(closed, fitted, atol=1e-5)


def test_a_head_started_at_the_marginal_has_the_kaplan_meier_curve_as_its_bias():
    time, event = _time_event("whas500")
    cuts = DeepHitCuts.from_times(time, event, NUM_BINS)
    branch = SurvivalBranch(16, SurvivalConfig(head="deephit", num_bins=NUM_BINS))
    weight = branch.head.weight.detach().clone()
    branch.start_at_marginal(cuts.marginal_log_probabilities(time, event))
    assert torch.equal(branch.head.weight, weight)  # the ranking part keeps its init
    survival = deephit_survival(branch.head.bias.detach()[None])[0].double().numpy()
    assert np.abs(survival - _kaplan_meier_at(time, event, cuts.cuts.numpy())).max() <= TARGET


def test_start_at_marginal_refuses_a_deepsurv_head_or_a_wrong_length():
    with pytest.raises(SurvivalConfigError, match=r"expected a DeepHit head and \(11,\) log-probabilities"):
        SurvivalBranch(8, SurvivalConfig(head="deephit", num_bins=10)).start_at_marginal(torch.zeros(5))
    with pytest.raises(SurvivalConfigError, match="got head 'deepsurv'"):
        SurvivalBranch(8, SurvivalConfig()).start_at_marginal(torch.zeros(1))


def test_curve_between_cuts_follows_the_schemes_within_bin_assumption():
    """Under "interpolate" (constant hazard in a bin) S between cuts is log-linear; the curve written on the
    dense grid matches Kaplan-Meier between the cuts too, where reading the cut before would not."""
    time, event = _time_event("whas500")
    cuts = DeepHitCuts.from_times(time, event, 4)
    survival = deephit_survival(cuts.marginal_log_probabilities(time, event)[None]).double()
    grid = cuts.curve_times()
    assert grid[-1] == cuts.cuts[-1] and len(grid) > cuts.num_bins
    assert set(cuts.cuts.tolist()) <= set(grid.tolist())
    second_bin = grid[(grid > cuts.cuts[0]) & (grid <= cuts.cuts[1])]
    torch.testing.assert_close(second_bin.diff(), ((cuts.cuts[1] - cuts.cuts[0]) / 8).expand(7))
    dense = survival_between_cuts(survival, cuts, grid)[0].numpy()
    at_cuts = dense[np.isin(grid.numpy(), cuts.cuts.numpy())]
    np.testing.assert_allclose(at_cuts, survival[0].numpy(), atol=1e-12)
    middle = (cuts.cuts[0] + cuts.cuts[1]) / 2
    value = survival_between_cuts(survival, cuts, torch.tensor([middle]))[0, 0]
    assert value == pytest.approx(float(torch.sqrt(survival[0, 0] * survival[0, 1])))
    km = _kaplan_meier_at(time, event, grid.numpy())
    assert np.abs(dense - km).max() <= TARGET
    step = DeepHitCuts(cuts.cuts, censoring="deephit")
    assert torch.equal(step.curve_times(), step.cuts)
    assert survival_between_cuts(survival, step, torch.tensor([middle]))[0, 0] == survival[0, 0]
    with pytest.raises(SurvivalConfigError, match="after the last cut"):
        survival_between_cuts(survival, cuts, cuts.cuts[-1:] + 1)
