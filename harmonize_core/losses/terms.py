"""Loss terms of both passes as small pure functions on features ``(1, C, H, W)`` and masks ``(1, 1, H, W)``.

Each returns a scalar tensor; the optimiser engine (``objective.py``) decides how gradients are masked, normalised
and weighted, as the authors' modules do.
"""

from __future__ import annotations

import torch


def channel_matrix(features: torch.Tensor) -> torch.Tensor:
    """Return ``features`` (1, C, H, W) as a (C, H*W) matrix: a view (no copy) for both contiguous and channels_last
    tensors (the core's backbones produce channels_last features); a copy only for other layouts."""
    channels = features.shape[1]
    if features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous():
        return features.permute(0, 2, 3, 1).reshape(-1, channels).t()
    return features.reshape(channels, -1)


def _from_channel_matrix(matrix: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return a (C, H*W) matrix as a (1, C, H, W) tensor shaped like ``like``, keeping the matrix's memory (a
    (H*W, C)-contiguous matrix becomes a channels_last tensor)."""
    _, channels, height, width = like.shape
    if matrix.t().is_contiguous() and not matrix.is_contiguous():
        return matrix.t().view(1, height, width, channels).permute(0, 3, 1, 2)
    return matrix.reshape(like.shape)


def masked_gram(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the masked Gram matrix (C, C): ``(F*m)(F*m)^T / (C * sum(m))``.

    neural_gram.lua L128-137 / L383-394: the mask is expanded to C x H x W, so its sum is C times the spatial sum.
    ``features`` (1, C, H, W), ``mask`` (1, 1, H, W) soft weights.
    """
    return gram_of_masked(features * mask, mask)


def gram_of_masked(masked_features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the Gram of features that are already masked, normalised by ``C * sum(mask)`` (as ``masked_gram``)."""
    channels = masked_features.shape[1]
    flat = channel_matrix(masked_features)
    return flat @ flat.t() / (channels * mask.sum().clamp_min(1e-8))


def style_loss(gram: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return ``mean((G - T)^2)`` over C x C (nn.MSECriterion averages)."""
    return torch.mean((gram - target) ** 2)


def style_loss_and_gradient(masked_features: torch.Tensor, mask: torch.Tensor,
                            target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (``style_loss(gram_of_masked(Fm, mask), target)``, its gradient with respect to ``Fm``) in closed form.

    With G = Fm Fm^T / k and dG = 2 (G - T) / C^2, the gradient is (dG + dG^T) Fm / k: one matrix product where
    autograd spends two (it differentiates both factors of the Gram separately). The gradient (1, C, H, W) has
    ``masked_features``' memory layout.
    """
    channels = masked_features.shape[1]
    flat = channel_matrix(masked_features)
    k = channels * mask.sum().clamp_min(1e-8)
    residual = flat @ flat.t() / k - target
    loss = torch.mean(residual**2)
    d_gram = residual * (2.0 / residual.numel())
    symmetric = (d_gram + d_gram.t()) / k
    if flat.t().is_contiguous() and not flat.is_contiguous():  # channels_last: (H*W, C) rows times a C x C matrix
        grad = (flat.t() @ symmetric).t()
    else:
        grad = symmetric @ flat
    return loss, _from_channel_matrix(grad, masked_features)


def content_loss(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return ``mean((F - target)^2)`` over C x H x W (neural_gram.lua L327-352)."""
    return torch.mean((features - target) ** 2)


def content_loss_and_gradient(features: torch.Tensor, target: torch.Tensor,
                              count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (``content_loss(features, target)``, its gradient ``2 (F - target) / numel``) in closed form.

    ``count``: the number of elements the mean runs over (default ``features.numel()``). A window of a map where
    F = target outside the window (masked features and target) passes the whole map's count: same loss, and the
    gradient on the window.
    """
    diff = features - target
    count = diff.numel() if count is None else count
    loss = torch.sum(diff**2) / count
    return loss, diff.mul_(2.0 / count)


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
