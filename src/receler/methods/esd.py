"""ESD (Gandikota et al., 2023): fine-tune UNet weights with negative guidance.

Same objective and sampler as Receler, without erasers: ``z_t`` is sampled by DDIM with
the model being trained and the concept prompt, the frozen targets ``ε(∅)`` and
``ε(c)`` come from the original weights, and the trained weights make ``ε(z_t, t, c)``
match :func:`~receler.objective.erase_target`.

Which weights (the choice of ESD's reference code, ``train-esd.py``):

* ``esd-x`` (``xattn``): every parameter of every cross-attention layer (``attn2``:
  ``to_q``, ``to_k``, ``to_v``, ``to_out``);
* ``esd-u`` (``noxattn``): every parameter *except* those of ``attn2``, the time
  embedding (LDM ``time_embed`` = diffusers ``time_embedding``) and the output layers
  (LDM ``out.`` = diffusers ``conv_norm_out``/``conv_out``).

Frozen targets without a second UNet: a copy of just the trained parameters is kept
(their original values) and the frozen passes run the same UNet through
``torch.func.functional_call`` with that copy substituted. For ESD-x this copy is the
size of the ``attn2`` weights; for ESD-u it is most of the UNet, which ESD's own code
(a deep copy of the whole model) also pays.

Training is resumable exactly like :class:`receler.train.Trainer` (same generator,
checkpoint of weights + Adam state + RNG state, same ``train_log.jsonl`` rows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch.func import functional_call

from ..config import TrainConfig
from ..erasers import get_erasers
from ..loop import (
    FineTuneLoop,
    IterationResult,
)
from ..objective import erase_loss, erase_target
from ..pipeline import ddim_scheduler, encode, latent_shape, unet_eps
from ..serialization import (
    CHECKPOINT_FILE,
    optimizer_tensors,
    read_tensors,
    restore_optimizer,
    save_tensors,
)
from .edits import EditConfig, mark_unet_edit, save_unet_edit

logger = logging.getLogger(__name__)

VARIANTS = ("esd-x", "esd-u")
# diffusers names of what ESD's `noxattn` leaves frozen besides attn2 (LDM time_embed, out.)
_ESD_U_FROZEN_PREFIXES = ("time_embedding.", "conv_norm_out.", "conv_out.")
PAPER_DEFAULTS = {"lr": 1e-5, "iterations": 1000, "eta": 1.0, "start_guidance": 3.0,
                  "ddim_steps": 50}


def esd_parameter_names(unet: torch.nn.Module, variant: str) -> list[str]:
    """Names of the UNet parameters that ``variant`` trains, in ``named_parameters`` order."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ESD variant {variant!r}: pass one of {VARIANTS}")
    names = []
    for name, _ in unet.named_parameters():
        cross = ".attn2." in f".{name}"
        if variant == "esd-x" and cross:
            names.append(name)
        elif variant == "esd-u" and not cross and not name.startswith(_ESD_U_FROZEN_PREFIXES):
            names.append(name)
    if not names:
        raise ValueError(f"{variant} found no parameters to train in {type(unet).__name__}")
    return names


def count_esd_parameters(unet: torch.nn.Module, variant: str) -> int:
    params = dict(unet.named_parameters())
    return sum(params[n].numel() for n in esd_parameter_names(unet, variant))


class EsdTrainer(FineTuneLoop):
    """Fine-tunes ``pipe.unet``'s ESD-x or ESD-u weights for ``config.concepts``.

    Uses ``config``'s ``iterations``, ``lr``, ``eta``, ``start_guidance``, ``ddim_steps``,
    ``seed`` and ``checkpoint_every``; the eraser, mask and attack fields are ignored.

    Args:
        pipe: a loaded pipeline; its UNet is changed in place.
        config: training settings.
        out_dir: checkpoints, log and the final ``unet_edit.safetensors``.
        variant: ``"esd-x"`` or ``"esd-u"``.
        base_model: recorded in the config.
        callbacks: called as ``cb(trainer, result)`` after every iteration.
    """

    def __init__(self, pipe, config: TrainConfig, out_dir: Path, *, variant: str,
                 base_model: str = "", callbacks: list[Callable] | None = None,
                 show_progress: bool = True):
        self._init_loop(config, out_dir, callbacks, show_progress)
        self.pipe, self.variant, self.base_model = pipe, variant, base_model
        self.desc = variant
        self.unet = pipe.unet
        if get_erasers(self.unet):
            raise ValueError("the UNet has erasers attached: remove_erasers(pipe.unet) first")
        self.latent_shape = latent_shape(pipe)

        self.names = esd_parameter_names(self.unet, variant)
        params = dict(self.unet.named_parameters())
        self.params = [params[n] for n in self.names]
        self.init_master()  # fp32 masters when the UNet is bf16/fp16
        if config.lr > 1e-4:
            logger.warning("ESD with lr=%g: the paper fine-tunes with lr=1e-5", config.lr)
        # The frozen model: original values of the trained parameters only (see module doc).
        self.original = {n: p.detach().clone() for n, p in zip(self.names, self.params, strict=True)}
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.optimizer = torch.optim.Adam(self.master or self.params, lr=config.lr)
        self.sched = ddim_scheduler(pipe, config.ddim_steps)
        self.uncond = encode(pipe, [""])
        self.cond = {c: encode(pipe, [c]) for c in config.concepts}

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    @torch.no_grad()
    def frozen_eps(self, z: torch.Tensor, t, cond) -> torch.Tensor:
        """``ε`` of the original weights: the same UNet with the saved copy substituted."""
        kwargs = {"encoder_hidden_states": cond.hidden}
        if cond.added is not None:
            kwargs["added_cond_kwargs"] = cond.added
        return functional_call(self.unet, self.original, (z, t), kwargs).sample

    def step(self) -> IterationResult:
        cfg = self.config
        concept, steps_done, z, t = self.sample_zt()  # with the weights being trained
        cond = self.cond[concept]
        e_uncond, e_cond = self.frozen_eps(z, t, self.uncond), self.frozen_eps(z, t, cond)
        self.passes(2)
        target = erase_target(e_uncond, e_cond, cfg.eta)
        loss = erase_loss(unet_eps(self.unet, z, t, cond), target)
        self.update(loss)
        return IterationResult(self.iteration, concept, steps_done, int(t), loss.item(), 0.0)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> Path:
        tensors = {f"params.{n}": p for n, p in zip(self.names, self.trained, strict=True)}
        opt_t, opt_meta = optimizer_tensors(self.optimizer, "optim")
        tensors.update(opt_t)
        loop_tensors, meta = self.loop_state()
        tensors.update(loop_tensors)
        meta.update(method=self.variant, optim=opt_meta, base_model=self.base_model)
        path = self.out_dir / CHECKPOINT_FILE
        save_tensors(path, tensors, meta)
        return path

    @torch.no_grad()
    def restore(self, path: Path) -> None:
        tensors, meta = read_tensors(path)
        if meta.get("method") != self.variant:
            raise ValueError(f"checkpoint {path} belongs to method {meta.get('method', 'receler')!r}, "
                             f"not {self.variant!r}: resume it with that method")
        self.check_resumable(path, meta["config"])
        stored = sorted(k[len("params."):] for k in tensors if k.startswith("params."))
        if stored != sorted(self.names):
            raise ValueError(f"checkpoint {path} holds other parameters than this UNet's "
                             f"{self.variant} set: it was made for another UNet")
        self.restore_weights(tensors)
        restore_optimizer(self.optimizer, "optim", tensors, meta["optim"])
        self.restore_loop_state(tensors, meta)

    # ------------------------------------------------------------------ the loop
    def begin(self) -> None:
        for p in self.params:
            p.requires_grad_(True)

    def end(self) -> None:
        for p in self.params:
            p.requires_grad_(False)
            p.grad = None

    def finish(self) -> EditConfig:
        """Write ``unet_edit.safetensors``; the trained weights stay in ``pipe.unet`` with
        their originals remembered, so :func:`receler.methods.remove_edit` undoes them."""
        cfg = self.config
        save_unet_edit(self.unet, self.names, self.out_dir, method=self.variant,
                       values=dict(zip(self.names, self.trained, strict=True)))
        mark_unet_edit(self.unet, self.variant, self.original)
        return EditConfig(rank=0, concepts=list(cfg.concepts), base_model=self.base_model,
                          method=self.variant, train=cfg.to_dict(),
                          stats={"trainable_parameters": self.trainable_parameters,
                                 "unet_forward": self.passes.forward,
                                 "unet_backward": self.passes.backward,
                                 "seconds": self.seconds})
