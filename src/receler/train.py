"""The Receler training loop.

One iteration, for the next concept ``c`` in turn:

1. sample ``z_t`` by DDIM with the *erased* model and the concept prompt, up to a
   random step (no gradient); or, on a ``zt_base`` share of the iterations, take one of
   the frozen model's own images of the concept (drawn once) noised to a random ``t``:
   the latents the evaluation's soft-prompt attack fits its tokens on;
2. with the erasers off (the frozen model, same UNet, no copy): ``ε(z_t, t, ∅)`` and
   ``ε(z_t, t, c)``, the latter while capturing cross-attention for the concept mask;
3. adversarial prompt learning: ``adv_steps`` updates of the concept's soft tokens so
   that the erased model under ``c ⊕ adv`` reproduces the frozen ``ε(c)``;
4. one eraser update on the erase loss under ``c ⊕ adv`` plus the mask loss.

All randomness comes from one ``torch.Generator`` whose state is checkpointed, so an
interrupted run resumed from its checkpoint ends with the same weights as a run that
was never interrupted. Checkpoints are single safetensors files, written atomically.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from .attention import binary_mask, capture_cross_attention, concept_attention, guidance_map
from .config import EraserConfig, TrainConfig
from .erasers import (
    attach_erasers,
    eraser_parameters,
    erasers_disabled,
    get_erasers,
    record_eraser_outputs,
    shadow_eraser_outputs,
)
from .loop import (  # noqa: F401 - re-exported: the loop's names were train's before
    LOG_FILE,
    RESUME_FREE,
    IterationResult,
    PassCounter,
    TrainingDiverged,
    TrainingInterrupted,
    TrainingLoop,
)
from .objective import (
    anchor_loss,
    attack_step,
    erase_loss,
    erase_target,
    insert_soft_tokens,
    mask_loss,
)
from .pipeline import (
    concept_token_indices,
    ddim_scheduler,
    ddim_until,
    encode,
    latent_shape,
    unet_eps,
)
from .serialization import (
    CHECKPOINT_FILE,
    check_out_dir,
    commit_work_dir,
    eraser_state,
    optimizer_tensors,
    read_eraser_weights,
    read_tensors,
    restore_optimizer,
    save_erasers,
    save_tensors,
    set_eraser_weights,
    start_work_dir,
    work_dir,
)
from .viz import MaskPictures

logger = logging.getLogger(__name__)


def mentions_concept(prompt: str, concepts: list[str]) -> bool:
    """Whether ``prompt`` holds one of ``concepts`` as whole words (case-insensitive)."""
    return any(re.search(rf"(?<!\w){re.escape(c.strip())}(?!\w)", prompt, re.IGNORECASE)
               for c in concepts)


def template_token_indices(tokenizer, template: str, concept: str) -> list[int]:
    """Positions of ``concept``'s tokens in the encoded ``template.format(concept)``."""
    idx = concept_token_indices(tokenizer, concept)
    prefix = template[:template.index("{}")].strip()
    shift = len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
    ids = tokenizer(template.format(concept))["input_ids"]
    want = tokenizer(concept, add_special_tokens=False)["input_ids"]
    idx = [i + shift for i in idx]
    if [ids[i] for i in idx if i < len(ids)] != want:
        raise ValueError(f"prompt template {template!r} changes how {concept!r} is tokenized: "
                         "put a space before {}")
    return idx


class Trainer(TrainingLoop):
    """Trains one eraser set on ``pipe.unet`` for the concepts of ``config``.

    Args:
        pipe: a loaded Stable-Diffusion-family pipeline (see :func:`receler.load_pipeline`).
        config: training settings.
        out_dir: where checkpoints, the log, mask pictures and the final erasers go.
        base_model: recorded in the eraser config.
        callbacks: called as ``cb(trainer, result)`` after every iteration.
    """

    desc = "erasing"

    def __init__(self, pipe, config: TrainConfig, out_dir: Path, *, base_model: str = "",
                 callbacks: list[Callable] | None = None, show_progress: bool = True):
        self._init_loop(config, out_dir, callbacks, show_progress)
        self.pipe, self.base_model = pipe, base_model
        if config.mask_image_every:
            self.callbacks.append(MaskPictures(self.out_dir, config.mask_image_every))
        self.unet = pipe.unet
        self.device = self.unet.device
        self.latent_shape = latent_shape(pipe)
        self.latent_hw = self.latent_shape[1:]

        if get_erasers(self.unet):
            raise ValueError("the UNet already has erasers: remove_erasers(pipe.unet) first")
        init = self._initial_erasers(config)  # checked before the UNet is touched
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.erasers = attach_erasers(self.unet, config.rank, generator=self.generator,
                                      site=config.eraser_site, act=config.eraser_act)
        if init is not None:
            set_eraser_weights(self.erasers, init)
        self.optimizer = torch.optim.Adam(eraser_parameters(self.unet), lr=config.lr)
        self.sched = ddim_scheduler(pipe, config.ddim_steps)

        self.uncond = encode(pipe, [""])
        # The empty prompt, when listed, is anchored every iteration: its pass is the ε(∅)
        # pass the target needs anyway. The other anchors take turns, one extra pass each.
        self.anchor_empty = config.anchor_weight > 0 and "" in config.anchor_prompts
        # An anchor that names an erased concept would pull against the erase loss: a
        # retain set shared by every concept ("a star|a heart|...") drops the erased ones.
        self.anchor_texts = [a for a in config.anchor_prompts
                             if a != "" and not mentions_concept(a, config.concepts)]
        self.anchors = ([encode(pipe, [a]) for a in self.anchor_texts]
                        if config.anchor_weight else [])
        self.concepts = config.concepts
        # The concept's prompts (``prompt_templates``, in turn), each with the positions of
        # the concept's tokens in it; ``cond``/``tokens`` hold the current iteration's.
        self.prompt_conds = {c: [encode(pipe, [t.format(c)]) for t in config.templates]
                             for c in self.concepts}
        self.prompt_tokens = {c: [template_token_indices(pipe.tokenizer, t, c)
                                  for t in config.templates] for c in self.concepts}
        self.cond = {c: v[0] for c, v in self.prompt_conds.items()}
        self.tokens = {c: v[0] for c, v in self.prompt_tokens.items()}
        max_len = self.uncond.hidden.shape[1]
        for c, idx in ((c, i) for c, v in self.prompt_tokens.items() for i in v):
            shown = c if len(c) <= 40 else c[:37] + "..."
            if idx[-1] + 1 >= max_len:  # BOS + the concept + EOS must fit the prompt
                raise ValueError(f"concept {shown!r} has {len(idx)} tokens, more than the "
                                 f"model's {max_len}-token prompt holds with its start and end "
                                 "tokens: shorten the concept")
            if config.adv_steps and idx[-1] + 1 + config.adv_tokens > max_len:
                room = max_len - idx[-1] - 1
                raise ValueError(f"concept {shown!r} has {len(idx)} tokens: with "
                                 f"{config.adv_tokens} adversarial tokens it exceeds the "
                                 f"{max_len}-token prompt; pass --adv-tokens {room} or fewer, "
                                 "or shorten the concept")
        # ``adv_pool`` soft prompts per concept, initialised to the embeddings they replace
        # (no change), or, as the paper's code does, to U[0,1) noise; each restarts from its
        # initialisation after ``adv_reset`` of its uses.
        self.adv, self.adv_start_values, self.adv_opts = {}, {}, {}
        self.adv_uses = {c: 0 for c in self.concepts}
        # --concept-balance: each concept's running mean of ‖ε(c) − ε(∅)‖² (NaN: not seen yet)
        self.guidance_energy = {c: float("nan") for c in self.concepts}
        for c, idx in self.tokens.items():
            start = idx[-1] + 1
            inits = []
            for _ in range(config.adv_pool):
                init = self.cond[c].hidden[0, start:start + config.adv_tokens].float().clone()
                if config.adv_init == "uniform":
                    init = torch.rand(init.shape, generator=self.generator).to(init.device)
                inits.append(init)
            self.adv_start_values[c] = inits
            self.adv[c] = [init.clone().requires_grad_(True) for init in inits]
            self.adv_opts[c] = [self._adv_optimizer(p) for p in self.adv[c]]
        # ``zt_base``: the frozen model's own images of each concept, drawn once (the same
        # ones again on resume: they come first from the seeded generator).
        self.base_latents: dict[str, torch.Tensor] = {}
        if config.zt_base > 0:
            with erasers_disabled(self.unet):
                for c in self.concepts:
                    self.base_latents[c] = torch.cat([
                        ddim_until(pipe, self.sched, self._noise(), self.uncond, self.cond[c],
                                   config.base_guidance, config.ddim_steps, count=self.passes)
                        for _ in range(config.base_images)])
        # ``anchor_latents='own'``: each anchor prompt's own images by the frozen model,
        # drawn once after the concepts' (the same ones on resume), so that the anchor term
        # holds the erasers on the latents of the objects it protects.
        self.anchor_x0: list[torch.Tensor] = []
        if config.anchor_latents == "own" and self.anchors:
            with erasers_disabled(self.unet):
                self.anchor_x0 = [torch.cat([
                    ddim_until(pipe, self.sched, self._noise(), self.uncond, anchor,
                               config.base_guidance, config.ddim_steps, count=self.passes)
                    for _ in range(config.base_images)]) for anchor in self.anchors]

    def _initial_erasers(self, config: TrainConfig) -> dict[str, torch.Tensor] | None:
        """The weights of ``config.init_erasers``, checked against the UNet and the run."""
        if not config.init_erasers:
            return None
        tensors, found = read_eraser_weights(self.unet, Path(config.init_erasers))
        mine = (config.rank, config.eraser_site, config.eraser_act)
        if (found.rank, found.site, found.act) != mine:
            raise ValueError(
                f"--init-erasers {config.init_erasers} holds rank-{found.rank} erasers at site "
                f"{found.site!r} with activation {found.act!r}, this run trains rank "
                f"{mine[0]} at {mine[1]!r} with {mine[2]!r}: pass --rank {found.rank} "
                f"--eraser-site {found.site} --eraser-act {found.act}")
        dropped = [c for c in found.concepts if c not in config.concepts]
        if dropped:
            logger.warning("--init-erasers %s also erases %s, which --concept does not list: "
                           "the anchor term may bring it back; list it to keep it erased",
                           config.init_erasers, ", ".join(dropped))
        return tensors

    def _adv_optimizer(self, soft: torch.Tensor) -> torch.optim.Optimizer:
        return torch.optim.Adam([soft], lr=self.config.adv_lr,
                                weight_decay=self.config.adv_weight_decay)

    def next_adversary(self, concept: str) -> tuple[torch.Tensor, torch.optim.Optimizer]:
        """The pool's next soft prompt of ``concept`` (in turn), restarted from its
        initialisation (with a fresh optimiser) when it has been used ``adv_reset`` times.
        Member ``k`` restarts ``k·adv_reset/adv_pool`` uses out of phase, so the pool always
        holds attacks of every age, from fresh to ``adv_reset·adv_steps`` steps."""
        cfg = self.config
        used = self.adv_uses[concept]
        self.adv_uses[concept] = used + 1
        k, own = used % cfg.adv_pool, used // cfg.adv_pool
        if cfg.adv_reset and own and (own + k * cfg.adv_reset // cfg.adv_pool) % cfg.adv_reset == 0:
            with torch.no_grad():
                self.adv[concept][k].copy_(self.adv_start_values[concept][k])
            self.adv_opts[concept][k] = self._adv_optimizer(self.adv[concept][k])
        return self.adv[concept][k], self.adv_opts[concept][k]

    # ------------------------------------------------------------------ one iteration
    def sample_zt(self) -> tuple[str, int, torch.Tensor, torch.Tensor]:
        """``z_t`` of the erased model's own trajectory (the paper), or, on a ``zt_base``
        share of the iterations, a frozen-model image of the concept noised to ``t``.

        Erasers trained only on their own trajectories never meet a latent that already
        holds the concept, while the evaluation's attack fits its soft tokens on exactly
        those (the base model's images, noised): there the eraser, trained under the
        attack, learns to keep erasing."""
        cfg = self.config
        if not self.base_latents or float(torch.rand((), generator=self.generator)) >= cfg.zt_base:
            return super().sample_zt()
        concept = cfg.concepts[self.iteration % len(cfg.concepts)]
        steps_done = int(torch.randint(cfg.ddim_steps, (1,), generator=self.generator))
        t = self.sched.timesteps[steps_done]
        images = self.base_latents[concept]
        x0 = images[int(torch.randint(len(images), (1,), generator=self.generator))][None]
        return concept, steps_done, self.sched.add_noise(x0, self._noise(), t.reshape(1)), t

    def adversarial_hidden(self, concept: str, soft: torch.Tensor) -> torch.Tensor:
        return insert_soft_tokens(self.cond[concept].hidden, soft, self.tokens[concept][-1] + 1)

    def use_adversary(self) -> bool:
        return self.config.adv_steps > 0 and self.iteration >= self.config.adv_start

    def select_prompt(self) -> None:
        """This iteration's prompt of its concept: each concept's templates in turn."""
        c = self.concepts[self.iteration % len(self.concepts)]
        k = (self.iteration // len(self.concepts)) % len(self.prompt_conds[c])
        self.cond[c], self.tokens[c] = self.prompt_conds[c][k], self.prompt_tokens[c][k]

    def step(self) -> IterationResult:
        self.select_prompt()
        concept, steps_done, z, t = self.sample_zt()  # 1. z_t from the erased model
        cond = self.cond[concept]
        e_uncond, e_cond, maps, shadowed = self.frozen_passes(z, t, cond)  # 2. targets
        attention = concept_attention(maps, self.tokens[concept], self.latent_hw,
                                      self.config.mask_resolution)
        if self.config.mask_source == "guidance":  # same resolution as the attention mask
            attention = guidance_map(e_uncond, e_cond, attention.shape[-2])
        mask = binary_mask(attention, self.config.mask_threshold)
        target = erase_target(e_uncond, e_cond, self.config.eta)
        weight = self.balance_weight(concept, e_uncond, e_cond)
        prompts, attack_losses = self.attack(concept, z, t, e_cond)  # 3. the attack
        loss_e, loss_m, loss_a = self.eraser_update(z, t, prompts, target, mask, shadowed,
                                                    attack_losses, weight)  # 4. the eraser step
        return IterationResult(self.iteration, concept, steps_done, int(t), loss_e.item(),
                               loss_m.item(), attack_losses, mask[0].cpu(), attention[0].cpu(),
                               loss_a.item() if shadowed else None)

    @torch.no_grad()
    def frozen_passes(self, z, t, cond):
        """The frozen model's ``ε(∅)`` and ``ε(c)`` (with the concept prompt's attention
        maps for the mask); the erasers shadow the anchor prompts' passes, the empty
        prompt's being the ``ε(∅)`` pass itself.

        Returns:
            ``(e_uncond, e_cond, maps, shadowed)``.
        """
        unet = self.unet
        which = self.iteration % len(self.anchors) if self.anchors else None
        anchor = self.anchors[which] if self.anchors else None
        shadowed = []
        with erasers_disabled(unet):
            with (shadow_eraser_outputs(unet) if self.anchor_empty
                  else contextlib.nullcontext()) as outs:
                e_uncond = unet_eps(unet, z, t, self.uncond)
            if self.anchor_empty:
                shadowed.append(outs)
            with capture_cross_attention(unet, detach=True) as maps:
                e_cond = unet_eps(unet, z, t, cond)
            self.passes(2)
            if anchor is not None:
                z_anchor = z
                if self.anchor_x0:  # one of the anchor's own images, noised to t
                    images = self.anchor_x0[which]
                    pick = int(torch.randint(len(images), (1,), generator=self.generator))
                    z_anchor = self.sched.add_noise(images[pick][None], self._noise(),
                                                    torch.as_tensor(t).reshape(1))
                with shadow_eraser_outputs(unet) as outs:
                    unet_eps(unet, z_anchor, t, anchor)
                shadowed.append(outs)
                self.passes(1)
        return e_uncond, e_cond, maps, shadowed

    def attack(self, concept: str, z, t, e_cond):
        """Adversarial prompt learning: ``adv_steps`` updates of the concept's soft tokens
        so that the erased model under ``c ⊕ adv`` reproduces the frozen ``ε(c)``.

        Returns:
            The prompts of the eraser step and the attack's losses.
        """
        cfg, cond = self.config, self.cond[concept]
        if not self.use_adversary():
            return cond, []
        soft, opt = self.next_adversary(concept)
        predict = lambda s: unet_eps(self.unet, z, t, cond.with_hidden(self.adversarial_hidden(concept, s)))  # noqa: E731
        losses = []
        for _ in range(cfg.adv_steps):
            losses.append(attack_step(soft, opt, predict, e_cond))
            self.passes(1, backward=True)
        # Erase on the plain prompt and under the attack, in one batch. Trained under the
        # attack alone (erase_on='attacked', the paper's code), the erasers learned to undo
        # the soft tokens and left the plain prompt's image in place on the toy model.
        attacked = cond.with_hidden(self.adversarial_hidden(concept, soft.detach()))
        return (attacked if cfg.erase_on == "attacked" else cond.cat(attacked)), losses

    def balance_weight(self, concept: str, e_uncond: torch.Tensor, e_cond: torch.Tensor
                       ) -> float:
        """The weight of this iteration's erase loss under ``concept_balance`` B: (the
        concepts' mean guidance energy / the concept's own)^B, each energy a running mean
        (decay 0.9) of the frozen model's ‖ε(c) − ε(∅)‖² on the iterations' z_t; 1 when B is
        0 or there is one concept. Unweighted, a concept whose guidance is weak (the erase
        loss starts at η²‖ε(c) − ε(∅)‖²) moves the shared erasers least."""
        b = self.config.concept_balance
        if b == 0 or len(self.concepts) == 1:
            return 1.0
        energy = (e_cond.float() - e_uncond.float()).pow(2).mean().item()
        was = self.guidance_energy[concept]
        self.guidance_energy[concept] = energy if math.isnan(was) else 0.9 * was + 0.1 * energy
        seen = [v for v in self.guidance_energy.values() if not math.isnan(v)]
        return (sum(seen) / len(seen) / max(self.guidance_energy[concept], 1e-12)) ** b

    def eraser_update(self, z, t, prompts, target, mask, shadowed, attack_losses,
                      weight: float = 1.0):
        """One eraser step on the erase (times ``weight``), mask and anchor losses; returns
        the three, the erase loss unweighted."""
        cfg, n = self.config, prompts.hidden.shape[0]
        with record_eraser_outputs(self.unet) as outputs:
            e_erased = unet_eps(self.unet, z.expand(n, -1, -1, -1), t, prompts)
        loss_e = erase_loss(e_erased, target.expand(n, -1, -1, -1))
        loss_m = (mask_loss(outputs, mask.expand(n, -1, -1), self.latent_hw) if cfg.reg_weight
                  else torch.zeros(()))
        loss_a = (sum(map(anchor_loss, shadowed)) / len(shadowed) if shadowed
                  else torch.zeros(()))
        self.update(weight * loss_e + cfg.reg_weight * loss_m + cfg.anchor_weight * loss_a,
                    tuple(attack_losses), samples=n)
        return loss_e, loss_m, loss_a

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> Path:
        """Write everything needed to resume into one safetensors file, atomically."""
        tensors = {f"erasers.{k}": v for k, v in eraser_state(self.unet).items()}
        opt_t, opt_meta = optimizer_tensors(self.optimizer, "optim")
        tensors.update(opt_t)
        adv_meta = {}
        for i, c in enumerate(self.concepts):
            for k, soft in enumerate(self.adv[c]):
                name = f"{i}" if k == 0 else f"{i}.{k}"  # pool member 0 keeps the old name
                tensors[f"adv.{name}"] = soft.detach()
                tensors[f"adv_start.{name}"] = self.adv_start_values[c][k]
                t_, adv_meta[c if k == 0 else f"{c}#{k}"] = optimizer_tensors(
                    self.adv_opts[c][k], f"adv_optim.{name}")
                tensors.update(t_)
        loop_tensors, meta = self.loop_state()
        tensors.update(loop_tensors)
        meta.update(optim=opt_meta, adv_optim=adv_meta, adv_uses=self.adv_uses,
                    guidance_energy={c: None if math.isnan(v) else v
                                     for c, v in self.guidance_energy.items()},
                    base_model=self.base_model)
        path = self.out_dir / CHECKPOINT_FILE
        save_tensors(path, tensors, meta)
        return path

    def restore(self, path: Path) -> None:
        tensors, meta = read_tensors(path)
        self.check_resumable(path, meta["config"])
        for name, e in self.erasers.items():
            e.load_state_dict({k: tensors[f"erasers.{name}.{k}"] for k in e.state_dict()})
        restore_optimizer(self.optimizer, "optim", tensors, meta["optim"])
        for i, c in enumerate(self.concepts):
            for k, soft in enumerate(self.adv[c]):
                name = f"{i}" if k == 0 else f"{i}.{k}"
                with torch.no_grad():
                    soft.copy_(tensors[f"adv.{name}"])
                    if f"adv_start.{name}" in tensors:
                        self.adv_start_values[c][k].copy_(tensors[f"adv_start.{name}"])
                restore_optimizer(self.adv_opts[c][k], f"adv_optim.{name}", tensors,
                                  meta["adv_optim"][c if k == 0 else f"{c}#{k}"])
        self.adv_uses = {c: int(meta.get("adv_uses", {}).get(c, 0)) for c in self.concepts}
        energy = meta.get("guidance_energy", {})
        self.guidance_energy = {c: float("nan") if energy.get(c) is None else float(energy[c])
                                for c in self.concepts}
        self.restore_loop_state(tensors, meta)

    # ------------------------------------------------------------------ the loop
    def postfix(self, r: IterationResult) -> dict[str, str]:
        return {"erase": f"{r.loss_erase:.4f}", "mask": f"{r.loss_mask:.4f}",
                "attack": f"{r.loss_attack[-1]:.4f}" if r.loss_attack else "-"}

    def begin(self) -> None:
        self.unet.eval()

    def finish(self) -> EraserConfig:
        """Save the erasers and their config; they stay attached to ``pipe.unet``."""
        cfg = self.config
        config = EraserConfig(rank=cfg.rank, concepts=list(self.concepts),
                              base_model=self.base_model, train=cfg.to_dict())
        save_erasers(self.unet, self.out_dir, config)
        return config


def erase(pipe, config: TrainConfig, out_dir: str | Path, *, base_model: str = "",
          resume: bool = False, overwrite: bool = False, **kwargs) -> EraserConfig:
    """Train erasers for ``config.concepts`` on ``pipe`` and save them into ``out_dir``.

    The erasers stay attached to ``pipe.unet``, so ``pipe`` generates erased images after.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite=overwrite, resume=resume)
    # Replacing a result: train elsewhere, move in once finished (serialization.work_dir).
    work = work_dir(out_dir, overwrite=overwrite, resume=resume)
    trainer = Trainer(pipe, config, work, base_model=base_model, **kwargs)  # checks inputs
    if not resume:
        start_work_dir(out_dir, work)
    result = trainer.train(resume=resume)
    commit_work_dir(out_dir, work)
    return result
