"""The five stages of one item, as plain functions on tensors: dilate -> pass1 -> blend -> pass2 -> reconstruct.

Each stage returns a ``StageOutput``: its image (8-bit quantised, as the PNG it is stored as, so that the
in-memory path and the stored pipeline give the same pixels) and a JSON-able metrics record. ``harmonize``
runs them all; the Prefect tasks call them one by one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import PAPER_SIZE, HarmonizeConfig, resolve_tau
from ..errors import InputError
from ..images import quantize, resize, to_working_size, working_shape
from ..losses.terms import noise_estimate
from ..network.vgg import load_backbone
from ..optimisation.progress import Iterate as Iterate  # re-exported: harmonize_core.passes.stages.Iterate
from ..optimisation.progress import ProgressFn, stage_record
from ..postprocess.reconstruct import reconstruct as run_reconstruct
from ..quality.scores import quality_scores
from .masks import dilate_mask, feather_mask
from .pass1 import run_pass1
from .pass2 import run_pass2
from .tau import estimate_tau

STAGES: tuple[str, ...] = ("dilate", "pass1", "blend", "pass2", "reconstruct")


@dataclass
class StageOutput:
    """One stage's result: ``image`` (1, C, H, W) float32 in [0, 1] on the CPU, and JSON-able ``metrics``."""

    image: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class ItemInputs:
    """One item's inputs at working size: content/style (1, 3, H, W) in [0, 1], tight mask (1, 1, H, W) in {0, 1}.

    ``painting`` is the painting as given (any size): statistics the authors measure at 700 px (mtv, which sets
    the TV/histogram split and tau="auto") are taken from it, so they do not drift with the working size.
    """

    content: torch.Tensor
    style: torch.Tensor
    tight: torch.Tensor
    painting: torch.Tensor | None = None

    def paper_size_painting(self) -> torch.Tensor:
        """Return the painting with its long side at the paper's 700 px (the size mtv was tuned at)."""
        return to_working_size(self.painting if self.painting is not None else self.style, PAPER_SIZE)


def prepare_inputs(
    content: torch.Tensor, style: torch.Tensor, tight: torch.Tensor, config: HarmonizeConfig,
    *, names: tuple[str, str, str] = ("content", "style", "mask"),
) -> ItemInputs:
    """Return the item's tensors at the working size (long side ``config.sizing.size``).

    The composite, the painting and the mask must have the same pixel size (the composite *is* the painting with
    the object pasted in); a mismatch raises ``InputError`` naming the files. Inputs already at the working size
    are not resampled. The mask is resized bilinearly and re-binarised at 0.5.
    """
    shapes = [tuple(t.shape[-2:]) for t in (content, style, tight)]
    if len(set(shapes)) != 1:
        described = ", ".join(f"{n} {w}x{h}" for n, (h, w) in zip(names, shapes, strict=False))
        raise InputError(f"size mismatch: {described}; the composite, painting and mask must have the same size")
    shape = working_shape(*shapes[0], config.sizing.size)
    tight_small = (resize(tight, shape) > 0.5).float() if shapes[0] != shape else tight
    if tight_small.sum() == 0:
        raise InputError(f"{names[2]}: the mask is empty at working size {shape[1]}x{shape[0]}")
    return ItemInputs(content=quantize(resize(content, shape)), style=quantize(resize(style, shape)), tight=tight_small,
                      painting=style)


def _output(stage: str, image: torch.Tensor, started: float, config: HarmonizeConfig, **metrics: Any) -> StageOutput:
    record = stage_record(stage, time.perf_counter() - started, config, metrics)
    return StageOutput(image=quantize(image.detach().float().cpu()), metrics=record)


def dilate(inputs: ItemInputs, config: HarmonizeConfig) -> StageOutput:
    """Return the loose mask M+ (1, 1, H, W) in {0, 1}: the tight mask dilated as dilate_mask.m does."""
    started = time.perf_counter()
    loose = dilate_mask(inputs.tight, config.masks, size=config.sizing.size)
    return _output("dilate", loose, started, config, loose_fraction=float(loose.mean()))


def pass1(
    inputs: ItemInputs, loose: torch.Tensor, backbone: Any, config: HarmonizeConfig,
    progress: ProgressFn | None = None,
) -> StageOutput:
    """Return pass 1's optimised image (unblended, (1, 3, H, W) in [0, 1]) and its loss curve (neural_gram.lua)."""
    started = time.perf_counter()
    image, metrics = run_pass1(inputs.content, inputs.style, loose, backbone, config, progress=progress)
    return _output("pass1", image, started, config, weights_digest=backbone.digest, **metrics)


def blend(image: torch.Tensor, inputs: ItemInputs, config: HarmonizeConfig, stage: str = "blend") -> StageOutput:
    """Return ``image`` blended into the painting with the feathered tight mask (neural_gram.lua L214-217).

    Where the feathered mask is 0 the result is bit-identical to the (8-bit) painting.
    """
    started = time.perf_counter()
    weight = feather_mask(inputs.tight, config.masks.feather_kernel).to(image.dtype)
    image, style = quantize(image), inputs.style
    blended = torch.where(weight > 0, image * weight + style * (1 - weight), style)
    return _output(stage, blended, started, config, feather_fraction=float((weight > 0).float().mean()))


def pass2(
    inputs: ItemInputs, loose: torch.Tensor, blended: torch.Tensor, backbone: Any, config: HarmonizeConfig,
    progress: ProgressFn | None = None,
) -> StageOutput:
    """Return pass 2's result blended into the painting ((1, 3, H, W) in [0, 1]) and its loss curves (neural_paint.lua)."""
    started = time.perf_counter()
    painting = inputs.paper_size_painting()
    tau = resolve_tau(config.pass2, estimate=lambda: estimate_tau(painting))
    image, metrics = run_pass2(inputs.content, inputs.style, loose, inputs.tight, blended, backbone, config,
                               tau=tau, mtv=noise_estimate(painting), progress=progress)
    out = blend(image.to(inputs.style.device), inputs, config, stage="pass2")
    return _output("pass2", out.image, started, config, weights_digest=backbone.digest, tau=tau, **metrics)


def reconstruct(pass2_image: torch.Tensor, inputs: ItemInputs, config: HarmonizeConfig) -> StageOutput:
    """Return the post-processed final image (filt_cnn_artifact.m): chroma denoise, patch synthesis, detail, blend.

    Its metrics carry ``quality``: the final image's (8-bit, as stored) ``{"style", "structure", "seam"}`` scores
    against the composite, the painting and the tight mask (harmonize_core/quality/scores.py says which way is better).
    """
    started = time.perf_counter()
    image, metrics = run_reconstruct(pass2_image, inputs.style, inputs.content, inputs.tight, config.post,
                                     size=config.sizing.size, seed=config.seed)
    quality = {key: round(value, 4) for key, value in
               quality_scores(quantize(image), inputs.content, inputs.style, inputs.tight).items()}
    return _output("reconstruct", image, started, config, quality=quality, **metrics)


def harmonize(
    content: torch.Tensor, style: torch.Tensor, mask: torch.Tensor, config: HarmonizeConfig | None = None,
    *, backbone: Any = None, device: str = "auto", progress: ProgressFn | None = None,
    stages: tuple[str, ...] = STAGES, names: tuple[str, str, str] = ("content", "style", "mask"),
) -> dict[str, StageOutput]:
    """Run the stages on one item and return ``{stage: StageOutput}`` in pipeline order.

    ``content``/``style`` are (1, 3, H, W) in [0, 1], ``mask`` (1, 1, H, W) in {0, 1}, all the same size.
    ``backbone`` defaults to ``load_backbone`` with the config's backbone section on ``device``.
    """
    config = config or HarmonizeConfig()
    if backbone is None:
        backbone = load_backbone(config.backbone.name, config.backbone.weights, device=device,
                                 ceil_mode=config.backbone.ceil_mode)
    on = backbone.device  # every stage, reconstruct included, runs where the backbone is
    inputs = prepare_inputs(content.to(on), style.to(on), mask.to(on), config, names=names)
    outputs: dict[str, StageOutput] = {}
    outputs["dilate"] = dilate(inputs, config)
    loose = outputs["dilate"].image.to(on)
    if "pass1" in stages:
        outputs["pass1"] = pass1(inputs, loose, backbone, config, progress)
        outputs["blend"] = blend(outputs["pass1"].image.to(on), inputs, config)
    if "pass2" in stages:
        outputs["pass2"] = pass2(inputs, loose, outputs["blend"].image.to(on), backbone, config, progress)
    if "reconstruct" in stages:
        outputs["reconstruct"] = reconstruct(outputs["pass2"].image.to(on), inputs, config)
    return outputs
