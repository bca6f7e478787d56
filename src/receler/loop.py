"""The loop every trained method shares (Receler's erasers, ESD's weights).

:class:`TrainingLoop` owns what does not depend on the method: the round-robin concept
and ``z_t`` sampling, the optimiser step with its NaN guard, the progress bar, Ctrl-C,
resume, and the callbacks that run after each iteration: the log row, the user's
callbacks (pictures, early stops) and the periodic checkpoint. A method subclasses it and
provides ``step``, ``checkpoint``, ``restore`` and ``finish``.

All randomness comes from one ``torch.Generator`` whose state is checkpointed, so an
interrupted run resumed from its checkpoint ends with the same weights as a run that
was never interrupted.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .config import TrainConfig
from .pipeline import ddim_until
from .serialization import CHECKPOINT_FILE
from .viz import loss_curves

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
            if self.config.inert(key):
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

        Each iteration is :meth:`step`, then the callbacks in order: the log row
        (:class:`LogWriter`), the user's callbacks, the periodic checkpoint
        (:class:`PeriodicCheckpoint`).

        Raises:
            TrainingInterrupted: after Ctrl-C or :meth:`request_stop`, once checkpointed.
            TrainingDiverged: on a non-finite loss, keeping the last good checkpoint.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        writer = LogWriter(self.out_dir / LOG_FILE)
        if resume:
            self.restore(self.out_dir / CHECKPOINT_FILE)
        writer.open(self.iteration if resume else None)
        callbacks = [writer, *self.callbacks, PeriodicCheckpoint(self.config.checkpoint_every)]
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if in_main else None
        bar = tqdm(total=self.config.iterations, initial=self.iteration, desc=self.desc,
                   disable=not self.show_progress, dynamic_ncols=True)
        self.begin()
        try:
            while self.iteration < self.config.iterations:
                start = time.perf_counter()
                result = self.step()
                self.seconds += time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(self.postfix(result))
                for cb in callbacks:
                    cb(self, result)
                if self._stop_requested and self.iteration < self.config.iterations:
                    self.checkpoint()
                    raise TrainingInterrupted(self.iteration, self.out_dir)
        finally:
            writer.close()
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
        loss_curves(writer.path, self.out_dir / "loss_curves.png")
        return result


# ------------------------------------------------------------------ built-in callbacks
class FineTuneLoop(TrainingLoop):
    """A loop that fine-tunes some of a model's own weights (ESD's UNet weights,
    AdvUnlearn's text-encoder weights): ``self.params``, named ``self.names``. When any of
    them is not fp32, Adam steps fp32 master copies and the model's weights are set from
    them after every step: in bf16, an lr-1e-5 update of a weight of size ~0.05 is below
    half a unit in the last place and would be lost."""

    def init_master(self) -> None:
        """``self.master``: fp32 copies of ``self.params``, or ``None`` when all are fp32."""
        self.master = ([p.detach().float().clone() for p in self.params]
                       if any(p.dtype != torch.float32 for p in self.params) else None)

    def optimizer_step(self) -> None:
        """Adam on the fp32 masters (when there are any), then the model's weights."""
        if self.master is None:
            return super().optimizer_step()
        for p, m in zip(self.params, self.master, strict=True):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        self.optimizer.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master, strict=True):
                p.copy_(m)

    @property
    def trained(self) -> list[torch.Tensor]:
        """The trained weights at full precision (the masters when there are any)."""
        return self.master or self.params

    @torch.no_grad()
    def restore_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the weights (and their masters) from a checkpoint's ``params.NAME`` tensors."""
        for n, p in zip(self.names, self.params, strict=True):
            p.copy_(tensors[f"params.{n}"])
        for n, m in zip(self.names, self.master or [], strict=False):
            m.copy_(tensors[f"params.{n}"])


class LogWriter:
    """Appends one JSON row per iteration to ``train_log.jsonl`` (losses, UNet passes)."""

    def __init__(self, path: Path):
        self.path, self.file = Path(path), None

    def open(self, resumed_at: int | None) -> None:
        """Start a new log, or keep the rows up to ``resumed_at`` of a resumed one."""
        if resumed_at is None:
            self.path.unlink(missing_ok=True)
        else:
            _truncate_log(self.path, resumed_at)
        self.file = self.path.open("a")

    def __call__(self, loop: TrainingLoop, result: IterationResult) -> None:
        self.file.write(json.dumps(_log_row(result, loop.passes)) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class PeriodicCheckpoint:
    """Writes the loop's checkpoint every ``every`` iterations."""

    def __init__(self, every: int):
        self.every = every

    def __call__(self, loop: TrainingLoop, result: IterationResult) -> None:
        if loop.iteration % self.every == 0:
            loop.checkpoint()


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
