"""MACE, Mass Concept Erasure (Lu et al., CVPR 2024): a closed-form refinement of the
cross-attention key and value projections, one LoRA per concept trained to take the
concept's attention out of its region, and a closed-form fusion of the LoRAs.

For every ``attn2.to_k`` and ``attn2.to_v`` weight ``W₀`` (out × d), three stages:

1. **Closed-form refinement (CFR).** Each concept ``c`` is written into ``templates``
   (the code's 30 object prompts, "A photo of {}" …) and so is its anchor (the code's
   ``mapping_concept``). The rows of the two prompts are aligned as the code's
   ``find_matching_indices`` does: the common leading tokens (start token and words
   before the concept), the common trailing tokens (the words after it and the end
   token), then the padding, shifted so that both run to the prompt's length. The
   concept's own tokens are not among them: CFR takes the concept's *residual*
   information out of the words around it (the README's "surrounding words"), the LoRA
   stage handles the concept's tokens. With ``c_k`` those rows of the concept prompt,
   ``a_k`` the aligned anchor rows and ``p_j`` every row of every ``preserve`` prompt:

       W₁ = argmin Σ_k ‖W c_k − W₀ a_k‖² + s_p Σ_j ‖W p_j − W₀ p_j‖² + λ ‖W − W₀‖²

   one solve for all concepts together, as the code's ``closed_form_refinement``.
2. **LoRA per concept** (:mod:`receler.methods.mace_lora`). On the refined UNet, a
   rank-``rank`` LoRA on every ``to_k``/``to_v`` is trained for ``steps`` steps on
   ``Σ_layers ‖A[mask, positions]‖_F``: the cross-attention probabilities, every head,
   of the concept's tokens (and, with ``use_pooler``, of every end-token position, which
   on a tokenizer that pads with the end token is all the padding too) at the pixels of
   the concept's region, on noised images of the concept drawn by the base model.
3. **Fusion**: ``ΔW_i`` being concept ``i``'s LoRA and ``q`` every row of every template
   prompt of concept ``i``,

       W* = argmin Σ_i Σ_q ‖W q − (W₁ + ΔW_i) q‖² + s_p Σ_j ‖W p_j − W₀ p_j‖² + λ ‖W − W₁‖²

   (the code's ``fuse_lora_close_form.py``). With one concept, no λ and no preserved
   prompts, ``W*`` is the LoRA-fused ``W₁ + ΔW₁``.

Defaults, from Shilin-LU/MACE: ``configs/object/erase_{ship,automobile,bird}.yaml``
(``lamb`` 1e3, 1e2 and 1e1: 1e2 here; ``rank: 1``, ``learning_rate: 1.0e-05``,
``max_train_steps: 50``, ``train_batch_size: 1``, ``train_preserve_scale`` and
``fuse_preserve_scale`` 0, i.e. nothing preserved; ``use_pooler``, ``augment`` with
``aug_length: 30`` of ``prompt_len: 30`` templates, ``importance_sampling``, ``seed:
2024``, ``adam_weight_decay: 0.01``, ``max_grad_norm: 1.``); ``src/cfr_utils.py``
(the templates, the row alignment, the attention loss, ``importance_sampling_fn``);
``data_preparation.py`` and ``inference.py`` (8 images of "a photo of the {c}", 30
steps, guidance 7.5). The celebrity and explicit configs use λ = 0 and preserve a
cache of MS-COCO captions (every position, ``src/cache_coco.py``) at 1e-4 and 7e-7; here
the ``preserve`` prompts take the cache's place, weighted by ``preserve_scale`` once
(the code's training stage multiplies its cache by ``train_preserve_scale`` twice).

Substitutions. The code segments each image with Grounded-SAM; receler has no
segmenter, so the region comes from the base model itself while it draws the image
(``mask_source``): the concept tokens' cross-attention (``attention``) or
``|ε(c) − ε(∅)|`` (``guidance``, the toy model's choice: its cross-attention on the
concept is high on the background), averaged over the sampling steps, min-max
normalised and thresholded at ``mask_threshold``; ``none`` takes every pixel (the code's
style path). Images are DDIM latents, not VAE-encoded pictures. The importance
sampling's window (t = 200 … 400 of 1000) scales with the scheduler's
``num_train_timesteps``. Everything is solved in float64.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..pipeline import encode
from .uce import original_weights

# src/cfr_utils.py, prompt_augmentation: the first 30 (aug_length of prompt_len) are used.
OBJECT_TEMPLATES = [
    "{} in a photo", "{} in a snapshot", "A snapshot of {}", "A photograph showcasing {}",
    "An illustration of {}", "A digital rendering of {}", "A visual representation of {}",
    "A graphic of {}", "A shot of {}", "A photo of {}", "A black and white image of {}",
    "A depiction in portrait form of {}", "A scene depicting {} during a public gathering",
    "{} captured in an image", "A depiction created with oil paints capturing {}",
    "An image of {}", "A drawing capturing the essence of {}",
    "An official photograph featuring {}", "A detailed sketch of {}",
    "{} during sunset/sunrise", "{} in a detailed portrait", "An official photo of {}",
    "Historic photo of {}", "Detailed portrait of {}", "A painting of {}", "HD picture of {}",
    "Magazine cover capturing {}", "Painting-like image of {}", "Hand-drawn art of {}",
    "An oil portrait of {}"]
STYLE_TEMPLATES = [
    "An artwork by {}", "Art piece by {}", "A recent creation by {}", "{}'s renowned art",
    "Latest masterpiece by {}", "A stunning image by {}", "An art in {}'s style",
    "Exhibition artwork of {}", "Art display by {}", "a beautiful painting by {}",
    "An image inspired by {}'s style", "A sketch by {}", "Art piece representing {}",
    "A drawing by {}", "Artistry showcasing {}", "An illustration by {}",
    "A digital art by {}", "A visual art by {}",
    "A reproduction inspired by {}'s colorful, expressive style", "Famous painting of {}",
    "A famous art by {}", "Artistic style of {}", "{}'s famous piece", "Abstract work of {}",
    "{}'s famous drawing", "Art from {}'s early period", "A portrait by {}",
    "An imitation reflecting the style of {}", "An painting from {}'s collection",
    "Vibrant reproduction of artwork by {}"]
MASK_SOURCES = ("attention", "guidance", "none")


def _number(name: str, value, *, whole: bool = False, positive: bool = False) -> None:
    """A one-line ValueError unless ``value`` is a (whole) number >= 0 (> 0 if ``positive``)."""
    kind, what = (int, "a whole number") if whole else (int | float, "a number")
    if isinstance(value, bool) or not isinstance(value, kind) or not value >= 0:
        raise ValueError(f"MACE {name} must be {what} >= 0, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"MACE {name} must be > 0, got {value!r}")


@dataclass
class MaceOptions:
    """Settings of ``mace`` beyond :class:`~receler.config.TrainConfig`'s ``concepts``."""

    anchor: str | list[str] = field(default="", metadata={
        "help": "the code's mapping_concept: what each concept's prompts are mapped to (\"\" "
                "= the template without it); one for all, or a list with one per concept"})
    templates: str | list[str] = field(default="object", metadata={
        "help": "prompts of each concept: object or style (the code's 30), or a list (or "
                "'|'-separated string) of templates with {}"})
    preserve: list[str] = field(default_factory=list, metadata={
        "help": "prompts whose outputs are kept (every position; the code's COCO cache)"})
    preserve_scale: float = field(default=1.0, metadata={
        "help": "s_p: weight of the preserved rows in the refinement and the fusion"})
    lamb: float = field(default=100.0, metadata={
        "help": "λ: weight of ‖W − W_start‖² in both solves (code: 10-1000 for objects)"})
    rank: int = field(default=1, metadata={"help": "rank of each concept's LoRA"})
    lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate of the LoRAs"})
    steps: int = field(default=50, metadata={
        "help": "LoRA steps per concept, batch 1 (0: refinement and fusion only)"})
    importance_sampling: bool = field(default=True, metadata={
        "help": "draw t from the code's window f(t) (200 < t < 400 of 1000), else uniformly"})
    use_pooler: bool = field(default=True, metadata={
        "help": "also suppress the end-token positions' attention (with padding = end token, "
                "the padding's too)"})
    images: int = field(default=8, metadata={"help": "base-model images per concept"})
    image_prompt: str = field(default="a photo of the {}", metadata={
        "help": "prompt of those images ({} = the concept)"})
    image_steps: int = field(default=30, metadata={"help": "DDIM steps of those images"})
    image_guidance: float = field(default=7.5, metadata={"help": "their guidance scale"})
    mask_source: str = field(default="attention", metadata={
        "help": "region of the attention loss: attention (the concept's cross-attention), "
                "guidance (|ε(c) − ε(∅)|) or none (every pixel)"})
    mask_threshold: float = field(default=0.5, metadata={
        "help": "threshold of the min-max normalised map"})
    seed: int = field(default=2024, metadata={"help": "seed of LoRA init, images and steps"})

    def __post_init__(self):
        if isinstance(self.preserve, str):
            self.preserve = [p.strip() for p in self.preserve.split(",") if p.strip()]
        if isinstance(self.templates, str) and self.templates not in ("object", "style"):
            self.templates = [t.strip() for t in self.templates.split("|") if t.strip()]
        if isinstance(self.templates, list):
            bad = [t for t in self.templates if not isinstance(t, str) or t.count("{}") != 1]
            if bad or not self.templates:
                raise ValueError(f"MACE templates must be object, style or templates with one "
                                 f"{{}} each, got {bad[0] if bad else self.templates!r}")
        if self.mask_source not in MASK_SOURCES:
            raise ValueError(f"MACE mask_source must be one of {', '.join(MASK_SOURCES)}, got "
                             f"{self.mask_source!r}")
        for name in ("importance_sampling", "use_pooler"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MACE {name} must be true or false, got "
                                 f"{getattr(self, name)!r}")
        if "{}" not in self.image_prompt:
            raise ValueError(f"MACE image_prompt must hold {{}} for the concept, got "
                             f"{self.image_prompt!r}")
        for name in ("preserve_scale", "lamb", "image_guidance"):
            _number(name, getattr(self, name))
        for name in ("steps", "seed"):
            _number(name, getattr(self, name), whole=True)
        for name in ("rank", "images", "image_steps"):
            _number(name, getattr(self, name), whole=True, positive=True)
        _number("lr", self.lr, positive=True)
        if not 0.0 <= self.mask_threshold <= 1.0:
            raise ValueError(f"MACE mask_threshold must lie in [0, 1], got {self.mask_threshold}")

    @property
    def template_list(self) -> list[str]:
        if isinstance(self.templates, list):
            return self.templates
        return OBJECT_TEMPLATES if self.templates == "object" else STYLE_TEMPLATES

    def anchors(self, concepts: list[str]) -> list[str]:
        if isinstance(self.anchor, str):
            return [self.anchor] * len(concepts)
        if len(self.anchor) != len(concepts):
            raise ValueError(f"{len(self.anchor)} MACE anchors for {len(concepts)} concepts: give "
                             "one anchor for all, or one per concept")
        return list(self.anchor)

    def kept_prompts(self, concepts: list[str]) -> list[str]:
        """``preserve`` without the prompts naming an erased concept (as UCE)."""
        words = [re.compile(r"\b" + re.escape(c.strip().lower()) + r"\b") for c in concepts]
        return [p for p in self.preserve if p and not any(w.search(p.lower()) for w in words)]


def aligned_positions(old: list[int], new: list[int], length: int
                      ) -> tuple[list[int], list[int]]:
    """The code's ``find_matching_indices`` and its extension: positions of the common
    leading and trailing tokens of two tokenised prompts (start and end tokens included),
    then the padding of each, the longer prompt's cut so both lists are equally long."""
    start = 0
    while start < min(len(old), len(new)) and old[start] == new[start]:
        start += 1
    end_old, end_new = len(old) - 1, len(new) - 1
    while end_old >= start and end_new >= start and old[end_old] == new[end_new]:
        end_old, end_new = end_old - 1, end_new - 1
    a = list(range(start)) + list(range(end_old + 1, len(old)))
    b = list(range(start)) + list(range(end_new + 1, len(new)))
    shift = a[-1] - b[-1]
    a += list(range(a[-1] + 1, length - max(0, -shift)))
    b += list(range(b[-1] + 1, length - max(0, shift)))
    return a, b


def _token_ids(tokenizer, text: str, length: int) -> list[int]:
    ids = tokenizer(text)["input_ids"]
    if len(ids) > length:
        raise ValueError(f"MACE prompt {text!r} has {len(ids)} tokens, more than the model's "
                         f"{length}: shorten the template or the concept")
    return ids


@torch.no_grad()
def cfr_rows(pipe, concepts: list[str], options: MaceOptions
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1's aligned ``(c, a)`` rows, each ``(R, d)`` float64: the concept prompts' rows
    around the concept and the anchor prompts' rows they are mapped to."""
    old_rows, new_rows = [], []
    for concept, anchor in zip(concepts, options.anchors(concepts), strict=True):
        olds = [t.format(concept) for t in options.template_list]
        news = [t.format(anchor).strip() for t in options.template_list]
        hidden = encode(pipe, olds + news).hidden.double()  # (2P, T, d)
        length = hidden.shape[1]
        for k, (o, n) in enumerate(zip(olds, news, strict=True)):
            a, b = aligned_positions(_token_ids(pipe.tokenizer, o, length),
                                     _token_ids(pipe.tokenizer, n, length), length)
            old_rows.append(hidden[k, a])
            new_rows.append(hidden[len(olds) + k, b])
    return torch.cat(old_rows), torch.cat(new_rows)


@torch.no_grad()
def preserved_rows(pipe, concepts: list[str], options: MaceOptions) -> torch.Tensor:
    """``(P·T, d)``: every row of every kept ``preserve`` prompt (float64; may be empty)."""
    kept = options.kept_prompts(concepts)
    if not kept:
        empty = encode(pipe, [""]).hidden
        return empty.new_zeros((0, empty.shape[-1])).double()
    return encode(pipe, kept).hidden.flatten(0, 1).double()


@torch.no_grad()
def concept_rows(pipe, concept: str, options: MaceOptions) -> torch.Tensor:
    """``(P·T, d)``: every row of every template prompt of ``concept`` (stage 3)."""
    return encode(pipe, [t.format(concept) for t in options.template_list]
                  ).hidden.flatten(0, 1).double()


def ridge_solve(start: torch.Tensor, lamb: float,
                pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``argmin_W Σ ‖W c − v‖² + λ ‖W − start‖²`` over the ``(c (R, d), v (R, out))``
    pairs: ``(λ start + Σ vᵀc)(λ I + Σ cᵀc)⁻¹`` (float64)."""
    d = start.shape[1]
    lhs = lamb * start  # (out, d)
    rhs = lamb * torch.eye(d, dtype=torch.float64, device=start.device)  # (d, d)
    for c, v in pairs:
        lhs = lhs + v.T @ c
        rhs = rhs + c.T @ c
    try:
        return torch.linalg.solve(rhs, lhs.T).T  # lhs · rhs⁻¹ (rhs is symmetric)
    except torch.linalg.LinAlgError:
        raise ValueError("MACE's closed form is singular: pass lamb > 0 or preserve prompts "
                         "(the code's celebrity setting lamb=0 needs rows spanning the "
                         "embedding space)") from None


def refine(original: dict[str, torch.Tensor], c: torch.Tensor, a: torch.Tensor,
           keep: torch.Tensor, options: MaceOptions) -> dict[str, torch.Tensor]:
    """Stage 1 for every weight of ``original`` (see the module docstring)."""
    out = {}
    for name, w in original.items():
        if w.shape[1] != c.shape[1]:
            raise ValueError(f"{name} takes {w.shape[1]}-dim text embeddings, the text encoder "
                             f"gives {c.shape[1]}: MACE needs them to match")
        out[name] = ridge_solve(w, options.lamb, [
            (c, a @ w.T), (keep * options.preserve_scale ** 0.5,
                           keep @ w.T * options.preserve_scale ** 0.5)])
    return out


def fuse(original: dict[str, torch.Tensor], refined: dict[str, torch.Tensor],
         deltas: list[dict[str, torch.Tensor]], rows: list[torch.Tensor], keep: torch.Tensor,
         options: MaceOptions) -> dict[str, torch.Tensor]:
    """Stage 3: one weight per name that reproduces each concept's LoRA-fused layer on that
    concept's prompts (``deltas[i]``, ``rows[i]``) and the original on the preserved rows."""
    s = options.preserve_scale ** 0.5
    out = {}
    for name, w1 in refined.items():
        pairs = [(q, q @ (w1 + delta[name]).T) for q, delta in zip(rows, deltas, strict=True)]
        pairs.append((keep * s, keep @ original[name].T * s))
        out[name] = ridge_solve(w1, options.lamb, pairs)
    return out


def mace_weights(pipe, concepts: list[str], options: MaceOptions
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """MACE's edited ``to_k``/``to_v`` weights (UNet untouched) and what it spent.

    Returns:
        ``(weights, info)``: weights keyed by UNet parameter name in the UNet's dtype;
        ``info`` holds ``cfr_rows``, ``preserved_rows``, per concept the LoRA's attention
        loss at the first and last step and the masks' mean area (``lora``), and the
        UNet passes of the LoRA stage (``unet_forward``, ``unet_backward``).
    """
    from .mace_lora import train_concept_loras

    c, a = cfr_rows(pipe, concepts, options)
    keep = preserved_rows(pipe, concepts, options).to(c.device)
    original = original_weights(pipe.unet)
    refined = refine(original, c, a, keep, options)
    deltas, lora_info, passes = train_concept_loras(pipe, concepts, refined, options)
    rows = [concept_rows(pipe, concept, options) for concept in concepts]
    fused = fuse(original, refined, deltas, rows, keep, options)
    params = dict(pipe.unet.named_parameters())
    info = {"cfr_rows": int(c.shape[0]), "preserved_rows": int(keep.shape[0]),
            "lora": lora_info, **passes}
    return {n: w.to(params[n].dtype) for n, w in fused.items()}, info
