"""Typed configs. The same objects feed the CLI flags, the Python API and the JSON
saved beside the eraser weights."""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import __version__


def _f(default: Any, help: str) -> Any:
    """A dataclass field with its help text; ``list``/``dict`` mean an empty one."""
    if default in (list, dict):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def scalar_type(hint: Any) -> tuple[type, bool]:
    """The scalar type (int, float or str) of a settings field's resolved annotation
    (``typing.get_type_hints``) and whether it may be ``None``: what a flag converts its
    value with."""
    import types
    import typing

    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = typing.get_args(hint) if union else ()
    kind = next((t for t in (int, float, str) if hint is t or t in args), None)
    if kind is None:
        raise TypeError(f"a setting of type {hint} has no flag: use int, float or str")
    return kind, type(None) in args


def parse_concepts(text: str | list[str]) -> list[str]:
    """Concepts to erase: a list is taken as it is, each item one concept (commas kept, as
    the reference code erases ``"red, cat"`` as one prompt); a string is split on commas
    (``"car, truck"`` → ``["car", "truck"]``). Refuses empty and repeated concepts."""
    if isinstance(text, str):
        items = text.split(",")
    elif isinstance(text, list | tuple) and all(isinstance(c, str) for c in text):
        items = list(text)
    else:
        raise TypeError(f"concepts must be a string or a list of strings, got {text!r}")
    concepts = [c.strip() for c in items]
    if not concepts or any(not c for c in concepts):
        raise ValueError(
            f"empty concept in {text!r}: pass one or more concepts, e.g. --concept car "
            "--concept truck"
        )
    seen = set()
    for c in concepts:
        if c in seen:
            raise ValueError(f"concept {c!r} is listed twice in {text!r}: list each concept once")
        seen.add(c)
    return concepts


def cli_concepts(values: list[str]) -> list[str]:
    """``--concept`` given once or more: each value is one concept, commas kept. Several
    values one of which holds a comma are refused: is ``"car, truck"`` then one concept or
    two?"""
    for v in values:
        if "," in v and any(not part.strip() for part in v.split(",")):
            raise ValueError(f"empty concept in --concept {v!r}: a concept may hold commas "
                             "between words (\"red, cat\"), not empty parts; pass each "
                             "concept as its own --concept")
    if len(values) > 1:
        for v in values:
            if "," in v:
                raise ValueError(
                    f"--concept {v!r} holds a comma while --concept is given {len(values)} "
                    "times: is it one concept or two? Pass each concept as its own --concept, "
                    "or a comma-holding concept alone")
    return parse_concepts(list(values))


MASK_SOURCES = ("attention", "guidance")
ADV_INITS = ("prompt", "uniform")
ERASER_SITES = ("output", "input")  # where an eraser acts: attn2's output, or its text tokens
ERASER_ACTIVATIONS = ("gelu", "linear")  # the eraser MLP's non-linearity ("linear": none)
ERASE_ON = ("both", "attacked")
SPACES = ("output", "input")  # where the soft-prompt attack's tokens go (AttackConfig.space)
ANCHOR_LATENTS = ("concept", "own")  # where the anchor prompts are held (TrainConfig.anchor_latents)
# `--preset paper`: what the official code (jasper0314-huang/Receler, train_receler.py)
# trains: its argparse defaults (500 iterations, lr 3e-4, rank 128, regulariser 0.1,
# threshold 0.1, 50 DDIM steps, start guidance 3, 16 soft tokens, attack from the first
# iteration) and its inner loop: 50 attack steps with Adam(lr=0.1, weight_decay=0.1) on
# soft tokens initialised with torch.rand (U[0,1)), the eraser step on the attacked prompt
# only. A model's own recommendations are not applied under a preset; flags still win.
PRESETS = {
    "paper": {"iterations": 500, "lr": 3e-4, "rank": 128, "eta": 1.0, "start_guidance": 3.0,
              "ddim_steps": 50, "zt_reuse": 1, "reg_weight": 0.1, "mask_source": "attention",
              "mask_threshold": 0.1, "anchor_weight": 0.0, "adv_steps": 50, "adv_tokens": 16,
              "adv_lr": 0.1, "adv_start": 0, "adv_weight_decay": 0.1, "adv_init": "uniform",
              "erase_on": "attacked"},
}
MODEL_DEFAULTS_FILE = "receler_defaults.json"


def default_model() -> str:
    """Path of the toy-world pipeline that ships with receler (the default ``--model``).
    Here, not in :mod:`receler.pipeline`, so that the CLI can name it without importing
    diffusers (``receler --help`` and a bad flag answer at once)."""
    try:
        from .toyworld import default_model_path
    except ImportError:
        raise FileNotFoundError(
            "no default model: the toy-world model is not part of this install yet; "
            "pass --model with a hub id or a local diffusers folder"
        ) from None
    return str(default_model_path())


def _model_erase_section(model: str | Path | None, method: str
                         ) -> tuple[Path | None, dict[str, Any]]:
    """The ``"erase"`` → method (or family) object of a model folder's defaults file."""
    path = Path(model) / MODEL_DEFAULTS_FILE if model else None
    if path is None or not path.is_file():
        return None, {}
    data = read_json_object(path)
    section = data.get("erase", {})
    if not isinstance(section, dict):
        raise ValueError(f"{path}: \"erase\" must be an object of per-method settings, got "
                         f"{type(section).__name__}; fix or delete the file")
    settings = section.get(method, section.get(method.split("-")[0], {}))
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: the {method} settings must be an object, got "
                         f"{type(settings).__name__}; fix or delete the file")
    options = settings.get("options", {})
    if not isinstance(options, dict):
        raise ValueError(f"{path}: the {method} \"options\" must be an object of method "
                         f"options, got {type(options).__name__}; fix or delete the file")
    return path, settings


def model_erase_defaults(model: str | Path | None, method: str) -> dict[str, Any]:
    """Training settings that a model folder recommends for ``method``.

    They sit in the ``"erase"`` section of the folder's ``receler_defaults.json``, keyed by
    method name or by family (``"receler"`` also covers the ``receler-*`` ablations, ``"esd"``
    covers ``esd-x`` and ``esd-u``). Hub ids and folders without the file recommend nothing,
    so SD models train with the papers' settings. The method's own options (e.g. SLD's
    preset) sit in that object's ``"options"``: see :func:`model_method_options`.
    """
    path, settings = _model_erase_section(model, method)
    settings = {k: v for k, v in settings.items() if k != "options"}
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    for key, value in settings.items():
        if key not in kinds or key == "concepts":
            raise ValueError(f"{path} recommends unknown training setting {key!r} for "
                             f"{method}; known settings are the flags of `receler erase`")
        kind = kinds[key].split(" | ")[0]
        ok = {"int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, int | float) and not isinstance(value, bool),
              "str": isinstance(value, str)}.get(kind, True)
        if not ok:
            raise ValueError(f"{path} recommends {key}={value!r} for {method}, which is not "
                             f"a{'n' if kind == 'int' else ''} {kind}; fix or delete the file")
    return settings


def model_method_options(model: str | Path | None, method: str) -> dict[str, Any]:
    """Method options (``--method-option`` values) that a model folder recommends: the
    ``"options"`` object of its ``"erase"`` → method settings; checked by the method's
    options dataclass when used (:func:`receler.methods.registry.method_options`)."""
    return dict(_model_erase_section(model, method)[1].get("options", {}))


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object, with one-line errors that name the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}; fix or delete the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(data).__name__}; fix or "
                         "delete the file")
    return data


@dataclass
class TrainConfig:
    """Settings of ``receler erase``. Defaults follow the Receler paper."""

    concepts: list[str] = _f(MISSING, "concepts to erase: a list, each item one concept (commas "
                                      "kept), or one string split on commas")
    iterations: int = _f(500, "eraser training iterations (one sampled z_t each)")
    lr: float = _f(3e-4, "learning rate of the erasers (Adam)")
    rank: int = _f(128, "hidden width of each eraser MLP")
    eraser_site: str = _f(
        "output", "where each eraser acts: 'output' (the cross-attention output, as in the "
        "paper) or 'input' (each text token the cross-attention attends to, before to_k and "
        "to_v; no concept mask there, so it needs --reg-weight 0)")
    eraser_act: str = _f("gelu", "the eraser MLP's non-linearity: 'gelu' (the paper) or 'linear' "
                                 "(none: each eraser is a low-rank linear map)")
    eta: float = _f(1.0, "negative guidance η of the erase target ε(∅) − η·(ε(c) − ε(∅))")
    concept_balance: float = _f(
        0.0, "with several concepts, each concept's erase loss is scaled by (the concepts' mean "
        "guidance energy / its own)^B, the energy being a running mean of ‖ε(c) − ε(∅)‖² of the "
        "frozen model on the iteration's z_t, so that a concept whose prompts move the model "
        "little is not drowned out by the others on the shared erasers (0 = off; no effect "
        "with one concept)")
    start_guidance: float = _f(3.0, "classifier-free guidance used when sampling z_t")
    ddim_steps: int = _f(50, "DDIM steps of the z_t sampler; t is drawn from them")
    zt_reuse: int = _f(1, "iterations that draw z_t from one cached DDIM trajectory (1 = a "
                          "fresh partial trajectory every iteration, as in the paper)")
    zt_base: float = _f(
        0.0, "share of iterations whose z_t is one of the frozen model's own images of the "
        "concept, noised to t (the latents the evaluation's soft-prompt attack is fitted on), "
        "instead of a partial trajectory of the erased model (0 = never, as in the paper)")
    base_images: int = _f(8, "images of each concept the frozen model draws once for --zt-base")
    base_guidance: float = _f(7.5, "classifier-free guidance of those images")
    reg_weight: float = _f(0.1, "weight of the concept-localised regularisation (0 = off)")
    mask_source: str = _f(
        "attention", "what the concept mask is made from: 'attention' (the frozen UNet's "
        "cross-attention on the concept tokens, as in the paper) or 'guidance' (|ε(c) − ε(∅)| "
        "of the frozen UNet, for models whose attention does not localise the concept)")
    mask_threshold: float = _f(0.1, "threshold of the min-max normalised attention mask")
    mask_resolution: int | None = _f(
        None, "attention resolution of the mask (default: latent/4 or the nearest one)")
    anchor_weight: float = _f(
        0.0, "weight of the anchor term: what the erasers would add to the frozen model on the "
        "anchor prompts is penalised (0 = off, as in the paper)")
    anchors: str = _f(
        "", "anchor prompts the erasers must leave alone, separated by '|' ('' = the empty "
        "prompt, anchored every iteration at no extra UNet pass; the others take turns, one "
        "extra frozen pass per iteration); an anchor naming an erased concept is dropped, "
        "so one retain set serves every concept")
    anchor_latents: str = _f(
        "concept", "latents the anchor prompts are held on: 'concept' (the iteration's z_t, "
        "from the concept's trajectory) or 'own' (each anchor's own images by the frozen "
        "model, --base-images of them drawn once, noised to the iteration's t: where the "
        "anchored objects' colours and shapes are decided; base-images × DDIM steps × 2 "
        "extra passes per anchor, once)")
    prompt_templates: str = _f(
        "", "prompts the concept is trained on, separated by '|', '{}' standing for the "
        "concept and ending each one so that the soft tokens follow it as the attack's do "
        "(e.g. '{}|a photo of a {}'); taken in turn ('' = the concept alone, as in the paper)")
    adv_steps: int = _f(10, "inner soft-prompt attack steps per iteration (0 = no attack)")
    adv_tokens: int = _f(16, "number of adversarial soft tokens after the concept tokens")
    adv_lr: float = _f(1e-2, "learning rate of the adversarial soft tokens (Adam)")
    adv_start: int = _f(0, "first iteration that uses adversarial prompts")
    adv_weight_decay: float = _f(0.0, "weight decay of the soft tokens' Adam (the paper's "
                                      "code: 0.1)")
    adv_init: str = _f("prompt", "soft-token start: 'prompt' (the embeddings they replace: no "
                                 "change at first) or 'uniform' (U[0,1), the paper's code)")
    adv_pool: int = _f(1, "adversarial soft prompts per concept, used in turn, one per "
                          "iteration (1 = one persistent prompt, as in the paper)")
    adv_reset: int = _f(0, "restart each soft prompt from its initialisation after this many "
                           "of its own uses, so the erasers keep meeting fresh attacks as the "
                           "evaluation's attacker is (0 = never); the pool's prompts restart "
                           "in turn, not all at once")
    erase_on: str = _f("both", "prompts of the eraser step once the attack runs: 'both' (the "
                               "plain and the attacked prompt, one batch) or 'attacked' (the "
                               "attacked prompt only, the paper's code)")
    init_erasers: str = _f(
        "", "eraser folder the run starts from instead of fresh erasers (sequential erasure: "
        "a set that already erases some concepts, trained further; list those concepts in "
        "--concept too, or the anchor term may undo them); its rank, site and activation "
        "must be this run's ('' = fresh erasers)")
    seed: int = _f(0, "seed of every random draw of the run")
    checkpoint_every: int = _f(50, "write a resumable checkpoint every N iterations")
    mask_image_every: int = _f(100, "save a picture of the concept mask every N iterations (0 = never)")

    def __post_init__(self):
        self.concepts = parse_concepts(self.concepts)
        positive = {"iterations": self.iterations, "rank": self.rank, "ddim_steps": self.ddim_steps,
                    "zt_reuse": self.zt_reuse, "base_images": self.base_images,
                    "adv_tokens": self.adv_tokens, "adv_pool": self.adv_pool,
                    "checkpoint_every": self.checkpoint_every}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        non_negative = {"adv_steps": self.adv_steps, "adv_start": self.adv_start,
                        "concept_balance": self.concept_balance,
                        "adv_reset": self.adv_reset,
                        "reg_weight": self.reg_weight, "anchor_weight": self.anchor_weight,
                        "mask_image_every": self.mask_image_every}
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0.0 <= self.zt_base <= 1.0:  # also refuses NaN
            raise ValueError(f"zt_base must lie in [0, 1], got {self.zt_base}")
        for name in ("lr", "adv_lr", "eta", "start_guidance", "base_guidance", "reg_weight",
                     "anchor_weight", "concept_balance"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.lr <= 0 or self.adv_lr <= 0:
            raise ValueError(f"learning rates must be positive, got lr={self.lr}, adv_lr={self.adv_lr}")
        if self.adv_weight_decay < 0 or not math.isfinite(self.adv_weight_decay):
            raise ValueError(f"adv_weight_decay must be a finite number >= 0, got "
                             f"{self.adv_weight_decay}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}: a negative η trains towards "
                             "the concept instead of away from it")
        for name, allowed in (("adv_init", ADV_INITS), ("erase_on", ERASE_ON),
                              ("eraser_site", ERASER_SITES), ("eraser_act", ERASER_ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got "
                                 f"{getattr(self, name)!r}")
        for t in self.templates:
            if t.count("{}") != 1 or not t.endswith("{}") or "{" in t.replace("{}", ""):
                raise ValueError(f"prompt template {t!r} must end with {{}} (the concept) and "
                                 "hold no other braces, e.g. 'a photo of a {}'")
        if self.eraser_site == "input" and self.reg_weight > 0:
            raise ValueError(f"reg_weight={self.reg_weight}: the concept mask is spatial and an "
                             "eraser at the 'input' site acts on text tokens; pass --reg-weight 0 "
                             "(and --anchor-weight to keep other prompts unchanged)")
        if self.anchor_latents not in ANCHOR_LATENTS:
            raise ValueError(f"anchor_latents must be one of {', '.join(ANCHOR_LATENTS)}, got "
                             f"{self.anchor_latents!r}")
        if self.mask_source not in MASK_SOURCES:
            raise ValueError(f"mask_source must be one of {', '.join(MASK_SOURCES)}, "
                             f"got {self.mask_source!r}")
        if not 0.0 <= self.mask_threshold <= 1.0:
            raise ValueError(f"mask_threshold must lie in [0, 1], got {self.mask_threshold}")

    @property
    def templates(self) -> list[str]:
        return [t.strip() for t in self.prompt_templates.split("|")] if self.prompt_templates \
            else ["{}"]

    @property
    def anchor_prompts(self) -> list[str]:
        return [a.strip() for a in self.anchors.split("|")]

    def inert(self, key: str) -> bool:
        """Whether setting ``key`` changes nothing here (the concept balance with one
        concept), so that two runs differing only in it are the same run."""
        return key == "concept_balance" and len(self.concepts) == 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class EraserConfig:
    """What ``eraser_config.json`` records beside ``erasers.safetensors``."""

    rank: int = _f(128, "hidden width of each eraser")
    site: str = _f("output", "where the erasers act: 'output' (cross-attention output) or "
                             "'input' (its text tokens)")
    act: str = _f("gelu", "the erasers' non-linearity: 'gelu' or 'linear'")
    concepts: list[str] = _f(list, "erased concepts")
    base_model: str = _f("", "hub id or local path of the base pipeline")
    method: str = _f("receler", "erasure method that produced the weights")
    train: dict[str, Any] = _f(dict, "training settings (TrainConfig as a dict)")
    layers: dict[str, int] = _f(dict, "attn2 module name → output channels")
    receler_version: str = _f(__version__, "library version that wrote the file")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> EraserConfig:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read eraser config {path}: {e}") from None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --params names: the attn2 submodule each trains (weight and bias, where it has one)
PARAM_GROUPS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


@dataclass
class MergeConfig:
    """Settings of ``receler export``. ``None`` takes the erasers' own training setting. The
    defaults did best in a sweep on the toy model (docs/merge.md); ``retain_weight`` 20 and
    ``retain_target`` 'base' since 2026-12-06, when weight 1 towards the erased model lost
    heart's neighbours; ``adv_steps`` 20 (was 5) since 2026-12-06, when 5 let a 300-step
    attack win back 0.15 of heart's attacked images (docs/merge.md). ``retain_weight`` 20 per
    erased concept (was 20 for any number) since 2026-12-07, when 20 with five concepts lost
    diamond to half its rate and 100 kept it (docs/many_concepts.md)."""

    iterations: int = _f(600, "distillation iterations (one z_t each)")
    lr: float = _f(3e-4, "learning rate of the merged weights (Adam)")
    params: str = _f("to_out,to_k,to_v", "cross-attention (attn2) projections that are "
                     "fine-tuned, comma-separated: to_q, to_k, to_v, to_out")
    retain: str | None = _f(None, "retain prompts separated by '|' whose predictions must "
                            "stay the erased model's too (the empty prompt is always in; "
                            "prompts naming an erased concept are dropped; default: the "
                            "erasers' anchor prompts)")
    retain_weight: float | None = _f(None, "weight of the retain prompts' and the empty "
                                           "prompt's terms in the distillation loss, against 1 "
                                           "for the erased concepts' and the attacked prompt's "
                                           "(default: 20 per erased concept, so that the retain "
                                           "terms keep their share of the loss as concepts are "
                                           "added)")
    retain_target: str = _f("base", "what the retain prompts and the empty prompt are "
                                      "distilled towards: 'erased' (the erased model's ε, "
                                      "erasers attached) or 'base' (the base model's ε, so "
                                      "that the export keeps the base model's images of them "
                                      "rather than the erasers' side effects)")
    ddim_steps: int | None = _f(None, "DDIM steps of the z_t sampler (default: the erasers')")
    start_guidance: float | None = _f(None, "guidance of the z_t sampler (default: the "
                                            "erasers')")
    zt_reuse: int = _f(5, "iterations that draw z_t from one cached trajectory of a prompt")
    adv_steps: int = _f(20, "soft-prompt attack steps per iteration against the merged UNet "
                           "(towards the base model's ε(c)); the attacked concept prompt is "
                           "then distilled too (0 = no attack)")
    adv_restart: int = _f(0, "attacks of a concept after which its soft prompt starts again "
                             "from the concept's own embeddings, with a fresh optimiser, as "
                             "each of the protocol's attacks starts (0 = one soft prompt for "
                             "the whole export)")
    adv_tokens: int = _f(8, "soft tokens after the concept's tokens (the protocol attacks 8)")
    adv_lr: float = _f(1e-2, "learning rate of the soft tokens (Adam)")
    adv_target: str = _f("erased", "what the attacked concept prompt is distilled towards: "
                                   "'erased' (the erased model under the same soft tokens) or "
                                   "'concept' (the erased model's ε of the plain concept "
                                   "prompt: the soft tokens should change nothing)")
    eval_trajectories: int = _f(2, "held-out trajectories per prompt for the final fidelity "
                                   "figures (0 = none)")
    seed: int = _f(0, "seed of every random draw of the export")
    checkpoint_every: int = _f(50, "write a resumable checkpoint every N iterations")

    def __post_init__(self):
        for name in ("adv_steps", "adv_restart"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("iterations", "zt_reuse", "checkpoint_every", "adv_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.ddim_steps is not None and self.ddim_steps <= 0:
            raise ValueError(f"ddim_steps must be positive, got {self.ddim_steps}")
        if self.eval_trajectories < 0:
            raise ValueError(f"eval_trajectories must be >= 0, got {self.eval_trajectories}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.adv_target not in ("erased", "concept"):
            raise ValueError(f"adv_target must be 'erased' or 'concept', got {self.adv_target!r}")
        if self.retain_target not in ("erased", "base"):
            raise ValueError(f"retain_target must be 'erased' or 'base', got "
                             f"{self.retain_target!r}")
        if self.retain_weight is not None and not (math.isfinite(self.retain_weight)
                                                   and self.retain_weight > 0):
            raise ValueError(f"retain_weight must be a positive number, got {self.retain_weight}")
        groups = self.param_groups
        unknown = [g for g in groups if g not in PARAM_GROUPS]
        if not groups or unknown:
            raise ValueError(f"unknown projection {unknown[0] if unknown else self.params!r} in "
                             f"--params: choose from {', '.join(PARAM_GROUPS)}")

    @property
    def param_groups(self) -> list[str]:
        return [g.strip() for g in self.params.split(",") if g.strip()]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_types(cls) -> dict[str, tuple[type, bool]]:
        """Each setting's scalar type (int, float or str) and whether it may be ``None``:
        what ``receler export``'s flags and :meth:`from_options` accept."""
        from dataclasses import fields
        from typing import get_type_hints

        hints = get_type_hints(cls)
        return {f.name: scalar_type(hints[f.name]) for f in fields(cls)}

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> MergeConfig:
        """The defaults with ``options`` (``{"iterations": 300}``) replacing them; an unknown
        key or a value of the wrong type is a one-line error naming the choices."""
        types, options = cls.field_types(), dict(options or {})
        what = {int: "an integer", float: "a number", str: "a string"}
        for key, value in options.items():
            if key not in types:
                raise ValueError(f"unknown export option {key!r}: choose from {', '.join(types)}")
            kind, optional = types[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = options[key] = float(value)
            if not (isinstance(value, kind) and not isinstance(value, bool)
                    or value is None and optional):
                raise ValueError(f"export option {key} takes {what[kind]}, got {value!r}")
        return cls(**options)
