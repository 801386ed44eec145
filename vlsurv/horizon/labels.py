"""Fixed-horizon mortality labels from (time, event), with early-censored scans excluded.

For a horizon ``h`` (in the manifest's time unit) and a scan with follow-up ``time`` and ``event``:

- positive (1): death within the horizon, ``event == 1 and time <= h``;
- negative (0): known alive at the horizon, ``time > h``, or censored exactly at ``h``;
- excluded: censored before the horizon, ``event == 0 and time < h``: whether the patient died by ``h`` is
  unknown, so the scan is left out of that horizon (not counted as a negative, which would bias the AUROC).

``horizon_labels`` returns ``HorizonLabels``: ``label`` (N, H) float {0, 1} (0 where excluded), ``known``
(N, H) bool, and the counts per horizon that the outputs record.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlsurv.errors import InputError


class HorizonError(InputError):
    """A horizon, label set or option of `vlsurv horizon` that cannot give a defined result."""


def horizon_name(horizon: float) -> str:
    """How a horizon is written in column names and outputs: ``365``, ``1095.5``."""
    return f"{horizon:g}"


@dataclass(frozen=True)
class HorizonLabels:
    """``label`` (N, H) float32 in {0, 1}, ``known`` (N, H) bool (False = censored before the horizon)."""

    horizons: tuple[float, ...]
    label: np.ndarray
    known: np.ndarray

    def subset(self, rows) -> HorizonLabels:
        """The labels of ``rows`` (a boolean mask or indices over the N scans)."""
        return HorizonLabels(self.horizons, self.label[rows], self.known[rows])

    def counts(self) -> dict[str, dict[str, int]]:
        """{horizon name: {"positives", "negatives", "excluded"}} (numbers of scans)."""
        result = {}
        for j, horizon in enumerate(self.horizons):
            known = self.known[:, j]
            positives = int((self.label[:, j][known] == 1).sum())
            result[horizon_name(horizon)] = {
                "positives": positives,
                "negatives": int(known.sum()) - positives,
                "excluded": int((~known).sum()),
            }
        return result

    def require_both_classes(self, where: str) -> None:
        """Raise ``HorizonError`` naming ``where`` and the horizon that lacks positives or negatives."""
        for name, count in self.counts().items():
            for kind, other in (("positives", "deaths within"), ("negatives", "patients followed past")):
                if count[kind] == 0:
                    raise HorizonError(
                        f"{where}: horizon {name} has no {kind} (no {other} {name}; "
                        f"{count['positives']} positives, {count['negatives']} negatives, "
                        f"{count['excluded']} excluded as censored earlier); "
                        "expected both classes: drop it from --horizons"
                    )


def check_horizons(horizons) -> tuple[float, ...]:
    """The horizons as floats, checked: at least one, each finite and > 0, no repeats."""
    values = tuple(float(h) for h in horizons)
    if not values:
        raise HorizonError("horizons: expected at least one horizon (e.g. 365 1095 1825)")
    bad = [h for h in values if not np.isfinite(h) or h <= 0]
    if bad:
        raise HorizonError(f"horizons: expected finite numbers > 0, got {bad}")
    if len(set(values)) != len(values):
        raise HorizonError(f"horizons: expected distinct values, got {list(values)}")
    return values


def horizon_labels(time, event, horizons) -> HorizonLabels:
    """Labels of N scans at H horizons; ``time`` (N,) >= 0, ``event`` (N,) in {0, 1} (see the module doc)."""
    horizons = check_horizons(horizons)
    time = np.asarray(time, dtype=float).reshape(-1, 1)
    died = np.asarray(event).astype(bool).reshape(-1, 1)
    h = np.asarray(horizons, dtype=float).reshape(1, -1)
    positive = died & (time <= h)
    known = positive | (time >= h)
    return HorizonLabels(horizons, positive.astype(np.float32), known)
