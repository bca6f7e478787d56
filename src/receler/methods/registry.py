"""One interface over every erasure method, so a benchmark can compare them on the same
model, prompts, seeds and detector.

``erase_with(name, pipe, config, out_dir)`` runs a method and leaves ``pipe`` edited;
``load_edit(pipe, out_dir)`` applies a saved result to a freshly loaded pipeline,
dispatching on ``eraser_config.json``'s ``method``; ``remove_edit(pipe)`` undoes
whatever was applied and ``edit_disabled(pipe)`` runs the base model for a block.

Every method reads the shared :class:`~receler.config.TrainConfig` (only the fields
listed in its :class:`Method` entry) and, for the closed-form edits (UCE, RECE, SPEED), SLD
and AdvUnlearn, an options dataclass. AdvUnlearn edits ``pipe.text_encoder`` instead of the
UNet; ``load_edit``, ``remove_edit`` and ``edit_disabled`` handle both.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import TrainConfig, model_method_options
from ..erasers import (
    eraser_dim,
    erasers_disabled,
    find_cross_attention,
    get_erasers,
    remove_erasers,
)
from ..serialization import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    ERASERS_FILE,
    atomic_write,
    check_out_dir,
    commit_work_dir,
    load_erasers,
    start_work_dir,
    work_dir,
)
from ..train import Trainer
from .advunlearn import PAPER_DEFAULTS as ADVUNLEARN_PAPER_DEFAULTS
from .advunlearn import (
    TEXT_EDIT_FILE,
    AdvUnlearnOptions,
    AdvUnlearnTrainer,
    apply_text_encoder_edit,
    count_advunlearn_parameters,
    read_text_encoder_edit,
    restore_text_encoder_edit,
    text_encoder_edit,
    text_encoder_edit_disabled,
)
from .edits import (
    EDIT_FILE,
    EditConfig,
    apply_unet_edit,
    current_edit,
    read_unet_edit,
    restore_unet_edit,
    save_unet_edit,
    unet_edit_disabled,
)
from .esd import PAPER_DEFAULTS as ESD_PAPER_DEFAULTS
from .esd import EsdTrainer, count_esd_parameters
from .mace import MaceOptions, mace_weights
from .rece import ReceOptions, rece_weights
from .sld import SldOptions, attach_sld, get_sld, remove_sld
from .speed import SpeedOptions, speed_parameter_names, speed_weights
from .uce import UceOptions, count_uce_parameters, uce_weights

logger = logging.getLogger(__name__)

_ESD_FIELDS = ("concepts", "iterations", "lr", "eta", "start_guidance", "ddim_steps", "seed",
               "checkpoint_every")
_ADVUNLEARN_FIELDS = ("concepts", "iterations", "lr", "eta", "start_guidance", "ddim_steps",
                      "zt_reuse", "adv_steps", "adv_tokens", "adv_lr", "adv_start", "seed",
                      "checkpoint_every")
_RECELER_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


@dataclass(frozen=True)
class Method:
    """How one erasure method is run, loaded and counted."""

    name: str
    summary: str
    config_fields: tuple[str, ...]  # TrainConfig fields the method reads
    options: type | None = None  # dataclass of the method's extra settings
    preset: dict[str, Any] = dataclasses.field(default_factory=dict)  # TrainConfig overrides
    paper_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)  # not auto-applied
    resumable: bool = False
    files: tuple[str, ...] = ()  # weight files it writes besides eraser_config.json

    @property
    def uses_erasers(self) -> bool:
        return ERASERS_FILE in self.files

    @property
    def seeded(self) -> bool:
        """Whether a training seed changes the result (UCE, MACE, RECE, SPEED and SLD:
        no; their one run stands for every seed)."""
        return "seed" in self.config_fields


def _receler(name: str, summary: str, preset: dict[str, Any]) -> Method:
    return Method(name, summary, _RECELER_FIELDS, preset=preset, resumable=True,
                  files=(ERASERS_FILE,))


METHODS: dict[str, Method] = {m.name: m for m in [
    _receler("receler", "Receler: erasers + concept-localised regularisation + adversarial "
             "prompts", {}),
    _receler("receler-eraser-only", "ablation: erasers alone (no regularisers, no attack)",
             {"reg_weight": 0.0, "anchor_weight": 0.0, "adv_steps": 0}),
    _receler("receler-eraser-reg", "ablation: erasers + regularisers (mask, and the anchor "
             "where the settings use it; no attack)", {"adv_steps": 0}),
    _receler("receler-eraser-adv", "ablation: erasers + attack (no regularisers)",
             {"reg_weight": 0.0, "anchor_weight": 0.0}),
    Method("esd-x", "ESD-x: fine-tune every cross-attention (attn2) parameter", _ESD_FIELDS,
           paper_defaults=ESD_PAPER_DEFAULTS, resumable=True, files=(EDIT_FILE,)),
    Method("esd-u", "ESD-u: fine-tune everything but attn2, time embedding and output layers",
           _ESD_FIELDS, paper_defaults=ESD_PAPER_DEFAULTS, resumable=True, files=(EDIT_FILE,)),
    Method("uce", "UCE: closed-form edit of attn2.to_k/to_v mapping the concept to an anchor",
           ("concepts",), options=UceOptions, files=(EDIT_FILE,)),
    Method("rece", "RECE: UCE, then rounds that derive the embedding still regenerating the "
           "concept (closed form) and erase it too", ("concepts",), options=ReceOptions,
           files=(EDIT_FILE,)),
    Method("speed", "SPEED: closed-form edit of attn2.to_v (or to_k) in the null space of the "
           "retained concepts' embeddings", ("concepts",), options=SpeedOptions,
           files=(EDIT_FILE,)),
    Method("mace", "MACE: closed-form refinement of attn2.to_k/to_v, a LoRA per concept on an "
           "attention-map loss, closed-form fusion of the LoRAs", ("concepts",),
           options=MaceOptions, files=(EDIT_FILE,)),
    Method("sld", "SLD: safety guidance at inference (hooks on the UNet), nothing trained",
           ("concepts",), options=SldOptions),
    Method("advunlearn", "AdvUnlearn: adversarial training of the text encoder (ESD's erase "
           "loss through the frozen UNet, soft-token attack, retain term)", _ADVUNLEARN_FIELDS,
           options=AdvUnlearnOptions, paper_defaults=ADVUNLEARN_PAPER_DEFAULTS, resumable=True,
           files=(TEXT_EDIT_FILE,)),
]}


# Closed-form weight edits: (pipe, concepts, options) -> (UNet weights, extra stats).
_CLOSED_FORM: dict[str, Callable[..., tuple[dict, dict]]] = {
    "uce": lambda pipe, concepts, opts: (uce_weights(pipe, concepts, opts), {}),
    "rece": lambda pipe, concepts, opts: _with_rounds(*rece_weights(pipe, concepts, opts)),
    "speed": speed_weights,
    "mace": mace_weights,
}


def _with_rounds(weights: dict, rounds: list[dict]) -> tuple[dict, dict]:
    return weights, {"rounds": rounds}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown erasure method {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_config(name: str, config: TrainConfig) -> TrainConfig:
    """``config`` with the method's preset applied (the Receler ablations)."""
    preset = get_method(name).preset
    return dataclasses.replace(config, **preset) if preset else config


def method_options(name: str, options: Any = None) -> Any:
    """The method's options dataclass from ``None`` (defaults), a dict or an instance."""
    kind = get_method(name).options
    if kind is None:
        if options:
            raise ValueError(f"method {name!r} takes no options, got {options!r}")
        return None
    if options is None:
        return kind()
    if isinstance(options, kind):
        return options
    if isinstance(options, dict):
        known = {f.name for f in dataclasses.fields(kind)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"{name} has no option {unknown[0]!r}: known are {sorted(known)}")
        return kind(**options)
    raise TypeError(f"options of {name} must be a {kind.__name__} or a dict, "
                    f"not {type(options).__name__}")


def trainable_parameters(name: str, pipe, config: TrainConfig | None = None, *,
                         options: Any = None) -> int:
    """Parameters the method changes: on ``pipe.unet`` (erasers for Receler, 0 for SLD) or,
    for AdvUnlearn, on ``pipe.text_encoder``; ``options`` matter for SPEED (which
    projections it edits) and AdvUnlearn (which layers it trains)."""
    unet = pipe.unet
    if name == "advunlearn":
        return count_advunlearn_parameters(pipe.text_encoder, method_options(name, options))
    if name.startswith("esd-"):
        return count_esd_parameters(unet, name)
    if name in ("uce", "rece", "mace"):
        return count_uce_parameters(unet)
    if name == "speed":
        params = dict(unet.named_parameters())
        names = speed_parameter_names(unet, method_options(name, options).params)
        return sum(params[n].numel() for n in names)
    if name == "sld":
        return 0
    get_method(name)
    config = config or TrainConfig(concepts="x")
    rank = config.rank
    dims = [eraser_dim(a, config.eraser_site) for a in find_cross_attention(unet).values()]
    return sum(2 * d * rank + rank + d for d in dims)  # down (d→r) + up (r→d), with biases


def settings_mismatch(name: str, config: TrainConfig, saved: EditConfig) -> str | None:
    """How a finished or checkpointed run in a folder differs from what is asked now: the
    method, a training setting that the method reads, or a method option (against what its
    ``base_model`` recommends now, else the defaults: a run made with ``options=None``).
    ``None`` when they agree."""
    if saved.method != name:
        return f"method {saved.method!r}, not {name!r}"
    asked = method_config(name, config).to_dict()
    for key in get_method(name).config_fields:
        if key in ("checkpoint_every", "mask_image_every"):  # bookkeeping, not the result
            continue
        if key.startswith("adv_") and key != "adv_steps" and asked.get("adv_steps") == 0:
            continue  # no attack: its settings change nothing
        if config.inert(key):
            continue  # e.g. the concept balance with one concept
        if key in saved.train and saved.train[key] != asked[key]:
            return f"{key}={saved.train[key]!r}, not {asked[key]!r}"
    if get_method(name).options is not None and saved.options:
        # what a fresh run would use: the saved model folder's recommendation, else defaults
        recommended = model_method_options(saved.base_model, name) if saved.base_model else None
        for key, value in asdict(method_options(name, recommended or None)).items():
            if key in saved.options and saved.options[key] != value:
                return f"option {key}={saved.options[key]!r}, not {value!r}"
    return None


def _check_folder(method: Method, out_dir: Path, *, overwrite: bool, resume: bool) -> None:
    if resume:
        if not method.resumable:
            raise ValueError(f"{method.name} has no training loop to resume: drop --resume")
        check_out_dir(out_dir, overwrite=overwrite, resume=True)
        return
    holds = [n for n in (CONFIG_FILE, ERASERS_FILE, EDIT_FILE, TEXT_EDIT_FILE, CHECKPOINT_FILE)
             if (out_dir / n).exists()]
    if holds and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {holds[0]}: pass --overwrite to replace "
                              "it, --resume to continue it, or choose another --out")
    check_out_dir(out_dir, overwrite=overwrite, resume=False)  # e.g. --out is a file


def _holds_edit(pipe) -> bool:
    unet = pipe.unet
    return bool(get_erasers(unet) or current_edit(unet) is not None or get_sld(unet) is not None
                or text_encoder_edit(pipe) is not None)


def _write_config(out_dir: Path, config: EditConfig) -> None:
    atomic_write(out_dir / CONFIG_FILE, config.save)


def erase_with(name: str, pipe, config: TrainConfig, out_dir: str | Path, *,
               base_model: str = "", overwrite: bool = False, resume: bool = False,
               options: Any = None, show_progress: bool = True,
               callbacks: list[Callable] | None = None) -> EditConfig:
    """Erase ``config.concepts`` from ``pipe`` with method ``name``; save into ``out_dir``.

    ``pipe`` is left edited (erasers attached, weights replaced or SLD hooked), and
    :func:`remove_edit` undoes it.

    Args:
        name: a key of :data:`METHODS`.
        pipe: a loaded pipeline with no edit applied yet.
        config: shared settings; the method reads the fields in ``METHODS[name].config_fields``
            (the Receler ablations override theirs with ``METHODS[name].preset``).
        out_dir: result folder (refused if it already holds one, unless ``overwrite``).
        base_model: recorded in ``eraser_config.json``.
        options: the method's settings (:class:`UceOptions`, :class:`ReceOptions`,
            :class:`SpeedOptions`, :class:`SldOptions`, :class:`AdvUnlearnOptions` or a
            dict); ``None``: what
            ``base_model``'s ``receler_defaults.json`` recommends (``"erase"`` → method →
            ``"options"``, used only when no options are given), else the defaults.
        callbacks: ``cb(trainer, result)`` after each iteration (Receler, ESD, AdvUnlearn).

    Returns:
        The :class:`EditConfig` written to ``out_dir/eraser_config.json``, with ``stats``.
    """
    method = get_method(name)
    out_dir = Path(out_dir)
    config = method_config(name, config)
    if options is None:  # the model folder's recommendation, e.g. the toy model's SLD preset
        options = model_method_options(base_model, name) if base_model else None
        if options:
            logger.info("%s options recommended by %s: %s", name, base_model, options)
    opts = method_options(name, options)
    unet = pipe.unet
    if _holds_edit(pipe):
        raise ValueError("this pipeline already holds an edit: remove_edit(pipe) first, or load "
                         "a fresh pipeline")
    _check_folder(method, out_dir, overwrite=overwrite, resume=resume)
    # A run that replaces a result writes elsewhere and moves in once finished (see
    # serialization.work_dir): the old result stays whole until then.
    final_dir, out_dir = out_dir, work_dir(out_dir, overwrite=overwrite, resume=resume)
    common = dict(concepts=list(config.concepts), base_model=base_model, method=name,
                  train=config.to_dict(), options=asdict(opts) if opts is not None else {})
    start = time.perf_counter()
    if method.uses_erasers:
        trainer = Trainer(pipe, config, out_dir, base_model=base_model, callbacks=callbacks,
                          show_progress=show_progress)  # checks every input first
        if not resume:
            start_work_dir(final_dir, out_dir)
        saved = trainer.train(resume=resume)
        result = EditConfig(**{**common, "rank": saved.rank, "site": saved.site, "act": saved.act,
                               "layers": saved.layers}, stats={
            "trainable_parameters": sum(p.numel() for p in trainer.optimizer.param_groups[0]["params"]),
            "unet_forward": trainer.passes.forward, "unet_backward": trainer.passes.backward,
            "seconds": trainer.seconds})
    elif name.startswith("esd-"):
        trainer = EsdTrainer(pipe, config, out_dir, variant=name, base_model=base_model,
                             callbacks=callbacks, show_progress=show_progress)
        if not resume:
            start_work_dir(final_dir, out_dir)
        result = trainer.train(resume=resume)
    elif name == "advunlearn":
        trainer = AdvUnlearnTrainer(pipe, config, out_dir, options=opts, base_model=base_model,
                                    callbacks=callbacks, show_progress=show_progress)
        if not resume:
            start_work_dir(final_dir, out_dir)
        result = trainer.train(resume=resume)
    elif name in _CLOSED_FORM:
        edited, extra = _CLOSED_FORM[name](pipe, list(config.concepts), opts)
        start_work_dir(final_dir, out_dir)
        apply_unet_edit(unet, edited, method=name)
        save_unet_edit(unet, list(edited), out_dir, method=name)
        result = EditConfig(**common, rank=0, stats={
            "trainable_parameters": sum(edited[n].numel() for n in edited), "unet_forward": 0,
            "unet_backward": 0, "seconds": time.perf_counter() - start, **extra})
    else:  # sld: "training" is saving its settings
        attach_sld(pipe, list(config.concepts), opts)
        start_work_dir(final_dir, out_dir)
        result = EditConfig(**common, rank=0, stats={
            "trainable_parameters": 0, "unet_forward": 0, "unet_backward": 0, "seconds": 0.0})
    _write_config(out_dir, result)
    for stale in {ERASERS_FILE, EDIT_FILE, TEXT_EDIT_FILE} - set(method.files):  # another method's weights
        (out_dir / stale).unlink(missing_ok=True)
    commit_work_dir(final_dir, out_dir)
    return result


def load_edit(pipe, out_dir: str | Path, *, keep_original: bool = True) -> EditConfig:
    """Apply the result in ``out_dir`` (erasers, replaced UNet or text-encoder weights, or
    SLD) to ``pipe``.

    Everything is checked before the UNet changes: a file made for another UNet is
    refused with the parameter and both shapes.

    Args:
        pipe: a loaded pipeline with no edit applied.
        out_dir: a folder written by :func:`erase_with` (or by ``receler erase``).
        keep_original: for weight edits, keep the replaced weights so :func:`remove_edit`
            and :func:`edit_disabled` work (costs their size in memory).

    Returns:
        The folder's :class:`EditConfig`.
    """
    folder = Path(out_dir)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder}: pass the --out folder of a "
                                "finished erase run")
    config = EditConfig.load(folder / CONFIG_FILE)
    method = get_method(config.method)
    unet = pipe.unet
    if _holds_edit(pipe):
        raise ValueError("this pipeline already holds an edit: remove_edit(pipe) first")
    if method.uses_erasers:
        load_erasers(pipe, folder)
    elif TEXT_EDIT_FILE in method.files:
        tensors = read_text_encoder_edit(pipe.text_encoder, folder / TEXT_EDIT_FILE)
        apply_text_encoder_edit(pipe.text_encoder, tensors, keep_original=keep_original)
    elif EDIT_FILE in method.files:
        tensors = read_unet_edit(unet, folder / EDIT_FILE, method=method.name)
        apply_unet_edit(unet, tensors, method=method.name, keep_original=keep_original)
    else:
        attach_sld(pipe, config.concepts, method_options(method.name, config.options))
    return config


def remove_edit(pipe) -> list[str]:
    """Undo whatever :func:`erase_with` or :func:`load_edit` applied; returns what was removed."""
    unet, removed = pipe.unet, []
    if remove_erasers(unet):
        removed.append("erasers")
    if remove_sld(unet):
        removed.append("sld")
    for method in (restore_unet_edit(unet), restore_text_encoder_edit(pipe)):
        if method is not None:
            removed.append(method)
    return removed


@contextmanager
def edit_disabled(pipe) -> Iterator[None]:
    """The base model inside the block, whatever edit the pipeline holds."""
    unet = pipe.unet
    sld = get_sld(unet)
    with ExitStack() as stack:
        stack.enter_context(erasers_disabled(unet))
        stack.enter_context(unet_edit_disabled(unet))
        stack.enter_context(text_encoder_edit_disabled(pipe))
        if sld is not None:
            sld.enabled = False
            stack.callback(setattr, sld, "enabled", True)
        yield

