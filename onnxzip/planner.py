"""A budget that plans the sharing: save the most multiply-adds (or parameters) while every task stays
within `max_drop` points of top-1 disagreement with its original model (or within `max_rel_err`),
judged on the held-out calibration samples by the upper confidence bound (fidelity.py).

What is searched, and why:
1. The zipper depth k: the first k shareable layer positions fully shared, the rest per task (channel
   groups tied across layers follow their first writer, as everywhere). A fully shared prefix is the
   only sharing that is computed once, so it is what saves multiply-adds. k is bisected on the
   assumption that sharing more layers costs more fidelity; k = 0 shares nothing, is exact, and always
   meets the budget, so a budget never fails: it only shares less.
2. With objective 'params', then a uniform share fraction on the layers after that prefix (partial
   sharing stores shared blocks once but computes nothing once), bisected over SHARES.

Every candidate is one pass of the zip loop over the originals recorded once (zip_loop.Reuse), as the
trade-off curve does: the search costs a few merges' layer work, not one full merge per candidate.
The plans tried, with their fidelity and cost, go into the report.
"""

from __future__ import annotations

import time

from . import report as reporting
from .emit import emit
from .fidelity import samples_for_agreement
from .options import MergeOptions
from .zip_loop import Prepared, Progress, Reuse, check_cancel, plan_shares, zip_layers

SHARES = (0.25, 0.5, 0.75)


def has_budget(options: MergeOptions) -> bool:
    return options.max_drop is not None or options.max_rel_err is not None


def plan_within_budget(prepared: Prepared, options: MergeOptions, progress: Progress, cancel, reuse: Reuse):
    """Search the plans (module docstring); returns the chosen plan's (state, records, emitted) and the
    report's `plan` section."""
    started = time.perf_counter()
    search = _Search(prepared, options, progress, cancel, reuse)
    positions = [j.position for j in prepared.alignment.shareable_layers()]
    search.evaluate("k=0", {"zipper": 0})
    lo, hi = 0, len(positions)  # k = lo meets the budget; no k above hi does
    k = hi  # full sharing first: when it meets the budget, one merge decides
    while lo < hi:
        if search.evaluate(f"k={k}", {"zipper": positions[k - 1]}):
            lo = k
        else:
            hi = k - 1
        k = (lo + hi + 1) // 2
    if options.objective == "params" and lo < len(positions):
        prefix = {str(p): 1.0 for p in positions[:lo]}
        low, high = 0, len(SHARES) - 1
        while low <= high:
            mid = (low + high) // 2
            share = SHARES[mid]
            if search.evaluate(f"k={lo}+share={share:g}", {"zipper": None, "share": share, "layer_share": prefix}):
                low = mid + 1
            else:
                high = mid - 1
    # within the budget, the most saved (the objective, then the other measure); ties go to less sharing
    primary, secondary = ("macs_ratio", "param_ratio") if options.objective == "macs" else ("param_ratio", "macs_ratio")
    best = max((t for t in search.tried if t.miss is None),
               key=lambda t: (t.totals[primary] or 0, t.totals[secondary] or 0, -t.totals["shared_neurons"]))
    progress("plan", 1.0, f"chose {best.label}")
    section = {
        "budget": {"max_drop": options.max_drop, "max_rel_err": options.max_rel_err,
                   "confidence": options.confidence, "objective": options.objective},
        "chosen": best.label, "setting": best.setting, "tried": [t.summary() for t in search.tried],
        "seconds": round(time.perf_counter() - started, 3), "warnings": _warnings(search, best, options),
    }
    return best.state, best.records, best.emitted, section


class _Candidate:
    def __init__(self, label, setting, state, records, emitted, report, miss):
        self.label, self.setting, self.miss = label, setting, miss
        self.state, self.records, self.emitted = state, records, emitted
        self.totals, self.fidelity = report["totals"], report["fidelity"]

    def summary(self) -> dict:
        keys = ("samples", "top1_agreement", "top1_agreement_lower", "rel_err", "rel_err_upper")
        return {"label": self.label, "setting": self.setting, "meets": self.miss is None, "miss": self.miss,
                **{k: self.totals[k] for k in ("macs_ratio", "param_ratio", "size_ratio", "shared_macs_fraction")},
                "fidelity": {t: {k: f.get(k) for k in keys if k in f} for t, f in self.fidelity.items()}}


class _Search:
    def __init__(self, prepared: Prepared, options: MergeOptions, progress: Progress, cancel, reuse: Reuse):
        self.prepared, self.options, self.progress, self.cancel, self.reuse = prepared, options, progress, cancel, reuse
        self.tried: list[_Candidate] = []

    def evaluate(self, label: str, setting: dict) -> bool:
        """Merge with this setting and measure it; does it meet the budget?"""
        check_cancel(self.cancel)
        self.progress("plan", min(0.95, len(self.tried) / 8), f"trying plan {label}")
        options = self.options.model_copy(update={"share": 1.0, "layer_share": {}, "epsilon": None, "curve": False,
                                                  "max_drop": None, "max_rel_err": None, **setting})
        state, records = zip_layers(self.prepared, options, lambda *a: None, self.cancel,
                                    plan_shares(self.prepared.alignment, options), self.reuse)
        emitted = emit(state)
        report = reporting.build(self.prepared, state, emitted, records, options, seconds=0.0)
        exact = setting.get("zipper") == 0  # nothing shared: the originals' outputs, whatever was measured
        candidate = _Candidate(label, setting, state, records, emitted, report,
                               None if exact else budget_miss(report["fidelity"], self.options))
        self.tried.append(candidate)
        return candidate.miss is None


def budget_miss(fidelity: dict, options: MergeOptions):
    """Why a merge's held-out fidelity misses the budget (one line), or None when it meets it."""
    if not fidelity:
        return "no held-out samples to measure on"
    for task, f in fidelity.items():
        if options.max_drop is not None:
            if "top1_agreement" not in f:
                return f"task {task} has no class-score output: use max_rel_err"
            lower = f["top1_agreement_lower"]
            if lower is None:
                return f"task {task}: not measured on {f['samples']} held-out samples"
            if 100.0 * (1.0 - lower) > options.max_drop:
                return (f"task {task}: disagreement {100.0 * (1.0 - f['top1_agreement']):.2f} points, upper bound "
                        f"{100.0 * (1.0 - lower):.2f} > {options.max_drop:g}")
        if options.max_rel_err is not None:
            upper = f["rel_err_upper"]
            if upper is None:
                return f"task {task}: not measured on {f['samples']} held-out samples"
            if upper > options.max_rel_err:
                return f"task {task}: relative error {f['rel_err']:.4f}, upper bound {upper:.4f} > {options.max_rel_err:g}"
    return None


def _warnings(search: _Search, best: _Candidate, options: MergeOptions) -> list[str]:
    """Say when the budget shares nothing because the held-out samples cannot show it is met."""
    if best.setting.get("zipper") != 0 or len(search.tried) < 2:
        return []
    samples = next(iter(search.tried[-1].fidelity.values()), {}).get("samples", 0)
    line = (f"the budget allowed no sharing: every plan tried misses it (the smallest, {search.tried[-1].label}: "
            f"{search.tried[-1].miss})")
    if options.max_drop is not None:
        needed = samples_for_agreement(1.0 - options.max_drop / 100.0, options.confidence)
        if samples < needed:
            line += (f"; with {samples} held-out samples even perfect agreement cannot show a drop within "
                     f"{options.max_drop:g} points at {options.confidence:.0%} confidence (that needs {needed}): "
                     "give more calibration samples, raise holdout, or lower confidence")
    return [line]
