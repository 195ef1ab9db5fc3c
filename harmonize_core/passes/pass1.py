"""Pass 1: robust coarse harmonisation (neural_gram.lua; ALGORITHM.md section 2).

Gatys-style optimisation from the naive composite, each style layer with its own independent nearest-neighbour
mapping (3x3 patch cosine, brute force, restricted here to positions inside the mask), masked Gram losses, a content
loss and a TV gradient, raw (unnormalised) gradients, L-BFGS lr 1.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

from ..config import HarmonizeConfig, use_bf16
from ..losses.terms import (
    content_loss,
    content_loss_and_gradient,
    gram_of_masked,
    masked_gram,
    style_loss,
    style_loss_and_gradient,
    total_variation,
)
from ..matching.nearest import gather_targets, patch_cosine_match
from ..network.architecture import layer_plan
from ..optimisation.lbfgs import LbfgsSettings, Snapshots, optimise
from ..optimisation.objective import Problem, Term
from ..optimisation.progress import Iterate
from ..timing import phase
from .masks import propagate_mask

FREE_MEMORY_SHARE = 0.5  # on CUDA a match chunk never takes more than half of the memory free at the time


def match_budget(budget_mb: int, device: torch.device) -> int:
    """Return the matching budget in bytes: the configured MB, capped on CUDA by half the currently free memory."""
    budget = budget_mb * 2**20
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, int(free * FREE_MEMORY_SHARE))
    return budget


def layer_masks(loose: torch.Tensor, backbone, names: list[str], ceil_mode: bool) -> dict[str, torch.Tensor]:
    """Return the soft loose mask at each named tap, (1, 1, h, w) on the backbone's device."""
    return {name: propagate_mask(loose, layer_plan(backbone.arch, name), ceil_mode=ceil_mode) for name in names}


def matched_gram_targets(
    content_feats: dict[str, torch.Tensor], style_feats: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
    *, patch_size: int, budget_bytes: int,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Return ({layer: target Gram (C, C)}, {layer: seconds}) from the independent per-layer mapping.

    neural_gram.lua L126-137: M_l[:, p] = F_s[:, q*(p)] with q* the best 3x3 patch-cosine match of the composite's
    patch at p; target T = (M_l * m)(M_l * m)^T / (C * sum(m)). Only positions with m > 0 are matched.
    """
    targets, seconds = {}, {}
    for name, mask in masks.items():
        started = time.perf_counter()
        query = mask[0, 0] > 0
        with phase("pass1.match", name):
            index = patch_cosine_match(content_feats[name][0], style_feats[name][0], query,
                                       patch_size=patch_size, budget_bytes=budget_bytes)
        mapped = gather_targets(style_feats[name][0], index).unsqueeze(0)
        targets[name] = masked_gram(mapped, mask)
        seconds[name] = round(time.perf_counter() - started, 4)
    return targets, seconds


def build_terms(config: HarmonizeConfig, content_target: torch.Tensor, grams: dict[str, torch.Tensor],
                masks: dict[str, torch.Tensor]) -> list[Term]:
    """Return pass 1's loss terms: content (unmasked value), masked Gram per style layer, TV on the image.

    The Gram terms also run on the window of their mask's support (``Term.windowed``: F * m is zero outside it);
    the content term's value reads the whole map, so it runs there.
    """
    cfg = config.pass1
    terms = [Term("content", cfg.content_layer, lambda f: content_loss(f, content_target), cfg.content_weight,
                  gradient=lambda f: content_loss_and_gradient(f, content_target))]
    for name, target in grams.items():
        mask = masks[name]
        terms.append(Term(f"style_{name}", name,
                          lambda fm, target=target, mask=mask: style_loss(gram_of_masked(fm, mask), target),
                          cfg.style_weight, masked_input=True,
                          gradient=lambda fm, target=target, mask=mask: style_loss_and_gradient(fm, mask, target),
                          windowed=lambda fm, window, target=target, mask=mask: style_loss_and_gradient(
                              fm, window.crop(mask), target)))
    terms.append(Term("tv", "image", total_variation, cfg.tv_weight))
    return terms


def pass1_problem(
    content: torch.Tensor, style: torch.Tensor, loose: torch.Tensor, backbone, config: HarmonizeConfig,
) -> tuple[Problem, torch.Tensor, dict]:
    """Return (the pass-1 objective, the preprocessed init x0 (1, 3, H, W), setup metrics).

    Matching and Gram targets are computed here once; ``objective.evaluate(problem, x)`` scores any image.
    """
    cfg, device = config.pass1, backbone.device
    pre = backbone.preprocessing
    x0 = pre.preprocess(content.to(device))
    loose = loose.to(device)
    layers = sorted({cfg.content_layer, *cfg.style_layers})
    with torch.no_grad():
        content_feats = backbone.extract(x0, layers)
        style_feats = backbone.extract(pre.preprocess(style.to(device)), list(cfg.style_layers))
    masks = layer_masks(loose, backbone, layers, config.backbone.ceil_mode)
    grams, match_seconds = matched_gram_targets(
        {k: content_feats[k] for k in cfg.style_layers}, style_feats, {k: masks[k] for k in cfg.style_layers},
        patch_size=cfg.patch_size, budget_bytes=match_budget(cfg.match_budget_mb, device))
    terms = build_terms(config, content_feats[cfg.content_layer].detach(), grams, masks)
    problem = Problem(backbone=backbone, terms=terms, layer_masks=masks, image_mask=loose.expand(-1, 3, -1, -1),
                      normalize=False, autocast=use_bf16(config, device.type))
    return problem, x0, {"seconds_match": match_seconds}


def run_pass1(
    content: torch.Tensor, style: torch.Tensor, loose: torch.Tensor, backbone, config: HarmonizeConfig,
    *, progress: Callable | None = None, snapshots: Snapshots | None = None,
) -> tuple[torch.Tensor, dict]:
    """Return (pass-1 image (1, 3, H, W) in [0, 1] on the CPU, unblended; metrics with loss curves and timings).

    ``content`` is the naive composite, ``style`` the painting (same size), ``loose`` the dilated mask, all in
    [0, 1] at working size. The image is optimised in the backbone's preprocessed space (Caffe units for Caffe
    weights), as the authors do, so the absolute weights 5 / 100 / 1e-3 keep their meaning. ``snapshots`` (optional)
    receives intermediate preprocessed images (``lbfgs.Snapshots``).
    """
    cfg = config.pass1
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    problem, x0, setup = pass1_problem(content, style, loose, backbone, config)
    setup_seconds = time.perf_counter() - started
    settings = LbfgsSettings(cfg.iterations, cfg.learning_rate, cfg.history_size, cfg.tolerance_grad,
                             cfg.tolerance_change, cfg.log_every, cfg.max_seconds, cfg.stop_levels, cfg.stop_every,
                             cfg.stop_patience)
    x, metrics = optimise(problem, x0, settings, stage="pass1", progress=progress,
                          event=functools.partial(Iterate, "pass1"), snapshots=snapshots)
    image = backbone.preprocessing.deprocess(x).clamp(0, 1).cpu()
    metrics.update(seconds_setup=round(setup_seconds, 4), **setup)
    return image, metrics
