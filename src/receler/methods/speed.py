"""SPEED, Scalable, Precise and Efficient concept Erasure (Li et al., ICLR 2026): a closed-form
edit of the cross-attention value (and optionally key) projections, confined to the null
space of the retained concepts' embeddings so that their outputs do not move.

With row embeddings (each ``(n, d)``) ``T`` of the erased concepts, ``A`` of their anchors,
``C_tt = Tᵀ T`` and ``C_at = Aᵀ T`` (means over the concepts), for every edited weight ``W``
(out × d):

* **retain rows** ``R``: the last word token of every preserved prompt (every position after
  the start token of ``''`` when nothing is preserved), without prompts that contain an
  erased concept's word;
* **IPF** (influence-based prior filtering): keep the rows that the unconstrained edit
  ``E = W (C_at − C_tt)(I + C_tt)⁻¹`` moves more than average, ``‖E r‖ > mean``;
* **DPA** (directed prior augmentation): add ``aug_num`` copies of every retain row,
  perturbed by Gaussian noise projected on ``W``'s weakest right singular vector, again
  keeping those that ``E`` moves more than average;
* ``P``: the projector on the eigenvectors of ``C_rr`` (the mean of ``r rᵀ`` over the rows
  kept) with eigenvalue below ``threshold``, i.e. the retained rows' (near) null space;
* **prior knowledge** ``K``: the empty prompt's start-token row and three k-means centres of
  its other rows, ``(d, 4)``, whose outputs the edit keeps (exactly when ``lamb = 0``);
* ``M = (C_tt P + α I)⁻¹`` with ``α`` = ``retain_scale``, and

      ΔW = W (C_at − C_tt) P (I − M K (Kᵀ P M K + λ I)⁻¹ Kᵀ P) M,    W* = W + ΔW.

``ΔW`` equals ``W (C_at − C_tt) (P C_tt P + α I)⁻¹ P (…)``: a retained row ``r`` with
``P r = 0`` keeps its output exactly. The concept rows are the last word token of each
concept (every position after the start token for ``nudity``, as the code does).

Defaults are those of the public code, Ouxiang-Li/SPEED ``train_erase_null.py``:
``--params V`` (values only), ``--aug_num 10``, ``--threshold 1e-1``, ``--retain_scale
1.0``, ``--lamb 0.0``, IPF on, seed 0; its scripts give ``retain_scale 0.05`` with IPF off
for 10 celebrities and ``retain_scale 0.70, lamb 0.5`` for nudity. Two differences, both
numerical: ``(Kᵀ P M K + λ I)⁻¹`` is a pseudo-inverse (with ``λ = 0`` it is singular when
the prior rows lie in the retained span), and the k-means is our own (Lloyd's algorithm
from seeded random centres, as ``kmeans_pytorch`` starts). The code averages DPA's norms
per chunk of 128 retain rows; here over all rows, the same for up to 128 of them (the toy
model's prompts have 47 rows after the start token). Everything runs in float64 on
the text encoder's outputs; the noise comes from a generator seeded with ``seed``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..pipeline import encode
from .uce import _last_token, original_weights

_PROJECTIONS = {"V": ("to_v",), "K": ("to_k",), "KV": ("to_k", "to_v")}
_ALL_TOKEN_CONCEPTS = ("nudity",)  # the code erases every position for these


@dataclass
class SpeedOptions:
    """Settings of ``speed`` beyond :class:`~receler.config.TrainConfig`'s ``concepts``."""

    anchor: str | list[str] = field(default="", metadata={
        "help": "concept the erased ones are mapped to (\"\" = empty prompt); one for all, "
                "or a list with one per concept"})
    preserve: list[str] = field(default_factory=list, metadata={
        "help": "retain set: prompts whose last word keeps its output (default: the empty "
                "prompt's positions)"})
    params: str = field(default="V", metadata={
        "help": "projections edited: V (to_v, the code's default), K (to_k) or KV"})
    aug_num: int = field(default=10, metadata={
        "help": "DPA: perturbed copies of each retain row (0: no augmentation, no IPF)"})
    threshold: float = field(default=0.1, metadata={
        "help": "eigenvalues of the retain rows' C_rr below this span the null space"})
    retain_scale: float = field(default=1.0, metadata={
        "help": "α: ridge weight of the edit, ‖ΔW‖² (code: 1.0; 0.05 for 10 celebrities)"})
    lamb: float = field(default=0.0, metadata={
        "help": "λ: slack on keeping the prior-knowledge rows (0 = kept exactly)"})
    prior_filter: bool = field(default=True, metadata={
        "help": "IPF: keep only the retain rows the plain edit moves more than average"})
    tokens: str = field(default="auto", metadata={
        "help": "concept rows: last (last word token), all (every position after the start "
                "token) or auto (all for nudity, else last, as the code)"})
    seed: int = field(default=0, metadata={"help": "seed of DPA's noise and the k-means"})

    def __post_init__(self):
        if isinstance(self.preserve, str):
            self.preserve = [p.strip() for p in self.preserve.split(",") if p.strip()]
        if self.params not in _PROJECTIONS:
            raise ValueError(f"SPEED params must be one of {', '.join(_PROJECTIONS)}, got "
                             f"{self.params!r}")
        if self.tokens not in ("auto", "last", "all"):
            raise ValueError(f"SPEED tokens must be auto, last or all, got {self.tokens!r}")
        if not isinstance(self.prior_filter, bool):
            raise ValueError(f"SPEED prior_filter must be true or false, got "
                             f"{self.prior_filter!r}")
        for name in ("aug_num", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SPEED {name} must be a whole number >= 0, got {value!r}")
        for name in ("threshold", "retain_scale", "lamb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"SPEED {name} must be a number >= 0, got {value!r}")
        if self.retain_scale == 0:
            raise ValueError("SPEED retain_scale must be > 0: the edit's solve needs it "
                             "(code default 1.0)")

    def anchors(self, concepts: list[str]) -> list[str]:
        if isinstance(self.anchor, str):
            return [self.anchor] * len(concepts)
        if len(self.anchor) != len(concepts):
            raise ValueError(f"{len(self.anchor)} SPEED anchors for {len(concepts)} concepts: "
                             "give one anchor for all, or one per concept")
        return list(self.anchor)


def speed_parameter_names(unet: torch.nn.Module, params: str = "V") -> list[str]:
    """``{attn2}.to_v.weight`` (and/or ``to_k``) of every cross-attention layer."""
    keep = tuple(f".{p}.weight" for p in _PROJECTIONS[params])
    return [n for n in original_weights(unet) if n.endswith(keep)]


def _rows(pipe, text: str, all_tokens: bool) -> torch.Tensor:
    """``(n, d)``: the last word token's row of ``text``, or every row after the start token."""
    hidden = encode(pipe, [text]).hidden[0].double()  # (T, d)
    if all_tokens:
        return hidden[1:]
    return hidden[[_last_token(pipe.tokenizer, text, hidden.shape[0])]]


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 100) -> torch.Tensor:
    """``(k, d)`` centres of the rows of ``x`` by Lloyd's algorithm from ``k`` random rows."""
    centres = x[torch.randperm(x.shape[0], generator=generator)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centres[j]
                           for j in range(centres.shape[0])])
        if torch.equal(new, centres):
            break
        centres = new
    return centres


def _above_mean(rows: torch.Tensor, erase: torch.Tensor) -> torch.Tensor:
    norms = (rows @ erase.T).norm(dim=1)
    return rows[norms > norms.mean()]


@torch.no_grad()
def speed_weights(pipe, concepts: list[str], options: SpeedOptions
                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """The edited weights (UNet untouched) and a summary of the retain set.

    Returns:
        ``(weights, info)``: weights keyed by UNet parameter name in the UNet's dtype;
        ``info`` holds ``retain_prompts`` (after removing those naming a concept) and
        ``null_dims`` (the null space's dimension, mean over the edited weights).
    """
    gen = torch.Generator().manual_seed(options.seed)
    all_tokens = {"all": True, "last": False}.get(
        options.tokens, [c.strip().lower() for c in concepts] == list(_ALL_TOKEN_CONCEPTS))
    pairs = [(_rows(pipe, c, all_tokens), _rows(pipe, a, all_tokens))
             for c, a in zip(concepts, options.anchors(concepts), strict=True)]
    c_tt = torch.stack([t.T @ t for t, _ in pairs]).mean(0)  # (d, d)
    c_at = torch.stack([a.T @ t for t, a in pairs]).mean(0)  # (d, d)
    d = c_tt.shape[0]
    eye = torch.eye(d, dtype=torch.float64)

    words = [re.compile(r"\b" + re.escape(c.strip().lower()) + r"\b") for c in concepts]
    retain = [p for p in options.preserve if p and not any(w.search(p.lower()) for w in words)]
    null = encode(pipe, [""]).hidden[0].double()  # (T, d)
    if retain:
        ret_rows = torch.cat([_rows(pipe, p, False) for p in retain])  # (P, d)
    else:
        ret_rows = null[1:]  # the code's retain set [''] uses every position after BOS
    prior = torch.cat([null[:1], kmeans(null[1:], 3, gen)]).T  # (d, 4)
    eye_k = torch.eye(prior.shape[1], dtype=torch.float64)

    original = original_weights(pipe.unet)
    names = speed_parameter_names(pipe.unet, options.params)
    params = dict(pipe.unet.named_parameters())
    edited, null_dims = {}, []
    for name in names:
        w = original[name]  # (out, d)
        if w.shape[1] != d:
            raise ValueError(f"{name} takes {w.shape[1]}-dim text embeddings, the text encoder "
                             f"gives {d}: SPEED needs them to match")
        diff = c_at - c_tt
        erase = w @ diff @ torch.linalg.inv(eye + c_tt)  # (out, d): the unconstrained edit
        rows = ret_rows
        if options.aug_num > 0:
            if options.prior_filter:
                rows = _above_mean(rows, erase)
            weakest = torch.linalg.svd(w, full_matrices=False).Vh[-1:]  # (1, d)
            noise = torch.randn((options.aug_num * rows.shape[0], d), generator=gen,
                                dtype=torch.float64)
            perturbed = rows.repeat(options.aug_num, 1) + noise @ weakest.T @ weakest
            rows = torch.cat([rows, _above_mean(perturbed, erase)])
        c_rr = rows.T @ rows / rows.shape[0]  # (d, d)
        evals, evecs = torch.linalg.eigh(c_rr)
        basis = evecs[:, evals < options.threshold]  # (d, k): the retained rows' null space
        null_dims.append(basis.shape[1])
        proj = basis @ basis.T  # P
        m = torch.linalg.inv(c_tt @ proj + options.retain_scale * eye)  # M
        inner = prior.T @ proj @ m @ prior + options.lamb * eye_k  # (4, 4)
        keep = eye - m @ prior @ torch.linalg.pinv(inner) @ prior.T @ proj
        delta = w @ diff @ proj @ keep @ m
        edited[name] = (w + delta).to(params[name].dtype)
    info = {"retain_prompts": len(retain), "null_dims": sum(null_dims) / len(null_dims)}
    return edited, info
