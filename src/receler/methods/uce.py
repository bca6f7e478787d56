"""UCE, Unified Concept Editing (Gandikota et al., 2024): a closed-form edit of the
cross-attention key and value projections, no training loop.

For every ``attn2.to_k`` and ``attn2.to_v`` weight ``W`` (out × d), with text-encoder
output rows ``c`` (d):

    W* = (λ W + s_e Σ_i v*_i c_iᵀ + s_p Σ_j W c_j c_jᵀ) (λ I + s_e Σ_i c_i c_iᵀ + s_p Σ_j c_j c_jᵀ)⁻¹

the minimiser of ``s_e Σ‖W' c_i − v*_i‖² + s_p Σ‖W' c_j − W c_j‖² + λ‖W' − W‖²``:

* erased rows ``c_i``: the concept prompt's embedding from its last token to the end
  (the last word and every end/padding position after it, which in CLIP's causal
  encoder all carry the concept), aligned with the anchor prompt's rows from *its* last
  token, ``v*_i = W c_anchor``: the concept now reads as the anchor (default ``""``);
* preserved rows ``c_j``: every position (all of the tokenizer's ``model_max_length``,
  77 on SD) of each preserved prompt, kept at ``W c_j``; a preserved prompt that names an
  erased concept is left out (it would ask for both).

The defaults are those of UCE's reference script (rohitgandikota/unified-concept-editing,
``train-scripts/train_erase.py``, technique ``replace``): the empty prompt ``''`` is always
preserved (``retain_texts = [''] + preserve_concepts``), λ = 0.5 (``edit_model(...,
lamb=0.5)``), s_e = 1 and s_p = max(0.1, 1 / len(retain_texts)) unless given. The options
``preserve_empty=false``, ``lamb=0.1`` and ``preserve_scale=0.1`` give the edit without
the empty-prompt rows (``edit_model``'s own keyword defaults). A bias, if a projection has
one, cancels from both sides and is left alone. The solve runs in float64.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..erasers import find_cross_attention
from ..pipeline import encode


@dataclass
class UceOptions:
    """Settings of ``uce`` beyond :class:`~receler.config.TrainConfig`'s ``concepts``."""

    anchor: str | list[str] = field(default="", metadata={
        "help": "concept the erased ones are mapped to (\"\" = empty prompt); one for all, "
                "or a list with one per concept"})
    preserve: list[str] = field(default_factory=list, metadata={
        "help": "concepts whose cross-attention outputs are kept (optional)"})
    preserve_empty: bool = field(default=True, metadata={
        "help": "also preserve the empty prompt '' (the reference script always does)"})
    lamb: float = field(default=0.5, metadata={
        "help": "λ: weight of ‖W* − W‖² (keeps the edit close to the original)"})
    erase_scale: float = field(default=1.0, metadata={"help": "s_e: weight of the erased rows"})
    preserve_scale: float | None = field(default=None, metadata={
        "help": "s_p: weight of the preserved rows (default max(0.1, 1 / number of preserved "
                "prompts), as in the reference)"})

    def __post_init__(self):
        if isinstance(self.preserve, str):
            self.preserve = [p.strip() for p in self.preserve.split(",") if p.strip()]
        if not isinstance(self.preserve_empty, bool):
            raise ValueError(f"UCE preserve_empty must be true or false, got "
                             f"{self.preserve_empty!r}")
        for name in ("lamb", "erase_scale", "preserve_scale"):
            value = getattr(self, name)
            if value is None and name == "preserve_scale":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"UCE {name} must be a number >= 0, got {value!r}")
        if self.lamb == 0 and self.erase_scale == 0:
            raise ValueError("UCE needs lamb > 0 or erase_scale > 0 for a solvable edit")

    @property
    def preserved_prompts(self) -> list[str]:
        """The prompts whose rows are kept: ``''`` first (unless off), then ``preserve``."""
        return ([""] if self.preserve_empty else []) + [p for p in self.preserve if p]

    @property
    def scale_preserved(self) -> float:
        """s_p: as given, else the reference's max(0.1, 1 / len(retain_texts))."""
        return self.preserve_weight(self.preserved_prompts)

    def kept_prompts(self, concepts: list[str]) -> list[str]:
        """:attr:`preserved_prompts` without those that name an erased concept (as a word):
        a row cannot be both erased and kept, so a preserve list of every class serves
        whichever of them is erased (SPEED's code drops such prompts the same way)."""
        words = [re.compile(r"\b" + re.escape(c.strip().lower()) + r"\b") for c in concepts]
        return [p for p in self.preserved_prompts if not any(w.search(p.lower()) for w in words)]

    def preserve_weight(self, kept: list[str]) -> float:
        """s_p for the prompts ``kept``: as given, else max(0.1, 1 / len(kept))."""
        if self.preserve_scale is not None:
            return float(self.preserve_scale)
        return max(0.1, 1.0 / max(1, len(kept)))

    def anchors(self, concepts: list[str]) -> list[str]:
        if isinstance(self.anchor, str):
            return [self.anchor] * len(concepts)
        if len(self.anchor) != len(concepts):
            raise ValueError(f"{len(self.anchor)} UCE anchors for {len(concepts)} concepts: give "
                             "one anchor for all, or one per concept")
        return list(self.anchor)


def uce_parameter_names(unet: torch.nn.Module) -> list[str]:
    """``{attn2}.to_k.weight`` and ``{attn2}.to_v.weight`` of every cross-attention layer."""
    return [f"{name}.{proj}.weight" for name in find_cross_attention(unet)
            for proj in ("to_k", "to_v")]


def count_uce_parameters(unet: torch.nn.Module) -> int:
    params = dict(unet.named_parameters())
    return sum(params[n].numel() for n in uce_parameter_names(unet))


def _last_token(tokenizer, text: str, length: int) -> int:
    """Position of the prompt's last word token (0, the start token, for ``""``)."""
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return min(n, length - 2)


@torch.no_grad()
def uce_rows(pipe, concept: str, anchor: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned ``(c_i, c_anchor)`` rows, each ``(R, d)``, of a concept and its anchor."""
    hc, ha = encode(pipe, [concept, anchor]).hidden.float()  # (T, d) each
    length = hc.shape[0]
    i, j = _last_token(pipe.tokenizer, concept, length), _last_token(pipe.tokenizer, anchor, length)
    rows = length - max(i, j)
    return hc[i:i + rows], ha[j:j + rows]


@torch.no_grad()
def closed_form_edit(weights: dict[str, torch.Tensor], c_erase: torch.Tensor,
                     c_anchor: torch.Tensor, c_keep: torch.Tensor, *, lamb: float,
                     erase_scale: float, preserve_scale: float) -> dict[str, torch.Tensor]:
    """UCE's solve for every weight ``W`` of ``weights`` (float64 in, float64 out):

    ``W* = (λ W + s_e (W c_a)ᵀ c_e + s_p (W c_k)ᵀ c_k) (λ I + s_e c_eᵀ c_e + s_p c_kᵀ c_k)⁻¹``

    Args:
        weights: ``{name: (out, d)}``, the weights the edit starts from (and stays close to).
        c_erase: ``(R, d)`` rows that should read as ``c_anchor``'s rows.
        c_anchor: ``(R, d)`` rows aligned with ``c_erase``.
        c_keep: ``(K, d)`` rows whose outputs are kept (``K`` may be 0).
    """
    eye = torch.eye(c_erase.shape[1], dtype=torch.float64, device=c_erase.device)
    rhs = (lamb * eye + erase_scale * c_erase.T @ c_erase
           + preserve_scale * c_keep.T @ c_keep)  # (d, d), symmetric
    edited = {}
    for name, w in weights.items():
        if w.shape[1] != c_erase.shape[1]:
            raise ValueError(f"{name} takes {w.shape[1]}-dim text embeddings, the text encoder "
                             f"gives {c_erase.shape[1]}: a closed-form edit needs them to match")
        v_star = c_anchor @ w.T  # (R, out): what the anchor reads as
        lhs = (lamb * w + erase_scale * v_star.T @ c_erase
               + preserve_scale * (c_keep @ w.T).T @ c_keep)  # (out, d)
        edited[name] = torch.linalg.solve(rhs, lhs.T).T  # lhs · rhs⁻¹
    return edited


def uce_inputs(pipe, concepts: list[str], options: UceOptions
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UCE's ``(c_erase, c_anchor, c_keep)`` rows in float64 (see the module docstring);
    ``c_keep`` holds :meth:`UceOptions.kept_prompts`."""
    erase = [uce_rows(pipe, c, a) for c, a in zip(concepts, options.anchors(concepts),
                                                  strict=True)]
    c_erase = torch.cat([c for c, _ in erase]).double()  # (R, d)
    c_anchor = torch.cat([a for _, a in erase]).double()  # (R, d)
    keep = options.kept_prompts(concepts)
    c_keep = (encode(pipe, keep).hidden.flatten(0, 1).double() if keep
              else c_erase.new_zeros((0, c_erase.shape[1])))  # (P·T, d), every position
    return c_erase, c_anchor, c_keep


def original_weights(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The ``to_k``/``to_v`` weights of every cross-attention layer, float64 copies."""
    params = dict(unet.named_parameters())
    return {n: params[n].detach().double() for n in uce_parameter_names(unet)}


@torch.no_grad()
def uce_weights(pipe, concepts: list[str], options: UceOptions) -> dict[str, torch.Tensor]:
    """The edited ``to_k``/``to_v`` weights, keyed by UNet parameter name (UNet untouched)."""
    c_erase, c_anchor, c_keep = uce_inputs(pipe, concepts, options)
    params = dict(pipe.unet.named_parameters())
    edited = closed_form_edit(original_weights(pipe.unet), c_erase, c_anchor, c_keep,
                              lamb=options.lamb, erase_scale=options.erase_scale,
                              preserve_scale=options.preserve_weight(
                                  options.kept_prompts(concepts)))
    return {n: w.to(params[n].dtype) for n, w in edited.items()}
