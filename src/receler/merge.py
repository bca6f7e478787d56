"""Merged export: the erasure written into the UNet's own weights, so no adapter is left
to detach.

Erasers are adapters: ``a + up(GELU(down(a)))`` after every cross-attention layer, in
files of their own. Anyone holding the weights can drop them (``remove_erasers``, or
loading the base model and never loading ``erasers.safetensors``) and has the base model
back. A merged export leaves nothing to drop: a plain ``UNet2DConditionModel``, of the
base model's own architecture, whose weights carry the erasure.

Why the erasers cannot simply be folded in: the eraser's output ``up(GELU(down(a)))`` is
a non-linear function of the cross-attention output ``a`` alone, added to the residual
stream. The UNet has no layer that computes a function of ``a`` alone after ``to_out``:
``to_out`` is linear, and the next non-linearity (the feed-forward's GELU, after
``norm3``) acts on the residual stream ``h + a``, not on ``a``. GELU is not affine on any
interval, so no choice of ``to_out`` (or of any linear weights) reproduces the eraser
exactly; an exact fold would need a new layer, which is the eraser again.

So the merge is *distilled*: a small set of base weights (by default the cross-attention
layers' ``to_k``, ``to_v`` and ``to_out.0``, see :data:`PARAM_GROUPS`) is fine-tuned so
that the plain UNet, without erasers, reproduces the erased model's noise predictions:
the MSE between the student's ``ε`` and the erased (teacher) model's ``ε``. ``z_t`` is drawn
as the eraser trainer draws it (:meth:`receler.loop.TrainingLoop.sample_zt`: DDIM partial
trajectories, here of the erased model, round robin over the erased concepts and the
retain prompts), and every batch holds ``z_t`` under the erased concepts, the empty prompt
(the guidance's unconditional branch) and the prompt whose trajectory gave ``z_t``. With
``adv_steps`` (20 by default), the batch also holds the concept under a soft prompt that is
attacked before each step, as the protocol's soft-prompt attack does, against the merged
UNet (towards the base model's ``ε(c)``): the merge is distilled where an attacker would
push it too. Without it the merged UNet gave way to long attacks (docs/merge.md).

Teacher and student share one UNet, as Receler's frozen model does: the UNet keeps its
base weights and the erasers (the teacher), and the student is the same UNet with the
erasers off and the trained weights substituted through ``torch.func.functional_call``.
The trained weights are fp32 master copies whatever the UNet's dtype. The shared
:class:`~receler.loop.TrainingLoop` gives the progress bar, the UNet pass counts, Ctrl-C
and resume; its checkpoint lives in a work folder beside ``--out``
(``.NAME.merge``), and the finished UNet folder is moved into place in one rename.

How much of the erasure survives is measured twice: by :meth:`MergeLoop.fidelity` at the
end of the export (the MSE to the teacher of the base and of the merged UNet on held-out
trajectories, in ``merge_config.json``), and by ``receler protocol --unet OUT``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from . import __version__
from .config import PARAM_GROUPS, MergeConfig, TrainConfig  # noqa: F401  (MergeConfig: kept importable from here)
from .erasers import (
    ERASER_ATTR,
    erasers_disabled,
    find_cross_attention,
    get_erasers,
    remove_erasers,
)
from .loop import IterationResult, TrainingLoop
from .objective import attack_step, insert_soft_tokens
from .pipeline import (
    Conditioning,
    concept_token_indices,
    ddim_scheduler,
    ddim_until,
    encode,
    latent_shape,
    unet_eps,
)
from .serialization import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    ERASERS_FILE,
    atomic_write,
    load_erasers,
    optimizer_tensors,
    read_tensors,
    restore_optimizer,
    save_tensors,
)

logger = logging.getLogger(__name__)

MERGE_FILE = "merge_config.json"  # beside the UNet's config.json and weights
_METHOD = "merge"  # the checkpoint's method


# settings added after exports had been recorded without them, and what those exports did
_BEFORE = {"retain_weight": 1.0, "retain_target": "erased", "adv_target": "erased",
           "adv_restart": 0}


# settings a resumed export may change: how long it runs, its final figures, its checkpoints
_RESUMABLE_CHANGES = ("iterations", "eval_trajectories", "checkpoint_every")


RETAIN_WEIGHT_PER_CONCEPT = 20.0  # MergeConfig.retain_weight's default, per erased concept


def retain_weight(weight: float | None, concepts: int) -> float:
    """The retain terms' weight of an export of ``concepts`` concepts: ``weight``, or, when
    ``None``, :data:`RETAIN_WEIGHT_PER_CONCEPT` per concept. Every batch holds each erased
    concept (and one attacked prompt) beside the retain prompts, so with a fixed weight the
    retain terms' share of the loss would shrink as concepts are added."""
    return float(weight) if weight is not None else RETAIN_WEIGHT_PER_CONCEPT * concepts


def recorded_settings(merge: dict[str, Any]) -> dict[str, Any]:
    """An export's recorded settings (``merge_config.json``'s ``merge``, a checkpoint's) with
    each setting added since it was recorded at the value that export ran with."""
    return {**_BEFORE, **merge}


def merge_parameter_names(unet: torch.nn.Module, groups: list[str]) -> list[str]:
    """Names of the UNet parameters a merge with ``groups`` (keys of :data:`PARAM_GROUPS`)
    fine-tunes, in ``named_parameters`` order; eraser weights never."""
    wanted = tuple(f"{attn}.{PARAM_GROUPS[g]}." for attn in find_cross_attention(unet)
                   for g in groups)
    names = [n for n, _ in unet.named_parameters() if n.startswith(wanted)]
    if not names:
        raise ValueError(f"{type(unet).__name__} has no cross-attention parameters "
                         f"{', '.join(groups)} to merge into")
    return names


def check_erasers_folder(folder: Path) -> Any:
    """The folder's :class:`~receler.methods.EditConfig`, refused unless it holds finished
    erasers of an eraser-based method; one-line errors that say what to pass."""
    from .methods import EditConfig, get_method

    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"--erasers {folder} {what}: pass the --out folder of a finished "
                                "`receler erase` run")
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"--erasers {folder} has no {CONFIG_FILE}: pass the --out folder "
                                "of a finished `receler erase` run")
    saved = EditConfig.load(folder / CONFIG_FILE)
    if not get_method(saved.method).uses_erasers:
        raise ValueError(f"--erasers {folder} was made with {saved.method!r}, which leaves no "
                         "erasers to merge (its result is already in the UNet's weights or "
                         "in the sampler): pass the folder of a receler-method erase run")
    if not (folder / ERASERS_FILE).is_file():
        raise FileNotFoundError(f"--erasers {folder} has no {ERASERS_FILE}: the erase run has "
                                "not finished; resume it with `receler erase --resume`")
    return saved


def work_folder(out: Path) -> Path:
    """The checkpoint folder of an export into ``out``: a hidden sibling."""
    out = Path(out)
    return out.parent / f".{out.name}.merge"


def check_out(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse an existing ``out`` without ``overwrite``, and ``resume`` with no checkpoint."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} already exists: pass --overwrite to replace it, or "
                              "choose another --out")
    if resume and not (work_folder(out) / CHECKPOINT_FILE).is_file():
        raise FileNotFoundError(f"nothing to resume: {work_folder(out) / CHECKPOINT_FILE} does "
                                "not exist; drop --resume to start a new export")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class MergeResult:
    """What :func:`export_merged` wrote and measured."""

    out: Path
    stats: dict[str, Any]  # trainable_parameters, unet_forward, unet_backward, seconds
    fidelity: dict[str, Any]  # see fidelity()


class MergeLoop(TrainingLoop):
    """Distils the erased model (``pipe.unet`` with erasers attached) into the ``params``
    of the plain UNet. The UNet's weights are never changed; ``finish`` writes the merged
    UNet into ``out_dir/unet``.

    Args:
        pipe: a pipeline whose UNet holds the erasers to merge.
        config: the merge settings, their ``None`` fields already resolved.
        loop_config: the loop's view of them (``concepts``: the erased concepts followed by
            the retain prompts, the prompts ``z_t`` trajectories are drawn for).
        concepts: the erased concepts.
        out_dir: the work folder (checkpoint, log, the finished UNet).
        source: what is recorded about the erasers (path, sha256, method, base model).
    """

    desc = "merging"

    def __init__(self, pipe, config: MergeConfig, loop_config: TrainConfig, concepts: list[str],
                 out_dir: Path, *, source: dict[str, Any], callbacks: list[Callable] | None = None,
                 show_progress: bool = True):
        self._init_loop(loop_config, out_dir, callbacks, show_progress)
        self.pipe, self.merge, self.concepts, self.source = pipe, config, concepts, source
        self.unet = pipe.unet
        if not get_erasers(self.unet):
            raise ValueError("the UNet has no erasers to merge: load_erasers(pipe, folder) first")
        self.latent_shape = latent_shape(pipe)
        self.names = merge_parameter_names(self.unet, config.param_groups)
        params = dict(self.unet.named_parameters())
        self.dtype = params[self.names[0]].dtype
        # the student's weights: fp32 masters, substituted in the UNet's dtype
        self.master = [params[n].detach().float().clone().requires_grad_(True)
                       for n in self.names]
        self.generator = torch.Generator(device="cpu").manual_seed(loop_config.seed)
        self.optimizer = torch.optim.Adam(self.master, lr=loop_config.lr)
        self.sched = ddim_scheduler(pipe, loop_config.ddim_steps)
        self.uncond = encode(pipe, [""])
        self.cond = {p: encode(pipe, [p]) for p in loop_config.concepts}
        # adv_steps: one persistent soft prompt per concept, started from the embeddings it
        # replaces (no change at first), as the eraser trainer's
        self.adv_start = {c: concept_token_indices(pipe.tokenizer, c)[-1] + 1 for c in concepts}
        self.adv, self.adv_opts = {}, {}
        for c, start in (self.adv_start.items() if config.adv_steps else ()):
            if start + config.adv_tokens > self.uncond.hidden.shape[1]:
                raise ValueError(f"{config.adv_tokens} soft tokens after concept {c!r} exceed "
                                 "the prompt length: pass a smaller --adv-tokens")
            self.start_soft_prompt(c)

    @torch.no_grad()
    def start_soft_prompt(self, concept: str) -> None:
        """The concept's soft prompt at its start: the embeddings it replaces (no change at
        first), with a fresh Adam."""
        start = self.adv_start[concept]
        hidden = self.cond[concept].hidden[0, start:start + self.merge.adv_tokens]
        self.adv[concept] = hidden.detach().float().clone().requires_grad_(True)
        self.adv_opts[concept] = torch.optim.Adam([self.adv[concept]], lr=self.merge.adv_lr)

    @property
    def trainable_parameters(self) -> int:
        return sum(m.numel() for m in self.master)

    def merged_weights(self) -> dict[str, torch.Tensor]:
        return {n: m.to(self.dtype) for n, m in zip(self.names, self.master, strict=True)}

    def student_eps(self, z: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        """``ε`` of the plain UNet with the merged weights (graph through the masters)."""
        kwargs = {"encoder_hidden_states": cond.hidden}
        if cond.added is not None:
            kwargs["added_cond_kwargs"] = cond.added
        with erasers_disabled(self.unet):
            return functional_call(self.unet, self.merged_weights(), (z, t), kwargs).sample

    def batch(self, prompt: str) -> tuple[list[str], Conditioning]:
        """The prompts trained at a ``z_t`` of ``prompt``'s trajectory: the erased concepts,
        the empty prompt and ``prompt`` itself, each once."""
        texts = list(dict.fromkeys([*self.concepts, "", prompt]))
        conds = [self.uncond if p == "" else self.cond[p] for p in texts]
        cond = conds[0]
        for c in conds[1:]:
            cond = cond.cat(c)
        return texts, cond

    def attacked(self, concept: str, z: torch.Tensor, t) -> tuple[Conditioning, list[float]]:
        """``adv_steps`` steps of the concept's soft prompt so that the merged UNet under it
        predicts the base model's ``ε(c)`` (the protocol's attack); the attacked prompt."""
        cond, start = self.cond[concept], self.adv_start[concept]
        with torch.no_grad(), erasers_disabled(self.unet):
            target = unet_eps(self.unet, z, t, cond)  # the base model: its own weights
        self.passes(1)

        def predict(soft):
            return self.student_eps(z, t, cond.with_hidden(
                insert_soft_tokens(cond.hidden, soft, start)))

        losses = []
        for _ in range(self.merge.adv_steps):
            losses.append(attack_step(self.adv[concept], self.adv_opts[concept], predict,
                                      target))
            self.passes(1, backward=True)
        soft = self.adv[concept].detach()
        return cond.with_hidden(insert_soft_tokens(cond.hidden, soft, start)), losses

    def step(self) -> IterationResult:
        prompt, steps_done, z, t = self.sample_zt()  # the erased model's trajectory
        texts, cond = self.batch(prompt)
        erased = [x in self.concepts for x in texts]  # the rows distilled towards the erasers
        losses, copied = [], None  # copied: (attacked row, the concept's row it copies)
        if self.adv:  # the concepts take turns
            concept = self.concepts[self.iteration % len(self.concepts)]
            done = self.iteration // len(self.concepts)  # this concept's attacks so far
            if self.merge.adv_restart and done and done % self.merge.adv_restart == 0:
                self.start_soft_prompt(concept)
            attacked, losses = self.attacked(concept, z, t)
            if self.merge.adv_target == "concept":
                copied = (len(texts), texts.index(concept))
            texts, cond = [*texts, f"{concept} + soft tokens"], cond.cat(attacked)
            erased.append(True)
        zb = z.expand(len(texts), *z.shape[1:])
        with torch.no_grad():
            # erased rows: erasers on; the rest: on, or off when distilled towards the base;
            # the attacked row's target copied from its concept's row (adv_target concept)
            on = torch.tensor(erased) if self.merge.retain_target == "base" \
                else torch.ones(len(texts), dtype=torch.bool)
            run = torch.ones(len(texts), dtype=torch.bool)
            if copied:
                run[copied[0]] = False
            teacher = torch.empty_like(zb)
            for rows, erasers_on in ((on & run, True), (~on & run, False)):
                if rows.any():
                    with contextlib.nullcontext() if erasers_on else erasers_disabled(self.unet):
                        teacher[rows] = unet_eps(self.unet, zb[rows], t, cond.select(rows))
            if copied:
                teacher[copied[0]] = teacher[copied[1]]
        self.passes(int(run.sum()))
        loss = self.loss(self.student_eps(zb, t, cond).float(), teacher.float(), erased)
        self.update(loss, tuple(losses), samples=len(texts))
        return IterationResult(self.iteration, prompt, steps_done, int(t), loss.item(), 0.0,
                               losses)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor,
             erased: list[bool]) -> torch.Tensor:
        """MSE per row of the batch, averaged with weight 1 on the erased concepts and the
        attacked prompt (``erased``) and ``retain_weight`` on the retain prompts and the
        empty prompt."""
        per = F.mse_loss(student, teacher, reduction="none").flatten(1).mean(1)
        if self.merge.retain_weight == 1.0:
            return per.mean()
        w = torch.tensor([1.0 if e else self.merge.retain_weight for e in erased],
                         device=per.device)
        return (per * w).sum() / w.sum()

    def postfix(self, r: IterationResult) -> dict[str, str]:
        return {"mse": f"{r.loss_erase:.2e}"}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> Path:
        tensors = {f"params.{n}": m for n, m in zip(self.names, self.master, strict=True)}
        opt_t, opt_meta = optimizer_tensors(self.optimizer, "optim")
        tensors.update(opt_t)
        adv_meta = {}
        for i, c in enumerate(self.concepts):
            if c in self.adv:
                tensors[f"adv.{i}"] = self.adv[c].detach()
                adv_t, adv_meta[c] = optimizer_tensors(self.adv_opts[c], f"adv_optim.{i}")
                tensors.update(adv_t)
        loop_tensors, meta = self.loop_state()
        tensors.update(loop_tensors)
        meta.update(method=_METHOD, optim=opt_meta, adv_optim=adv_meta,
                    merge=self.merge.to_dict(),
                    source=self.source)
        path = self.out_dir / CHECKPOINT_FILE
        save_tensors(path, tensors, meta)
        return path

    @torch.no_grad()
    def restore(self, path: Path) -> None:
        tensors, meta = read_tensors(path)
        if meta.get("method") != _METHOD:
            raise ValueError(f"{path} is not a merge checkpoint: drop --resume")
        if meta["source"]["sha256"] != self.source["sha256"]:
            raise ValueError(f"{path} merges other erasers ({meta['source']['path']}) than "
                             f"{self.source['path']}: resume with those, or start again "
                             "with --overwrite")
        saved, asked = recorded_settings(meta["merge"]), self.merge.to_dict()
        for key in (k for k in asked if k not in _RESUMABLE_CHANGES):
            if saved[key] != asked[key]:
                raise ValueError(f"{path} was made with {key}={saved[key]!r}, not "
                                 f"{asked[key]!r}: resume with the same --{key.replace('_', '-')}"
                                 ", or start again without --resume")
        self.check_resumable(path, meta["config"])
        stored = sorted(k[len("params."):] for k in tensors if k.startswith("params."))
        if stored != sorted(self.names):
            raise ValueError(f"{path} holds other parameters than this UNet's: it was made "
                             "for another model")
        for n, m in zip(self.names, self.master, strict=True):
            m.copy_(tensors[f"params.{n}"])
        restore_optimizer(self.optimizer, "optim", tensors, meta["optim"])
        for i, c in enumerate(self.concepts):
            if c in self.adv:
                self.adv[c].copy_(tensors[f"adv.{i}"])
                restore_optimizer(self.adv_opts[c], f"adv_optim.{i}", tensors,
                                  meta["adv_optim"][c])
        self.restore_loop_state(tensors, meta)

    # ------------------------------------------------------------------ the result
    def finish(self) -> dict[str, Any]:
        """Write the merged UNet into ``out_dir/unet`` (a full diffusers folder, safetensors)
        with ``merge_config.json``; returns that file's content."""
        unet = merged_unet(self.unet, self.merged_weights())
        folder = self.out_dir / "unet"
        if folder.exists():
            shutil.rmtree(folder)
        unet.save_pretrained(folder, safe_serialization=True)
        mask = os.umask(0)
        os.umask(mask)
        for file in folder.iterdir():  # diffusers writes its weights private (0600)
            os.chmod(file, 0o666 & ~mask)
        stats = {"trainable_parameters": self.trainable_parameters,
                 "unet_forward": self.passes.forward, "unet_backward": self.passes.backward,
                 "seconds": self.seconds}
        record = {"format": "receler-merged-unet", "receler_version": __version__,
                  "concepts": self.concepts, "source": self.source,
                  "parameters": self.names, "merge": self.merge.to_dict(),
                  "retain_prompts": [""] + self.config.concepts[len(self.concepts):],
                  "stats": stats, "fidelity": self.fidelity()}
        text = json.dumps(record, indent=2, sort_keys=True) + "\n"
        atomic_write(folder / MERGE_FILE, lambda tmp: tmp.write_text(text))
        return record

    @torch.no_grad()
    def fidelity(self) -> dict[str, Any]:
        """MSE to the erased model's ``ε`` of the base UNet and of the merged one, on
        held-out trajectories of the erased model (their own seed): per group
        (``concept``: the erased concepts; ``retain``: the retain prompts and ``""``), with
        ``mse_merged_to_base`` the merged UNet's MSE to the base model's ``ε`` (what
        ``retain_target='base'`` trains the retain prompts towards), and
        ``kept``: 1 − merged/base on the concepts, the share of the erasers' change of the
        concept's predictions that the merged weights reproduce (1: all of it, 0: none)."""
        n = self.merge.eval_trajectories
        if n == 0:
            return {}
        g = torch.Generator(device="cpu").manual_seed(self.config.seed + 1)
        groups = {"concept": self.concepts, "retain": ["", *self.config.concepts[len(self.concepts):]]}
        out = {}
        for group, prompts in groups.items():
            sums = {"base": 0.0, "merged": 0.0, "merged_to_base": 0.0}
            for prompt in prompts:
                cond = self.uncond if prompt == "" else self.cond[prompt]
                for _ in range(n):
                    noise = torch.randn((1, *self.latent_shape), generator=g)
                    noise = noise.to(self.unet.device, self.uncond.hidden.dtype)
                    path = ddim_until(self.pipe, self.sched, noise, self.uncond, cond,
                                      self.config.start_guidance, self.config.ddim_steps - 1,
                                      keep=True)  # (steps, C, H, W), one row per timestep
                    rows = Conditioning(cond.hidden.expand(len(path), -1, -1),
                                        None if cond.added is None else
                                        {k: v.expand(len(path), *v.shape[1:])
                                         for k, v in cond.added.items()})
                    t = self.sched.timesteps[:len(path)]
                    teacher = unet_eps(self.unet, path, t, rows).float()
                    with erasers_disabled(self.unet):
                        base = unet_eps(self.unet, path, t, rows).float()
                    merged = self.student_eps(path, t, rows).float()
                    sums["base"] += F.mse_loss(base, teacher).item()
                    sums["merged"] += F.mse_loss(merged, teacher).item()
                    sums["merged_to_base"] += F.mse_loss(merged, base).item()
            k = len(prompts) * n
            out[group] = {"mse_base": sums["base"] / k, "mse_merged": sums["merged"] / k,
                          "mse_merged_to_base": sums["merged_to_base"] / k,
                          "prompts": len(prompts), "trajectories": n}
        base = out["concept"]["mse_base"]
        out["kept"] = 1.0 - out["concept"]["mse_merged"] / base if base > 0 else None
        return out


def merged_unet(unet: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain copy of ``unet`` (same class and config, no erasers) with ``weights``
    replacing its parameters of those names. Built on the meta device and given the
    tensors themselves, so it costs no second UNet's memory."""
    state = {k: v for k, v in unet.state_dict().items() if f".{ERASER_ATTR}." not in k}
    missing = sorted(set(weights) - set(state))
    assert not missing, f"merged weights name no UNet parameter: {missing[0]}"
    state.update({k: v.detach() for k, v in weights.items()})
    with torch.device("meta"):
        plain = type(unet).from_config(unet.config)
    plain.load_state_dict(state, strict=True, assign=True)
    meta = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    assert not meta, f"{meta[0]} was left on the meta device"
    return plain.requires_grad_(False).eval()


def _resolve(config: MergeConfig, saved) -> tuple[MergeConfig, TrainConfig, list[str]]:
    """``config`` with its ``None`` fields taken from the erasers' training settings (the
    retain weight from their number of concepts), the loop's TrainConfig and the retain
    prompts (the empty prompt left out: every batch
    holds it)."""
    from .train import mentions_concept

    train = TrainConfig.from_dict({**saved.train, "concepts": saved.concepts}) \
        if saved.train else TrainConfig(concepts=saved.concepts)
    resolved = MergeConfig(**{
        **config.to_dict(),
        "retain": train.anchors if config.retain is None else config.retain,
        "ddim_steps": config.ddim_steps or train.ddim_steps,
        "start_guidance": (train.start_guidance if config.start_guidance is None
                           else config.start_guidance),
        "retain_weight": retain_weight(config.retain_weight, len(saved.concepts))})
    concepts = list(saved.concepts)
    retain = [p.strip() for p in resolved.retain.split("|")]
    retain = list(dict.fromkeys(p for p in retain
                                if p and p not in concepts and not mentions_concept(p, concepts)))
    loop = TrainConfig(concepts=[*concepts, *retain], iterations=resolved.iterations,
                       lr=resolved.lr, ddim_steps=resolved.ddim_steps,
                       start_guidance=resolved.start_guidance, zt_reuse=resolved.zt_reuse,
                       seed=resolved.seed, checkpoint_every=resolved.checkpoint_every,
                       mask_image_every=0, adv_steps=0)
    return resolved, loop, concepts


def resolved_config(config: MergeConfig, saved) -> MergeConfig:
    """``config`` as an export of the erasers whose :class:`~receler.methods.EditConfig` is
    ``saved`` runs it (what ``merge_config.json`` records under ``merge``)."""
    return _resolve(config, saved)[0]


def both_stages(erase: dict[str, Any], export: dict[str, Any]) -> dict[str, Any]:
    """UNet forward and backward passes and seconds of the erasers' training (``erase``,
    their recorded stats; missing counts as 0) and of their export (``export``, the stats
    in ``merge_config.json``) together: what the exported model cost."""
    return {k: erase.get(k, 0) + export[k] for k in ("unet_forward", "unet_backward", "seconds")}


def erasers_sha256(folder: str | Path) -> str:
    """The fingerprint of an erasers folder that an export records as its source."""
    return _sha256(Path(folder) / ERASERS_FILE)


def export_merged(pipe, erasers: str | Path, out: str | Path, config: MergeConfig | None = None,
                  *, overwrite: bool = False, resume: bool = False, show_progress: bool = True,
                  callbacks: list[Callable] | None = None) -> MergeResult:
    """Distil the erasers of ``erasers`` into ``pipe``'s UNet weights; write the merged UNet
    as a diffusers folder ``out`` (``config.json``, ``diffusion_pytorch_model.safetensors``,
    ``merge_config.json``, ``train_log.jsonl``, ``loss_curves.png``).

    ``out`` appears whole or not at all: the export trains in a work folder beside it
    (:func:`work_folder`, checkpointed every ``checkpoint_every`` iterations and on
    Ctrl-C) and renames the finished UNet folder into place. ``pipe`` is left as it was.

    Args:
        pipe: the base pipeline, no edit applied.
        erasers: a ``receler erase`` folder of an eraser-based method.
        out: the merged UNet's folder.
        config: merge settings (default :class:`MergeConfig`).
        overwrite: replace an existing ``out``.
        resume: continue the interrupted export into ``out`` from its checkpoint.
        callbacks: ``cb(loop, result)`` after every iteration.

    Raises:
        ValueError, FileNotFoundError, FileExistsError: bad input, before anything trains.
        receler.loop.TrainingInterrupted: after Ctrl-C, once checkpointed.
    """
    erasers, out = Path(erasers), Path(out)
    saved = check_erasers_folder(erasers)
    check_out(out, overwrite=overwrite, resume=resume)
    config, loop_config, concepts = _resolve(config or MergeConfig(), saved)
    source = {"path": str(erasers), "sha256": _sha256(erasers / ERASERS_FILE),
              "method": saved.method, "base_model": saved.base_model}
    load_erasers(pipe, erasers)
    work = work_folder(out)
    try:
        loop = MergeLoop(pipe, config, loop_config, concepts, work, source=source,
                         callbacks=callbacks, show_progress=show_progress)
        if not resume and work.exists():
            shutil.rmtree(work)
        record = loop.train(resume=resume)
    finally:
        remove_erasers(pipe.unet)
    folder = work / "unet"
    for name in ("train_log.jsonl", "loss_curves.png"):
        if (work / name).is_file():
            shutil.copy2(work / name, folder / name)
    _move_into_place(folder, out)
    shutil.rmtree(work)
    return MergeResult(out, record["stats"], record["fidelity"])


def _move_into_place(folder: Path, out: Path) -> None:
    """Rename ``folder`` onto ``out``; an existing ``out`` is moved aside first and deleted
    once the new one is in place."""
    old = out.parent / f".{out.name}.replaced"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(folder, out)
    if old.exists():
        shutil.rmtree(old)
