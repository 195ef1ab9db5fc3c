"""The objective both passes minimise: loss terms at VGG taps, masked/normalised gradients (the driver: ``lbfgs``).

The authors' loss modules sit inside the network and rewrite the gradient flowing through them: each takes its own
gradient, (pass 2 only) L2-normalises it, scales it by its weight, adds the upstream gradient and multiplies the sum
by the layer's soft mask, module after module (so at a tap with several modules the upstream gradient is masked
once per module) (neural_gram.lua L396-413, neural_paint.lua L537-539 / L592-594 / L656-658). A plain sum of
losses cannot express that, so ``evaluate`` backpropagates segment by segment between taps and applies the rule at
each tap. Finally the image gradient is multiplied by the loose mask, so pixels outside M+ never move (L244-246).

Every module multiplies the gradient leaving it by the soft mask m, so at a tap the gradient handed to the network
is zero wherever m is: the module chain runs on the window of m's support only (``window.Window``, a slice view),
and terms that declare a ``windowed`` form compute their loss and gradient there too (the masked terms see
``F * m``, zero outside it).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..network.architecture import TAPS
from .window import Window

GRADIENT_EPS = 1e-8  # neural_paint.lua L537-539: g / (||g|| + 1e-8)


@dataclass(frozen=True)
class SparseGradient:
    """A gradient that is zero outside the bool mask ``where`` (H, W): ``values`` (n, C) holds it at the n masked
    positions in raster order, one row of C channels per position (the histogram loss's I - R is zero outside maskI,
    so it never needs a full-size tensor)."""

    where: torch.Tensor
    values: torch.Tensor


OwnGradient = torch.Tensor | SparseGradient


@dataclass(frozen=True)
class Term:
    """One loss term (one of the authors' loss modules): ``fn`` maps the tap's features (or the image for layer
    "image") to a raw scalar loss. Terms at the same tap are listed in the order the modules sit in the network.

    ``masked_input``: the term sees ``F * m`` and its gradient is taken with respect to that masked input (the
    authors call ``gram:backward(masked_input, ...)``), so the mask is applied once, not twice.
    ``gradient``: optional closed form of ``fn``'s gradient, returning (raw loss as a 0-d tensor, d loss / d input)
    as a tensor shaped like the input or a ``SparseGradient``; without it the gradient is autograd's of ``fn``.
    ``windowed``: optional form of ``gradient`` on the window of the tap's mask support: given the term's input
    cropped to the ``Window`` (a view) and the window, it returns (the raw loss of the whole map as a 0-d tensor, the
    gradient on the window: a window-shaped tensor or a ``SparseGradient`` whose ``where`` is window-shaped). Only
    for terms whose loss and gradient depend on nothing outside the window (masked inputs, maskI rows).
    """

    name: str
    layer: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    weight: float
    masked_input: bool = False
    premask: bool = True  # pass 2: mask the own gradient before normalising (all but the histogram module)
    gradient: Callable[[torch.Tensor], tuple[torch.Tensor, OwnGradient]] | None = None
    windowed: Callable[[torch.Tensor, Window], tuple[torch.Tensor, OwnGradient]] | None = None


@dataclass
class Problem:
    """What an evaluation needs: the backbone, the terms, the soft mask per tap and the image-gradient mask.

    ``crop``: run each tap's loss maths on the window of its mask's support (``windows``, computed here once);
    False runs it on the whole maps (the same results up to float summation order; kept for tests and benches).
    """

    backbone: object
    terms: list[Term]
    layer_masks: dict[str, torch.Tensor]
    image_mask: torch.Tensor
    normalize: bool
    autocast: bool = False
    crop: bool = True
    taps: list[str] = field(init=False)
    windows: dict[str, Window] = field(init=False)

    def __post_init__(self) -> None:
        indices = TAPS[self.backbone.arch]
        used = {t.layer for t in self.terms if t.layer != "image"}
        self.taps = sorted(used, key=indices.__getitem__)
        masks = {name: self.layer_masks[name] for name in self.taps if name in self.layer_masks}
        self.windows = {name: Window.of_support(mask) if self.crop else Window.whole(*mask.shape[-2:])
                        for name, mask in masks.items()}

    def terms_at(self, layer: str) -> list[Term]:
        """Return the terms at ``layer`` (a tap or "image") in insertion order."""
        return [t for t in self.terms if t.layer == layer]


def _own_gradient(term: Term, inputs: torch.Tensor) -> tuple[torch.Tensor, OwnGradient]:
    """Return (raw loss 0-d tensor, d loss / d inputs) of one term: its closed form, or autograd of ``fn``."""
    if term.gradient is not None:
        return term.gradient(inputs)
    leaf = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = term.fn(leaf)
        (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def _masked_norm(grad: OwnGradient, mask: torch.Tensor | None) -> torch.Tensor:
    """Return ``||grad * mask||`` (``||grad||`` when ``mask`` is None) as a 0-d tensor without forming the product:
    the norms over channels at each position (one read of ``grad``) are weighted by a one-channel mask."""
    if isinstance(grad, SparseGradient):
        if mask is None:
            return torch.linalg.vector_norm(grad.values)
        return torch.linalg.vector_norm(torch.linalg.vector_norm(grad.values, dim=1) * mask[0, 0][grad.where])
    if mask is None:
        return torch.linalg.vector_norm(grad)
    if mask.shape[1] != 1:  # a per-channel mask (the image's): form the product
        return torch.linalg.vector_norm(grad * mask)
    return torch.linalg.vector_norm(torch.linalg.vector_norm(grad, dim=1, keepdim=True) * mask)


def _at(where: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Return the (1, 1, H, W) ``factor`` at the positions of the bool mask ``where``, as an (n, 1) column."""
    return factor[0, 0][where].unsqueeze(1)


def _crop_gradient(own: OwnGradient, window: Window) -> OwnGradient:
    """Return a whole-map gradient restricted to ``window``: a view of a dense one, the window's rows of a sparse one
    (raster order within the window is raster order of the map, so the rows keep their order)."""
    if window.is_whole:
        return own
    if isinstance(own, SparseGradient):
        inside = torch.zeros_like(own.where)
        window.crop(inside).fill_(True)
        return SparseGradient(window.crop(own.where), own.values[inside[own.where]])
    return window.crop(own)


def _term_gradient(term: Term, window: Window, mask: torch.Tensor, inputs: Callable[[bool, bool], torch.Tensor],
                   normalize: bool) -> tuple[torch.Tensor, OwnGradient, torch.Tensor | None]:
    """Return (raw loss, own gradient on ``window``, the norm pass 2 divides it by or None) of one term at a tap.

    ``inputs(masked, windowed)`` gives the term's input (``F`` or ``F * m``, whole or cropped). A term with a
    ``windowed`` form runs on the window; any other runs on the whole map and its gradient is cropped afterwards
    (after its norm, which for a term that is not premasked reads the whole gradient).
    """
    if term.windowed is not None:
        loss, own = term.windowed(inputs(term.masked_input, True), window)
        norm = _masked_norm(own, window.crop(mask) if term.premask else None) if normalize else None
        return loss, own, norm
    loss, own = _own_gradient(term, inputs(term.masked_input, False))
    norm = _masked_norm(own, mask if term.premask else None) if normalize else None
    return loss, _crop_gradient(own, window), norm


def _accumulate(grad: torch.Tensor, own: OwnGradient, factor: torch.Tensor) -> torch.Tensor:
    """Add ``own * factor`` ((1, 1, H, W) factor, broadcast over channels) into ``grad`` in place; return it."""
    if isinstance(own, SparseGradient):
        rows = grad[0].permute(1, 2, 0)  # (H, W, C) view: one row of channels per position
        rows[own.where] += own.values * _at(own.where, factor)
        return grad
    return grad.addcmul_(own, factor)


def _through_modules(terms: list[Term], features: torch.Tensor, mask: torch.Tensor, normalize: bool,
                     losses: dict[str, torch.Tensor], upstream: torch.Tensor | None,
                     window: Window | None = None) -> torch.Tensor:
    """Return the gradient leaving a tap's loss modules (shaped like ``features``).

    Backward visits them in reverse insertion order; each adds its own gradient (weighted, in pass 2 masked and
    L2-normalised) to the one coming down and multiplies the sum by the soft mask m. Unrolled, with k modules and
    module j (in visiting order) scaled by s_j: ``g = up m^k + sum_j s_j own_j m^(k - j + 1 + premask_j)``, which is
    summed here in one pass per module instead of three (scale, add, mask). Every summand carries m, so g is zero
    outside ``window`` (which must hold m's support; default the whole map): the sum is formed on the window only.
    """
    if not terms:
        return torch.zeros_like(features) if upstream is None else upstream.float()
    window = window or Window.whole(*features.shape[-2:])
    if upstream is None:
        full = torch.zeros_like(features)
    else:  # reuse the upstream gradient's memory: zero it outside the window, scale it inside
        full = window.zero_outside_(upstream.float())
    grad, cropped_mask = window.crop(full), window.crop(mask)
    cache: dict[tuple[bool, bool], torch.Tensor] = {}

    def inputs(masked: bool, windowed: bool) -> torch.Tensor:
        if (masked, windowed) not in cache:
            source = window.crop(features) if windowed else features
            cache[masked, windowed] = source * (cropped_mask if windowed else mask) if masked else source
        return cache[masked, windowed]

    visiting = list(reversed(terms))
    powers = {1: cropped_mask}

    def power(n: int) -> torch.Tensor:
        if n not in powers:
            powers[n] = power(n - 1) * cropped_mask
        return powers[n]

    count = len(visiting)
    if upstream is not None:
        grad.mul_(power(count))
    for j, term in enumerate(visiting, start=1):
        loss, own, norm = _term_gradient(term, window, mask, inputs, normalize)
        losses[term.name] = losses[term.name] + term.weight * loss if term.name in losses else term.weight * loss
        exponent = count - j + 1
        if normalize:
            exponent += int(term.premask)
            scale = term.weight / (norm + GRADIENT_EPS)
        else:
            scale = term.weight
        _accumulate(grad, own, power(exponent) * scale)
    return full


def evaluate(problem: Problem, x: torch.Tensor) -> tuple[float, dict[str, float], torch.Tensor]:
    """Return (total loss, per-term weighted losses, image gradient) at the preprocessed image ``x`` (1, 3, H, W).

    The image gradient is already multiplied by the loose image mask. The loss values are read back from the
    device once, at the end.
    """
    losses: dict[str, torch.Tensor] = {}
    x = x.detach().requires_grad_(True)
    device_type = x.device.type
    cast = torch.autocast(device_type, dtype=torch.bfloat16) if problem.autocast else nullcontext()
    with torch.enable_grad():
        with cast:
            raw = problem.backbone.extract(x, problem.taps) if problem.taps else {}
        upstream = None
        for index in range(len(problem.taps) - 1, -1, -1):
            name = problem.taps[index]
            # Loss maths in fp32 even when the network runs in bf16.
            grad = _through_modules(problem.terms_at(name), raw[name].detach().float(), problem.layer_masks[name],
                                    problem.normalize, losses, upstream, problem.windows[name])
            below = raw[problem.taps[index - 1]] if index > 0 else x
            (upstream,) = torch.autograd.grad(raw[name], below, grad_outputs=grad.to(raw[name].dtype),
                                              retain_graph=index > 0)
    # The image mask is binary, so the TV module's own masking and feval's final one coincide (pass 1 and 2).
    image_grad = _through_modules(problem.terms_at("image"), x.detach(), problem.image_mask, problem.normalize, losses,
                                  upstream if upstream is not None else torch.zeros_like(x))
    image_grad.mul_(problem.image_mask)
    names = list(losses)
    numbers = torch.stack([losses[n].float() for n in names]).tolist() if names else []
    values = dict(zip(names, numbers, strict=True))
    return sum(values.values()), values, image_grad
