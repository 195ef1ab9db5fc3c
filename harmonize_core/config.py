"""The one configuration tree for Deep Painterly Harmonization.

Every default cites its source in the authors' code (``neural_gram.lua`` = pass 1, ``neural_paint.lua`` = pass 2,
``dilate_mask.m``, ``filt_cnn_artifact.m``); see ``docs/algorithm.md`` section 8 for the full table. Deviations say
"differs from X because Y". The CLI flags, the flow parameters and the manifest overrides are all derived from
this tree: there is no second copy of any default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .network.weights_cache import default_caffe_vgg19

PAPER_SIZE = 700  # gen_all.py L24,L33: the working long side every hyperparameter below was tuned at
DEFAULT_TAU = 5.0  # the authors' middle level (issue #6: levels 1, 5, 10); the code itself has no default


@dataclass(frozen=True, kw_only=True)
class SizingConfig:
    """Working resolution. Inputs are resized so that max(H, W) == size (up or down, bilinear)."""

    size: int = field(default=PAPER_SIZE, metadata={"help": "working long side in pixels (gen_all.py L24)"})


@dataclass(frozen=True, kw_only=True)
class MaskConfig:
    """Mask binarisation, loose-mask dilation and feathering. Pixel sizes are given at 700 px and scaled."""

    binarize_threshold: float = field(
        default=0.5,
        metadata={"help": "grey level (0..1) splitting JPEG mask noise into 0/1 (docs/algorithm.md section 1)"},
    )
    dilate_kernel: int = field(default=35, metadata={"help": "Gaussian support at 700 px (dilate_mask.m L23)"})
    dilate_sigma: float = field(default=35 / 3, metadata={"help": "Gaussian sigma at 700 px (dilate_mask.m L23)"})
    dilate_threshold: float = field(default=0.1, metadata={"help": "blurred > t becomes 1 (dilate_mask.m L27-30)"})
    feather_kernel: int = field(
        default=7, metadata={"help": "box feather of the tight mask for the blend (neural_gram.lua L83-85)"}
    )


@dataclass(frozen=True, kw_only=True)
class BackboneConfig:
    """Feature extractor and its weights."""

    # Differs from the paper's VGG19 because this default must run anywhere: the VGG16 whose ImageNet weights
    # install offline, in the Caffe convention the loss weights were tuned on. The paper and fast presets take a
    # Caffe VGG19 instead whenever one is configured (``paper_backbone``).
    name: str = field(default="vgg16", metadata={"help": "vgg16 (offline weights) or vgg19 (the paper's network)"})
    weights: str = field(
        default="offline-vgg16",
        metadata={"help": "offline-vgg16 | imagenet | <path or s3:// file>[#caffe] | random:<seed> (tests only)"},
    )
    ceil_mode: bool = field(
        default=True,
        metadata={"help": "ceil-mode pooling as loadcaffe builds it (differs from torchvision's floor mode)"},
    )
    precision: str = field(
        default="fp32",
        metadata={"help": "fp32 | bf16 | auto (bf16 VGG on CUDA, fp32 on CPU); losses are always fp32. fp32 by default: "
                          "bf16 moved the final quality scores 2.6-12x beyond fp32's noise (docs/quality.md, 'bf16')"},
    )


@dataclass(frozen=True, kw_only=True)
class OptimiserConfig:
    """The settings both passes share: their L-BFGS run, its memory and time limits, and early stopping. Each pass
    states its own ``iterations`` and ``learning_rate`` (the authors' values differ); the dotted names stay
    ``pass1.<field>`` and ``pass2.<field>``."""

    iterations: int
    learning_rate: float
    history_size: int = field(default=100, metadata={"help": "L-BFGS nCorrection; also a memory knob"})
    match_budget_mb: int = field(
        default=512,
        metadata={"help": "peak extra memory of the pass's nearest-neighbour match (relu4_1 in pass 2)", "runtime": True},
    )
    log_every: int = field(default=50, metadata={"help": "record the loss curve every N iterations", "runtime": True})
    max_seconds: float = field(
        default=0.0,
        metadata={"help": "wall-clock limit of the optimisation, checked every iteration (0 = none)", "runtime": True},
    )
    stop_levels: float = field(
        default=0.0,
        metadata={"help": "early stop: end the pass when the image moves less than this (mean 8-bit levels over the "
                          "loose mask between checks) stop_patience checks in a row; 0 = off (ours, not the authors': "
                          "they run every iteration; docs/quality.md 'Iteration study')"},
    )
    stop_every: int = field(default=50, metadata={"help": "early stop: evaluations between checks (ours)"})
    stop_patience: int = field(default=2, metadata={"help": "early stop: quiet checks in a row that stop (ours)"})


@dataclass(frozen=True, kw_only=True)
class Pass1Config(OptimiserConfig):
    """Robust coarse harmonisation (neural_gram.lua)."""

    iterations: int = field(default=1000, metadata={"help": "L-BFGS iterations (neural_gram.lua L182-186)"})
    learning_rate: float = field(default=1.0, metadata={"help": "optim.lbfgs default (neural_gram.lua L182)"})
    content_layer: str = field(default="relu4_1", metadata={"help": "neural_gram.lua L47"})
    style_layers: tuple[str, ...] = field(
        default=("relu3_1", "relu4_1", "relu5_1"), metadata={"help": "neural_gram.lua L48"}
    )
    content_weight: float = field(default=5.0, metadata={"help": "neural_gram.lua L23"})
    style_weight: float = field(default=100.0, metadata={"help": "per style layer (neural_gram.lua L24)"})
    tv_weight: float = field(default=1e-3, metadata={"help": "gradient-only TV (neural_gram.lua L25)"})
    tolerance_grad: float = field(
        default=1e-5, metadata={"help": "optim.lbfgs tolFun (torch tests max|g|, Torch7 sum|g|)"}
    )
    tolerance_change: float = field(default=1e-9, metadata={"help": "optim.lbfgs tolX"})
    patch_size: int = field(default=3, metadata={"help": "matching patch (neural_gram.lua L51)"})


@dataclass(frozen=True, kw_only=True)
class Pass2Config(OptimiserConfig):
    """High-quality refinement (neural_paint.lua)."""

    iterations: int = field(default=1000, metadata={"help": "L-BFGS iterations (gen_all.py L37)"})
    learning_rate: float = field(default=0.1, metadata={"help": "neural_paint.lua L26"})
    content_layer: str = field(default="relu4_1", metadata={"help": "neural_paint.lua L63-66"})
    style_layers: tuple[str, ...] = field(
        default=("relu1_1", "relu2_1", "relu3_1", "relu4_1"), metadata={"help": "neural_paint.lua L63-66"}
    )
    hist_layers: tuple[str, ...] = field(default=("relu1_1", "relu4_1"), metadata={"help": "neural_paint.lua L66"})
    reference_layer: str = field(default="relu4_1", metadata={"help": "mapping layer (L63, issue #29)"})
    tau: float | str | None = field(
        default=None,
        metadata={"help": "style weight: a number, 'auto' (estimated from the painting) or none for 5"},
    )
    content_weight: float = field(default=1.0, metadata={"help": "neural_paint.lua L506"})
    refine_size: int = field(default=5, metadata={"help": "consistency window (neural_paint.lua L47)"})
    ring_radius: int = field(default=1, metadata={"help": "used-style set ring (neural_paint.lua L50)"})
    hist_bins: int = field(default=256, metadata={"help": "cuda_utils.cu L23"})


@dataclass(frozen=True, kw_only=True)
class PostConfig:
    """Reconstruction / post-processing (filt_cnn_artifact.m). Pixel sizes are given at 700 px."""

    guide: str = field(
        default="composite",
        metadata={"help": "chroma guided-filter guide: composite (authors' code) or luminance (paper)"},
    )
    guided_radius: int = field(default=2, metadata={"help": "filt_cnn_artifact.m L37-42"})
    guided_eps: float = field(default=0.01, metadata={"help": "0.1^2 (filt_cnn_artifact.m L37-42)"})
    patch_size: int = field(default=7, metadata={"help": "PatchMatch patch (filt_cnn_artifact.m L47)"})
    patchmatch_iters: int = field(default=5, metadata={"help": "PatchMatch-2.0 default nn_iters"})
    detail_kernel: int = field(default=7, metadata={"help": "Gaussian base 7x7 (filt_cnn_artifact.m L53)"})
    detail_sigma: float = field(default=1.0, metadata={"help": "filt_cnn_artifact.m L53"})
    blend_kernel: int = field(default=7, metadata={"help": "filt_cnn_artifact.m L24-29"})
    blend_sigma: float = field(default=3.0, metadata={"help": "filt_cnn_artifact.m L24-29"})
    blend_threshold: float = field(default=0.01, metadata={"help": "filt_cnn_artifact.m L26"})


@dataclass(frozen=True, kw_only=True)
class HarmonizeConfig:
    """The whole resolved configuration of one item. ``resolve_tau`` and ``stage_section`` read it."""

    sizing: SizingConfig = field(default_factory=SizingConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pass1: Pass1Config = field(default_factory=Pass1Config)
    pass2: Pass2Config = field(default_factory=Pass2Config)
    post: PostConfig = field(default_factory=PostConfig)
    seed: int = field(default=316, metadata={"help": "neural_gram.lua L45"})

    def to_dict(self) -> dict[str, Any]:
        """Return the config as plain JSON-able nested dicts."""
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> HarmonizeConfig:
        """Return a copy with dotted overrides applied, e.g. ``replace(**{"pass2.tau": 1.0})``."""
        return apply_overrides(self, overrides)


# Presets. ``paper`` is the authors' schedule (the dataclass defaults) with the paper's network when configured
# (``paper_backbone``). ``quick`` is for CPU smoke runs: small working size, few iterations, the offline VGG16
# (differs from the paper because a 700 px, 2 x 1000-iteration run takes hours on a CPU).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "quick": {"sizing.size": 256, "pass1.iterations": 60, "pass2.iterations": 60, "pass1.log_every": 10,
              "pass2.log_every": 10, "backbone.name": "vgg16", "backbone.weights": "offline-vgg16"},
    # ``fast``: the paper's size, network, losses and pass 1; pass 2 at most 600 iterations, stopped early when the
    # image moves less than 1 level per 50 iterations twice in a row: within the noise of 1000 + 1000 at 128 px
    # (6 cases) and 256 px (2 cases); unproven at 700 px (ours; docs/quality.md "Iteration study").
    "fast": {"pass2.iterations": 600, "pass2.stop_levels": 1.0},
}

# Manifest/CLI overrides: a documented flat name -> the dotted field(s) it sets.
OVERRIDE_FIELDS: dict[str, str | tuple[str, ...]] = {
    "size": "sizing.size",
    "pass1_iters": "pass1.iterations",
    "pass2_iters": "pass2.iterations",
    "tau": "pass2.tau",
    "backbone": "backbone.name",
    "weights": "backbone.weights",
    "max_seconds": ("pass1.max_seconds", "pass2.max_seconds"),  # a deadline for each optimisation stage
}


def override_targets(key: str) -> tuple[str, ...]:
    """Return the dotted field names an override key sets (a flat name may set several; a dotted name itself)."""
    target = OVERRIDE_FIELDS.get(key, key)
    return target if isinstance(target, tuple) else (target,)


# Presets whose network is the paper's when one is configured: a Caffe-convention VGG19 (their loss weights were
# tuned on it), else the offline VGG16 (same convention).
CAFFE_BACKBONE_PRESETS = ("paper", "fast")


def paper_backbone() -> dict[str, str]:
    """Return the backbone overrides of the paper preset: the configured Caffe VGG19 (``weights.default_caffe_vgg19``)
    or, when none is configured, the offline VGG16."""
    caffe = default_caffe_vgg19()
    if caffe:
        return {"backbone.name": "vgg19", "backbone.weights": caffe}
    return {"backbone.name": "vgg16", "backbone.weights": "offline-vgg16"}


def preset(name: str) -> HarmonizeConfig:
    """Return the named preset (``paper``, ``fast`` or ``quick``) as a ``HarmonizeConfig``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    backbone = paper_backbone() if name in CAFFE_BACKBONE_PRESETS else {}
    return apply_overrides(HarmonizeConfig(), {**PRESETS[name], **backbone})


def backbone_for_weights(weights: str, current: str) -> str:
    """Return the network a weights source implies when no backbone was named: the offline VGG16 is a VGG16,
    ``imagenet`` and weights files the paper's VGG19 (name ``--backbone vgg16`` for a VGG16 file), random keeps
    ``current``."""
    source = str(weights).strip()
    if source.startswith("random:"):
        return current
    return "vgg16" if source.startswith("offline-vgg16") else "vgg19"


BACKBONE_KEYS = ("backbone", "backbone.name")
WEIGHTS_KEYS = ("weights",)  # the flat name users give (CLI, run settings); a dotted replace() sets only the field


def apply_overrides(config: HarmonizeConfig, overrides: dict[str, Any]) -> HarmonizeConfig:
    """Return ``config`` with dotted or flat-named overrides applied; values are coerced to the field's type.

    ``None`` values are skipped, so optional CLI flags and empty manifest cells leave the default.
    """
    for key, value in overrides.items():
        if value is None:
            continue
        for dotted in override_targets(key):
            config = _set_field(config, key, dotted, value)
    weights = next((overrides[k] for k in WEIGHTS_KEYS if overrides.get(k) is not None), None)
    if weights is not None and all(overrides.get(k) is None for k in BACKBONE_KEYS):
        config = _set_field(config, "backbone", "backbone.name", backbone_for_weights(weights, config.backbone.name))
    validate_config(config)
    return config


def _set_field(config: HarmonizeConfig, key: str, dotted: str, value: Any) -> HarmonizeConfig:
    if "." in dotted:
        section_name, field_name = dotted.split(".", 1)
        section = getattr(config, section_name, None)
        if section is None or field_name not in {f.name for f in dataclasses.fields(section)}:
            raise ValueError(f"unknown config field {key!r}")
        new_section = dataclasses.replace(section, **{field_name: _coerce(section, field_name, value)})
        return dataclasses.replace(config, **{section_name: new_section})
    if dotted not in {f.name for f in dataclasses.fields(config)}:
        raise ValueError(f"unknown config field {key!r}")
    return dataclasses.replace(config, **{dotted: _coerce(config, dotted, value)})


def _coerce(obj: Any, name: str, value: Any) -> Any:
    current = getattr(obj, name)
    if name == "tau":
        return parse_tau(value)
    if isinstance(current, bool):
        if isinstance(value, str):
            return value.strip().lower() in {"1", "true", "yes", "on"}
        return bool(value)
    if isinstance(current, int):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return int(float(value)) if isinstance(value, str) else int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, tuple):
        return tuple(item.strip() for item in value.split(",")) if isinstance(value, str) else tuple(value)
    if isinstance(current, str) and isinstance(value, str):
        return value.strip()  # a cell's surrounding blanks mean nothing
    return value


def parse_tau(value: Any) -> float | str | None:
    """Return tau as a positive float, the string ``"auto"``, or ``None`` (meaning the default 5)."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    tau = float(value)
    if not tau > 0:
        raise ValueError(f"tau must be a positive number or 'auto', got {value!r}")
    return tau


def validate_config(config: HarmonizeConfig) -> None:
    """Raise ``ValueError`` naming the field when a value is out of its domain."""
    checks = [
        (config.sizing.size >= 32, "sizing.size must be >= 32 pixels"),
        (config.sizing.size <= 4096, "sizing.size must be <= 4096 pixels"),
        (config.pass1.iterations >= 0, "pass1.iterations must be >= 0"),
        (config.pass2.iterations >= 0, "pass2.iterations must be >= 0"),
        (config.backbone.name in ("vgg19", "vgg16"), "backbone.name must be vgg19 or vgg16"),
        (config.backbone.precision in ("auto", "fp32", "bf16"), "backbone.precision must be auto, fp32 or bf16"),
        (config.post.guide in ("composite", "luminance"), "post.guide must be composite or luminance"),
        (config.pass1.match_budget_mb > 0 and config.pass2.match_budget_mb > 0, "match budgets must be > 0"),
        (config.pass1.max_seconds >= 0 and config.pass2.max_seconds >= 0, "max_seconds must be >= 0 (0 = no limit)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def scale_to_size(pixels_at_700: float, size: int) -> float:
    """Return a pixel length given at the paper's 700 px working size, scaled to ``size``."""
    return pixels_at_700 * size / PAPER_SIZE


def odd_at_size(pixels_at_700: int, size: int) -> int:
    """Return an odd kernel width (>= 1) for a kernel of ``pixels_at_700`` px at 700 px, scaled to ``size``."""
    width = max(1, int(round(scale_to_size(pixels_at_700, size))))
    return width if width % 2 == 1 else width + 1


def use_bf16(config: HarmonizeConfig, device_type: str) -> bool:
    """Return whether the VGG forward/backward runs under bf16 autocast for this config and device type."""
    precision = config.backbone.precision
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def resolve_tau(pass2: Pass2Config, estimate: Callable[[], float] | None = None) -> float:
    """Return the numeric tau: the configured number, the estimator's value for ``"auto"``, or ``DEFAULT_TAU``."""
    if pass2.tau is None:
        return DEFAULT_TAU
    if pass2.tau == "auto":
        if estimate is None:
            raise ValueError("tau='auto' needs the painting to estimate from")
        return float(estimate())
    return float(pass2.tau)


# Which config sections each stage's output depends on (for cache keys): a stage's key includes its own
# sections and, through its inputs' digests, everything upstream.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "dilate": ("sizing", "masks"),
    "pass1": ("sizing", "masks", "backbone", "pass1", "seed"),
    "blend": ("sizing", "masks"),
    "pass2": ("sizing", "masks", "backbone", "pass2", "seed"),
    "reconstruct": ("sizing", "masks", "post"),
}


def stage_section(config: HarmonizeConfig, stage: str) -> dict[str, Any]:
    """Return the part of the config that determines ``stage``'s output (JSON-able, ``canonical_section``'s form).

    Fields marked ``runtime`` in their metadata (logging cadence, memory budgets, time limits) do not change the
    pixels, so they are left out: changing them never invalidates a cached stage.
    """
    full = config.to_dict()
    section = {}
    for name in STAGE_SECTIONS[stage]:
        value = getattr(config, name)
        if dataclasses.is_dataclass(value):
            runtime = {f.name for f in dataclasses.fields(value) if f.metadata.get("runtime")}
            section[name] = {k: v for k, v in full[name].items() if k not in runtime}
        else:
            section[name] = full[name]
    return canonical_section(section)


# Each section's defaults, to write every value the way its default is written (``canonical_section``).
SECTION_DEFAULTS: dict[str, dict[str, Any]] = {
    f.name: dataclasses.asdict(f.default_factory()) for f in dataclasses.fields(HarmonizeConfig)
    if f.default_factory is not dataclasses.MISSING
}
EARLY_STOP_CADENCE = ("stop_every", "stop_patience")  # early stopping's checks; they mean nothing while it is off


def canonical_section(section: dict[str, Any]) -> dict[str, Any]:
    """Return a config section (``stage_section``'s form, or one read back from JSON) with every value written the
    one way its meaning is written, so that settings that compute the same pixels key the same.

    A ``pass2.tau`` left empty is the default it stands for (``DEFAULT_TAU``) and a numeric tau a float; a value is
    written with its default's type (``5`` in a float field is ``5.0``, a tuple a list, text without surrounding
    blanks); while early stopping is off (``stop_levels`` 0) its cadence (``stop_every``, ``stop_patience``) is the
    default's. A value nothing can make equal (``"auto"``, a different number) is kept as it is.
    """
    result: dict[str, Any] = {}
    for name, values in section.items():
        defaults = SECTION_DEFAULTS.get(name)
        if not isinstance(values, dict) or defaults is None:
            result[name] = values
            continue
        values = {field_name: _as_default(defaults.get(field_name), value) for field_name, value in values.items()}
        if "tau" in values and name == "pass2":
            tau = values["tau"]
            values["tau"] = DEFAULT_TAU if tau is None else float(tau) if isinstance(tau, (int, float)) else tau
        if isinstance(values.get("stop_levels"), (int, float)) and values["stop_levels"] <= 0:
            values.update({"stop_levels": 0.0, **{k: defaults[k] for k in EARLY_STOP_CADENCE if k in values}})
        result[name] = values
    return result


def _as_default(default: Any, value: Any) -> Any:
    """Return ``value`` written with ``default``'s type where the two mean the same."""
    if isinstance(default, bool) or isinstance(value, bool):
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return list(value)
    if isinstance(default, str) and isinstance(value, str):
        return value.strip()
    return value


def config_digest(section: dict[str, Any]) -> str:
    """Return a stable sha256 hex digest of a JSON-able config section."""
    return hashlib.sha256(json.dumps(section, sort_keys=True, default=str).encode()).hexdigest()
