"""Pass 2: high-quality refinement (neural_paint.lua; ALGORITHM.md section 3).

One consistent mapping at relu4_1 between the blended pass-1 image and the painting (sum of per-pixel cosines,
5x5 consistency refinement), the set U of used style positions (3x3 ring) nearest-upsampled to the other layers,
then content + masked Gram + histogram + TV losses with per-loss gradient normalisation, weighted by tau, optimised
by L-BFGS (lr 0.1, exactly ``iterations`` steps) from the naive composite, not from the pass-1 image.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..config import PAPER_SIZE, HarmonizeConfig, use_bf16
from ..images import resize, to_working_size
from ..losses.histogram import histogram_loss_and_gradient, histogram_target, remap_histogram
from ..losses.terms import (
    content_loss,
    content_loss_and_gradient,
    gram_of_masked,
    histogram_loss,
    masked_gram,
    noise_estimate,
    pass2_weights,
    style_loss,
    style_loss_and_gradient,
    total_variation,
)
from ..matching.mapping import refine_mapping, upsample_used_mask, used_style_mask
from ..matching.nearest import normalized_sum_match
from ..optimisation.lbfgs import LbfgsSettings, Snapshots, optimise
from ..optimisation.objective import Problem, SparseGradient, Term
from ..optimisation.progress import Iterate
from ..timing import phase
from .masks import nearest_resize
from .pass1 import layer_masks, match_budget

HIST_MASK_THRESHOLD = 0.1  # neural_paint.lua L258-261: maskI = loose mask at the layer > 0.1
TIGHT_THRESHOLD = 0.1  # neural_paint.lua L150: tmask = tight > 0.1 after a nearest resize


def consistent_used_sets(
    reference: torch.Tensor, style_feats: dict[str, torch.Tensor], tight: torch.Tensor, style: torch.Tensor,
    config: HarmonizeConfig,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Return ({layer: U (1, 1, h, w) in {0, 1}}, diagnostics) from the relu4_1 mapping (sections 3a-3c).

    ``reference`` is the pass-1 image's features at the reference layer (1, C, h, w); ``tight`` the full-res tight
    mask; ``style`` the painting in [0, 1] (resized to the reference resolution for the consistency cost).
    """
    cfg = config.pass2
    BP = style_feats[cfg.reference_layer]
    shape = tuple(BP.shape[-2:])
    tmask = nearest_resize(tight, shape)[0, 0] > TIGHT_THRESHOLD
    radius = cfg.refine_size // 2
    # Refinement reads P0 at p + o for |o| <= radius: match those neighbours too, nothing else.
    query = F.max_pool2d(tmask[None, None].float(), 2 * radius + 1, stride=1, padding=radius)[0, 0] > 0
    with phase("pass2.match", cfg.reference_layer):
        P0 = normalized_sum_match(reference[0], BP[0], query,
                                  budget_bytes=match_budget(cfg.match_budget_mb, BP.device))
    painting_small = resize(style, shape)[0]
    with phase("pass2.refine"):
        P = refine_mapping(P0, tmask, painting_small.to(BP.device), radius=radius)
    used = used_style_mask(P, tmask, shape, ring_radius=cfg.ring_radius)
    sets = {}
    for name, feats in style_feats.items():
        layer_used = used if feats.shape[-2:] == used.shape else upsample_used_mask(used, tuple(feats.shape[-2:]))
        sets[name] = layer_used.to(feats.dtype)[None, None]
    changed = float((P[tmask] != P0[tmask]).float().mean()) if tmask.any() else 0.0
    return sets, {"matched_positions": int(tmask.sum()), "refined_changed_fraction": round(changed, 4),
                  "used_style_positions": int(used.sum())}


def build_terms(
    config: HarmonizeConfig, weights: dict[str, float], content_target: torch.Tensor,
    style_feats: dict[str, torch.Tensor], used: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
) -> list[Term]:
    """Return pass 2's terms: content (relu4_1), masked Gram per style layer, histogram per hist layer, TV.

    Every feature term also runs on the window of its layer mask's support (``Term.windowed``): the content and
    Gram terms see F * m, zero outside it, and maskI (m > 0.1) lies inside it.
    """
    cfg = config.pass2
    masked_target = content_target * masks[cfg.content_layer]  # the content module compares F*m with target*m
    terms = [Term("content", cfg.content_layer, lambda fm: content_loss(fm, masked_target), weights["content"],
                  masked_input=True, gradient=lambda fm: content_loss_and_gradient(fm, masked_target),
                  windowed=lambda fm, window: content_loss_and_gradient(fm, window.crop(masked_target),
                                                                        masked_target.numel()))]
    for name in cfg.style_layers:
        target, mask = masked_gram(style_feats[name], used[name]), masks[name]
        terms.append(Term(f"style_{name}", name,
                          lambda fm, target=target, mask=mask: style_loss(gram_of_masked(fm, mask), target),
                          weights["style"], masked_input=True,
                          gradient=lambda fm, target=target, mask=mask: style_loss_and_gradient(fm, mask, target),
                          windowed=lambda fm, window, target=target, mask=mask: style_loss_and_gradient(
                              fm, window.crop(mask), target)))
    for name in cfg.hist_layers:
        query = masks[name][0, 0] > HIST_MASK_THRESHOLD
        target = histogram_target(style_feats[name][0], used[name][0, 0] > 0, int(query.sum()), bins=cfg.hist_bins)

        def hist_fn(f, query=query, target=target):
            remapped = remap_histogram(f[0].detach(), query, target).unsqueeze(0)
            return histogram_loss(f, remapped)

        def hist_gradient(f, query=query, target=target):
            loss, rows = histogram_loss_and_gradient(f, query, target)
            return loss, SparseGradient(query, rows)

        def hist_windowed(f, window, query=query, target=target):
            inside = window.crop(query)  # the mean still runs over the whole map: query.numel() * C elements
            loss, rows = histogram_loss_and_gradient(f, inside, target, query.numel() * f.shape[1])
            return loss, SparseGradient(inside, rows)

        # HistLoss normalises I - R as is (zero outside maskI) and masks only after adding the upstream gradient.
        terms.append(Term(f"hist_{name}", name, hist_fn, weights["hist"], premask=False, gradient=hist_gradient,
                          windowed=hist_windowed))
    terms.append(Term("tv", "image", total_variation, weights["tv"]))
    return terms


def pass2_problem(
    content: torch.Tensor, style: torch.Tensor, loose: torch.Tensor, tight: torch.Tensor, blended: torch.Tensor,
    backbone, config: HarmonizeConfig, *, tau: float, mtv: float | None = None,
) -> tuple[Problem, torch.Tensor, dict]:
    """Return (the pass-2 objective, the preprocessed init x0 (1, 3, H, W), setup metrics).

    The relu4_1 mapping, the used sets, the Gram and histogram targets and the weights are computed here once;
    ``objective.evaluate(problem, x)`` scores any image. Arguments as ``run_pass2``.
    """
    cfg, device = config.pass2, backbone.device
    pre = backbone.preprocessing
    x0 = pre.preprocess(content.to(device))
    loose, tight = loose.to(device), tight.to(device)
    layers = sorted({cfg.content_layer, *cfg.style_layers, *cfg.hist_layers, cfg.reference_layer})
    with torch.no_grad():
        style_feats = backbone.extract(pre.preprocess(style.to(device)), layers)
        reference = backbone.extract(pre.preprocess(blended.to(device)), [cfg.reference_layer])[cfg.reference_layer]
        content_target = backbone.extract(x0, [cfg.content_layer])[cfg.content_layer]
    used, match_info = consistent_used_sets(reference, style_feats, tight, style.to(device), config)
    masks = layer_masks(loose, backbone, layers, config.backbone.ceil_mode)
    if mtv is None:
        mtv = noise_estimate(to_working_size(style, PAPER_SIZE))
    weights = pass2_weights(tau, mtv)
    terms = build_terms(config, weights, content_target, style_feats, used, masks)
    problem = Problem(backbone=backbone, terms=terms, layer_masks=masks, image_mask=loose.expand(-1, 3, -1, -1),
                      normalize=True, autocast=use_bf16(config, device.type))
    return problem, x0, {"weights": weights, "mtv": mtv, **match_info}


def run_pass2(
    content: torch.Tensor, style: torch.Tensor, loose: torch.Tensor, tight: torch.Tensor, blended: torch.Tensor,
    backbone, config: HarmonizeConfig, *, tau: float, mtv: float | None = None, progress: Callable | None = None,
    snapshots: Snapshots | None = None,
) -> tuple[torch.Tensor, dict]:
    """Return (pass-2 image (1, 3, H, W) in [0, 1] on the CPU, unblended; metrics).

    ``content`` = naive composite (the init and the content target), ``style`` = painting, ``blended`` = the
    blended pass-1 image (only used for the relu4_1 mapping), masks (1, 1, H, W); all at working size.
    ``mtv`` is the painting's noise estimate at 700 px (neural_paint.lua measures it on the 700 px painting);
    when omitted it is measured on ``style`` resized to 700 px. ``snapshots`` (optional) receives intermediate
    preprocessed images (``lbfgs.Snapshots``).
    """
    cfg = config.pass2
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    problem, x0, setup = pass2_problem(content, style, loose, tight, blended, backbone, config, tau=tau, mtv=mtv)
    setup_seconds = time.perf_counter() - started
    # tolX = tolFun = -1 (neural_paint.lua L305-312): exactly ``iterations`` steps.
    settings = LbfgsSettings(cfg.iterations, cfg.learning_rate, cfg.history_size, -1.0, -1.0, cfg.log_every,
                             cfg.max_seconds, cfg.stop_levels, cfg.stop_every, cfg.stop_patience)
    x, metrics = optimise(problem, x0, settings, stage="pass2", progress=progress,
                          event=functools.partial(Iterate, "pass2"), snapshots=snapshots)
    image = backbone.preprocessing.deprocess(x).clamp(0, 1).cpu()
    metrics.update(seconds_setup=round(setup_seconds, 4), **setup)
    return image, metrics
