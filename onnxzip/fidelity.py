"""How close the merged model stays to the originals: every figure with its sample count and a bound.

Top-1 agreement (and accuracy, with labels) carries a one-sided Wilson score lower bound; relative
output error a bootstrap upper bound over samples. Both at `confidence` (MergeOptions). Fewer than
MIN_SAMPLES samples are not a measurement: the figures are then None and `measured` is False, so no
reader (or gate) takes one lucky sample for fidelity.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Optional

import numpy as np
import onnx
from scipy import stats

from .errors import NonFiniteError
from .runtime import make_session

# Below this many samples a fidelity figure is not reported (a 95% bound would span 10 points or more).
MIN_SAMPLES = 30
# Bootstrap resamples for the relative-error bound: its Monte Carlo error is well below its spread.
BOOTSTRAP = 2000


def z_score(confidence: float) -> float:
    """One-sided normal quantile: 1.645 at 95%, 0 at 50% (the bounds are then the point estimates)."""
    return NormalDist().inv_cdf(confidence)


def wilson_lower(successes: int, n: int, confidence: float) -> float:
    """One-sided Wilson score lower bound of a proportion (honest near 1, unlike p - z*se): the lower end
    of scipy's two-sided interval at 2 * confidence - 1."""
    if n == 0:
        return 0.0
    if confidence <= 0.5:
        return successes / n
    interval = stats.binomtest(successes, n).proportion_ci(confidence_level=2 * confidence - 1, method="wilson")
    return float(interval.low)


def samples_for_agreement(target: float, confidence: float) -> int:
    """Samples needed for a perfect agreement's lower bound to reach `target` (Wilson at p = 1)."""
    z2 = z_score(confidence) ** 2
    return int(np.ceil(target * z2 / max(1.0 - target, 1e-12)))


def _ratio(err_sq, ref_sq, axis=-1):
    return np.sqrt(np.sum(err_sq, axis=axis) / np.maximum(np.sum(ref_sq, axis=axis), 1e-30))


def rel_err_upper(err_sq: np.ndarray, ref_sq: np.ndarray, confidence: float, seed: int = 0) -> float:
    """One-sided percentile-bootstrap upper bound of sqrt(sum err^2 / sum ref^2), resampling samples."""
    if len(err_sq) < 2 or confidence <= 0.5:
        return float(_ratio(err_sq, ref_sq))
    result = stats.bootstrap((err_sq, ref_sq), _ratio, paired=True, vectorized=True, n_resamples=BOOTSTRAP,
                             confidence_level=confidence, alternative="less", method="percentile",
                             rng=np.random.default_rng(seed))
    return float(result.confidence_interval.high)


def measure(originals: dict[str, onnx.ModelProto], merged: onnx.ModelProto, data: dict[str, np.ndarray],
            tasks: list[str], providers=None, labels: Optional[dict[str, np.ndarray]] = None,
            confidence: float = 0.95, seed: int = 0) -> dict:
    """Per task: relative output error and top-1 agreement of the merged model with the original
    (accuracy too with labels), each with its bound, on `data`. Raises NonFiniteError when the merged
    model computes NaN or infinity where the original does not."""
    n = _n(data)
    if n == 0:
        return {}
    session = make_session(merged, providers, optimize=True)
    merged_inputs = {i.name for i in session.get_inputs()}
    result = {}
    for t in tasks:
        ref_session = make_session(originals[t], providers, optimize=True)
        names = [o.name for o in ref_session.get_outputs()]
        ref = ref_session.run(names, {i.name: data[i.name] for i in ref_session.get_inputs()})
        got = session.run([f"{t}/{name}" for name in names], {k: v for k, v in data.items() if k in merged_inputs})
        check_finite_outputs(t, names, ref, got)
        result[t] = _compare(names, ref, got, (labels or {}).get(t), confidence, seed)
        result[t].update(samples=n, measured=n >= MIN_SAMPLES, confidence=confidence)
        if n < MIN_SAMPLES:
            _not_measured(result[t])
    return result


def check_finite_outputs(task: str, names, ref, got) -> None:
    for name, r, g in zip(names, ref, got):
        g, r = np.asarray(g), np.asarray(r)
        if g.dtype.kind == "f" and r.shape == g.shape:
            bad = int(np.count_nonzero(~np.isfinite(g) & np.isfinite(r)))
            if bad:
                raise NonFiniteError(
                    f"the merged model computes {bad} NaN or infinite values in output '{task}/{name}' where "
                    "the original model's are finite; nothing was written. Check that the calibration data has "
                    "the scale the models were trained on; if it does, this is a bug in onnxzip: please report it "
                    "with the command and the models' architecture")


def _compare(names, ref, got, y, confidence: float, seed: int) -> dict:
    out: dict = {"outputs": {}}
    main = None
    for name, r, g in zip(names, ref, got):
        r, g = np.asarray(r), np.asarray(g)
        entry: dict = {}
        if r.dtype.kind == "f":
            err_sq = np.square(g - r, dtype=np.float64).reshape(len(r), -1).sum(1)
            ref_sq = np.square(r, dtype=np.float64).reshape(len(r), -1).sum(1)
            entry["rel_err"] = float(np.sqrt(err_sq.sum() / max(ref_sq.sum(), 1e-30)))
            entry["rel_err_upper"] = rel_err_upper(err_sq, ref_sq, confidence, seed)
            entry["max_abs_err"] = float(np.max(np.abs(g - r))) if r.size else 0.0
            if r.ndim == 2 and r.shape[1] > 1:
                same = int(np.count_nonzero(g.argmax(1) == r.argmax(1)))
                entry["top1_agreement"] = same / len(r)
                entry["top1_agreement_lower"] = wilson_lower(same, len(r), confidence)
                if y is not None:
                    right = int(np.count_nonzero(g.argmax(1) == y))
                    entry["accuracy_original"] = float(np.mean(r.argmax(1) == y))
                    entry["accuracy_merged"] = right / len(r)
                    entry["accuracy_merged_lower"] = wilson_lower(right, len(r), confidence)
                main = main or entry
        else:
            entry["agreement"] = float(np.mean(g == r)) if r.shape == g.shape else 0.0
        out["outputs"][name] = entry
    if main:
        out.update({k: v for k, v in main.items() if k != "max_abs_err"})
    elif out["outputs"]:
        out.update(next(iter(out["outputs"].values())))
    return out


# The figures a reader could mistake for a measurement; set to None below MIN_SAMPLES.
FIGURES = ("rel_err", "rel_err_upper", "max_abs_err", "top1_agreement", "top1_agreement_lower", "agreement",
           "accuracy_original", "accuracy_merged", "accuracy_merged_lower")


def _not_measured(entry: dict) -> None:
    for target in [entry, *entry["outputs"].values()]:
        for key in FIGURES:
            if key in target:
                target[key] = None


def _n(data: dict) -> int:
    return len(next(iter(data.values()))) if data else 0
