"""The optimisation engine: segment-wise backward with per-tap masking equals a hook-based reference."""

import dataclasses

import pytest
import torch

from harmonize_core.errors import DivergedError, HarmonizeError
from harmonize_core.losses.histogram import histogram_loss_and_gradient, histogram_target, remap_histogram
from harmonize_core.losses.terms import (
    content_loss,
    content_loss_and_gradient,
    gram_of_masked,
    histogram_loss,
    masked_gram,
    style_loss,
    style_loss_and_gradient,
    total_variation,
)
from harmonize_core.network.vgg import load_backbone
from harmonize_core.optimisation.lbfgs import LbfgsSettings, optimise
from harmonize_core.optimisation.objective import GRADIENT_EPS, Problem, SparseGradient, Term, evaluate
from tasks.stages import is_transient


def _backbone():
    return load_backbone("vgg16", "random:7", device="cpu", ceil_mode=True)


def _own(term, f, mask, normalize):
    leaf = (f * mask if term.masked_input else f).detach().requires_grad_(True)
    with torch.enable_grad():  # hooks run inside backward, where grad mode is off
        (g,) = torch.autograd.grad(term.fn(leaf), leaf)
    if normalize:
        if term.premask:
            g = g * mask
        g = g / (g.norm() + GRADIENT_EPS)
    return term.weight * g


def _hook_reference(problem: Problem, x: torch.Tensor) -> torch.Tensor:
    """The authors' module chain written with tensor hooks: backward meets a tap's modules in reverse insertion
    order and each returns (own + incoming) * mask."""
    x = x.detach().requires_grad_(True)
    feats = problem.backbone.extract(x, problem.taps)

    def chain(name, f, g):
        mask = problem.layer_masks[name]
        for term in reversed([t for t in problem.terms if t.layer == name]):
            g = (_own(term, f, mask, problem.normalize) + g) * mask
        return g

    for name in problem.taps:
        f = feats[name].detach()
        feats[name].register_hook(lambda g, name=name, f=f: chain(name, f, g))
    deepest = feats[problem.taps[-1]]
    deepest.backward(torch.zeros_like(deepest))
    image_grad = x.grad.clone()
    for term in reversed([t for t in problem.terms if t.layer == "image"]):
        image_grad = (_own(term, x.detach(), problem.image_mask, problem.normalize) + image_grad) * problem.image_mask
    return image_grad * problem.image_mask


def _problem(normalize: bool, soft: bool):
    torch.manual_seed(0)
    backbone = _backbone()
    x = torch.randn(1, 3, 32, 28) * 40
    feats = backbone.extract(x, ["relu1_1", "relu2_1", "relu3_1"])
    masks = {}
    for name, f in feats.items():
        masks[name] = torch.rand(1, 1, *f.shape[-2:]) if soft else torch.ones(1, 1, *f.shape[-2:])
    target2 = torch.rand_like(feats["relu2_1"].detach())
    gram3 = masked_gram(torch.rand_like(feats["relu3_1"].detach()), masks["relu3_1"])
    terms = [
        Term("content", "relu2_1", lambda f: content_loss(f, target2), 5.0),
        Term("style3", "relu3_1", lambda fm: style_loss(gram_of_masked(fm, masks["relu3_1"]), gram3), 100.0,
             masked_input=True),
        Term("style1", "relu1_1", lambda fm: style_loss(gram_of_masked(fm, masks["relu1_1"]), gram3[:64, :64]), 3.0,
             masked_input=True),
        Term("hist3", "relu3_1", lambda f: (f - 0.5 * f.detach()).square().sum() / f.numel(), 7.0, premask=False),
        Term("tv", "image", total_variation, 1e-3),
    ]
    image_mask = (torch.rand(1, 1, 32, 28) > 0.3).float().expand(-1, 3, -1, -1)
    return Problem(backbone, terms, masks, image_mask, normalize=normalize), x


def test_pass1_rule_equals_hook_reference_with_soft_masks():
    problem, x = _problem(normalize=False, soft=True)
    _, values, grad = evaluate(problem, x)
    reference = _hook_reference(problem, x)
    assert torch.allclose(grad, reference, rtol=1e-4, atol=1e-6 * reference.abs().max())
    assert set(values) == {"content", "style3", "style1", "hist3", "tv"}


def test_pass2_normalised_rule_equals_hook_reference():
    problem, x = _problem(normalize=True, soft=True)
    _, _, grad = evaluate(problem, x)
    reference = _hook_reference(problem, x)
    assert torch.allclose(grad, reference, rtol=1e-4, atol=1e-6 * reference.abs().max())


def test_with_unit_masks_the_gradient_is_plain_autograd_of_the_weighted_sum():
    problem, x = _problem(normalize=False, soft=False)
    problem.image_mask = torch.ones_like(problem.image_mask)
    _, _, grad = evaluate(problem, x)
    leaf = x.clone().requires_grad_(True)
    feats = problem.backbone.extract(leaf, problem.taps)
    total = sum(t.weight * t.fn(leaf if t.layer == "image" else feats[t.layer]) for t in problem.terms)
    (expected,) = torch.autograd.grad(total, leaf)
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-6 * expected.abs().max())


def test_pixels_outside_the_image_mask_get_zero_gradient():
    problem, x = _problem(normalize=False, soft=True)
    _, _, grad = evaluate(problem, x)
    assert float(grad[problem.image_mask == 0].abs().max()) == 0.0
    assert float(grad[problem.image_mask == 1].abs().max()) > 0.0


def _closed_form_problem(normalize: bool, hist_premask: bool = False):
    """A pass-2-like problem whose terms carry closed-form gradients (dense and sparse) beside their ``fn``: a
    histogram and a Gram module on the same tap, content and Gram on another."""
    torch.manual_seed(5)
    backbone = _backbone()
    x = torch.randn(1, 3, 32, 28) * 40
    feats = {k: v.detach() for k, v in backbone.extract(x, ["relu1_1", "relu2_1"]).items()}
    masks = {name: torch.rand(1, 1, *f.shape[-2:]) for name, f in feats.items()}
    query = masks["relu1_1"][0, 0] > 0.3
    style = torch.rand(64, 32, 28) * 30
    target = histogram_target(style, torch.rand(32, 28) < 0.5, n_query=int(query.sum()))
    gram1, gram2 = (masked_gram(torch.rand_like(feats[k]) * 20, masks[k]) for k in ("relu1_1", "relu2_1"))
    content = torch.rand_like(feats["relu2_1"]) * masks["relu2_1"]

    def hist_fn(f):
        return histogram_loss(f, remap_histogram(f[0].detach(), query, target).unsqueeze(0))

    def hist_gradient(f):
        loss, rows = histogram_loss_and_gradient(f, query, target)
        return loss, SparseGradient(query, rows)

    def style(name, gram, weight):
        mask = masks[name]
        return Term(f"style_{name}", name, lambda fm: style_loss(gram_of_masked(fm, mask), gram), weight,
                    masked_input=True, gradient=lambda fm: style_loss_and_gradient(fm, mask, gram))

    terms = [Term("content", "relu2_1", lambda fm: content_loss(fm, content), 1.0, masked_input=True,
                  gradient=lambda fm: content_loss_and_gradient(fm, content)),
             style("relu2_1", gram2, 5.0), style("relu1_1", gram1, 5.0),
             Term("hist", "relu1_1", hist_fn, 20.0, premask=hist_premask, gradient=hist_gradient),
             Term("tv", "image", total_variation, 30.0)]
    image_mask = (torch.rand(1, 1, 32, 28) > 0.3).float().expand(-1, 3, -1, -1)
    return Problem(backbone, terms, masks, image_mask, normalize=normalize), x


@pytest.mark.parametrize(("normalize", "hist_premask"), [(False, False), (True, False), (True, True)])
def test_closed_form_and_sparse_gradients_equal_the_hook_reference(normalize, hist_premask):
    problem, x = _closed_form_problem(normalize, hist_premask)
    total, values, grad = evaluate(problem, x)
    reference = _hook_reference(problem, x)  # autograd of each term's fn
    assert torch.allclose(grad, reference, rtol=1e-4, atol=1e-5 * reference.abs().max())
    autograd_only = dataclasses.replace(problem, terms=[dataclasses.replace(t, gradient=None) for t in problem.terms])
    total_ref, values_ref, _ = evaluate(autograd_only, x)
    assert values.keys() == values_ref.keys()
    for name, value in values.items():
        assert value == pytest.approx(values_ref[name], rel=1e-5), name
    assert total == pytest.approx(sum(values.values()))


def _windowed_problem(normalize: bool, crop: bool = True):
    """``_closed_form_problem`` with soft masks that are zero outside a box (as the real layer masks are far from the
    object) and every feature term's ``windowed`` form: content with the whole map's count, Gram on the cropped
    mask, histogram on the cropped maskI."""
    problem, x = _closed_form_problem(normalize)
    masks = {}
    for name, mask in problem.layer_masks.items():
        height, width = mask.shape[-2:]
        box = torch.zeros_like(mask)
        box[..., height // 4: height * 3 // 4, width // 3: width - 2] = 1
        masks[name] = mask * box
    torch.manual_seed(6)
    feats = {k: v.detach() for k, v in problem.backbone.extract(x, ["relu1_1", "relu2_1"]).items()}
    query = masks["relu1_1"][0, 0] > 0.3
    target = histogram_target(torch.rand(64, 32, 28) * 30, torch.rand(32, 28) < 0.5, n_query=int(query.sum()))
    gram1, gram2 = (masked_gram(torch.rand_like(feats[k]) * 20, masks[k]) for k in ("relu1_1", "relu2_1"))
    content = torch.rand_like(feats["relu2_1"]) * masks["relu2_1"]

    def style(name, gram, weight):
        mask = masks[name]
        return Term(f"style_{name}", name, lambda fm: style_loss(gram_of_masked(fm, mask), gram), weight,
                    masked_input=True, windowed=lambda fm, w: style_loss_and_gradient(fm, w.crop(mask), gram))

    def hist_windowed(f, w):
        loss, rows = histogram_loss_and_gradient(f, w.crop(query), target, query.numel() * f.shape[1])
        return loss, SparseGradient(w.crop(query), rows)

    terms = [Term("content", "relu2_1", lambda fm: content_loss(fm, content), 1.0, masked_input=True,
                  windowed=lambda fm, w: content_loss_and_gradient(fm, w.crop(content), content.numel())),
             style("relu2_1", gram2, 5.0), style("relu1_1", gram1, 5.0),
             Term("hist", "relu1_1", lambda f: histogram_loss(f, remap_histogram(f[0], query, target).unsqueeze(0)),
                  20.0, premask=False, windowed=hist_windowed),
             Term("tv", "image", total_variation, 30.0)]
    return Problem(problem.backbone, terms, masks, problem.image_mask, normalize=normalize, crop=crop), x


@pytest.mark.parametrize("normalize", [False, True])
def test_windowed_terms_equal_the_whole_map_evaluation_and_the_hook_reference(normalize):
    problem, x = _windowed_problem(normalize)
    whole, _ = _windowed_problem(normalize, crop=False)
    assert all(w.area < w.height * w.width / 2 for w in problem.windows.values())
    assert all(w.is_whole for w in whole.windows.values())
    total, values, grad = evaluate(problem, x)
    total_whole, values_whole, grad_whole = evaluate(whole, x)
    reference = _hook_reference(problem, x)  # autograd of each term's fn on the whole maps
    assert torch.allclose(grad, grad_whole, rtol=1e-5, atol=1e-6 * grad_whole.abs().max())
    assert torch.allclose(grad, reference, rtol=1e-4, atol=1e-5 * reference.abs().max())
    assert values == pytest.approx(values_whole, rel=1e-5)
    assert total == pytest.approx(total_whole, rel=1e-5)


def test_a_term_without_a_windowed_form_runs_on_the_whole_map_beside_windowed_ones():
    """Terms without ``windowed`` (autograd of fn, whole map; a dense and a not-premasked one) at a cropped tap: their
    gradient is cropped after its norm, which for the not-premasked term reads the whole map."""
    problem, x = _windowed_problem(normalize=True)
    dense = Term("dense", "relu1_1", lambda f: (f - 0.5 * f.detach()).square().sum() / f.numel(), 7.0, premask=False)
    unmasked = Term("unmasked", "relu2_1", lambda f: f.square().mean(), 3.0)
    terms = [*problem.terms[:1], unmasked, *problem.terms[1:3], dense, *problem.terms[3:]]
    mixed = dataclasses.replace(problem, terms=terms)
    whole = dataclasses.replace(mixed, crop=False)
    _, values, grad = evaluate(mixed, x)
    _, values_whole, grad_whole = evaluate(whole, x)
    reference = _hook_reference(mixed, x)
    assert not mixed.windows["relu1_1"].is_whole
    assert torch.allclose(grad, grad_whole, rtol=1e-5, atol=1e-6 * grad_whole.abs().max())
    assert torch.allclose(grad, reference, rtol=1e-4, atol=1e-5 * reference.abs().max())
    assert values == pytest.approx(values_whole, rel=1e-5)


# --- divergence: a NaN, an infinity or an explosion fails the pass with one line (LossGuard) -----------------------

def _image_problem(*terms: Term, shape=(1, 3, 6, 5)) -> Problem:
    """A problem of image-level terms only (no network pass): a stub backbone with identity preprocessing."""
    from types import SimpleNamespace

    backbone = SimpleNamespace(arch="vgg16", preprocessing=SimpleNamespace(deprocess=lambda x: x))
    return Problem(backbone, list(terms), {}, torch.ones(shape), normalize=False)


def _settings(iterations: int = 20, learning_rate: float = 1.0) -> LbfgsSettings:
    return LbfgsSettings(iterations, learning_rate, history_size=5, tolerance_grad=-1.0, tolerance_change=-1.0,
                         log_every=100)


def _uphill(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss ||x||^2 with a gradient pointing uphill (-x): every L-BFGS step (lr 1 after the first) doubles x."""
    return x.square().sum(), -x


def test_an_exploding_loss_fails_the_pass_naming_the_term_and_the_evaluation():
    problem = _image_problem(Term("style_relu4_1", "image", lambda x: x.square().sum(), 1.0, gradient=_uphill))
    # Start total 90 x 0.5^2 = 22.5. The first step is 1/|g|_1 = 1/45 long (x * 46/45), every later one doubles x
    # (curvature pairs with y.s < 0 are dropped): evaluation n >= 1 reads 22.5 (46/45)^2 4^(n-1), 2.41e4 at n = 6,
    # the first above 1000 x 22.5.
    x0 = torch.full((1, 3, 6, 5), 0.5)
    with pytest.raises(DivergedError) as failure:
        optimise(problem, x0, _settings(), stage="pass1")
    message = str(failure.value)
    assert message == ("pass1: the loss exploded (style_relu4_1 2.41e+04; total 2.41e+04 = 1.07e+03 x its start 22.5, "
                       "limit 1000 x) at evaluation 6 of 20; the optimisation diverged and is not retried: lower "
                       "pass1.learning_rate (now 1) or check this item's images")
    assert isinstance(failure.value, HarmonizeError) and not is_transient(failure.value)


@pytest.mark.parametrize(("bad", "what"), [(float("nan"), "NaN"), (float("inf"), "infinite")])
def test_a_non_finite_loss_term_fails_at_once_with_one_line(bad, what):
    def broken(x):
        return torch.tensor(bad), torch.zeros_like(x)

    problem = _image_problem(Term("tv", "image", lambda x: x.sum(), 1.0),
                             Term("hist_relu1_1", "image", lambda x: x.sum(), 1.0, gradient=broken))
    with pytest.raises(DivergedError) as failure:
        optimise(problem, torch.rand(1, 3, 6, 5), _settings(5, 0.1), stage="pass2")
    assert str(failure.value) == (f"pass2: the hist_relu1_1 loss became {what} at evaluation 0 of 5; the optimisation "
                                  "diverged and is not retried: lower pass2.learning_rate (now 0.1) or check this "
                                  "item's images")


def test_a_non_finite_gradient_fails_even_when_every_loss_is_finite():
    def bad_gradient(x):
        grad = torch.zeros_like(x)
        grad[0, 1, 2, 3] = float("nan")
        return x.square().sum(), grad

    problem = _image_problem(Term("content", "image", lambda x: x.square().sum(), 1.0, gradient=bad_gradient))
    with pytest.raises(DivergedError) as failure:
        optimise(problem, torch.rand(1, 3, 6, 5), _settings(5), stage="pass1")
    assert str(failure.value).startswith("pass1: the image gradient became NaN or infinite (every loss term still "
                                         "finite) at evaluation 0 of 5; ")


def test_a_term_growing_from_zero_while_the_total_falls_is_not_an_explosion():
    """Pass 2's shape: the content term starts at exactly 0 and grows without bound relative to that start, while
    the total (dominated by the style term) falls: the pass completes."""
    x0 = torch.zeros(1, 3, 6, 5)
    target = torch.full_like(x0, 0.8)
    problem = _image_problem(Term("content", "image", lambda x: (x - x0).square().sum(), 1.0),
                             Term("style", "image", lambda x: 9.0 * (x - target).square().sum(), 1.0))
    _, metrics = optimise(problem, x0, _settings(10, 0.1), stage="pass2")
    start = metrics["curves"]["total"][0][1]
    assert metrics["curves"]["content"][0][1] == 0.0 and metrics["final"]["content"] > 1.0
    assert start == pytest.approx(9 * 90 * 0.64) and metrics["final"]["total"] < start
