"""vlsurv.losses against torchsurv, lifelines, pycox's formulas and direct references, on real survival data
sets."""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi
from sksurv.datasets import load_flchain, load_gbsg2, load_whas500
from torchsurv.loss.cox import neg_partial_log_likelihood

from vlsurv import losses
from vlsurv.losses import LossInputError
from vlsurv.model.survival import DEEPHIT_CENSORING, DeepHitCuts


def _numeric(frame) -> np.ndarray:
    """Standardised numeric columns without missing values (N, p) float64."""
    values = frame.select_dtypes("number").dropna(axis=1).to_numpy(dtype=np.float64)
    return (values - values.mean(0)) / values.std(0)


@functools.cache
def _survival_set(name: str) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(covariates (N, p), time (N,) float64, event (N,) long) of a data set shipped with lifelines /
    sksurv."""
    if name == "rossi":
        frame = load_rossi()
        return (
            _numeric(frame.drop(columns=["week", "arrest"])),
            torch.tensor(frame["week"].to_numpy(), dtype=torch.float64),
            torch.tensor(frame["arrest"].to_numpy(), dtype=torch.long),
        )
    loader, event_field, time_field = {
        "whas500": (load_whas500, "fstat", "lenfol"),
        "gbsg2": (load_gbsg2, "cens", "time"),
        "flchain": (load_flchain, "death", "futime"),
    }[name]
    covariates, outcome = loader()
    return (
        _numeric(covariates),
        torch.from_numpy(outcome[time_field].astype(np.float64)),
        torch.from_numpy(outcome[event_field].astype(np.int64)),
    )


def _linear_log_risk(covariates: np.ndarray, seed: int = 0) -> torch.Tensor:
    """A fixed linear predictor X @ beta with seeded coefficients (N,) float64."""
    beta = np.random.default_rng(seed).normal(scale=0.5, size=covariates.shape[1])
    return torch.tensor(covariates @ beta, dtype=torch.float64)


def _torchsurv(log_risk, time, event, ties, reduction="sum"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return neg_partial_log_likelihood(log_risk, event.bool(), time, ties_method=ties, reduction=reduction)


DATA_SETS = ("rossi", "whas500", "gbsg2", "flchain")


@pytest.mark.parametrize("name", DATA_SETS)
@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_cox_loss_matches_torchsurv_on_real_data(name, ties):
    covariates, time, event = _survival_set(name)
    log_risk = _linear_log_risk(covariates)
    expected_sum = _torchsurv(log_risk, time, event, ties).double()
    ours_sum = losses.cox_loss(log_risk, time, event, ties=ties, reduction="sum")
    ours_mean = losses.cox_loss(log_risk, time, event, ties=ties, reduction="mean")
    torch.testing.assert_close(ours_sum, expected_sum, rtol=2e-6, atol=0.0)
    torch.testing.assert_close(ours_mean, expected_sum / event.sum(), rtol=2e-6, atol=0.0)


def test_real_data_sets_exercise_tied_event_times():
    for name in ("rossi", "whas500"):
        _, time, event = _survival_set(name)
        event_times = time[event.bool()]
        assert torch.unique(event_times).numel() < event_times.numel() - 10, name


def test_ties_methods_differ_and_match_torchsurv_mean_without_ties():
    _, time, event = _survival_set("whas500")
    log_risk = torch.linspace(-1.0, 1.0, len(time), dtype=torch.float64)
    breslow = losses.cox_loss(log_risk, time, event, ties="breslow")
    efron = losses.cox_loss(log_risk, time, event, ties="efron")
    assert float(breslow - efron) > 1e-3  # Breslow over-counts tied risk sets
    distinct_time = time + torch.arange(len(time), dtype=torch.float64) * 1e-3  # integer days: order kept
    no_ties = losses.cox_loss(log_risk, distinct_time, event, ties="efron")
    torch.testing.assert_close(no_ties, _torchsurv(log_risk, distinct_time, event, "efron", "mean").double())


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_cox_loss_gradient_matches_torchsurv(ties):
    covariates, time, event = _survival_set("whas500")
    ours = _linear_log_risk(covariates, seed=1).requires_grad_(True)
    theirs = ours.detach().clone().requires_grad_(True)
    losses.cox_loss(ours, time, event, ties=ties, reduction="sum").backward()
    _torchsurv(theirs, time, event, ties).backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6)


def test_efron_log_likelihood_equals_lifelines_at_its_fit():
    frame = load_rossi()
    fitter = CoxPHFitter().fit(frame, duration_col="week", event_col="arrest")
    covariates = torch.tensor(frame[fitter.params_.index].to_numpy(), dtype=torch.float64)
    log_risk = covariates @ torch.tensor(fitter.params_.to_numpy(), dtype=torch.float64)
    time = torch.tensor(frame["week"].to_numpy(), dtype=torch.float64)
    event = torch.tensor(frame["arrest"].to_numpy())
    log_likelihood = -losses.cox_loss(log_risk, time, event, ties="efron", reduction="sum")
    assert float(log_likelihood) == pytest.approx(fitter.log_likelihood_, rel=1e-10)


def test_cox_loss_is_invariant_to_row_order_and_risk_shift():
    _, time, event = _survival_set("rossi")
    log_risk = torch.linspace(-2.0, 3.0, len(time), dtype=torch.float64)
    order = torch.randperm(len(time), generator=torch.Generator().manual_seed(0))
    reference = losses.cox_loss(log_risk, time, event, ties="efron")
    torch.testing.assert_close(
        losses.cox_loss(log_risk[order], time[order], event[order], ties="efron"), reference
    )
    torch.testing.assert_close(losses.cox_loss(log_risk + 7.0, time, event, ties="efron"), reference)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_cox_loss_all_censored_is_zero_with_graph_and_warning(ties):
    log_risk = torch.randn(6, requires_grad=True)
    with pytest.warns(UserWarning, match="no event in the batch"):
        loss = losses.cox_loss(log_risk, torch.arange(1.0, 7.0), torch.zeros(6, dtype=torch.long), ties=ties)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(log_risk.grad, torch.zeros(6))


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_cox_loss_one_event_has_finite_gradient(ties):
    log_risk = torch.tensor([0.3, -1.0, 2.0, 0.5], requires_grad=True)
    time = torch.tensor([4.0, 1.0, 1.0, 3.0])
    event = torch.tensor([0, 1, 0, 0])
    loss = losses.cox_loss(log_risk, time, event, ties=ties)
    loss.backward()
    expected = -(-1.0 - torch.logsumexp(log_risk.detach(), 0))  # every row is at risk at t = 1
    torch.testing.assert_close(loss.detach(), expected)
    assert torch.isfinite(log_risk.grad).all()


extreme = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(extreme, st.integers(1, 5), st.booleans()), min_size=1, max_size=12),
    st.sampled_from(["breslow", "efron"]),
)
def test_cox_loss_finite_for_extreme_log_risks(rows, ties):
    log_risk = torch.tensor([r[0] for r in rows], dtype=torch.float32, requires_grad=True)
    time = torch.tensor([float(r[1]) for r in rows])
    event = torch.tensor([int(r[2]) for r in rows])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = losses.cox_loss(log_risk, time, event, ties=ties)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(log_risk.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"time": torch.ones(3)}, r"`time` must have shape \(4,\), got \(3,\)"),
        ({"event": torch.tensor([0, 1, 2, 1])}, "`event` must contain only 0 and 1"),
        ({"time": torch.tensor([1.0, float("nan"), 2.0, 3.0])}, "`time` must be finite"),
        ({"log_risk": torch.ones(4, dtype=torch.long)}, "`log_risk` must be a floating-point tensor"),
        ({"log_risk": torch.ones(4, 1)}, r"`log_risk` must have shape \(N,\)"),
        ({"ties": "exact"}, "`ties` must be one of"),
        ({"reduction": "none"}, "`reduction` must be one of"),
    ],
)
def test_cox_loss_rejects_bad_inputs(kwargs, message):
    arguments = {
        "log_risk": torch.zeros(4),
        "time": torch.arange(1.0, 5.0),
        "event": torch.tensor([1, 0, 1, 1]),
    }
    arguments.update(kwargs)
    with pytest.raises(LossInputError, match=f"cox_loss: {message}"):
        losses.cox_loss(**arguments)


def _deephit_inputs(name: str, num_bins: int, seed: int = 0, rows: slice = slice(None)):
    """pycox-style phi (N, K) from a seeded linear map of real covariates, quantile-cut bins, events."""
    covariates, time, event = _survival_set(name)
    covariates, time, event = covariates[rows], time[rows], event[rows]
    weights = np.random.default_rng(seed).normal(scale=0.25, size=(covariates.shape[1], num_bins))
    phi = torch.tensor(covariates @ weights, dtype=torch.float64)
    cuts = torch.quantile(time[event.bool()], torch.linspace(0, 1, num_bins + 1, dtype=torch.float64)[1:])
    bins = torch.searchsorted(cuts, time).clamp(max=num_bins - 1)
    return phi, bins, event


def _pycox_nll_pmf(phi, idx_durations, events, epsilon=1e-7):
    """pycox.models.loss.nll_pmf, transcribed (pycox is not a dependency); its epsilon is why logits are kept
    moderate in the comparison (a tail mass near 1e-7 would be distorted by it)."""
    events = events.double().view(-1)
    idx_durations = idx_durations.view(-1, 1)
    phi = torch.cat([phi, torch.zeros_like(phi[:, :1])], dim=1)
    gamma = phi.max(1)[0]
    cumsum = phi.sub(gamma.view(-1, 1)).exp().cumsum(1)
    sum_ = cumsum[:, -1]
    part1 = phi.gather(1, idx_durations).view(-1).sub(gamma).mul(events)
    part2 = -sum_.relu().add(epsilon).log()
    part3 = sum_.sub(cumsum.gather(1, idx_durations).view(-1)).relu().add(epsilon).log().mul(1.0 - events)
    return -part1.add(part2).add(part3).mean()


@pytest.mark.parametrize("name", ["rossi", "whas500", "gbsg2"])
def test_deephit_nll_matches_pycox_formula(name):
    phi, bins, event = _deephit_inputs(name, num_bins=8)
    logits = torch.cat([phi, torch.zeros_like(phi[:, :1])], dim=1)
    torch.testing.assert_close(
        losses.deephit_nll(logits, bins, event), _pycox_nll_pmf(phi, bins, event), rtol=1e-5, atol=1e-6
    )


def _credit_reference(logits, bins, event, credit):
    """Direct loop over rows: -(1/N) sum [d log p_k + (1 - d) ((1 - w) log S_{k-1} + w log S_k)]."""
    probs = torch.softmax(logits, dim=1)
    total = 0.0
    for i, k in enumerate(bins.tolist()):
        if event[i]:
            total += math.log(probs[i, k])
            continue
        weight = float(credit[i])
        total += (1.0 - weight) * math.log(probs[i, k:].sum())
        total += weight * math.log(probs[i, k + 1 :].sum()) if weight > 0 else 0.0
    return -total / len(bins)


@pytest.mark.parametrize("censoring", DEEPHIT_CENSORING)
def test_deephit_nll_censored_credit_matches_direct_reference(censoring):
    covariates, time, event = _survival_set("whas500")
    cuts = DeepHitCuts.from_times(time, event, num_bins=6, censoring=censoring)
    labels = cuts.labels(time, event)
    assert bool((labels.bin_index == 6).any())  # rows after the last cut
    partial = bool(((labels.censored_credit > 0) & (labels.censored_credit < 1)).any())
    assert partial == (censoring in ("interpolate", "life_table"))
    weights = np.random.default_rng(1).normal(scale=0.25, size=(covariates.shape[1], 7))
    logits = torch.tensor(covariates @ weights, dtype=torch.float64)
    loss = losses.deephit_nll(logits, labels.bin_index, labels.event, labels.censored_credit)
    reference = _credit_reference(logits, labels.bin_index, labels.event, labels.censored_credit)
    assert float(loss) == pytest.approx(reference, rel=1e-10)


def test_deephit_nll_credit_one_is_the_default_and_zero_is_the_cut_before():
    logits = torch.randn(4, 4, dtype=torch.float64)
    bins, event = torch.tensor([1, 2, 2, 0]), torch.tensor([0, 0, 1, 0])
    torch.testing.assert_close(
        losses.deephit_nll(logits, bins, event),
        losses.deephit_nll(logits, bins, event, torch.ones(4).double()),
    )
    zero = losses.deephit_nll(logits[:3], bins[:3], event[:3], torch.zeros(3).double())
    torch.testing.assert_close(zero, losses.deephit_nll(logits[:3], torch.tensor([0, 1, 2]), event[:3]))


def test_deephit_nll_gradient_finite_with_censored_rows_in_the_tail_column():
    logits = torch.tensor([[30.0, -30.0, -30.0], [-30.0, -30.0, 30.0], [0.0, 1.0, 2.0]], requires_grad=True)
    loss = losses.deephit_nll(
        logits, torch.tensor([2, 2, 0]), torch.tensor([0, 0, 0]), torch.tensor([0.0, 0.0, 1.0])
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def _ranking_reference(logits, bins, event, sigma):
    """Direct O(N^2) loops over pycox's pair_rank_mat and exp(-(F_i(T_i) - F_j(T_i)) / sigma)."""
    cdf = torch.softmax(logits, dim=1).cumsum(1)
    n, total = len(bins), 0.0
    for i in range(n):
        if not event[i]:
            continue
        for j in range(n):
            if bins[i] < bins[j] or (bins[i] == bins[j] and not event[j]):
                total += math.exp(-(cdf[i, bins[i]] - cdf[j, bins[i]]) / sigma)
    return total / (n * n)


@pytest.mark.parametrize("sigma", [0.1, 1.0])
def test_deephit_ranking_loss_matches_direct_reference(sigma):
    phi, bins, event = _deephit_inputs("whas500", num_bins=6, rows=slice(0, 60))
    logits = torch.cat([phi, torch.zeros_like(phi[:, :1])], dim=1)
    loss = losses.deephit_ranking_loss(logits, bins, event, sigma=sigma)
    assert float(loss) == pytest.approx(_ranking_reference(logits, bins, event, sigma), rel=1e-10)


def test_deephit_losses_gradients_finite_all_censored_and_one_event():
    logits = torch.randn(5, 4, requires_grad=True)
    bins = torch.tensor([0, 1, 2, 2, 1])
    for event in (torch.zeros(5, dtype=torch.long), torch.tensor([0, 0, 1, 0, 0])):
        logits.grad = None
        (
            losses.deephit_nll(logits, bins, event) + losses.deephit_ranking_loss(logits, bins, event)
        ).backward()
        assert torch.isfinite(logits.grad).all()


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(extreme, min_size=4, max_size=4), st.integers(0, 3), st.booleans()),
        min_size=1,
        max_size=8,
    )
)
def test_deephit_losses_finite_for_extreme_logits(rows):
    logits = torch.tensor([r[0] for r in rows], dtype=torch.float32, requires_grad=True)
    event = torch.tensor([int(r[2]) for r in rows])
    bins = torch.tensor([r[1] if r[2] else min(r[1], 2) for r in rows])  # censored rows need mass after
    loss = losses.deephit_nll(logits, bins, event) + losses.deephit_ranking_loss(logits, bins, event)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    ("function", "arguments", "message"),
    [
        ("deephit_nll", {"bin_index": torch.tensor([0, 4])}, r"`bin_index` must lie in \[0, 3\]"),
        ("deephit_nll", {"bin_index": torch.tensor([0.0, 1.0])}, "`bin_index` must be an integer tensor"),
        ("deephit_nll", {"event": torch.tensor([1, 0]), "bin_index": torch.tensor([0, 3])}, "a censored row"),
        (
            "deephit_nll",
            {
                "event": torch.tensor([1, 0]),
                "bin_index": torch.tensor([0, 3]),
                "censored_credit": torch.ones(2),
            },
            r"a censored row has `bin_index` = 3 .* and `censored_credit` > 0; it must be 0 there",
        ),
        (
            "deephit_nll",
            {"censored_credit": torch.tensor([0.5, 1.5])},
            r"`censored_credit` must lie in \[0, 1\]",
        ),
        (
            "deephit_nll",
            {"censored_credit": torch.tensor([1, 0])},
            "`censored_credit` must be a floating-point",
        ),
        ("deephit_nll", {"censored_credit": torch.ones(3)}, r"`censored_credit` must have shape \(2,\)"),
        ("deephit_nll", {"logits": torch.zeros(2, 1)}, r"`logits` must have shape \(N, K\+1\)"),
        ("deephit_nll", {"event": torch.tensor([1])}, r"`event` must have shape \(2,\)"),
        ("deephit_ranking_loss", {"sigma": 0.0}, "`sigma` must be > 0"),
        ("deephit_ranking_loss", {"event": torch.tensor([1, 3])}, "`event` must contain only 0 and 1"),
    ],
)
def test_deephit_losses_reject_bad_inputs(function, arguments, message):
    inputs = {"logits": torch.zeros(2, 4), "bin_index": torch.tensor([0, 1]), "event": torch.tensor([1, 0])}
    inputs.update(arguments)
    with pytest.raises(LossInputError, match=f"{function}: {message}"):
        getattr(losses, function)(**inputs)


def test_dispersion_continuous_hand_computed():
    z = torch.tensor([[0.0], [1.0], [3.0]])
    time = torch.tensor([0.0, 1.0, 2.0])
    near, far = math.exp(-0.5), math.exp(-2.0)  # w for |dt| = 1 and 2 with sigma = 1
    expected = (near * 1.0 + near * 4.0 + far * 9.0) / (2 * near + far)
    loss = losses.dispersion_loss_continuous(z, time, torch.ones(3), sigma=1.0)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_dispersion_continuous_default_sigma_and_equal_times():
    z = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    time = torch.tensor([1.0, 3.0, 4.0, 10.0])
    event = torch.ones(4)
    explicit = losses.dispersion_loss_continuous(z, time, event, sigma=float(time.std()))
    torch.testing.assert_close(losses.dispersion_loss_continuous(z, time, event), explicit)
    same_time = losses.dispersion_loss_continuous(z, torch.full((4,), 2.0), event)
    pairwise = torch.cdist(z, z) ** 2
    assert float(same_time) == pytest.approx(float(pairwise.sum() / 12), rel=1e-6)  # plain mean over 12 pairs


def test_dispersion_continuous_ignores_censored_rows_order_and_translation():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(5, 3, generator=generator)
    time = torch.tensor([2.0, 5.0, 1.0, 7.0, 3.0])
    event = torch.ones(5)
    reference = losses.dispersion_loss_continuous(z, time, event)
    padded = losses.dispersion_loss_continuous(
        torch.cat([z, 100 * torch.randn(3, 3, generator=generator)]),
        torch.cat([time, torch.tensor([0.5, 4.0, 9.0])]),
        torch.cat([event, torch.zeros(3)]),
    )
    order = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(padded, reference)
    torch.testing.assert_close(
        losses.dispersion_loss_continuous(z[order], time[order], event[order]), reference
    )
    torch.testing.assert_close(
        losses.dispersion_loss_continuous(z + 50.0, time, event), reference, rtol=1e-4, atol=1e-4
    )


def _mean_pair(values):
    return sum(values) / len(values)


def test_dispersion_discrete_hand_computed():
    event = torch.ones(3)
    orthogonal = losses.dispersion_loss_discrete(
        torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 1.0]]), torch.tensor([0, 0, 1]), event, tau=0.5
    )
    assert float(orthogonal) == pytest.approx(math.sqrt(0.5) / 0.5, rel=1e-6)  # G = 2: cos(mu_0, mu_1) / tau
    opposite = losses.dispersion_loss_discrete(
        torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]), torch.tensor([0, 1, 2]), event, tau=0.5
    )
    per_group = [math.log(0.5 * (1 + math.exp(-2.0))), math.log(1.0), math.log(0.5 * (1 + math.exp(-2.0)))]
    assert float(opposite) == pytest.approx(_mean_pair(per_group), rel=1e-6)


def test_dispersion_discrete_invariances():
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(6, 4, generator=generator)
    bins = torch.tensor([0, 2, 2, 5, 0, 5])
    event = torch.ones(6)
    reference = losses.dispersion_loss_discrete(z, bins, event)
    with_censored = losses.dispersion_loss_discrete(
        torch.cat([z, torch.randn(2, 4, generator=generator)]),
        torch.cat([bins, torch.tensor([1, 2])]),
        torch.cat([event, torch.zeros(2)]),
    )
    torch.testing.assert_close(with_censored, reference)
    torch.testing.assert_close(losses.dispersion_loss_discrete(3.0 * z, bins, event), reference)
    torch.testing.assert_close(losses.dispersion_loss_discrete(z, bins + 10, event), reference)


def test_dispersion_zero_cases_keep_graph():
    z = torch.randn(4, 3, requires_grad=True)
    time = torch.tensor([1.0, 2.0, 3.0, 4.0])
    one_event = torch.tensor([0, 1, 0, 0])
    cases = [
        losses.dispersion_loss_continuous(z, time, one_event),
        losses.dispersion_loss_continuous(z, time, torch.zeros(4)),
        losses.dispersion_loss_discrete(z, torch.tensor([0, 1, 2, 3]), one_event),
        losses.dispersion_loss_discrete(z, torch.tensor([2, 2, 2, 0]), torch.tensor([1, 1, 1, 0])),
    ]
    for loss in cases:
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(z.grad, torch.zeros(4, 3))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(extreme, min_size=3, max_size=3), st.integers(0, 3), st.booleans()),
        min_size=1,
        max_size=8,
    )
)
def test_dispersion_and_alignment_finite_for_extreme_embeddings(rows):
    z = torch.tensor([r[0] for r in rows], dtype=torch.float32, requires_grad=True)
    bins = torch.tensor([r[1] for r in rows])
    event = torch.tensor([int(r[2]) for r in rows])
    loss = (
        losses.dispersion_loss_continuous(z, bins.float() * 100.0, event)
        + losses.dispersion_loss_discrete(z, bins, event)
        + losses.alignment_loss(z, torch.zeros_like(z))
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize(
    ("function", "arguments", "message"),
    [
        ("dispersion_loss_continuous", {"z": torch.zeros(3)}, r"`z` must have shape \(N, d\)"),
        ("dispersion_loss_continuous", {"sigma": -1.0}, "`sigma` must be > 0 or None"),
        (
            "dispersion_loss_continuous",
            {"time": torch.tensor([1.0, float("nan"), 2.0])},
            "`time` must be finite",
        ),
        (
            "dispersion_loss_continuous",
            {"event": torch.tensor([1, 0, 5])},
            "`event` must contain only 0 and 1",
        ),
        ("dispersion_loss_discrete", {"tau": 0.0}, "`tau` must be > 0"),
        (
            "dispersion_loss_discrete",
            {"bin_index": torch.tensor([0.0, 1.0, 1.0])},
            "`bin_index` must be an integer",
        ),
        (
            "dispersion_loss_discrete",
            {"bin_index": torch.tensor([0, 1])},
            r"`bin_index` must have shape \(3,\)",
        ),
    ],
)
def test_dispersion_rejects_bad_inputs(function, arguments, message):
    inputs = {"z": torch.zeros(3, 2), "event": torch.ones(3)}
    inputs["time" if function.endswith("continuous") else "bin_index"] = (
        torch.tensor([1.0, 2.0, 3.0]) if function.endswith("continuous") else torch.tensor([0, 1, 1])
    )
    inputs.update(arguments)
    with pytest.raises(LossInputError, match=f"{function}: {message}"):
        getattr(losses, function)(**inputs)


def test_alignment_loss_value_and_shape_check():
    z_surv = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    z_pooled = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    assert float(losses.alignment_loss(z_surv, z_pooled)) == pytest.approx((4.0 + 25.0) / 2)
    with pytest.raises(LossInputError, match=r"alignment_loss: .* got \(2, 2\) and \(2, 3\)"):
        losses.alignment_loss(z_surv, torch.zeros(2, 3))


def test_objective_weights_components_and_reports_floats():
    lm = torch.tensor(2.0, requires_grad=True)
    surv, disp, align = torch.tensor(4.0), torch.tensor(0.5), torch.tensor(3.0)
    total, parts = losses.objective(lm, surv, disp, align, alpha=0.25, lambda_d=2.0, lambda_a=0.1)
    assert float(total.detach()) == pytest.approx(2.0 + 1.0 + 1.0 + 0.3)
    assert parts == pytest.approx({"lm": 2.0, "surv": 4.0, "disp": 0.5, "align": 3.0, "total": 4.3})
    assert all(type(value) is float for value in parts.values())
    total.backward()
    assert lm.grad == 1.0


def test_objective_stage_one_has_only_lm():
    total, parts = losses.objective(torch.tensor(1.5), None, None, None)
    assert float(total) == 1.5 and parts == {"lm": 1.5, "total": 1.5}


def test_objective_rejects_bad_components():
    with pytest.raises(LossInputError, match="objective: every loss component is None"):
        losses.objective(None, None, None, None)
    with pytest.raises(LossInputError, match="objective: `surv` must be a 0-d tensor or None"):
        losses.objective(torch.tensor(1.0), torch.ones(3), None, None)
