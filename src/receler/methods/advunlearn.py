"""AdvUnlearn (Zhang et al., NeurIPS 2024): adversarial training of the *text encoder*.

The UNet is never changed. The trainable part is the text encoder, and the loss reaches
it through the frozen UNet. One iteration, for the next concept ``c`` in turn:

1. (from iteration ``adv_start`` on) the attack: ``adv_tokens`` soft *word* embeddings,
   put in after the start token and before the prompt's tokens (``prefix_k``), take
   ``adv_steps`` Adam steps (lr ``adv_lr``). Each step draws a fresh ``z_t``, and the UNet,
   under the edited encoder's embedding of ``adv ⊕ c``, must reproduce the frozen model's
   ``ε(z_t, t, c)``. The attack runs in the encoder's *input* space, so its tokens pass
   through the layers being trained;
2. ESD's erase loss: the UNet under the edited encoder's embedding of ``c``
   (``adv ⊕ c`` once the attack runs) must predict ``ε(∅) − η·(ε(c) − ε(∅))`` of the
   frozen model;
3. the retain term (the code's ``--retain_train reg``): on ``retain_batch`` prompts of a
   retain set, drawn without replacement, the UNet under the edited embedding must keep
   the frozen prediction on the prompts' own ``z_t`` (``retain_loss="unet"``), or the
   edited embedding must stay the frozen one (``"embedding"``, which needs no UNet pass);
4. one Adam step on ``erase + retain_weight · retain``.

The frozen model needs no second copy: the UNet is untouched, and every frozen
embedding (``∅``, the concepts, the retain prompts) is encoded once, before training.
``z_t`` comes from the frozen model's DDIM trajectory of the concept, as in the code (the
UNet that samples it is unchanged). Only the trained text-encoder tensors are saved
(``text_encoder_edit.safetensors``). A loaded edit remembers the original values, so
:func:`receler.methods.remove_edit` and :func:`~receler.methods.edit_disabled` restore
the frozen encoder exactly.

Defaults come from the public code, OPTML-Group/AdvUnlearn, ``train-scripts/AdvUnlearn.py``.
Its argparse defaults are 1000 iterations, lr 1e-5, start guidance 3, negative guidance
1, 50 DDIM steps, ``--attack_step 30``, ``--adv_prompt_num 1`` (one token),
``--attack_lr 1e-3``, ``--warmup_iter 200``, ``--attack_type prefix_k``,
``--attack_embd_type word_embd``, ``--attack_method pgd``, ``--retain_batch 5`` and
``--train_method text_encoder_full`` with ``--component all``. Under ``param_choices``
in ``utils/util.py``, that trains every parameter of the transformer layers (self-attention,
MLP, layer norms) and the final layer norm, but not the token or position embeddings.
Where the README's training command differs, we follow it: ``--attack_init random``,
``--retain_train reg``, ``--dataset_retain coco_object`` and ``--retain_loss_w 0.3``. The
argparse defaults there are ``latest``, ``iter``, an invalid ``coco`` and 1.0. The COCO
retain list (``data/prompts/train/coco_object_retain.csv``, 243 prompts "a photo of
{object}") is not shipped here: pass it as ``retain=PATH``.

We differ from the code in a few places. Concepts take turns instead of being drawn at
random, and ``t`` is a DDIM timestep, not a DDPM step drawn inside it (as in
:mod:`receler.methods.esd`). ``adv_tokens`` counts tokens, not words. The prompt's tail
(end and padding tokens) is shifted right to make room for the soft tokens.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attack import text_encoder_hidden
from ..config import TrainConfig
from ..loop import FineTuneLoop, IterationResult
from ..objective import erase_loss, erase_target
from ..pipeline import Conditioning, ddim_scheduler, ddim_until, encode, latent_shape, unet_eps
from ..serialization import (
    CHECKPOINT_FILE,
    optimizer_tensors,
    read_tensors,
    restore_optimizer,
    save_tensors,
)
from ..train import mentions_concept
from .edits import EditConfig, current_edit, mark_unet_edit, restore_unet_edit, unet_edit_disabled

logger = logging.getLogger(__name__)

METHOD = "advunlearn"
TEXT_EDIT_FILE = "text_encoder_edit.safetensors"
TEXT_EDIT_FORMAT = "receler-text-encoder-edit"
PAPER_DEFAULTS = {"iterations": 1000, "lr": 1e-5, "eta": 1.0, "start_guidance": 3.0,
                  "ddim_steps": 50, "adv_steps": 30, "adv_tokens": 1, "adv_lr": 1e-3,
                  "adv_start": 200}
COMPONENTS = ("all", "attn", "ffn")
RETAIN_LOSSES = ("unet", "embedding")
ATTACK_INITS = ("random", "latest")
ATTACK_METHODS = ("pgd", "fast_at")


@dataclass
class AdvUnlearnOptions:
    """Settings of ``advunlearn`` beyond the :class:`~receler.config.TrainConfig` fields."""

    retain: list[str] | str = field(default_factory=list, metadata={
        "help": "retain prompts: a list, one string split on '|', or a .csv (column 'prompt', "
                "the code's format) or .txt file (one per line); prompts that name an erased "
                "concept are dropped; empty = no retain term"})
    retain_weight: float = field(default=0.3, metadata={
        "help": "weight of the retain term (the README's --retain_loss_w 0.3)"})
    retain_batch: int = field(default=5, metadata={"help": "retain prompts per iteration"})
    retain_loss: str = field(default="unet", metadata={
        "help": "'unet': the UNet's prediction under the edited embedding matches the frozen "
                "one on the prompts' own z_t (the code's 'reg'); 'embedding': the edited "
                "embedding matches the frozen one (no UNet pass)"})
    component: str = field(default="all", metadata={
        "help": "what of each transformer layer trains: all, attn (self-attention) or ffn"})
    layers: int | None = field(default=None, metadata={
        "help": "train only the first N transformer layers (None: all, text_encoder_full)"})
    final_layer_norm: bool = field(default=False, metadata={
        "help": "also train the final layer norm when component or layers restrict the set "
                "(with component=all and every layer it always trains, as in the code)"})
    attack_init: str = field(default="random", metadata={
        "help": "soft tokens start each round from random vocabulary words ('random', the "
                "README) or from the previous round's tokens ('latest')"})
    attack_method: str = field(default="pgd", metadata={
        "help": "'pgd': Adam steps on the gradient; 'fast_at': on its sign"})

    def __post_init__(self):
        if not isinstance(self.retain, str | list) or (
                isinstance(self.retain, list) and not all(isinstance(p, str) for p in self.retain)):
            raise ValueError(f"AdvUnlearn retain must be a list of prompts, a '|'-separated "
                             f"string or a file path, got {self.retain!r}")
        w = self.retain_weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w < float("inf"):
            raise ValueError(f"AdvUnlearn retain_weight must be a number >= 0, got {w!r}")
        for name in ("retain_batch", "layers"):
            value = getattr(self, name)
            if value is None and name == "layers":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"AdvUnlearn {name} must be a whole number > 0, got {value!r}")
        for name, allowed in (("retain_loss", RETAIN_LOSSES), ("component", COMPONENTS),
                              ("attack_init", ATTACK_INITS), ("attack_method", ATTACK_METHODS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"AdvUnlearn {name} must be one of {', '.join(allowed)}, got "
                                 f"{getattr(self, name)!r}")
        if not isinstance(self.final_layer_norm, bool):
            raise ValueError(f"AdvUnlearn final_layer_norm must be true or false, got "
                             f"{self.final_layer_norm!r}")

    def retain_prompts(self, concepts: list[str]) -> list[str]:
        """The retain set, without the prompts that name an erased concept."""
        if isinstance(self.retain, list):
            prompts = list(self.retain)
        elif self.retain.endswith((".csv", ".txt")):
            prompts = _read_prompt_file(Path(self.retain))
        else:
            prompts = self.retain.split("|")
        prompts = [p.strip() for p in prompts if p.strip()]
        return [p for p in prompts if not mentions_concept(p, concepts)]


def _read_prompt_file(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"AdvUnlearn retain file {path} does not exist: pass a .csv with "
                                "a 'prompt' column or a .txt with one prompt per line")
    if path.suffix == ".txt":
        return path.read_text().splitlines()
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "prompt" not in rows[0]:
        raise ValueError(f"AdvUnlearn retain file {path} has no 'prompt' column")
    return [r["prompt"] for r in rows]


# --------------------------------------------------------------------------- parameters
def _clip_types():
    from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention, CLIPEncoderLayer

    return CLIPEncoderLayer, CLIPAttention, CLIPMLP


def advunlearn_parameter_names(text_encoder: torch.nn.Module,
                               options: AdvUnlearnOptions | None = None) -> list[str]:
    """Names of the text-encoder parameters AdvUnlearn trains, in ``named_parameters``
    order; found by module type (CLIP's encoder layers, attention and MLP blocks)."""
    opts = options or AdvUnlearnOptions()
    layer_t, attn_t, mlp_t = _clip_types()
    layers = [m for m in text_encoder.modules() if isinstance(m, layer_t)]
    if not layers:
        raise ValueError(f"advunlearn trains the transformer layers of a CLIP text encoder; "
                         f"{type(text_encoder).__name__} has none")
    if opts.layers is not None and opts.layers > len(layers):
        raise ValueError(f"AdvUnlearn layers={opts.layers}, but the text encoder has "
                         f"{len(layers)} transformer layers")
    chosen = layers[:opts.layers]
    if opts.component != "all":
        kind = attn_t if opts.component == "attn" else mlp_t
        chosen = [m for layer in chosen for m in layer.modules() if isinstance(m, kind)]
    ids = {id(p) for m in chosen for p in m.parameters()}
    final = getattr(getattr(text_encoder, "text_model", text_encoder), "final_layer_norm", None)
    full = opts.component == "all" and opts.layers is None
    if final is not None and (full or opts.final_layer_norm):
        ids |= {id(p) for p in final.parameters()}
    return [n for n, p in text_encoder.named_parameters() if id(p) in ids]


def count_advunlearn_parameters(text_encoder: torch.nn.Module,
                                options: AdvUnlearnOptions | None = None) -> int:
    params = dict(text_encoder.named_parameters())
    return sum(params[n].numel() for n in advunlearn_parameter_names(text_encoder, options))


# --------------------------------------------------------------------------- the edit
def save_text_encoder_edit(text_encoder: torch.nn.Module, values: dict[str, torch.Tensor],
                           out_dir: Path) -> Path:
    """Atomically write the changed text-encoder tensors ``values`` (by parameter name)."""
    params = dict(text_encoder.named_parameters())
    missing = [n for n in values if n not in params]
    if missing:
        raise ValueError(f"the text encoder has no parameter {missing[0]}")
    path = Path(out_dir) / TEXT_EDIT_FILE
    save_tensors(path, values, {"format": TEXT_EDIT_FORMAT, "method": METHOD})
    return path


def read_text_encoder_edit(text_encoder: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Read ``text_encoder_edit.safetensors``, checked against ``text_encoder`` (unchanged)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {TEXT_EDIT_FILE} in {path.parent}: pass the --out folder "
                                f"of a finished {METHOD} run")
    tensors, meta = read_tensors(path)
    if meta.get("format") != TEXT_EDIT_FORMAT or meta.get("method") != METHOD:
        raise ValueError(f"{path} is not a receler {METHOD} text-encoder edit (format "
                         f"{meta.get('format')!r}, method {meta.get('method')!r})")
    params = dict(text_encoder.named_parameters())
    for name, value in tensors.items():
        if name not in params:
            raise ValueError(f"edit file {path} changes parameter {name}, which this text "
                             "encoder does not have: it was made for another model")
        if value.shape != params[name].shape:
            raise ValueError(f"edit file {path} has shape {tuple(value.shape)} for {name}, this "
                             f"text encoder expects {tuple(params[name].shape)}: it was made "
                             "for another model")
    return tensors


@torch.no_grad()
def apply_text_encoder_edit(text_encoder: torch.nn.Module, tensors: dict[str, torch.Tensor], *,
                            keep_original: bool = True) -> None:
    """Copy checked ``tensors`` into the text encoder, remembering the originals."""
    if current_edit(text_encoder) is not None:
        raise ValueError("this text encoder already holds an edit: call remove_edit(pipe) first")
    params = dict(text_encoder.named_parameters())
    original = {n: params[n].detach().clone() for n in tensors} if keep_original else None
    for name, value in tensors.items():
        params[name].copy_(value.to(params[name].device, params[name].dtype))
    mark_unet_edit(text_encoder, METHOD, original)  # the marker is module-generic


def text_encoder_edit(pipe) -> dict | None:
    """The edit on ``pipe.text_encoder`` (``None``: none, or the pipeline has no encoder)."""
    te = getattr(pipe, "text_encoder", None)
    return None if te is None else current_edit(te)


def restore_text_encoder_edit(pipe) -> str | None:
    """Put the frozen text encoder back; returns the removed method, ``None`` if none."""
    return restore_unet_edit(pipe.text_encoder) if text_encoder_edit(pipe) else None


@contextmanager
def text_encoder_edit_disabled(pipe) -> Iterator[None]:
    """The original text encoder inside the block (storage pointer swaps, no copy)."""
    if text_encoder_edit(pipe) is None:
        yield
        return
    with unet_edit_disabled(pipe.text_encoder):
        yield


# --------------------------------------------------------------------------- training
class AdvUnlearnTrainer(FineTuneLoop):
    """Trains ``pipe.text_encoder`` to erase ``config.concepts`` (see the module docstring).

    Uses ``config``'s ``iterations``, ``lr``, ``eta``, ``start_guidance``, ``ddim_steps``,
    ``zt_reuse``, ``adv_steps``, ``adv_tokens``, ``adv_lr``, ``adv_start``, ``seed`` and
    ``checkpoint_every``, and ``options`` (:class:`AdvUnlearnOptions`).
    """

    desc = METHOD

    def __init__(self, pipe, config: TrainConfig, out_dir: Path, *,
                 options: AdvUnlearnOptions | None = None, base_model: str = "",
                 callbacks: list[Callable] | None = None, show_progress: bool = True):
        self._init_loop(config, out_dir, callbacks, show_progress)
        self.pipe, self.base_model = pipe, base_model
        self.opts = options or AdvUnlearnOptions()
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise ValueError("advunlearn trains one CLIP text encoder (SD 1.x/2.x); this "
                             "pipeline has two: pass a Stable Diffusion 1.x/2.x model")
        self.te, self.unet, self.tokenizer = pipe.text_encoder, pipe.unet, pipe.tokenizer
        self.names = advunlearn_parameter_names(self.te, self.opts)
        params = dict(self.te.named_parameters())
        self.params = [params[n] for n in self.names]
        self.original = {n: p.detach().clone() for n, p in zip(self.names, self.params, strict=True)}
        self.init_master()  # fp32 masters when the encoder is bf16/fp16
        self.max_len = self.tokenizer.model_max_length
        self.retain = self.opts.retain_prompts(config.concepts)
        if not self.retain and self.opts.retain_weight:
            logger.warning("advunlearn without retain prompts: no retain term (pass "
                           "--method-option retain=...)")
        self.retain_n = min(self.opts.retain_batch, len(self.retain))
        self.ids = {c: self._ids([c]) for c in config.concepts}  # (1, T)
        self.words = {c: len(self.tokenizer(c, add_special_tokens=False)["input_ids"])
                      for c in config.concepts}
        for c, n in self.words.items():
            if 2 + n + config.adv_tokens > self.max_len and config.adv_steps:
                raise ValueError(f"concept {c!r} has {n} tokens: with {config.adv_tokens} "
                                 f"adversarial tokens it exceeds the {self.max_len}-token "
                                 f"prompt; pass --adv-tokens {max(0, self.max_len - 2 - n)} or "
                                 "fewer, or shorten the concept")
        self.latent_shape = latent_shape(pipe)
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.optimizer = torch.optim.Adam(self.master or self.params, lr=config.lr)
        self.sched = ddim_scheduler(pipe, config.ddim_steps)
        # the frozen model's embeddings, encoded once (the UNet itself never changes)
        self.uncond = encode(pipe, [""])
        self.cond = {c: encode(pipe, [c]) for c in config.concepts}
        self.retain_cond = encode(pipe, self.retain) if self.retain else None
        self.retain_ids = self._ids(self.retain) if self.retain else None
        self.retain_order: list[int] = []  # retain prompts not yet drawn this round
        self.adv: dict[str, torch.Tensor] = {}  # concept -> (k, D), the latest soft tokens

    # ------------------------------------------------------------------ encoding
    def _ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.max_len,
                              truncation=True, return_tensors="pt").input_ids.to(self.te.device)

    def edited_hidden(self, ids: torch.Tensor, soft: torch.Tensor | None = None) -> torch.Tensor:
        """The edited encoder's embedding ``(B, T, D)`` of ``ids``, with gradients; with
        ``soft``, positions ``1 …`` of the token embeddings are the soft tokens."""
        mask = None
        if getattr(self.te.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()
        return text_encoder_hidden(self.te, ids, soft=soft, start=1,
                                   attention_mask=mask).to(self.uncond.hidden.dtype)

    def prefixed_ids(self, concept: str) -> torch.Tensor:
        """``prefix_k`` ids: start token, ``k`` placeholders (the tokens they push out), the
        concept's tokens, then its end and padding shifted right by ``k``."""
        ids, n, k = self.ids[concept], self.words[concept], self.config.adv_tokens
        return torch.cat([ids[:, :1], ids[:, 1 + n:1 + n + k], ids[:, 1:1 + n],
                          ids[:, 1 + n:self.max_len - k]], 1)

    # ------------------------------------------------------------------ one iteration
    def use_adversary(self) -> bool:
        return self.config.adv_steps > 0 and self.iteration >= self.config.adv_start

    def _random_tokens(self) -> torch.Tensor:
        emb = self.te.get_input_embeddings().weight
        ids = torch.randint(emb.shape[0], (self.config.adv_tokens,), generator=self.generator)
        return emb[ids.to(emb.device)].detach().float().clone()  # (k, D)

    def attack(self, concept: str) -> list[float]:
        """``adv_steps`` Adam steps on the concept's soft tokens, each on a fresh ``z_t``:
        the UNet under the edited ``adv ⊕ c`` must reproduce the frozen ``ε(c)``."""
        cfg = self.config
        init = self.adv.get(concept) if self.opts.attack_init == "latest" else None
        soft = (init if init is not None else self._random_tokens()).clone().requires_grad_(True)
        opt = torch.optim.Adam([soft], lr=cfg.adv_lr)
        ids, cond, losses = self.prefixed_ids(concept), self.cond[concept], []
        for _ in range(cfg.adv_steps):
            _, _, z, t = self.sample_zt()
            with torch.no_grad():
                e_cond = unet_eps(self.unet, z, t, cond)
            pred = unet_eps(self.unet, z, t, cond.with_hidden(self.edited_hidden(ids, soft)))
            loss = F.mse_loss(pred.float(), e_cond.float())
            (grad,) = torch.autograd.grad(loss, [soft])
            soft.grad = grad.sign() if self.opts.attack_method == "fast_at" else grad
            opt.step()
            self.passes(1)
            self.passes(1, backward=True)
            losses.append(loss.item())
        self.adv[concept] = soft.detach()
        return losses

    def next_retain(self) -> list[int]:
        """The next ``retain_batch`` retain prompts, without replacement; a new random
        order once fewer than a batch are left (as the code's ``PromptDataset``)."""
        if len(self.retain_order) < self.retain_n:
            self.retain_order = torch.randperm(len(self.retain), generator=self.generator).tolist()
        batch, self.retain_order = (self.retain_order[:self.retain_n],
                                    self.retain_order[self.retain_n:])
        return batch

    def retain_loss(self, steps_done: int, t) -> tuple[torch.Tensor, int]:
        """The retain term and the UNet samples its backward pass costs."""
        if not self.retain or not self.opts.retain_weight:
            return torch.zeros(()), 0
        idx = self.next_retain()
        frozen = Conditioning(self.retain_cond.hidden[idx])  # (B, T, D)
        edited = self.edited_hidden(self.retain_ids[idx])
        if self.opts.retain_loss == "embedding":
            return F.mse_loss(edited.float(), frozen.hidden.float()), 0
        b = len(idx)
        noise = torch.cat([self._noise() for _ in range(b)])  # (B, C, H, W)
        uncond = self.uncond.with_hidden(self.uncond.hidden.expand(b, -1, -1))
        z = ddim_until(self.pipe, self.sched, noise, uncond, frozen, self.config.start_guidance,
                       steps_done, count=lambda n: self.passes(n * b))
        with torch.no_grad():
            target = unet_eps(self.unet, z, t, frozen)
        self.passes(b)
        return F.mse_loss(unet_eps(self.unet, z, t, frozen.with_hidden(edited)).float(),
                          target.float()), b

    def step(self) -> IterationResult:
        cfg = self.config
        concept = cfg.concepts[self.iteration % len(cfg.concepts)]
        attacked = self.use_adversary()
        attack_losses = self.attack(concept) if attacked else []
        _, steps_done, z, t = self.sample_zt()
        cond = self.cond[concept]
        with torch.no_grad():
            target = erase_target(unet_eps(self.unet, z, t, self.uncond),
                                  unet_eps(self.unet, z, t, cond), cfg.eta)
        self.passes(2)
        hidden = (self.edited_hidden(self.prefixed_ids(concept), self.adv[concept]) if attacked
                  else self.edited_hidden(self.ids[concept]))
        loss_e = erase_loss(unet_eps(self.unet, z, t, cond.with_hidden(hidden)), target)
        loss_r, retained = self.retain_loss(steps_done, t)
        self.update(loss_e + self.opts.retain_weight * loss_r, tuple(attack_losses),
                    samples=1 + retained)
        return IterationResult(self.iteration, concept, steps_done, int(t), loss_e.item(), 0.0,
                               attack_losses, loss_anchor=loss_r.item() if self.retain else None)

    def postfix(self, r: IterationResult) -> dict[str, str]:
        return {"erase": f"{r.loss_erase:.4f}",
                "retain": "-" if r.loss_anchor is None else f"{r.loss_anchor:.4f}",
                "attack": f"{r.loss_attack[-1]:.4f}" if r.loss_attack else "-"}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> Path:
        tensors = {f"params.{n}": p for n, p in zip(self.names, self.trained, strict=True)}
        tensors.update({f"adv.{i}": self.adv[c] for i, c in enumerate(self.config.concepts)
                        if c in self.adv})
        opt_t, opt_meta = optimizer_tensors(self.optimizer, "optim")
        tensors.update(opt_t)
        loop_tensors, meta = self.loop_state()
        tensors.update(loop_tensors)
        meta.update(method=METHOD, optim=opt_meta, base_model=self.base_model,
                    retain_order=self.retain_order)
        path = self.out_dir / CHECKPOINT_FILE
        save_tensors(path, tensors, meta)
        return path

    @torch.no_grad()
    def restore(self, path: Path) -> None:
        tensors, meta = read_tensors(path)
        if meta.get("method") != METHOD:
            raise ValueError(f"checkpoint {path} belongs to method {meta.get('method', 'receler')!r}, "
                             f"not {METHOD!r}: resume it with that method")
        self.check_resumable(path, meta["config"])
        stored = sorted(k[len("params."):] for k in tensors if k.startswith("params."))
        if stored != sorted(self.names):
            raise ValueError(f"checkpoint {path} holds other text-encoder parameters than these "
                             "options train: resume with the same --method-option values")
        self.restore_weights(tensors)
        self.adv = {c: tensors[f"adv.{i}"].to(self.te.device)
                    for i, c in enumerate(self.config.concepts) if f"adv.{i}" in tensors}
        restore_optimizer(self.optimizer, "optim", tensors, meta["optim"])
        self.retain_order = list(meta.get("retain_order", []))
        self.restore_loop_state(tensors, meta)

    # ------------------------------------------------------------------ the loop
    def begin(self) -> None:
        self.te.eval()  # CLIP has no dropout to switch on; as the frozen encoder
        for p in self.params:
            p.requires_grad_(True)

    def end(self) -> None:
        for p in self.params:
            p.requires_grad_(False)
            p.grad = None

    def finish(self) -> EditConfig:
        """Write ``text_encoder_edit.safetensors``; the trained weights stay in
        ``pipe.text_encoder`` with the originals remembered (so the edit can be removed)."""
        save_text_encoder_edit(self.te, dict(zip(self.names, self.trained, strict=True)),
                               self.out_dir)
        mark_unet_edit(self.te, METHOD, self.original)
        cfg = self.config
        return EditConfig(rank=0, concepts=list(cfg.concepts), base_model=self.base_model,
                          method=METHOD, train=cfg.to_dict(), options=asdict(self.opts),
                          stats={"trainable_parameters": sum(p.numel() for p in self.params),
                                 "unet_forward": self.passes.forward,
                                 "unet_backward": self.passes.backward,
                                 "retain_prompts": len(self.retain), "seconds": self.seconds})
