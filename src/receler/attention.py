"""Capturing cross-attention probabilities and turning them into concept masks.

diffusers' default SDPA processor never materialises attention probabilities, so
:func:`capture_cross_attention` installs, on the ``attn2`` modules only and only
inside a ``with`` block, a processor that computes them explicitly and records
them keyed by module name. The original processors come back in ``finally``.

The concept mask of Receler: average the probabilities of the concept's tokens
over heads and over the layers of one resolution, min-max normalise per image,
threshold. It is then resized to every layer that has an eraser.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .erasers import find_cross_attention


class CaptureAttnProcessor:
    """Plain (non-fused) attention that records its probabilities.

    Args:
        name: key under which the probabilities are stored.
        store: dict that receives ``(B, heads, HW, tokens)`` probabilities.
        detach: store detached maps (for pictures) instead of maps with a graph.
    """

    def __init__(self, name: str, store: dict[str, torch.Tensor], *, detach: bool = False):
        self.name, self.store, self.detach = name, store, detach

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, seq_len, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, HW, tokens)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        probs = probs.view(batch, attn.heads, *probs.shape[1:])  # (B, heads, HW, tokens)
        self.store[self.name] = probs.detach() if self.detach else probs
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def capture_cross_attention(
    unet: nn.Module, *, detach: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Record cross-attention probabilities of every ``attn2`` inside the block.

    Yields:
        A dict ``{attn2 module name: (B, heads, HW, tokens)}``, filled as the UNet runs.
    """
    store: dict[str, torch.Tensor] = {}
    modules = find_cross_attention(unet)
    originals = {name: m.processor for name, m in modules.items()}
    try:
        for name, m in modules.items():
            m.processor = CaptureAttnProcessor(name, store, detach=detach)
        yield store
    finally:
        for name, m in modules.items():
            m.processor = originals[name]


def layer_hw(num_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Spatial size ``(h, w)`` of a layer with ``num_tokens`` positions in a UNet whose
    latent is ``latent_hw``; each down-sampling halves the size, rounding up."""
    h, w = latent_hw
    while h * w > num_tokens and h > 1:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != num_tokens:
        raise ValueError(f"a layer with {num_tokens} positions does not fit latent size {latent_hw}")
    return h, w


def default_mask_resolution(available: Sequence[int], latent_height: int) -> int:
    """Receler's choice: latent/4 (16 on SD 1.4's 64×64 latent), or the nearest
    resolution that has cross-attention."""
    wanted = max(1, latent_height // 4)
    return min(available, key=lambda r: (abs(r - wanted), -r))


def concept_attention(
    maps: dict[str, torch.Tensor],
    token_indices: Sequence[int],
    latent_hw: tuple[int, int],
    resolution: int | None = None,
) -> torch.Tensor:
    """Average attention on the concept's tokens over heads and the layers at one resolution.

    Args:
        maps: output of :func:`capture_cross_attention`.
        token_indices: positions of the concept's tokens in the prompt.
        latent_hw: the UNet's latent size ``(H, W)``.
        resolution: height of the layers to use; ``None`` picks :func:`default_mask_resolution`.

    Returns:
        ``(B, h, w)`` average attention.
    """
    if not maps:
        raise ValueError("no cross-attention maps were captured: run the UNet inside "
                         "capture_cross_attention(unet)")
    if len(token_indices) == 0:
        raise ValueError("the concept has no tokens: pass a non-empty concept")
    by_res: dict[int, list[torch.Tensor]] = {}
    for probs in maps.values():
        b, _, n, _ = probs.shape
        h, w = layer_hw(n, latent_hw)
        idx = torch.as_tensor(list(token_indices), device=probs.device)
        avg = probs.index_select(-1, idx).mean(dim=(1, 3))  # (B, HW)
        by_res.setdefault(h, []).append(avg.view(b, h, w))
    if resolution is None:
        resolution = default_mask_resolution(sorted(by_res), latent_hw[0])
    if resolution not in by_res:
        raise ValueError(
            f"no cross-attention layer at resolution {resolution}; this UNet has {sorted(by_res)}"
        )
    return torch.stack(by_res[resolution], dim=0).mean(0)


def guidance_map(e_uncond: torch.Tensor, e_cond: torch.Tensor, resolution: int) -> torch.Tensor:
    """Where the concept changes the frozen UNet's prediction: ``|ε(c) − ε(∅)|`` averaged over
    channels and pooled to ``resolution`` rows, ``(B, h, w)``. A concept map for models whose
    cross-attention does not single out the concept's pixels."""
    diff = (e_cond.float() - e_uncond.float()).abs().mean(dim=1, keepdim=True)  # (B, 1, H, W)
    h, w = diff.shape[-2:]
    size = (resolution, max(1, round(resolution * w / h)))
    return F.adaptive_avg_pool2d(diff, size).squeeze(1)


def binary_mask(attention: torch.Tensor, threshold: float) -> torch.Tensor:
    """Min-max normalise each ``(h, w)`` map and threshold it: 1 = concept, 0 = elsewhere."""
    flat = attention.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    norm = (flat - lo) / (hi - lo).clamp_min(1e-12)
    return (norm >= threshold).to(attention.dtype).view_as(attention)


def resize_mask(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Resize a ``(B, h, w)`` binary mask. Down-sampling uses max-pooling so that a layer
    never penalises a position that holds some of the concept; up-sampling is nearest."""
    if tuple(mask.shape[-2:]) == tuple(hw):
        return mask
    x = mask.unsqueeze(1)
    if hw[0] <= mask.shape[-2] and hw[1] <= mask.shape[-1]:
        x = F.adaptive_max_pool2d(x, hw)
    else:
        x = F.interpolate(x, size=hw, mode="nearest")
    return x.squeeze(1)
