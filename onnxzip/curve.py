"""The trade-off curve (the MobileNet zippering paper's Table 1): fidelity, parameters and
multiply-adds for sharing the first k layers and for share fractions, computed in one run."""

from __future__ import annotations

from typing import Optional

from . import report as reporting
from .emit import emit
from .options import MergeOptions
from .zip_loop import Prepared, Progress, Reuse, check_cancel, plan_shares, zip_layers


CURVE_SHARES = (0.25, 0.5, 0.75, 1.0)
CURVE_FIGURES = ("samples", "rel_err", "rel_err_upper", "top1_agreement", "top1_agreement_lower")


def trade_off_curve(prepared: Prepared, options: MergeOptions, progress: Progress, cancel,
                    reuse: Optional["Reuse"] = None) -> list[dict]:
    """Fidelity, parameters and multiply-adds for zippering k = 0..L (the first k shareable layers
    fully shared, the MobileNet paper's Table 1) and for uniform share fractions, in one run: the
    canonical models, the alignment and the record of the originals (zip_loop.Reuse) are reused."""
    al = prepared.alignment
    reuse = reuse or Reuse()
    positions = [j.position for j in al.shareable_layers()]
    settings = [(f"k={k}", {"zipper": positions[k - 1] if k else 0}) for k in range(len(positions) + 1)]
    settings += [(f"share={s:g}", {"share": s, "zipper": None}) for s in CURVE_SHARES]
    points = []
    for i, (label, change) in enumerate(settings):
        check_cancel(cancel)
        progress("curve", i / len(settings), f"trade-off point {label}")
        point_options = options.model_copy(update={**change, "layer_share": {}, "epsilon": None, "curve": False})
        state, records = zip_layers(prepared, point_options, lambda *a: None, cancel,
                                    plan_shares(al, point_options), reuse)
        emitted = emit(state)
        summary = reporting.build(prepared, state, emitted, records, point_options, seconds=0.0)
        points.append({"label": label, "setting": change,
                       "shared": [r["shared"] for r in summary["layers"]],
                       **{k: summary["totals"][k] for k in ("param_ratio", "macs_ratio", "size_ratio")},
                       "fidelity": {t: {k: v for k, v in f.items() if k in CURVE_FIGURES}
                                    for t, f in summary["fidelity"].items()}})
    progress("curve", 1.0, "trade-off curve done")
    return points
