"""The Receler training loop.

One iteration, for the next concept ``c`` in turn:

1. sample ``z_t`` by DDIM with the *erased* model and the concept prompt, up to a
   random step (no gradient);
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
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
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
    read_tensors,
    restore_optimizer,
    save_erasers,
    save_tensors,
    start_work_dir,
    work_dir,
)
from .viz import MaskPictures, loss_curves

logger = logging.getLogger(__name__)
LOG_FILE = "train_log.jsonl"
# settings a resumed run may change: how long it runs and how often it writes things
RESUME_FREE = ("iterations", "checkpoint_every", "mask_image_every")


class TrainingInterrupted(RuntimeError):
    """Ctrl-C: a checkpoint was written at ``iteration``."""

    def __init__(self, iteration: int, out_dir: Path):
        super().__init__(f"interrupted after iteration {iteration}; checkpoint in {out_dir}")
        self.iteration, self.out_dir = iteration, out_dir


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint was kept."""


@dataclass
class PassCounter:
    """UNet passes spent, counted per sample in the batch."""

    forward: int = 0
    backward: int = 0

    def __call__(self, n: int = 1, backward: bool = False):
        self.forward += n
        self.backward += n if backward else 0


@dataclass
class IterationResult:
    iteration: int
    concept: str
    step: int  # DDIM steps taken to reach z_t
    timestep: int
    loss_erase: float
    loss_mask: float
    loss_attack: list[float] = field(default_factory=list)
    mask: torch.Tensor | None = None  # (h, w), for pictures
    attention: torch.Tensor | None = None
    loss_anchor: float | None = None  # None: no anchor term


class TrainingLoop:
    """The loop every trained method shares: progress bar, log, callbacks, periodic and
    Ctrl-C checkpoints, resume. Subclasses set ``desc`` and provide ``step``,
    ``checkpoint``, ``restore`` and ``finish`` (and may override ``begin``/``end``)."""

    desc = "training"

    def _init_loop(self, config: TrainConfig, out_dir: Path, callbacks, show_progress: bool):
        self.config, self.out_dir = config, Path(out_dir)
        self.callbacks, self.show_progress = list(callbacks or []), show_progress
        self.passes = PassCounter()
        self.iteration, self.seconds = 0, 0.0
        self._stop_requested = False
        self.trajectories: dict[str, torch.Tensor] = {}  # concept -> (ddim_steps, C, H, W)
        self.trajectory_uses: dict[str, int] = {}  # concept -> draws left from it

    def loop_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and metadata of the loop itself, for a checkpoint."""
        tensors = {"rng": self.generator.get_state()}
        tensors.update({f"trajectory.{i}": self.trajectories[c]
                        for i, c in enumerate(self.config.concepts) if c in self.trajectories})
        meta = {"iteration": self.iteration, "config": self.config.to_dict(),
                "passes": vars(self.passes), "seconds": self.seconds,
                "trajectory_uses": self.trajectory_uses, "receler_version": __version__}
        return tensors, meta

    def restore_loop_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.generator.set_state(tensors["rng"])
        self.iteration = meta["iteration"]
        self.passes = PassCounter(**meta["passes"])
        self.seconds = meta["seconds"]
        self.trajectory_uses = dict(meta.get("trajectory_uses", {}))
        device = self.pipe.unet.device
        self.trajectories = {c: tensors[f"trajectory.{i}"].to(device, self.uncond.hidden.dtype)
                             for i, c in enumerate(self.config.concepts)
                             if f"trajectory.{i}" in tensors}

    def check_resumable(self, path: Path, saved: dict) -> None:
        """Refuse to resume a checkpoint trained with other settings than asked now (only
        the iteration count and the bookkeeping intervals may change)."""
        asked = self.config.to_dict()
        for key, value in saved.items():
            if key in RESUME_FREE or key not in asked or asked[key] == value:
                continue
            flag = "--concept" if key == "concepts" else "--" + key.replace("_", "-")
            raise ValueError(f"checkpoint {path} was trained with {key}={value!r}, not "
                             f"{asked[key]!r}: resume with the same {flag}, or start again "
                             "with --overwrite")

    def step(self) -> IterationResult:
        raise NotImplementedError

    def checkpoint(self) -> Path:
        raise NotImplementedError

    def restore(self, path: Path) -> None:
        raise NotImplementedError

    def finish(self):
        """Write the final result; its return value is what ``train`` returns."""
        raise NotImplementedError

    def begin(self) -> None:
        """Before the first iteration of this call of ``train``."""

    def end(self) -> None:
        """After the loop, also when it stops with an exception."""

    def postfix(self, r: IterationResult) -> dict[str, str]:
        return {"erase": f"{r.loss_erase:.4f}"}

    def sample_zt(self) -> tuple[str, int, torch.Tensor, torch.Tensor]:
        """The next concept (round robin: equal shares) and ``z_t`` sampled by DDIM with the
        model being trained, up to a random step. Needs ``pipe``, ``sched``, ``cond``,
        ``uncond``, ``generator`` and ``latent_shape`` on the subclass.

        Returns:
            ``(concept, steps_done, z_t, t)``, ``t`` being the timestep ``z_t`` is at.
        """
        cfg = self.config
        concept = cfg.concepts[self.iteration % len(cfg.concepts)]
        steps_done = int(torch.randint(cfg.ddim_steps, (1,), generator=self.generator))
        t = self.sched.timesteps[steps_done]
        if cfg.zt_reuse == 1:  # the paper: a fresh partial trajectory every iteration
            z = ddim_until(self.pipe, self.sched, self._noise(), self.uncond, self.cond[concept],
                           cfg.start_guidance, steps_done, count=self.passes)
            return concept, steps_done, z, t
        if self.trajectory_uses.get(concept, 0) == 0:  # one whole trajectory, reused zt_reuse×
            self.trajectories[concept] = ddim_until(
                self.pipe, self.sched, self._noise(), self.uncond, self.cond[concept],
                cfg.start_guidance, cfg.ddim_steps - 1, count=self.passes, keep=True)
            self.trajectory_uses[concept] = cfg.zt_reuse
        self.trajectory_uses[concept] -= 1
        return concept, steps_done, self.trajectories[concept][steps_done:steps_done + 1], t

    def _noise(self) -> torch.Tensor:
        noise = torch.randn((1, *self.latent_shape), generator=self.generator)
        return noise.to(self.pipe.unet.device, self.uncond.hidden.dtype)

    def update(self, loss: torch.Tensor, extra_losses: tuple[float, ...] = (),
               samples: int = 1) -> None:
        """Stop on a non-finite loss (keeping the last checkpoint), else take one step."""
        if not torch.isfinite(loss) or not all(math.isfinite(x) for x in extra_losses):
            where = f"loss became {loss.item()} at iteration {self.iteration + 1}"
            if (self.out_dir / CHECKPOINT_FILE).is_file():
                raise TrainingDiverged(f"{where}; the last good checkpoint is kept in "
                                       f"{self.out_dir}: lower --lr and use --resume")
            raise TrainingDiverged(f"{where}, before any checkpoint was written: lower --lr "
                                   "and start again with --overwrite")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.passes(samples, backward=True)
        self.optimizer_step()
        self.iteration += 1

    def optimizer_step(self) -> None:
        """One step of ``optimizer`` on the gradients ``backward`` left."""
        self.optimizer.step()

    def _on_sigint(self, signum, frame):
        if self._stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop_requested = True
        logger.warning("Ctrl-C: finishing this iteration, then writing a checkpoint "
                       "(Ctrl-C again to abort without one)")

    def request_stop(self) -> None:
        """Stop after the current iteration with a checkpoint (what Ctrl-C does)."""
        self._stop_requested = True

    def train(self, *, resume: bool = False):
        """Run to ``config.iterations``, then :meth:`finish`.

        Raises:
            TrainingInterrupted: after Ctrl-C or :meth:`request_stop`, once checkpointed.
            TrainingDiverged: on a non-finite loss, keeping the last good checkpoint.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.out_dir / LOG_FILE
        if resume:
            self.restore(self.out_dir / CHECKPOINT_FILE)
            _truncate_log(log_path, self.iteration)
        else:
            log_path.unlink(missing_ok=True)
        cfg = self.config
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if in_main else None
        bar = tqdm(total=cfg.iterations, initial=self.iteration, desc=self.desc,
                   disable=not self.show_progress, dynamic_ncols=True)
        self.begin()
        try:
            with log_path.open("a") as log:
                while self.iteration < cfg.iterations:
                    start = time.perf_counter()
                    result = self.step()
                    self.seconds += time.perf_counter() - start
                    log.write(json.dumps(_log_row(result, self.passes)) + "\n")
                    log.flush()
                    bar.update(1)
                    bar.set_postfix(self.postfix(result))
                    for cb in self.callbacks:
                        cb(self, result)
                    if self.iteration % cfg.checkpoint_every == 0:
                        self.checkpoint()
                    if self._stop_requested and self.iteration < cfg.iterations:
                        self.checkpoint()
                        raise TrainingInterrupted(self.iteration, self.out_dir)
        finally:
            self.end()
            bar.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        result = self.finish()  # what the user needs first: on a full disk it still lands
        try:
            self.checkpoint()
        except OSError as e:
            logger.warning("the final checkpoint was not written (%s); the result is saved in "
                           "%s", e, self.out_dir)
        loss_curves(log_path, self.out_dir / "loss_curves.png")
        return result


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
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.erasers = attach_erasers(self.unet, config.rank, generator=self.generator)
        self.optimizer = torch.optim.Adam(eraser_parameters(self.unet), lr=config.lr)
        self.sched = ddim_scheduler(pipe, config.ddim_steps)

        self.uncond = encode(pipe, [""])
        # The empty prompt, when listed, is anchored every iteration: its pass is the ε(∅)
        # pass the target needs anyway. The other anchors take turns, one extra pass each.
        self.anchor_empty = config.anchor_weight > 0 and "" in config.anchor_prompts
        self.anchors = ([encode(pipe, [a]) for a in config.anchor_prompts if a != ""]
                        if config.anchor_weight else [])
        self.concepts = config.concepts
        self.cond = {c: encode(pipe, [c]) for c in self.concepts}
        self.tokens = {c: concept_token_indices(pipe.tokenizer, c) for c in self.concepts}
        max_len = self.uncond.hidden.shape[1]
        for c, idx in self.tokens.items():
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
        # One soft prompt per concept, initialised to the embedding it replaces (no change),
        # or, as the paper's code does, to U[0,1) noise.
        self.adv = {}
        for c, idx in self.tokens.items():
            start = idx[-1] + 1
            init = self.cond[c].hidden[0, start:start + config.adv_tokens].float().clone()
            if config.adv_init == "uniform":
                init = torch.rand(init.shape, generator=self.generator).to(init.device)
            self.adv[c] = init.requires_grad_(True)
        self.adv_opts = {c: torch.optim.Adam([p], lr=config.adv_lr,
                                             weight_decay=config.adv_weight_decay)
                         for c, p in self.adv.items()}

    # ------------------------------------------------------------------ one iteration
    def adversarial_hidden(self, concept: str, soft: torch.Tensor) -> torch.Tensor:
        return insert_soft_tokens(self.cond[concept].hidden, soft, self.tokens[concept][-1] + 1)

    def use_adversary(self) -> bool:
        return self.config.adv_steps > 0 and self.iteration >= self.config.adv_start

    def step(self) -> IterationResult:
        cfg, unet = self.config, self.unet
        # 1. z_t from the erased model
        concept, steps_done, z, t = self.sample_zt()
        cond = self.cond[concept]

        # 2. frozen targets; attention of the concept prompt gives the mask; the erasers
        # shadow the anchor prompts' passes (the empty prompt's is the ε(∅) pass itself)
        anchor = self.anchors[self.iteration % len(self.anchors)] if self.anchors else None
        shadowed = []
        with torch.no_grad(), erasers_disabled(unet):
            with (shadow_eraser_outputs(unet) if self.anchor_empty
                  else contextlib.nullcontext()) as outs:
                e_uncond = unet_eps(unet, z, t, self.uncond)
            shadowed += [outs] if self.anchor_empty else []
            with capture_cross_attention(unet, detach=True) as maps:
                e_cond = unet_eps(unet, z, t, cond)
            self.passes(2)
            if anchor is not None:
                with shadow_eraser_outputs(unet) as outs:
                    unet_eps(unet, z, t, anchor)
                shadowed.append(outs)
                self.passes(1)
        attention = concept_attention(maps, self.tokens[concept], self.latent_hw,
                                      cfg.mask_resolution)
        if cfg.mask_source == "guidance":  # same resolution as the attention mask would have
            attention = guidance_map(e_uncond, e_cond, attention.shape[-2])
        mask = binary_mask(attention, cfg.mask_threshold)
        target = erase_target(e_uncond, e_cond, cfg.eta)

        # 3. adversarial prompt learning (the attack)
        attack_losses = []
        prompts = cond
        if self.use_adversary():
            soft, opt = self.adv[concept], self.adv_opts[concept]
            predict = lambda s: unet_eps(unet, z, t, cond.with_hidden(self.adversarial_hidden(concept, s)))  # noqa: E731
            for _ in range(cfg.adv_steps):
                attack_losses.append(attack_step(soft, opt, predict, e_cond))
                self.passes(1, backward=True)
            # Erase on the plain prompt and under the attack, in one batch. Trained under the
            # attack alone (erase_on='attacked', the paper's code), the erasers learned to undo
            # the soft tokens and left the plain prompt's image in place on the toy model.
            attacked = cond.with_hidden(self.adversarial_hidden(concept, soft.detach()))
            prompts = attacked if cfg.erase_on == "attacked" else cond.cat(attacked)
        n = prompts.hidden.shape[0]

        # 4. eraser update
        with record_eraser_outputs(unet) as outputs:
            e_erased = unet_eps(unet, z.expand(n, -1, -1, -1), t, prompts)
        loss_e = erase_loss(e_erased, target.expand(n, -1, -1, -1))
        loss_m = (mask_loss(outputs, mask.expand(n, -1, -1), self.latent_hw) if cfg.reg_weight
                  else torch.zeros(()))
        loss_a = (sum(map(anchor_loss, shadowed)) / len(shadowed) if shadowed
                  else torch.zeros(()))
        self.update(loss_e + cfg.reg_weight * loss_m + cfg.anchor_weight * loss_a,
                    tuple(attack_losses), samples=n)
        return IterationResult(self.iteration, concept, steps_done, int(t), loss_e.item(),
                               loss_m.item(), attack_losses, mask[0].cpu(), attention[0].cpu(),
                               loss_a.item() if shadowed else None)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> Path:
        """Write everything needed to resume into one safetensors file, atomically."""
        tensors = {f"erasers.{k}": v for k, v in eraser_state(self.unet).items()}
        opt_t, opt_meta = optimizer_tensors(self.optimizer, "optim")
        tensors.update(opt_t)
        adv_meta = {}
        for i, c in enumerate(self.concepts):
            tensors[f"adv.{i}"] = self.adv[c].detach()
            t_, adv_meta[c] = optimizer_tensors(self.adv_opts[c], f"adv_optim.{i}")
            tensors.update(t_)
        loop_tensors, meta = self.loop_state()
        tensors.update(loop_tensors)
        meta.update(optim=opt_meta, adv_optim=adv_meta, base_model=self.base_model)
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
            with torch.no_grad():
                self.adv[c].copy_(tensors[f"adv.{i}"])
            restore_optimizer(self.adv_opts[c], f"adv_optim.{i}", tensors, meta["adv_optim"][c])
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


def _log_row(r: IterationResult, passes: PassCounter) -> dict:
    return {"iteration": r.iteration, "concept": r.concept, "ddim_step": r.step,
            "timestep": r.timestep, "loss_erase": r.loss_erase, "loss_mask": r.loss_mask,
            "loss_anchor": r.loss_anchor,
            "loss_attack_first": r.loss_attack[0] if r.loss_attack else None,
            "loss_attack_last": r.loss_attack[-1] if r.loss_attack else None,
            "unet_forward": passes.forward, "unet_backward": passes.backward}


def _truncate_log(path: Path, iteration: int) -> None:
    """Drop log rows written after the checkpoint we resume from."""
    if not path.is_file():
        return
    rows = [ln for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln)["iteration"] <= iteration]
    path.write_text("".join(r + "\n" for r in rows))


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
