"""Merge settings: one object with defaults and a one-line reason each (CLI flags and REST mirror it)."""

from __future__ import annotations

import re
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import InvalidOptionsError

TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,31}$")


class MergeOptions(BaseModel):
    """How much to share and how to merge; every field has a safe default."""

    # NaN and infinity are never a setting: they reach the solves and come out as a non-finite model.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    share: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Fraction of each hidden layer's neurons shared between the models "
        "(1.0 = every hidden layer fully merged, 0 = nothing shared).")
    layer_share: dict[str, Union[int, float]] = Field(
        default_factory=dict,
        description="Per-layer override, keyed by layer index (1-based, as `inspect` prints) or by "
        "model A's node name: an int is a neuron count, a float a fraction.")
    epsilon: Optional[float] = Field(
        None, ge=0.0, le=1e30,
        description="MTZ's threshold: share only pairs whose predicted error d is below it "
        "(applied on top of share).")
    zipper: Optional[int] = Field(
        None, ge=0,
        description="Zippering: share the first k mergeable layers fully and keep the rest per task "
        "(overrides share).")
    calibrate: bool = Field(
        True,
        description="Recover accuracy in closed form from the merged model's own activations and refit "
        "output layers; false applies the MTZ paper's formula exactly.")
    activation_margin: Optional[float] = Field(
        1.0, ge=0.0, le=100.0,
        description="When calibrating, targets of a layer followed by ReLU/Clip are clamped to this many "
        "standard deviations past the activation's flat edge (values it discards); null fits them exactly.")
    alpha: float = Field(
        0.5, gt=0.0, lt=1.0,
        description="Weight of task A's error against task B's (MTZ eq. 5); 0.5 treats them alike.")
    damping: float = Field(
        1e-2, ge=0.0, le=100.0,
        description="Ridge term lambda*mean(diag(H)) added to each Hessian, and the ridge of the calibrated "
        "recovery toward MTZ's (or the original) weights: keeps solves stable when calibration data does not "
        "span a layer's input. Above 100 every Hessian is practically a multiple of the identity.")
    pairing: Literal["hessian", "random"] = Field(
        "hessian",
        description="How neurons are paired: MTZ's Hessian cost with optimal assignment, or random "
        "(a baseline for ablations).")
    spill_mb: float = Field(
        256.0, gt=0, le=2.0**30,
        description="Activations of the calibration set larger than this many MiB wait on disk (in the "
        "system temp folder) between layers instead of in memory, and so does the record of the "
        "original models' targets when it is larger: bounds memory on big models.")
    batch_size: int = Field(
        64, ge=1, le=65536,
        description="Calibration samples per onnxruntime call; bounds activation memory.")
    holdout: float = Field(
        0.2, ge=0.0, lt=1.0,
        description="Fraction of calibration samples kept out of merging and used only to measure "
        "fidelity in the report.")
    tasks: Optional[list[str]] = Field(
        None,
        description="Task names, one per model, used in output names '<task>/<output>' "
        "(default a, b, c, ...).")
    providers: Optional[list[str]] = Field(
        None,
        description="onnxruntime execution providers; default: CUDA when it really loads, else CPU.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for random pairing, the holdout split and "
                      "the row samples.")
    hessian: Literal["full", "channel"] = Field(
        "full",
        description="Convolution Hessians over whole k*k*C patches (exact), or per channel (C x C, MTZ's "
        "reference-code approximation): far cheaper for very wide convolutions.")
    hessian_rows: Optional[Union[Annotated[int, Field(ge=1, le=2**40)], Literal["auto"]]] = Field(
        32768,
        description="At most this many calibration rows (im2col patches) per layer feed its Hessian and its "
        "recovery targets, a fixed random subset of positions, but never fewer than 16 per input; 'auto' "
        "scales them with the layer's inputs: 64 per input (d + 1 with the bias) within [16384, 32768] (a 3x3 "
        "convolution of 16 channels: 16,384 rows; of 32: 18,496; of 64 and wider: 32,768), faster on narrow "
        "layers; null uses every row. Neighbouring patches of a big feature map are nearly alike, so a "
        "subset costs little accuracy and saves most of the capture time on 224x224 models.")
    device_hessians: Optional[bool] = Field(
        None,
        description="Accumulate layer Hessians inside onnxruntime (on the GPU with CUDA) instead of numpy; "
        "default: on when the CUDA provider is used.")
    target_opset: Optional[int] = Field(
        None, ge=11, le=23,
        description="Write the merged model in this opset (e.g. 17 for TensorRT 8.5 and 8.6) instead of the "
        "inputs' opset; converted with onnx's version converter and checked to compute the same outputs.")
    curve: bool = Field(
        False,
        description="Also compute the trade-off curve: fidelity, parameters and multiply-adds for "
        "sharing the first k layers (k = 0..L) and for share fractions 0.25..1, reusing captures.")
    confidence: float = Field(
        0.95, ge=0.5, le=0.999,
        description="Confidence of the one-sided bounds every fidelity figure carries (a lower bound on top-1 "
        "agreement, an upper bound on relative error); budgets and gates compare these bounds. 0.5 compares "
        "the point estimates.")
    max_drop: Optional[float] = Field(
        None, ge=0.0, le=100.0,
        description="Budget: plan the sharing that saves the most (see objective) while every task keeps within "
        "this many points of top-1 disagreement with its original model on the held-out samples (upper "
        "confidence bound). Overrides share, zipper and layer_share; sharing nothing always meets it.")
    max_rel_err: Optional[float] = Field(
        None, ge=0.0, le=1e6,
        description="Budget like max_drop for outputs that are not class scores: every task's relative output "
        "error on the held-out samples (upper confidence bound) at most this.")
    objective: Literal["macs", "params"] = Field(
        "macs",
        description="What a budget saves: multiply-adds (only a fully shared prefix is computed once) or "
        "parameters (partial sharing also stores shared blocks once).")
    distill: bool = Field(
        False,
        description="After the closed-form merge, train the merged weights to match the original models on the "
        "calibration inputs (no labels: the originals are the teachers); the held-out samples pick the best "
        "weights, and the result is kept only if no task's held-out fidelity gets worse. Needs the distill "
        "extra (PyTorch).")
    distill_steps: int = Field(
        2000, ge=1, le=10_000_000,
        description="Most training steps of distillation (it stops earlier when the held-out loss stops "
        "improving).")
    distill_seconds: float = Field(
        600.0, gt=0, le=7 * 86400.0,
        description="Most seconds distillation may train (the best weights so far are kept).")
    require_agreement: Optional[float] = Field(
        None, ge=0.0, le=1.0,
        description="Gate: fail (CLI exit 3, REST fidelity_not_met, no merged model) when any task's top-1 "
        "agreement with its original on the held-out samples (lower confidence bound) is below this.")
    require_rel_err: Optional[float] = Field(
        None, ge=0.0, le=1e6,
        description="Gate like require_agreement on relative output error (upper confidence bound).")
    require_shared: Optional[float] = Field(
        None, ge=0.0, le=1.0,
        description="Gate: fail when less than this fraction of the original models' multiply-adds is computed "
        "once for several tasks (a merge that shares much less than asked).")

    @field_validator("providers")
    @classmethod
    def _provider_names(cls, providers):
        if providers is None:
            return providers
        from .runtime import known_providers

        known = known_providers()
        unknown = [p for p in providers if p not in known]
        if unknown or not providers:
            raise ValueError(f"unknown onnxruntime provider(s) {unknown or providers}: use names such as "
                             f"{', '.join(known[:6])}")
        return providers

    @field_validator("hessian_rows", mode="before")
    @classmethod
    def _rows_word(cls, rows):
        if isinstance(rows, str) and rows != "auto":
            raise ValueError(f"expected a row count (an integer >= 1), 'auto' or null; got {rows!r}")
        return rows

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, tasks):
        if tasks is None:
            return tasks
        for t in tasks:
            if not TASK_NAME.match(t):
                raise ValueError(
                    f"task name {t!r} must start with a letter and hold only letters, digits, '_' or '-' "
                    "(at most 32 characters)")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be distinct, got {tasks}")
        return tasks

    @model_validator(mode="after")
    def _one_plan(self):
        if (self.max_drop is not None or self.max_rel_err is not None) and (self.zipper is not None or self.layer_share):
            raise ValueError("a budget (max_drop, max_rel_err) plans the sharing itself: drop zipper and layer_share")
        return self

    @model_validator(mode="after")
    def _distill_needs_held_out(self):
        if self.distill and self.holdout == 0:
            raise ValueError("distill keeps the best weights by the held-out samples: holdout must be above 0")
        return self

    @model_validator(mode="after")
    def _layer_share_values(self):
        for key, value in self.layer_share.items():
            if isinstance(value, float) and not 0.0 <= value <= 1.0:
                raise ValueError(f"layer_share[{key!r}] = {value}: a fraction must lie in [0, 1]")
            if isinstance(value, int) and value < 0:
                raise ValueError(f"layer_share[{key!r}] = {value}: a neuron count cannot be negative")
        return self

    def task_names(self, n_models: int) -> list[str]:
        """The task name of each model, checked against the number of models."""
        if self.tasks is None:
            return [chr(ord("a") + i) for i in range(n_models)]
        if len(self.tasks) != n_models:
            raise InvalidOptionsError(
                f"{len(self.tasks)} task names given ({','.join(self.tasks)}) for {n_models} models: "
                "give one name per model, in the models' order")
        return list(self.tasks)


def parse_options(data: dict | None) -> MergeOptions:
    """Validate a plain dict (from JSON or CLI) into MergeOptions, raising InvalidOptionsError."""
    from pydantic import ValidationError

    try:
        return MergeOptions(**(data or {}))
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(p) for p in first["loc"]]
        if len(loc) > 1 and loc[-1] in ("int", "float", "constrained-int", "constrained-float"):  # the member of a Union that failed, not a field
            loc = loc[:-1]
        where = ".".join(loc) or "options"
        if first["type"] == "extra_forbidden":
            raise InvalidOptionsError(f"unknown option '{where}'; valid options: "
                                      f"{', '.join(MergeOptions.model_fields)}") from err
        message = first["msg"].removeprefix("Value error, ")
        if where == "options" or not first["loc"]:
            raise InvalidOptionsError(f"options: {message}") from err
        raise InvalidOptionsError(f"option {where}: {message}") from err
