"""Survival and text metrics, thin over scikit-survival, lifelines and bert-score.

Conventions: ``time`` (N,) float >= 0, ``event`` (N,) in {0, 1} (1 = event observed), ``risk`` (N,)
a ranking score where a higher risk means an earlier event (a DeepSurv log-risk, or -E[T] for
DeepHit). Probabilities at a horizon ``h`` are ``1 - S(h | x)``. Every undefined metric (constant
risk, no event, a horizon beyond the follow-up) raises :class:`MetricError` saying why, instead of
returning a number that looks valid. BERTScore lives in :mod:`vlsurv.metrics_text`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vlsurv.errors import InputError

# scikit-survival (~2 s) and lifelines (~1.5 s) are imported inside the functions that use them, so that the
# modules that import this one for a single metric or MetricError (`vlsurv synth`, `vlsurv evaluate --help`,
# validation) do not pay for both at start-up.


class MetricError(InputError):
    """A metric that is undefined on the given input (the message says why)."""


def _survival_arrays(time, event, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    time = np.asarray(time, dtype=float).reshape(-1)
    event_raw = np.asarray(event).reshape(-1)
    label = f" ({where})" if where else ""
    if time.shape != event_raw.shape:
        raise MetricError(f"time has {time.size} values but event has {event_raw.size}{label}")
    if time.size == 0:
        raise MetricError(f"no patients{label}: time and event are empty")
    if not np.all(np.isfinite(time)) or np.any(time < 0):
        raise MetricError(
            f"time{label} must be finite and >= 0; got {time[~(np.isfinite(time) & (time >= 0))][:3]}"
        )
    if not np.all(np.isin(event_raw, (0, 1, True, False))):
        raise MetricError(f"event{label} must be 0 or 1; got {sorted(set(event_raw.tolist()) - {0, 1})[:3]}")
    return time, event_raw.astype(bool)


def _risk_array(risk, n: int, name: str = "risk") -> np.ndarray:
    risk = np.asarray(risk, dtype=float)
    if risk.shape[0] != n:
        raise MetricError(f"{name} has {risk.shape[0]} rows but there are {n} patients")
    bad = ~np.isfinite(risk)
    if bad.any():
        raise MetricError(
            f"{name} has {int(bad.sum())} NaN/infinite values (first at row {int(np.argmax(bad))})"
        )
    return risk


def _require_events(event: np.ndarray, metric: str) -> None:
    if not event.any():
        raise MetricError(
            f"{metric} is undefined: all {event.size} patients are censored (no event observed)"
        )


def _require_varying(risk: np.ndarray, metric: str) -> None:
    if risk.size and np.ptp(risk) == 0:
        raise MetricError(
            f"{metric} is undefined: the risk is constant (all {risk.size} values equal {risk.flat[0]:.6g}), "
            "so no pair of patients can be ranked"
        )


def _surv(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    from sksurv.util import Surv

    return Surv.from_arrays(event=event, time=time)


def _censor_after(time: np.ndarray, event: np.ndarray, last: float) -> np.ndarray:
    """Events after ``last`` as censored: the same AUC/Brier up to ``last`` (those patients only act
    as controls there, unweighted), and no IPCW lookup where the censoring survival may reach 0."""
    return event & (time <= last)


def concordance_index(time, event, risk) -> float:
    """Harrell's C (sksurv ``concordance_index_censored``).

    Risks within 1e-8 of each other count as ties (1/2), as in sksurv; lifelines'
    ``concordance_index(time, -risk, event)`` gives the same value unless risks differ by less.
    """
    from sksurv.metrics import concordance_index_censored

    time, event = _survival_arrays(time, event)
    risk = _risk_array(risk, time.size).reshape(-1)
    _require_events(event, "Harrell's C-index")
    _require_varying(risk, "Harrell's C-index")
    try:
        with np.errstate(invalid="ignore", divide="ignore"):
            c_index, concordant, discordant, tied_risk, _ = concordance_index_censored(event, time, risk)
    except ValueError as err:
        raise MetricError(f"Harrell's C-index is undefined: {err}") from err
    if concordant + discordant + tied_risk == 0:
        raise MetricError(
            "Harrell's C-index is undefined: no comparable pair (no event is followed by a longer follow-up)"
        )
    return float(c_index)


def uno_c(train_time, train_event, test_time, test_event, risk, tau: float | None = None) -> float:
    """Uno's IPCW C (sksurv ``concordance_index_ipcw``), censoring estimated on the training split.

    ``tau`` truncates the comparison at that time; test times beyond the training follow-up
    need ``tau`` at or below the last training time.
    """
    from sksurv.metrics import concordance_index_ipcw

    train_time, train_event = _survival_arrays(train_time, train_event, "train")
    test_time, test_event = _survival_arrays(test_time, test_event, "test")
    risk = _risk_array(risk, test_time.size).reshape(-1)
    _require_events(test_event, "Uno's C-index")
    _require_varying(risk, "Uno's C-index")
    try:
        return float(
            concordance_index_ipcw(_surv(train_time, train_event), _surv(test_time, test_event), risk, tau)[0]
        )
    except ValueError as err:
        raise MetricError(
            f"Uno's C-index is undefined with tau={tau}: {err} (the censoring distribution comes from "
            f"{train_time.size} training patients followed up to {train_time.max():g})"
        ) from err


def check_horizon(horizon: float, time, event, train_time=None) -> None:
    """Raise unless ``horizon`` lies inside the follow-up and has cases (event <= h) and controls."""
    time, event = _survival_arrays(time, event)
    longest = time.max() if train_time is None else min(time.max(), np.max(train_time))
    if horizon >= longest:
        raise MetricError(
            f"horizon {horizon:g} is beyond the follow-up: the longest follow-up is {longest:g} "
            f"(evaluated patients up to {time.max():g}"
            + ("" if train_time is None else f", training patients up to {np.max(train_time):g}")
            + "); choose a shorter horizon"
        )
    if horizon < time.min():
        raise MetricError(f"horizon {horizon:g} is before the first follow-up time {time.min():g}")
    if not np.any(event & (time <= horizon)):
        raise MetricError(f"horizon {horizon:g} has no event at or before it, so there are no cases")


def time_dependent_auc(
    train_time, train_event, test_time, test_event, risk, horizons: Sequence[float]
) -> tuple[dict[float, float], float]:
    """Cumulative/dynamic AUC at each horizon (sksurv ``cumulative_dynamic_auc``, IPCW on train).

    ``risk`` is (N,) (one score for all horizons) or (N, H) (a risk per horizon, e.g. 1 - S(h)).
    Returns ``({horizon: auc}, mean_auc)``.
    """
    from sksurv.metrics import cumulative_dynamic_auc

    train_time, train_event = _survival_arrays(train_time, train_event, "train")
    test_time, test_event = _survival_arrays(test_time, test_event, "test")
    risk = _risk_array(risk, test_time.size)
    horizons = sorted(float(h) for h in horizons)
    if not horizons:
        raise MetricError("time-dependent AUC needs at least one horizon")
    _require_events(test_event, "time-dependent AUC")
    _require_varying(risk, "time-dependent AUC")
    for horizon in horizons:
        check_horizon(horizon, test_time, test_event, train_time)
    try:
        auc, mean_auc = cumulative_dynamic_auc(
            _surv(train_time, train_event),
            _surv(test_time, _censor_after(test_time, test_event, horizons[-1])),
            risk,
            horizons,
        )
    except ValueError as err:
        raise MetricError(f"time-dependent AUC at horizons {horizons}: {err}") from err
    return dict(zip(horizons, map(float, np.atleast_1d(auc)))), float(mean_auc)


def integrated_brier_score(train_time, train_event, test_time, test_event, survival, times) -> float:
    """Integrated Brier score of survival curves (sksurv ``integrated_brier_score``, IPCW on train).

    ``survival`` (N, K) holds S(t_k | x) at the increasing ``times`` (K,), K >= 2, all inside the
    test follow-up.
    """
    from sksurv.metrics import integrated_brier_score as sksurv_ibs

    train_time, train_event = _survival_arrays(train_time, train_event, "train")
    test_time, test_event = _survival_arrays(test_time, test_event, "test")
    survival = _risk_array(survival, test_time.size, "survival")
    times = np.asarray(times, dtype=float)
    if survival.ndim != 2 or survival.shape[1] != times.size or times.size < 2:
        raise MetricError(
            f"survival must be (N, K) with K = len(times) >= 2; got {survival.shape}, {times.size} times"
        )
    if np.any(np.diff(times) <= 0):
        raise MetricError(f"survival curve times must increase strictly; got {times.tolist()}")
    if survival.min() < 0 or survival.max() > 1:
        raise MetricError("survival probabilities must lie in [0, 1]")
    for horizon in (times[0], times[-1]):
        check_horizon(horizon, test_time, np.ones_like(test_event), train_time)
    test_event = _censor_after(test_time, test_event, times[-1])
    try:
        return float(
            sksurv_ibs(_surv(train_time, train_event), _surv(test_time, test_event), survival, times)
        )
    except ValueError as err:
        raise MetricError(f"integrated Brier score over [{times[0]:g}, {times[-1]:g}]: {err}") from err


def breslow_risk_at(
    train_time, train_event, train_log_risk, log_risk, horizons: Sequence[float]
) -> np.ndarray:
    """Probability of an event by each horizon, 1 - S(h | x), for a Cox-type log-risk.

    A Breslow baseline cumulative hazard H0 is fitted on the training split's (time, event,
    log-risk) with sksurv's ``BreslowEstimator``; then ``1 - exp(-H0(h) * exp(log_risk))``.
    Returns (N, H).
    """
    from sksurv.linear_model.coxph import BreslowEstimator

    train_time, train_event = _survival_arrays(train_time, train_event, "train")
    train_log_risk = _risk_array(train_log_risk, train_time.size, "train risk").reshape(-1)
    log_risk = _risk_array(log_risk, np.asarray(log_risk).shape[0]).reshape(-1)
    _require_events(train_event, "the Breslow baseline hazard")
    horizons = np.asarray(horizons, dtype=float)
    if horizons.max() > train_time.max():
        raise MetricError(
            f"horizon {horizons.max():g} is beyond the training follow-up {train_time.max():g}, "
            "where the Breslow baseline hazard is not estimated"
        )
    step = BreslowEstimator().fit(train_log_risk, train_event, train_time).cum_baseline_hazard_
    padded = np.concatenate([[0.0], step.y])
    cumulative_hazard = padded[np.searchsorted(step.x, horizons, side="right")]
    return 1.0 - np.exp(-np.outer(np.exp(log_risk), cumulative_hazard))


def curve_risk_at(survival, times, horizons: Sequence[float]) -> np.ndarray:
    """1 - S(h | x) read off step survival curves ``survival`` (N, K) at ``times`` (K,); (N, H) out."""
    survival = np.asarray(survival, dtype=float)
    times = np.asarray(times, dtype=float)
    horizons = np.asarray(horizons, dtype=float)
    if horizons.max() > times[-1]:
        raise MetricError(f"horizon {horizons.max():g} is beyond the last survival-curve time {times[-1]:g}")
    columns = np.searchsorted(times, horizons, side="right") - 1
    padded = np.concatenate([np.ones((survival.shape[0], 1)), survival], axis=1)
    return 1.0 - padded[:, columns + 1]


@dataclass(frozen=True)
class BootstrapCI:
    """Percentile interval of a metric over resamples of ``n_groups`` units (patients, or rows)."""

    estimate: float
    low: float
    high: float
    n_resamples: int
    n_skipped: int
    n_groups: int

    def as_list(self) -> list[float]:
        return [self.low, self.high]


def _group_codes(groups, size: int, what: str = "groups") -> np.ndarray:
    """(N,) integer codes 0..G-1 numbered in order of first appearance."""
    groups = np.asarray(groups).reshape(-1)
    if groups.size != size:
        raise MetricError(f"{what} has {groups.size} rows but there are {size} rows to group")
    return pd.factorize(groups)[0]


def first_row_per_group(groups, order) -> np.ndarray:
    """Row indices (ascending) of one row per group: the row with the smallest ``order`` (ties: the first).

    ``groups`` (N,) e.g. patient ids; ``order`` (N,) e.g. a scan date, or ``-time`` when the follow-up
    time counts from the scan (the earliest scan then has the longest follow-up).
    """
    order = np.asarray(order).reshape(-1)
    groups = np.asarray(groups).reshape(-1)
    if groups.size != order.size:
        raise MetricError(f"groups has {groups.size} rows but order has {order.size}")
    codes = _group_codes(groups, order.size)
    by_order = np.lexsort((np.arange(order.size), order, codes))  # group, then order, then row
    is_first = np.concatenate([[True], codes[by_order][1:] != codes[by_order][:-1]])
    return np.sort(by_order[is_first])


def bootstrap_ci(
    fn: Callable[..., float], *arrays, n: int = 1000, seed: int = 0, level: float = 0.95, groups=None
) -> BootstrapCI:
    """Percentile bootstrap CI of ``fn(*arrays)``, resampling rows, or whole groups, with replacement.

    Without ``groups`` every row is a unit. With ``groups`` (N,) (patient ids) this is a cluster
    bootstrap: each resample draws G of the G groups with replacement and keeps every row of each
    drawn group, so one patient's scans stay together and count as one patient. With one row per
    group it is the row bootstrap (same seed, same resamples). Resamples on which the metric is
    undefined (``MetricError``: no event, constant risk) are skipped and counted in ``n_skipped``;
    if fewer than half of them are usable, this raises.
    """
    if n < 1:
        raise MetricError(f"bootstrap needs n >= 1 resamples; got {n}")
    arrays = [np.asarray(a) for a in arrays]
    size = arrays[0].shape[0]
    if any(a.shape[0] != size for a in arrays):
        raise MetricError(f"bootstrap arrays differ in length: {[a.shape[0] for a in arrays]}")
    codes = np.arange(size) if groups is None else _group_codes(groups, size)
    rows_by_group = np.argsort(codes, kind="stable")
    counts = np.bincount(codes)
    starts = np.cumsum(counts) - counts
    estimate = fn(*arrays)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        picked = rng.integers(0, counts.size, counts.size)
        picked_counts = counts[picked]
        group_starts = np.repeat(np.cumsum(picked_counts) - picked_counts, picked_counts)
        within_group = np.arange(picked_counts.sum()) - group_starts
        index = rows_by_group[np.repeat(starts[picked], picked_counts) + within_group]
        try:
            values.append(fn(*(a[index] for a in arrays)))
        except MetricError:
            continue
    if len(values) < n / 2:
        raise MetricError(f"bootstrap: the metric is undefined on {n - len(values)} of {n} resamples")
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    skipped = n - len(values)
    return BootstrapCI(float(estimate), float(low), float(high), len(values), skipped, int(counts.size))


def calibration_table(
    time, event, predicted_risk, horizon: float, n_bins: int = 10, min_per_bin: int = 10
) -> pd.DataFrame:
    """Predicted vs Kaplan-Meier observed risk of an event by ``horizon``, in risk-ordered bins.

    ``predicted_risk`` (N,) is a probability 1 - S(h | x). Patients are sorted by it and split into
    ``min(n_bins, N // min_per_bin)`` (at least 1) groups of near-equal size; in each group the
    observed risk is 1 - KM(h) (lifelines ``KaplanMeierFitter``) with its 95% interval.
    Columns: bin, n, n_events, predicted, observed, observed_low, observed_high.
    """
    from lifelines import KaplanMeierFitter

    time, event = _survival_arrays(time, event)
    predicted = _risk_array(predicted_risk, time.size, "predicted risk").reshape(-1)
    if predicted.min() < 0 or predicted.max() > 1:
        raise MetricError("predicted risk for calibration must be a probability in [0, 1]")
    _require_events(event, "calibration")
    check_horizon(horizon, time, event)
    bins = max(1, min(n_bins, time.size // min_per_bin))
    rows = []
    for number, index in enumerate(np.array_split(np.argsort(predicted, kind="stable"), bins), start=1):
        km = KaplanMeierFitter().fit(time[index], event[index])
        interval = km.confidence_interval_survival_function_.loc[:horizon].iloc[-1]
        rows.append(
            {
                "bin": number,
                "n": int(index.size),
                "n_events": int(event[index].sum()),
                "predicted": float(predicted[index].mean()),
                "observed": float(1.0 - km.predict(horizon)),
                "observed_low": float(1.0 - interval.iloc[1]),
                "observed_high": float(1.0 - interval.iloc[0]),
            }
        )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class LogrankSplit:
    """High- vs low-risk groups split at the median risk; ``high_risk`` (N,) bool."""

    p_value: float
    statistic: float
    threshold: float
    high_risk: np.ndarray


def logrank_split(time, event, risk, groups=None) -> LogrankSplit:
    """Split at the median risk (high = risk > median) and compare with lifelines' log-rank test.

    The test assumes independent patients: pass ``groups`` (N,) (patient ids) to have a repeated
    patient refused instead of counted twice (keep one row per patient with ``first_row_per_group``).
    """
    from lifelines.statistics import logrank_test

    time, event = _survival_arrays(time, event)
    risk = _risk_array(risk, time.size).reshape(-1)
    if groups is not None:
        codes = _group_codes(groups, time.size)
        counts = np.bincount(codes)
        if counts.max() > 1:
            repeated = int(np.argmax(counts > 1))
            name = np.asarray(groups).reshape(-1)[int(np.argmax(codes == repeated))]
            raise MetricError(
                f"the log-rank test needs independent patients: group {str(name)!r} has {counts[repeated]} "
                f"rows ({int((counts > 1).sum())} of {counts.size} groups have several); "
                "keep one row per patient"
            )
    _require_events(event, "the log-rank test")
    _require_varying(risk, "the median risk split")
    threshold = float(np.median(risk))
    high = risk > threshold
    if high.all() or not high.any():
        raise MetricError(f"the median split at {threshold:g} leaves one group empty (too many tied risks)")
    result = logrank_test(time[high], time[~high], event[high], event[~high])
    return LogrankSplit(float(result.p_value), float(result.test_statistic), threshold, high)
