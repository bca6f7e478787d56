"""The Receler training objective as small pure functions.

* erase loss: ESD-style negative guidance, the erased UNet conditioned on the
  concept must predict ``ε(∅) − η·(ε(c) − ε(∅))`` of the frozen UNet;
* mask loss: eraser output outside the concept mask is penalised;
* anchor loss (optional, not in the paper): what the erasers would add on prompts they
  must leave alone is penalised;
* attack: soft tokens written after the concept tokens are trained so that the
  erased UNet reproduces the frozen ``ε(c)``.

Losses are computed in fp32 whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .attention import layer_hw, resize_mask


def erase_target(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, eta: float) -> torch.Tensor:
    """Negative-guidance target ``ε(∅) − η·(ε(c) − ε(∅))``."""
    eps_uncond, eps_cond = eps_uncond.float(), eps_cond.float()
    return eps_uncond - eta * (eps_cond - eps_uncond)


def erase_loss(eps_erased: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(eps_erased.float(), target.float())


def mask_loss(
    eraser_outputs: dict[str, torch.Tensor], mask: torch.Tensor, latent_hw: tuple[int, int]
) -> torch.Tensor:
    """Concept-localised regularisation, averaged over the erasers.

    For each eraser output ``E`` of shape ``(B, HW, C)`` and the mask ``M`` resized to
    that layer: ``Σ mean_C((1 − M)·E)² / Σ(1 − M)``, the sums running over batch and
    positions. The channel mean (as in the reference code) keeps the weight comparable
    across layers and models of different widths.

    Args:
        eraser_outputs: from :func:`receler.erasers.record_eraser_outputs`.
        mask: ``(B, h, w)`` binary concept mask (1 = concept).
        latent_hw: the UNet's latent size, to find each layer's spatial size.
    """
    if not eraser_outputs:
        raise ValueError("no eraser outputs were recorded: run the UNet inside "
                         "record_eraser_outputs(unet)")
    losses = []
    for out in eraser_outputs.values():
        if out.ndim == 4:  # (B, C, h, w) from a processor that keeps the spatial layout
            out = out.flatten(2).transpose(1, 2)
        b, n, _ = out.shape  # (B, HW, C)
        keep = 1.0 - resize_mask(mask.float(), layer_hw(n, latent_hw)).reshape(b, n, 1)
        losses.append(((keep * out.float()) ** 2).mean(-1).sum() / keep.sum().clamp_min(1.0))
    return torch.stack(losses).mean()


def anchor_loss(eraser_outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean square of what the erasers would add on an anchor prompt, averaged over the
    erasers: ``mean(E²)`` over batch, positions and channels (the mask loss with an empty
    mask, i.e. every position is to be kept)."""
    if not eraser_outputs:
        raise ValueError("no eraser outputs were recorded: run the UNet inside "
                         "shadow_eraser_outputs(unet)")
    return torch.stack([(out.float() ** 2).mean() for out in eraser_outputs.values()]).mean()


def insert_soft_tokens(embeds: torch.Tensor, soft: torch.Tensor, start: int) -> torch.Tensor:
    """Return ``embeds`` with positions ``start … start+K−1`` replaced by ``soft``.

    Built with ``torch.cat`` (not an in-place write into a copy), so gradients flow from
    the UNet back into ``soft``: the attack really reaches the model.

    Args:
        embeds: ``(B, T, D)`` prompt embedding.
        soft: ``(K, D)`` or ``(B, K, D)`` soft tokens.
        start: first replaced position (right after the concept's tokens).
    """
    if soft.ndim == 2:
        soft = soft.unsqueeze(0)
    b, t, _ = embeds.shape
    k = soft.shape[1]
    if start < 1 or start + k > t:
        raise ValueError(f"{k} soft tokens from position {start} do not fit a {t}-token prompt: "
                         "use fewer --adv-tokens or a shorter concept")
    soft = soft.to(embeds.dtype).expand(b, -1, -1)
    return torch.cat([embeds[:, :start], soft, embeds[:, start + k:]], dim=1)


def attack_step(
    soft: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    predict: Callable[[torch.Tensor], torch.Tensor],
    eps_cond_frozen: torch.Tensor,
) -> float:
    """One step of the soft-prompt attack: move ``soft`` so that ``predict(soft)`` (the
    erased UNet under the attacked prompt) matches the frozen model's ``ε(c)``.

    Only ``soft`` receives a gradient; the erasers are untouched.

    Returns:
        The attack loss before the step.
    """
    loss = F.mse_loss(predict(soft).float(), eps_cond_frozen.float())
    (grad,) = torch.autograd.grad(loss, [soft])
    optimizer.zero_grad(set_to_none=True)
    soft.grad = grad
    optimizer.step()
    soft.grad = None
    return loss.item()
