"""RECE, Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024): UCE's closed-form
edit, then rounds that find, in closed form, the text embedding that still regenerates the
concept under the edited weights and erase that embedding as well.

Start: ``W₀`` (every ``attn2.to_k`` and ``attn2.to_v`` weight) and UCE's edit ``W₁`` of
it, with the UCE settings of :class:`ReceOptions` (see :mod:`receler.methods.uce`).
Each round ``r`` then:

1. derives the embedding that makes the edited layers produce what the concept produced
   in the original ones, summed over every edited weight ``n``:

       c' = argmin Σ_n ‖W_r,n c' − W₀,n c‖² + ρ ‖c'‖²
          = (Σ_n W_r,nᵀ W_r,n + ρ I)⁻¹ (Σ_n W_r,nᵀ W₀,n) c

   row by row over all positions of the concept prompt's encoding (``c``: the plain
   concept text, padded to the tokenizer's length);
2. edits the current weights so that ``c'`` reads as the anchor, keeping the preserved
   prompts' outputs and staying close to ``W_r`` (the paper's eq. 3):

       W_r+1 = argmin ‖W c' − W_r c_a‖² + λ₁ Σ_j ‖W c_j − W_r c_j‖² + λ₂ ‖W − W_r‖²

   with the anchor's encoding ``c_a`` at every position and the preserved prompts
   (``''`` plus ``preserve``, without those naming an erased concept, as UCE) at every
   position; solved as UCE's edit.

Each round erases only that round's derived embedding; the concept itself stays erased
through the λ₂ term, which holds the weights near the round's start (as in the public
code, which edits the previous round's model).

Defaults are those of the public code (CharlesGong12/RECE): ``train_object.py`` and
``utils/embedding_calculation/close_form_emb.py`` (``close_form_emb_regzero``, the
``--emb_computing close_regzero`` default): ρ = 1e-3 (``--regular_scale``), λ₁ = 0.1
(``--preserve_scale``), λ₂ = 0.1 (``--lamb``), erase scale 1, ``--epochs 1``, anchor
``' '`` (the code's ``new_texts``, which encodes as ``''``). Its README gives the per-task
values: ρ = 1e-3 and 1 round for styles and objects that UCE leaves partly unerased,
ρ = 0.1 with 3 rounds for nudity (2 for other I2P concepts). The UCE stage uses
:class:`UceOptions`' defaults (UCE's reference script); RECE starts from such a UCE model
with no extra preserved concepts. Everything is solved in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..pipeline import encode
from .uce import UceOptions, closed_form_edit, original_weights, uce_inputs, uce_parameter_names


@dataclass
class ReceOptions(UceOptions):
    """Settings of ``rece``: UCE's (the first edit, and anchor and preserved prompts of
    every round) plus the rounds'."""

    rounds: int = field(default=1, metadata={
        "help": "rounds of derive-and-erase after UCE's edit (public code: 1 for objects and "
                "styles, 3 for nudity)"})
    reg: float = field(default=1e-3, metadata={
        "help": "ρ: weight of ‖c'‖² when deriving the embedding (public code: 1e-3, 0.1 for "
                "nudity)"})
    round_lamb: float = field(default=0.1, metadata={
        "help": "λ₂ of each round's edit: weight of ‖W − W_r‖²"})
    round_preserve_scale: float = field(default=0.1, metadata={
        "help": "λ₁ of each round's edit: weight of the preserved rows"})
    round_erase_scale: float = field(default=1.0, metadata={
        "help": "weight of the derived embedding's rows in each round's edit"})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"RECE rounds must be a whole number >= 0, got {self.rounds!r}")
        for name in ("reg", "round_lamb", "round_preserve_scale", "round_erase_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"RECE {name} must be a number >= 0, got {value!r}")
        if self.reg == 0:
            raise ValueError("RECE reg must be > 0: the derived embedding's solve needs it "
                             "(public code: 1e-3)")
        if self.round_lamb == 0 and self.round_erase_scale == 0:
            raise ValueError("RECE needs round_lamb > 0 or round_erase_scale > 0 for a "
                             "solvable edit")


def derive_embedding(edited: dict[str, torch.Tensor], original: dict[str, torch.Tensor],
                     c: torch.Tensor, reg: float) -> torch.Tensor:
    """RECE's closed form: the rows ``c'`` (T, d) that the ``edited`` weights map closest to
    what ``original`` makes of ``c`` (T, d), with ``reg``·‖c'‖² (all float64)."""
    d = c.shape[1]
    a = reg * torch.eye(d, dtype=torch.float64, device=c.device)  # (d, d)
    b = torch.zeros_like(a)
    for name, w in edited.items():
        a = a + w.T @ w
        b = b + w.T @ original[name]
    coef = torch.linalg.solve(a, b)  # (d, d): c' = coef · c
    return c @ coef.T


def regeneration_gap(edited: dict[str, torch.Tensor], original: dict[str, torch.Tensor],
                     c_in: torch.Tensor, c: torch.Tensor) -> float:
    """``Σ_n ‖W_n c_in − W₀,n c‖ / Σ_n ‖W₀,n c‖``: how far the ``edited`` layers' outputs on
    rows ``c_in`` are from the original layers' on ``c`` (0: ``c_in`` regenerates ``c``)."""
    num = sum((c_in @ w.T - c @ original[n].T).norm() for n, w in edited.items())
    den = sum((c @ original[n].T).norm() for n in edited)
    return float(num / den)


@torch.no_grad()
def rece_weights(pipe, concepts: list[str], options: ReceOptions
                 ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The edited ``to_k``/``to_v`` weights (UNet untouched) and a record per round.

    Returns:
        ``(weights, rounds)``: weights keyed by UNet parameter name, in the UNet's dtype;
        ``rounds[r]`` holds, for the weights at the round's start, ``gap_concept`` (how far
        their outputs on the concept are from the original ones, :func:`regeneration_gap`)
        and ``gap_derived`` (the same for the derived embedding: lower means it brings the
        concept back better).
    """
    original = original_weights(pipe.unet)
    c_erase, c_anchor, c_keep = uce_inputs(pipe, concepts, options)
    weights = closed_form_edit(original, c_erase, c_anchor, c_keep, lamb=options.lamb,
                               erase_scale=options.erase_scale,
                               preserve_scale=options.preserve_weight(
                                   options.kept_prompts(concepts)))
    texts = encode(pipe, list(concepts)).hidden.double()  # (N, T, d), every position
    anchors = encode(pipe, options.anchors(concepts)).hidden.double()  # (N, T, d)
    rounds = []
    for _ in range(options.rounds):
        derived = [derive_embedding(weights, original, c, options.reg) for c in texts]
        rounds.append({  # mean over the concepts
            "gap_concept": sum(regeneration_gap(weights, original, c, c)
                               for c in texts) / len(texts),
            "gap_derived": sum(regeneration_gap(weights, original, c2, c)
                               for c2, c in zip(derived, texts, strict=True)) / len(texts)})
        weights = closed_form_edit(weights, torch.cat(derived), anchors.flatten(0, 1), c_keep,
                                   lamb=options.round_lamb,
                                   erase_scale=options.round_erase_scale,
                                   preserve_scale=options.round_preserve_scale)
    params = dict(pipe.unet.named_parameters())
    assert set(weights) == set(uce_parameter_names(pipe.unet))
    return {n: w.to(params[n].dtype) for n, w in weights.items()}, rounds
