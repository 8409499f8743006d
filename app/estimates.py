"""What more labels would buy: a log-linear fit of test top-1 against the labeled count."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable

from app.schemas import LabelEstimate

LN2 = math.log(2)
# A fit whose gain per doubling is below this (it shows as +0.0 points or less) predicts no
# accuracy: a line that does not rise says more labels buy nothing, which one unlucky seed
# can make it say.
RISES_BY = 0.0005


def estimate_label_gains(points: Iterable[tuple[str, int, float]],
                         images: int | None = None) -> list[LabelEstimate]:
    """Per method, what doubling the labels of its largest measured budget would buy.

    `points` are (method, labeled count n, test top-1 in 0..1), one per succeeded run, so
    every seed counts. For each method with results at two or more distinct counts, fit
    top-1 = a + b·ln(n) by least squares; a method measured at one count gets no estimate.

    Doubling the labels adds b·ln 2 whatever n is, which is how such curves tend to look
    over the range that was measured. The standard error of that gain comes from the
    regression's residuals, so it needs more points than parameters (n_points > 2), and it
    only reflects the scatter of the runs, not whether the log-linear shape is right.

    This is an extrapolation: it grows less reliable the further 2·n_max lies beyond the
    measured budgets, and near 100 % where accuracy must flatten while the log keeps
    rising (the prediction is clipped to 0..1, the gain per doubling is not). A line that
    does not rise (gain below RISES_BY) predicts no accuracy at all.

    The prediction is the measured top-1 at n_max plus that gain, so the figures shown side
    by side agree: the fit's own value at 2·n_max could lie below what was measured at
    n_max while the gain is positive. `images`, the dataset's training images, says how many
    more this dataset holds beyond n_max (doubling may need more than it has).
    """
    by_method: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for method, labeled_count, top1 in points:
        if labeled_count >= 1:
            by_method[method].append((labeled_count, top1))
    estimates = []
    for method, measured in by_method.items():
        counts = {n for n, _ in measured}
        if len(counts) < 2:
            continue
        xs = [math.log(n) for n, _ in measured]
        ys = [top1 for _, top1 in measured]
        x_mean, y_mean = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - x_mean) ** 2 for x in xs)
        slope = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True)) / sxx
        intercept = y_mean - slope * x_mean
        slope_se = None
        if len(measured) > 2:
            residuals = [y - (intercept + slope * x) for x, y in zip(xs, ys, strict=True)]
            variance = sum(r * r for r in residuals) / (len(measured) - 2)
            slope_se = math.sqrt(variance / sxx)
        n_max = max(counts)
        measured_top1 = statistics.fmean(top1 for n, top1 in measured if n == n_max)
        predicted = measured_top1 + slope * LN2
        estimates.append(LabelEstimate(
            method=method,
            n_max=n_max,
            measured_top1=measured_top1,
            gain_per_doubling=slope * LN2,
            gain_per_doubling_se=None if slope_se is None else slope_se * LN2,
            predicted_top1_at_double=(min(1.0, max(0.0, predicted))
                                      if slope * LN2 >= RISES_BY else None),
            extra_labels=n_max,
            images_left=None if images is None else max(0, images - n_max),
            n_points=len(measured),
            intercept=intercept,
            slope=slope,
        ))
    return estimates
