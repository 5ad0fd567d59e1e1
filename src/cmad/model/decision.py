"""The pass/fail decision: image and pixel thresholds for a target false-positive rate.

Both thresholds are chosen on normal parts only (validation normals at fit time, or the
user's own normal parts with `cmad calibrate`); test data never reaches this module.

- Image threshold: with the 10-25 validation normals a category usually has, an empirical
  1% quantile does not exist, so the normal image scores' distribution is estimated
  robustly: the logarithm of the scores is taken as normal; scores the others make
  implausible are set aside, the mean and standard deviation of the n kept are its
  location and spread (`fit_scores`). The threshold for a target
  false-positive rate F is the upper F-quantile of the prediction for one new normal part:
  exp(loc + t(1 - F; n - 1) * scale * sqrt(1 + 1/n)), Student's t with n - 1 degrees of
  freedom, which allows for the location and spread being estimated from few parts. (The
  plain normal quantile, exp(loc + z(1 - F) * scale), took its spread as known: over 25
  synthetic categories with 10 validation normals a 1% target flagged 5.2% of the good
  test parts, against 1.6% this way; RESULTS.md, round 10.) The location, spread and n
  are stored, so another target rate needs no data (`Decision.with_fpr`); a model saved
  without n (`n_fit` 0) keeps the normal quantile.
- Pixel threshold: normal parts give hundreds of thousands of pixels, so their quantiles
  are empirical (`pixel_quantiles`, stored as a small table of (rate, value) pairs,
  interpolated in log rate). The pixel threshold is never above the image threshold, and
  a part judged anomalous always has at least its peak in the predicted mask (its map may
  fuse fewer branches than its score, `DetectorConfig.map_exclude`, so `mask` sees to it).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from scipy.stats import norm
from scipy.stats import t as student_t

from cmad.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_FPR = 0.01
DEFAULT_PIXEL_FPR = 0.005
MIN_NORMALS = 1
# stored pixel quantiles: rates from 50% down to 1e-6 (log-spaced, 1-2-5 steps)
PIXEL_RATES: tuple[float, ...] = tuple(
    m * 10.0 ** -e for e in range(1, 7) for m in (5.0, 2.0, 1.0)) + (5e-1,)
_SCALE_FLOOR = 0.02  # of the log score: about 2% relative spread at least
REJECT_P = 0.001    # a "normal" score this unlikely (upper tail) under the others' law goes


def defect_mask(amap: np.ndarray, anomalous: bool, pixel_threshold: float) -> np.ndarray:
    """Pixels above `pixel_threshold` on a part judged anomalous, at least its peak (the
    map can be another fusion than the score, `DetectorConfig.map_exclude`); empty on a
    part judged normal."""
    amap = np.asarray(amap)
    if not anomalous:
        return np.zeros(amap.shape, dtype=bool)
    m = amap > pixel_threshold
    if not m.any() and amap.size:
        m = amap >= np.nanmax(amap)
    return m


PIXELS = "normal pixels"  # what a pixel false-positive rate is a share of


def check_rate(fpr: float, what: str = "--fpr", of: str = "normal parts") -> float:
    """A false-positive rate (of `of`) in (0, 0.5]; ConfigError otherwise."""
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not math.isfinite(fpr) \
            or not 0.0 < float(fpr) <= 0.5:
        raise ConfigError(f"{what} must be a rate in (0, 0.5] (0.01 = 1% of {of}), got {fpr!r}")
    return float(fpr)


def fit_scores_n(scores: Sequence[float] | np.ndarray) -> tuple[float, float, float, int]:
    """(shift, loc, scale, n) of normal image scores: log(score - shift) ~ N(loc, scale),
    fitted on the n scores kept.

    Robust in two steps: log scores that the others make implausible are set aside (a
    defective part among the "normal" ones, `_set_aside_outliers`), then loc and scale are
    the mean and standard deviation of the rest, the scale floored at 2% (identical scores
    say nothing about the spread). The shift is 0 for positive scores (fused scores of
    normal parts sit near 1); if some score is not positive, it moves the smallest one to a tenth of the
    spread above 0, so the model still applies.
    """
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size < MIN_NORMALS:
        raise ConfigError(f"{s.size} normal samples with finite scores; the threshold needs at "
                          f"least {MIN_NORMALS} normal part")
    if s.size < 5:
        log.warning("only %d normal parts to set the threshold on: its false-positive rate is "
                    "a rough guess (run `cmad calibrate` on more normal parts)", s.size)
    shift = 0.0
    if s.min() <= 0:
        spread = float(np.ptp(s)) or 1.0
        shift = float(s.min()) - 0.1 * spread
    ls = np.log(s - shift)
    keep, gone = _set_aside_outliers(ls)
    if gone.size:
        log.warning("%d of %d normal scores set aside as outliers when picking the threshold "
                    "(%s; the rest %.4g to %.4g)", gone.size, ls.size,
                    ", ".join(f"{v:.4g}" for v in np.exp(gone) + shift),
                    float(np.exp(keep.min()) + shift), float(np.exp(keep.max()) + shift))
    loc = float(keep.mean())
    scale = float(keep.std(ddof=1)) if keep.size > 1 else 0.0
    return shift, loc, max(scale, _SCALE_FLOOR), int(keep.size)


def _set_aside_outliers(ls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(`ls` without its outliers, the outliers), by a generalized extreme Studentized
    deviate test (Rosner's) on the upper tail: one at a time, up to a quarter of the
    values, the highest is taken out and tested against the others' predictive Student-t
    law (the probability of a value at least that far above their mean); the i highest
    values go, i the last step whose probability is below REJECT_P. Testing all
    the steps before deciding keeps two defective parts from hiding each other: with both
    among the others, the spread is wide and the first looks plausible. Only high scores
    are tested, since a defective part scores high; a low one stays and widens the spread,
    which raises the threshold (fewer false alarms, not more).

    (A fixed cut at 3.5 scaled median absolute deviations, the rule of round 9, set aside a
    perfectly normal value in 12% of draws of 10 Gaussian values, since the MAD of 10
    values is itself uncertain, and the spread left then put 1.9% of new normal parts
    above a 1%-target threshold; this rule sets a value aside in 1.4% of such draws and
    1.22% of new normal parts exceed its threshold, `tests/test_decision.py`.)"""
    srt = np.sort(np.asarray(ls, dtype=np.float64))
    n = srt.size
    last = 0
    # step j tests srt[n - j] against srt[: n - j]; a quarter at most, so at least 3 of
    # the values (n >= 4) are always left to test against
    for j in range(1, n // 4 + 1):
        others = srt[: n - j]
        k = others.size
        sd = max(float(others.std(ddof=1)), _SCALE_FLOOR)
        z = (float(srt[n - j]) - float(others.mean())) / (sd * math.sqrt(1.0 + 1.0 / k))
        if float(student_t.sf(z, k - 1)) < REJECT_P:
            last = j
    return srt[: n - last], srt[n - last :]


def fit_scores(scores: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """(shift, loc, scale) of normal image scores: log(score - shift) ~ N(loc, scale);
    see `fit_scores_n`."""
    return fit_scores_n(scores)[:3]


def score_quantile(shift: float, loc: float, scale: float, fpr: float, n: int = 0) -> float:
    """The score a new normal part exceeds with probability `fpr`, with loc and scale
    estimated from `n` normal parts: the predictive Student-t quantile for n >= 2, the
    normal quantile (loc and scale taken as known) for n < 2."""
    if n >= 2:
        z = float(student_t.isf(fpr, n - 1)) * math.sqrt(1.0 + 1.0 / n)
    else:
        z = float(norm.isf(fpr))
    return float(shift + math.exp(loc + z * scale))


def pixel_quantiles(maps: np.ndarray, areas: np.ndarray,
                    rates: Sequence[float] = PIXEL_RATES) -> list[tuple[float, float]]:
    """(rate, value) pairs: the fraction `rate` of the normal pixels inside the image lies
    above `value`. `maps`, `areas`: (B, S, S) normal maps and image-area masks."""
    v = np.concatenate([np.asarray(m, dtype=np.float64)[np.asarray(a, bool)]
                        for m, a in zip(maps, areas)])
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ConfigError("no finite normal pixels to pick the pixel threshold on")
    rates = sorted({float(r) for r in rates}, reverse=True)
    vals = np.quantile(v, [1.0 - r for r in rates], method="linear")
    return [(r, float(x)) for r, x in zip(rates, np.maximum.accumulate(vals))]


def pixel_value(table: Sequence[Sequence[float]], fpr: float) -> float:
    """The pixel score for rate `fpr` from a `pixel_quantiles` table (log-rate
    interpolation; clamped to the table's ends)."""
    rates = np.array([r for r, _ in table], dtype=np.float64)
    vals = np.array([v for _, v in table], dtype=np.float64)
    order = np.argsort(rates)
    return float(np.interp(math.log(fpr), np.log(rates[order]), vals[order]))


@dataclass(frozen=True)
class Decision:
    """The stored pass/fail rule of a model (see the module docstring).

    `rule` says how `threshold` was set: "lognormal" (from `target_fpr` and the fitted
    loc / scale, estimated from `n_fit` scores), "fixed" (given by the user), or
    "max-validation" (a format-3 model: the highest validation normal score, no
    distribution stored).
    """

    threshold: float
    pixel_threshold: float
    rule: str = "lognormal"
    target_fpr: float | None = DEFAULT_FPR
    pixel_target_fpr: float | None = DEFAULT_PIXEL_FPR
    shift: float = 0.0
    loc: float | None = None
    scale: float | None = None
    n_normals: int = 0
    n_fit: int = 0
    normal_max: float | None = None
    pixel_table: tuple[tuple[float, float], ...] = ()
    source: str = "validation"

    # ------------------------------------------------------------ building
    @classmethod
    def from_normals(cls, scores: np.ndarray, maps: np.ndarray, areas: np.ndarray,
                     fpr: float = DEFAULT_FPR, pixel_fpr: float = DEFAULT_PIXEL_FPR,
                     source: str = "validation") -> Decision:
        """Both thresholds from normal parts: image scores (B,), maps and areas (B, S, S)."""
        fpr, pixel_fpr = check_rate(fpr), check_rate(pixel_fpr, "pixel fpr", PIXELS)
        shift, loc, scale, n = fit_scores_n(scores)
        table = tuple(pixel_quantiles(maps, areas))
        s = np.asarray(scores, dtype=np.float64)
        d = cls(threshold=score_quantile(shift, loc, scale, fpr, n), pixel_threshold=0.0,
                rule="lognormal", target_fpr=fpr, pixel_target_fpr=pixel_fpr, shift=shift,
                loc=loc, scale=scale, n_normals=int(np.isfinite(s).sum()), n_fit=n,
                normal_max=float(np.nanmax(s)), pixel_table=table, source=source)
        d = d.with_pixel_fpr(pixel_fpr)
        log.info("threshold %.4f for a %.2g false-positive rate (%d normals, highest %.4f); "
                 "pixel threshold %.4f", d.threshold, fpr, d.n_normals, d.normal_max,
                 d.pixel_threshold)
        return d

    @classmethod
    def legacy(cls, threshold: float) -> Decision:
        """A format-3 model's decision: its max-validation threshold, for pixels too."""
        return cls(threshold=float(threshold), pixel_threshold=float(threshold),
                   rule="max-validation", target_fpr=None, pixel_target_fpr=None,
                   source="format 3 model")

    # ------------------------------------------------------------ overrides
    @property
    def has_distribution(self) -> bool:
        return self.loc is not None and self.scale is not None

    def with_fpr(self, fpr: float) -> Decision:
        """The same model of normal scores, the threshold for another target rate."""
        fpr = check_rate(fpr)
        if not self.has_distribution:
            raise ConfigError("--fpr: this model stores no distribution of normal scores "
                              "(saved by an older cmad); run `cmad calibrate` on normal parts "
                              "first, or pass --threshold")
        t = score_quantile(self.shift, float(self.loc), float(self.scale), fpr,  # type: ignore[arg-type]
                           self.n_fit)
        return self._clip_pixel(replace(self, threshold=t, rule="lognormal", target_fpr=fpr))

    def with_threshold(self, threshold: float) -> Decision:
        """A threshold given by the user (no target rate)."""
        if isinstance(threshold, bool) or not math.isfinite(float(threshold)):
            raise ConfigError(f"--threshold must be a finite number, got {threshold!r}")
        return self._clip_pixel(replace(self, threshold=float(threshold), rule="fixed",
                                        target_fpr=None))

    def with_pixel_fpr(self, fpr: float) -> Decision:
        fpr = check_rate(fpr, "--pixel-fpr", PIXELS)
        if not self.pixel_table:
            raise ConfigError("--pixel-fpr: this model stores no normal pixel quantiles (saved by "
                              "an older cmad); run `cmad calibrate` on normal parts first")
        return self._clip_pixel(replace(self, pixel_threshold=pixel_value(self.pixel_table, fpr),
                                        pixel_target_fpr=fpr))

    def _clip_pixel(self, d: Decision) -> Decision:
        """Re-derive the pixel threshold from its target, never above the image threshold."""
        px = d.pixel_threshold
        if d.pixel_table and d.pixel_target_fpr is not None:
            px = pixel_value(d.pixel_table, d.pixel_target_fpr)
        return replace(d, pixel_threshold=float(min(px, d.threshold)))

    # ------------------------------------------------------------ verdicts
    def anomalous(self, score: float) -> bool:
        return bool(score > self.threshold)

    def mask(self, amap: np.ndarray, score: float) -> np.ndarray:
        """The predicted defect mask of one map: pixels above the pixel threshold, on parts
        judged anomalous (a part judged normal has an empty mask)."""
        return defect_mask(amap, self.anomalous(score), self.pixel_threshold)

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pixel_table"] = [list(p) for p in self.pixel_table]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Decision:
        """Inverse of `to_dict`; KeyError / TypeError / ValueError on a bad field."""
        def opt(k: str) -> float | None:
            v = d.get(k)
            return None if v is None else float(v)

        table = tuple((float(r), float(v)) for r, v in d.get("pixel_table") or ())
        return cls(threshold=float(d["threshold"]), pixel_threshold=float(d["pixel_threshold"]),
                   rule=str(d["rule"]), target_fpr=opt("target_fpr"),
                   pixel_target_fpr=opt("pixel_target_fpr"), shift=float(d.get("shift", 0.0)),
                   loc=opt("loc"), scale=opt("scale"), n_normals=int(d.get("n_normals", 0)),
                   n_fit=int(d.get("n_fit", 0)),
                   normal_max=opt("normal_max"), pixel_table=table,
                   source=str(d.get("source", "")))


# how maps are coloured relative to the threshold T (overlays and report panels): no colour
# below SHOW_FROM * T, the colour scale runs from SHOW_FROM * T to SCALE_TO * T (T itself in
# the middle), and the opacity ramps up from 0 at SHOW_FROM * T to MAX_ALPHA at T
SHOW_FROM = 0.5
SCALE_TO = 1.5
MAX_ALPHA = 0.75


def colour_range(threshold: float, amap: np.ndarray | None = None) -> tuple[float, float]:
    """(lo, hi) of the colour scale: SHOW_FROM * T to SCALE_TO * T for a positive finite
    threshold; otherwise the map's median to its maximum."""
    if math.isfinite(threshold) and threshold > 0:
        return SHOW_FROM * threshold, SCALE_TO * threshold
    if amap is None or not np.isfinite(amap).any():
        return 0.0, 1.0
    lo, hi = float(np.nanmedian(amap)), float(np.nanmax(amap))
    return lo, max(hi, lo + 1e-6)


def heat(amap: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(position on the colour scale in [0, 1], opacity in [0, MAX_ALPHA]) of every pixel.

    Opacity is 0 below the colour scale's low end, so a good part keeps its own colours
    wherever its map stays below half the threshold."""
    lo, hi = colour_range(threshold, amap)
    a = np.nan_to_num(np.asarray(amap, dtype=np.float64), nan=lo)
    c = np.clip((a - lo) / (hi - lo), 0.0, 1.0)
    mid = (threshold - lo) / (hi - lo) if math.isfinite(threshold) and threshold > 0 else 0.5
    alpha = MAX_ALPHA * np.clip(c / mid, 0.0, 1.0)
    return c, alpha
