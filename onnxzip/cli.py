"""The `onnxzip` command: merge, inspect (and the service's serve/worker, when installed).

Bad input exits with code 2 and one line on stderr that says what is wrong and what to do.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from typing import Optional

from . import __version__
from .errors import FidelityNotMetError, InvalidOptionsError, OnnxZipError

EXIT_BAD_INPUT = 2
EXIT_NOT_MET = 3  # a gate (--require-*) failed: no model written, the report still is
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a reader that left early
EXIT_INTERNAL = 70  # sysexits' EX_SOFTWARE: onnxzip itself failed; the input may be fine


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage too)
        print(f"onnxzip: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _share_pairs(text: str) -> dict:
    """'1=0.5,3=10' -> {'1': 0.5, '3': 10} (float: fraction, int: neuron count)."""
    out = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"'{item}' is not LAYER=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = float(value) if "." in value else int(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxzip", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"onnxzip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    m = sub.add_parser("merge", help="merge two models into one multi-output ONNX model")
    m.add_argument("models", nargs="+", help="input .onnx files, in task order")
    m.add_argument("--calibration", required=True, metavar="CALIB.npz",
                   help="unlabelled inputs, one array per graph input keyed by input name")
    m.add_argument("-o", "--out", required=True, metavar="MERGED.onnx", help="where to write the merged model")
    m.add_argument("--share", type=float, default=1.0,
                   help="fraction of each hidden layer's neurons to share (1.0 all, 0 none; default 1.0). Partial "
                        "sharing stores shared blocks once but computes nothing once: only a fully shared prefix "
                        "(--zipper, or 1.0) saves multiply-adds")
    m.add_argument("--tasks", help="comma-separated task names, one per model (default a,b,...)")
    m.add_argument("--report", metavar="REPORT.json", help="write the JSON report here")
    m.add_argument("--html", metavar="REPORT.html", help="write the human report (tables and plots) here")
    m.add_argument("--layer-share", type=_share_pairs, default={}, metavar="L=V,...",
                   help="per-layer override: position or node name = fraction (0.5) or count (10)")
    m.add_argument("--epsilon", type=float, help="share only pairs with predicted error below this (MTZ)")
    m.add_argument("--zipper", type=int, metavar="K", help="share the first K layers fully, no others")
    m.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="use the MTZ paper's formula exactly, without onnxzip's closed-form recovery")
    m.add_argument("--alpha", type=float, default=0.5, help="weight of task A vs B (default 0.5)")
    m.add_argument("--damping", type=float, help="Hessian damping lambda (default 1e-2)")
    m.add_argument("--pairing", choices=["hessian", "random"], default="hessian")
    m.add_argument("--batch-size", type=int, default=64)
    m.add_argument("--activation-margin", type=float,
                   help="targets deep in a following ReLU/Clip's flat range only need to land there "
                        "(spreads past the edge; default 1.0)")
    m.add_argument("--hessian", choices=["full", "channel"],
                   help="conv Hessians over whole patches (default) or per channel (C x C, cheaper, approximate)")
    m.add_argument("--hessian-rows", type=_rows_cap, metavar="N|auto|all",
                   help="at most N calibration rows per layer feed its Hessian, a random subset of "
                        "positions but at least 16 per input (default 32768); 'auto' 64 per input within "
                        "[16384, 32768]; 'all' uses every row")
    m.add_argument("--spill-mb", type=float,
                   help="activations (and the originals' record) larger than this many MiB wait on disk (default 256)")
    m.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of calibration samples kept to measure fidelity (default 0.2)")
    m.add_argument("--eval", metavar="TEST.npz",
                   help="extra evaluation inputs, with optional labels y<task> (ya, yb...) for accuracy")
    m.add_argument("--providers", help="onnxruntime providers, comma-separated (default: CUDA if usable)")
    m.add_argument("--opset", type=int, dest="target_opset",
                   help="write the merged model in this opset (e.g. 17 for TensorRT 8.5 and 8.6)")
    m.add_argument("--curve", action="store_true",
                   help="also compute the trade-off curve (first k layers shared, k = 0..L; share 0.25..1)")
    m.add_argument("--plot", metavar="PLOT.png", help="write the sharing / trade-off plot as a PNG")
    m.add_argument("--seed", type=int, help="seed of the holdout split, row samples and random pairing (default 0)")
    budget = m.add_argument_group("fidelity budgets and gates (held-out calibration samples, confidence bounds)")
    budget.add_argument("--max-drop", type=float, metavar="P",
                        help="plan the most sharing that keeps every task within P points of top-1 disagreement "
                             "with its original (upper confidence bound); overrides --share/--zipper")
    budget.add_argument("--max-rel-err", type=float, metavar="E",
                        help="like --max-drop, for outputs that are not class scores: relative output error <= E")
    budget.add_argument("--objective", choices=["macs", "params"],
                        help="what a budget saves: multiply-adds (default; only a fully shared prefix is computed "
                             "once) or parameters (partial sharing also stores shared blocks once)")
    budget.add_argument("--require-agreement", type=float, metavar="A",
                        help="gate: exit 3 and write no model when a task's top-1 agreement (lower bound) is below A")
    budget.add_argument("--require-rel-err", type=float, metavar="E",
                        help="gate: exit 3 and write no model when a task's relative error (upper bound) is above E")
    budget.add_argument("--require-shared", type=float, metavar="F",
                        help="gate: exit 3 and write no model when less than F of the multiply-adds is computed once")
    budget.add_argument("--confidence", type=float,
                        help="confidence of the bounds on every fidelity figure (default 0.95; 0.5: point estimates)")
    distill = m.add_argument_group("label-free distillation (needs the distill extra: PyTorch)")
    distill.add_argument("--distill", action="store_true",
                         help="after the closed-form merge, train the merged weights toward the original models "
                              "on the calibration inputs; kept only if no task gets worse on the held-out samples")
    distill.add_argument("--distill-steps", type=int, metavar="N", help="most training steps (default 2000)")
    distill.add_argument("--distill-seconds", type=float, metavar="S", help="most training seconds (default 600)")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    m.add_argument("-v", "--verbose", action="store_true", help="log what each stage does (on stderr)")
    m.add_argument("--log-file", metavar="FILE", help="also write the log (every stage, at debug detail) to FILE")

    i = sub.add_parser("inspect", help="show how two models' layers align, without merging")
    i.add_argument("models", nargs="+")
    i.add_argument("--calibration", metavar="CALIB.npz", help="needed only for dynamic input shapes")
    i.add_argument("--json", action="store_true", help="print the alignment as JSON")

    _add_service_commands(sub)
    return parser


def _add_service_commands(sub) -> None:
    s = sub.add_parser("serve", help="run the REST merge service")
    s.add_argument("--host", default=None, help="address to listen on (ONNXZIP_HOST; default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="TCP port (ONNXZIP_PORT; default 8000)")
    _add_store_flags(s)
    w = sub.add_parser("worker", help="run merge workers without the API (on the same data dir, or the queue)")
    _add_store_flags(w)


def _add_store_flags(parser) -> None:
    """What `serve` and `worker` must agree on to share jobs; flags override the ONNXZIP_* variables."""
    parser.add_argument("--data-dir", default=None, help="job store and artifacts (ONNXZIP_DATA_DIR; default "
                                                         "./onnxzip-data): give workers the server's")
    parser.add_argument("--workers", type=int, default=None, help="merge processes (ONNXZIP_WORKERS)")
    parser.add_argument("--queue-url", default=None,
                        help="scale-out: the Redis of the job store and queue (ONNXZIP_QUEUE_URL)")


def _options(args) -> dict:
    opts = {"share": args.share, "layer_share": args.layer_share, "epsilon": args.epsilon,
            "zipper": args.zipper, "calibrate": args.calibrate, "alpha": args.alpha,
            "pairing": args.pairing, "batch_size": args.batch_size, "holdout": args.holdout,
            "curve": args.curve, "target_opset": args.target_opset, "distill": args.distill}
    for name in ("damping", "activation_margin", "spill_mb", "hessian", "seed", "max_drop", "max_rel_err", "objective",
                 "require_agreement", "require_rel_err", "require_shared", "confidence", "distill_steps",
                 "distill_seconds"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    if args.tasks:
        opts["tasks"] = [t.strip() for t in args.tasks.split(",")]
    if args.providers:
        opts["providers"] = [p.strip() for p in args.providers.split(",")]
    opts = {k: v for k, v in opts.items() if v is not None}
    if args.hessian_rows is not None:
        opts["hessian_rows"] = None if args.hessian_rows == "all" else args.hessian_rows
    return opts


def _rows_cap(text: str):
    if text in ("all", "auto"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a row count such as 32768, 'auto' or 'all'; got {text!r}") from None


class _Bars:
    """tqdm bars per stage, on stderr."""

    def __init__(self, quiet: bool):
        self.quiet = quiet or not sys.stderr.isatty()  # bars are for people at a terminal
        self.bar = None
        self.stage = None
        self.said = None

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        if (stage, message) != self.said:  # --verbose / --log-file: each new step once
            self.said = (stage, message)
            logging.getLogger("onnxzip").info("%s %3.0f%%: %s", stage, 100 * fraction, message)
        if self.quiet:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=100, desc=f"{stage:<12}", file=sys.stderr, leave=True,
                            bar_format="{desc} {bar:24} {percentage:3.0f}% [{elapsed}<{remaining}]{postfix}")
        self.bar.n = int(round(fraction * 100))
        self.bar.set_postfix_str(message, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _write_atomic(path: str, data: bytes) -> None:
    """Write next to the target and rename: a reader never sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".onnxzip-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the user's file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cmd_merge(args) -> int:
    from .zipper import merge

    if os.path.isdir(args.out):
        raise InvalidOptionsError(f"--out '{args.out}' is a folder: give the path of the .onnx file to write")
    bars = _Bars(args.quiet)
    try:
        model, report = merge(args.models, args.calibration, _options(args), evaluation=args.eval,
                              progress=bars)
    except FidelityNotMetError as err:
        bars.close()
        _write_reports(args, err.report)
        print(summary(err.report, None))
        written = f" (report: {args.report})" if args.report else ""
        print(f"onnxzip: fidelity not met: {err}; no model written to {args.out}{written}", file=sys.stderr)
        return EXIT_NOT_MET
    finally:
        bars.close()
    _write_atomic(args.out, model.SerializeToString())
    _write_reports(args, report)
    text = summary(report, args.out)
    logging.getLogger("onnxzip").info("%s", text)
    print(text)
    return 0


def _write_reports(args, report: dict) -> None:
    if args.report:
        _write_atomic(args.report, json.dumps(report, indent=2).encode())
    if args.html or args.plot:
        from .html_report import plot_png, render

        png = plot_png(report)
        if args.plot and png:
            _write_atomic(args.plot, png)
        if args.html:
            _write_atomic(args.html, render(report, png).encode())


def summary(report: dict, out: Optional[str]) -> str:
    """What a person reads after a merge: sharing and its savings, data, fidelity with bounds, warnings."""
    t = report["totals"]
    head = f"wrote {out}" if out else "merged (not written)"
    lines = [f"{head}: {t['shared_neurons']} neurons shared in "
             f"{sum(1 for r in report['layers'] if r['shared'])} layers; parameters x{t['param_ratio']} smaller, "
             f"multiply-adds x{t['macs_ratio']} fewer ({t['shared_macs_fraction']:.1%} computed once), "
             f"file x{t['size_ratio']} smaller than the inputs together"]
    cal = report["calibration"]
    widest = cal["widest_layer"]
    need = (f"; widest layer {widest['position']} ({widest['op']}): {widest['rows']:,} rows for {widest['unknowns']:,} "
            "unknowns per neuron" if widest else "")
    lines.append(f"  calibration: {cal['fit_samples']} samples fit the merge, {cal['holdout_samples']} held out to "
                 f"measure it (recommended: {cal['recommended_fit_samples']}+ and {cal['min_holdout_samples']}+){need}")
    if report.get("plan"):
        plan = report["plan"]
        lines.append(f"  plan: {plan['chosen']} chosen for the budget ({len(plan['tried'])} plans tried in "
                     f"{plan['seconds']:.1f} s)")
    if report.get("distill"):
        lines.append("  " + _distill_line(report["distill"]))
    for task, fid in (report.get("fidelity") or {}).items():
        lines.append(f"  task {task}: {_fidelity_line(fid)} on {fid['samples']} held-out calibration samples")
    if report.get("tensorrt"):
        from .tensorrt import summary_line

        lines.append("  " + summary_line(report["tensorrt"]))
    for task, fid in (report.get("evaluation") or {}).items():
        if fid.get("accuracy_merged") is not None:
            lines.append(f"  task {task}: accuracy {fid['accuracy_original']:.4f} -> {fid['accuracy_merged']:.4f} "
                         f"(>= {fid['accuracy_merged_lower']:.4f}) on {fid['samples']} evaluation samples")
    lines += [f"  warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


def _distill_line(section: dict) -> str:
    if not section.get("steps"):
        return "distillation: skipped, the closed-form merge is kept"
    agreement = ", ".join(f"{t} {f['closed_form']['top1_agreement']:.3f} -> {f['distilled']['top1_agreement']:.3f}"
                          for t, f in section["fidelity"].items() if f["closed_form"]["top1_agreement"] is not None)
    why = f" ({section['why']})" if section.get("why") else ""
    return (f"distillation: {section['steps']} steps in {section['seconds']:.1f} s (stopped: {section['stopped']}), "
            f"kept the {section['kept']} weights{why}" + (f"; held-out top-1 agreement {agreement}" if agreement else ""))


def _fidelity_line(fid: dict) -> str:
    if not fid.get("measured"):
        return "fidelity not measured (too few samples)"
    level = f"{fid['confidence']:.0%}"
    parts = []
    if fid.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {fid['top1_agreement']:.4f} (>= {fid['top1_agreement_lower']:.4f} at {level})")
    if fid.get("rel_err") is not None:
        parts.append(f"rel. error {fid['rel_err']:.4f} (<= {fid['rel_err_upper']:.4f})")
    return ", ".join(parts) or "compared"


def cmd_inspect(args) -> int:
    from .inspect import inspect_models, format_table

    info = inspect_models(args.models, args.calibration)
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    return 0


def cmd_serve(args) -> int:
    try:
        from service.main import serve
    except ImportError as err:
        raise OnnxZipError(f"the REST service is not available in this install ({err})") from err
    serve(host=args.host, port=args.port, **_store_overrides(args))
    return 0


def _store_overrides(args) -> dict:
    return {k: v for k, v in {"data_dir": args.data_dir, "workers": args.workers, "queue_url": args.queue_url}.items()
            if v is not None}


def cmd_worker(args) -> int:
    try:
        from service.worker import run_worker
    except ImportError as err:
        raise OnnxZipError(f"the queue worker is not available in this install ({err})") from err
    run_worker(**_store_overrides(args))
    return 0


def _logging(args) -> None:
    handlers = []
    if getattr(args, "verbose", False):
        handlers.append(logging.StreamHandler(sys.stderr))
        handlers[-1].setLevel(logging.INFO)
    if getattr(args, "log_file", None):
        handlers.append(logging.FileHandler(args.log_file))
        handlers[-1].setLevel(logging.DEBUG)
    if handlers:
        logging.basicConfig(level=logging.DEBUG, handlers=handlers,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"merge": cmd_merge, "inspect": cmd_inspect, "serve": cmd_serve, "worker": cmd_worker}[args.command]
    try:
        _logging(args)
        return handler(args)
    except BrokenPipeError:  # `onnxzip inspect ... | head`: the reader left; no traceback, no more output
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OnnxZipError as err:
        print("onnxzip: error: " + " ".join(str(err).split()), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("onnxzip: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not bad input: one line, no traceback unless asked for
        if os.environ.get("ONNXZIP_DEBUG"):
            raise
        print(f"onnxzip: internal error: {type(err).__name__}: {' '.join(str(err).split())[:500]}. "
              "This is a bug in onnxzip, not in your input: please report it with the output of "
              "`onnxzip inspect --json` on your models (ONNXZIP_DEBUG=1 shows the traceback).", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
