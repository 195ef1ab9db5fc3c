"""Loss terms of both passes as small pure functions on features ``(1, C, H, W)`` and masks ``(1, 1, H, W)``.

Each returns a scalar tensor; the optimiser engine (``objective.py``) decides how gradients are masked, normalised
and weighted, as the authors' modules do.
"""

from __future__ import annotations

import torch


def masked_gram(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the masked Gram matrix (C, C): ``(F*m)(F*m)^T / (C * sum(m))``.

    neural_gram.lua L128-137 / L383-394: the mask is expanded to C x H x W, so its sum is C times the spatial sum.
    ``features`` (1, C, H, W), ``mask`` (1, 1, H, W) soft weights.
    """
    channels = features.shape[1]
    flat = (features * mask).reshape(channels, -1)
    return flat @ flat.t() / (channels * mask.sum().clamp_min(1e-8))


def gram_of_masked(masked_features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the Gram of features that are already masked, normalised by ``C * sum(mask)`` (as ``masked_gram``)."""
    channels = masked_features.shape[1]
    flat = masked_features.reshape(channels, -1)
    return flat @ flat.t() / (channels * mask.sum().clamp_min(1e-8))


def style_loss(gram: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return ``mean((G - T)^2)`` over C x C (nn.MSECriterion averages)."""
    return torch.mean((gram - target) ** 2)


def content_loss(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return ``mean((F - target)^2)`` over C x H x W (neural_gram.lua L327-352)."""
    return torch.mean((features - target) ** 2)


def histogram_loss(features: torch.Tensor, remapped: torch.Tensor) -> torch.Tensor:
    """Return ``sum((F - R)^2) / numel``; its gradient is ``2 (F - R) / numel`` (neural_paint.lua L605-664)."""
    return torch.sum((features - remapped.detach()) ** 2) / features.numel()


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """Return ``0.5 * sum(dx^2 + dy^2)`` over the first (H-1) x (W-1) pixels (neural_gram.lua L431-446).

    The authors' TV module has a gradient and no loss value; this is the function whose gradient it is.
    """
    core = image[..., :-1, :-1]
    dx = core - image[..., :-1, 1:]
    dy = core - image[..., 1:, :-1]
    return 0.5 * torch.sum(dx**2 + dy**2)


def noise_estimate(painting: torch.Tensor) -> float:
    """Return mtv: the median of ((dx^2 + dy^2) / 2) over interior pixels of the [0, 1] RGB painting.

    neural_paint.lua L470-483 (Torch median of all channels' values).
    """
    image = painting[0].float()
    core = image[:, :-1, :-1]
    d = ((core - image[:, :-1, 1:]) ** 2 + (core - image[:, 1:, :-1]) ** 2) / 2
    values = d.flatten()
    # Torch7's median returns the lower middle element for an even count.
    return float(values.sort().values[(values.numel() - 1) // 2])


def tv_sigmoid(mtv: float) -> float:
    """Return tv_raw = 10 / (1 + exp(1e4 * mtv - 25)) (neural_paint.lua L488): 10 for smooth, 0 for textured paintings."""
    exponent = min(1e4 * mtv - 25.0, 700.0)
    return 10.0 / (1.0 + float(torch.exp(torch.tensor(exponent, dtype=torch.float64))))


def pass2_weights(tau: float, mtv: float) -> dict[str, float]:
    """Return pass 2's loss weights {content, style, hist, tv} (neural_paint.lua L506-508): hist + tv = 10 tau."""
    tv_raw = tv_sigmoid(mtv)
    return {"content": 1.0, "style": tau, "hist": tau * (10.0 - tv_raw), "tv": tau * tv_raw}
