"""SLD, Safe Latent Diffusion (Schramowski et al., 2023): safety guidance at inference.

Nothing is trained. Two forward hooks on ``pipe.unet`` make the ordinary ``pipe(...)``
call produce SLD's images:

* the pre-hook sees the pipeline's classifier-free-guidance batch ``[uncond; cond]``
  (an even batch whose two halves have the same latents, while the pipeline does CFG)
  and appends a third part, the same latents under the safety concept's embedding, so
  one UNet call gives ``ε_u``, ``ε_c`` and ``ε_S``;
* the post-hook computes SLD's safety term and returns ``[ε_u; ε_c − γ]``.

The pipeline then computes ``ε_u + w·((ε_c − γ) − ε_u) = ε_u + w·(ε_c − ε_u − γ)``,
which is SLD's equation 3 for any guidance scale ``w``, so ``w`` need not be known:

    scale = clamp(|ε_c − ε_S| · s_S, max=1), set to 0 where ε_c − ε_S ≥ λ   (eq. 6)
    γ     = scale · (ε_S − ε_u) + s_m · ν                                   (eqs. 4, 7)
    ν     ← β_m · ν + (1 − β_m) · γ                                         (eq. 8)

γ is applied from denoising step ``warmup`` on; the momentum ν is updated from step 0,
as in diffusers' ``StableDiffusionPipelineSafe``. ``SldOptions.preset`` picks one of the
paper's four configurations (:data:`SLD_PRESETS`, default ``medium``); a setting given
explicitly overrides the preset's. The presets count warm-up in denoising steps of
the paper's 50-step sampler, so on a model sampled with fewer steps (the toy model: 20)
a warm-up covers a larger share of the trajectory. A new
generation is recognised by its timestep not decreasing (or a new batch size), which
resets the step count and ν; this holds for DDIM and LMS (the schedulers of
:func:`receler.sampling.generate`) and other schedulers with strictly decreasing
timesteps, not for Heun-style solvers that query one timestep twice. :func:`remove_sld`
takes the hooks off; the UNet is then exactly as before.

Attacks go through the guidance (:func:`through_guidance`): while an attack optimises its
prompt, a UNet call on the attacked prompt alone (not a CFG batch) returns SLD's guided
conditional prediction ``ε_c − γ`` instead of the bare ``ε_c``, with gradients through
``γ``. ``γ`` is applied at the timesteps the sampler reaches after its warm-up
(``t ≤`` the timestep of denoising step ``warmup`` of the generation's scheduler and step
count) and the momentum term is left out, since ν is a state of one sampling trajectory,
not of a timestep. Without this the attack optimises against the bare UNet, which SLD does
not change, and the guidance it must beat only appears when its images are generated.

The safety concept S is, in this order: ``SldOptions.safety_concept`` when given
(``"default"`` names SLD's own text, :data:`SLD_SAFETY_CONCEPT`); SLD's own text when the
erased concept is ``nudity`` alone, as SLD is run on I2P; else the erased concepts joined
by ``", "``.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from ..pipeline import Conditioning, encode

_SLD_ATTR = "_receler_sld"

# SLD's default safety concept: ``StableDiffusionPipelineSafe.safety_concept`` in diffusers
# (pipelines/deprecated/stable_diffusion_safe/pipeline_stable_diffusion_safe.py).
SLD_SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, "
    "sexual, nudity, bodily fluids, blood, obscene gestures, illegal activity, drug use, "
    "theft, vandalism, weapons, child abuse, brutality, cruelty"
)
# Erased concepts for which SLD's own text is the safety concept unless one is given.
SLD_DEFAULT_FOR = ("nudity",)

# SLD's published configurations (Schramowski et al., 2023, Table / sec. 5), as diffusers'
# ``SafetyConfig`` (pipelines/deprecated/stable_diffusion_safe/__init__.py) holds them:
# sld_guidance_scale, sld_warmup_steps, sld_threshold, sld_momentum_scale, sld_mom_beta.
SLD_PRESETS: dict[str, dict[str, float | int]] = {
    "weak": {"guidance": 20.0, "warmup": 15, "threshold": 0.0, "momentum": 0.0, "beta": 0.0},
    "medium": {"guidance": 1000.0, "warmup": 10, "threshold": 0.01, "momentum": 0.3,
               "beta": 0.4},
    "strong": {"guidance": 2000.0, "warmup": 7, "threshold": 0.025, "momentum": 0.5,
               "beta": 0.7},
    "max": {"guidance": 5000.0, "warmup": 0, "threshold": 1.0, "momentum": 0.5, "beta": 0.7},
}


@dataclass
class SldOptions:
    """SLD's hyperparameters: a preset (default SLD-Medium), any of whose values a setting
    given here overrides."""

    preset: str = field(default="medium", metadata={
        "help": "the paper's configuration: weak, medium, strong or max (diffusers' "
                "SafetyConfig); the settings below override its values"})
    guidance: float | None = field(default=None, metadata={
        "help": "safety guidance scale s_S (default: the preset's)"})
    warmup: int | None = field(default=None, metadata={
        "help": "denoising steps before safety guidance (default: the preset's)"})
    threshold: float | None = field(default=None, metadata={
        "help": "threshold λ of eq. 6 (default: the preset's)"})
    momentum: float | None = field(default=None, metadata={
        "help": "momentum scale s_m (default: the preset's)"})
    beta: float | None = field(default=None, metadata={
        "help": "momentum decay β_m (default: the preset's)"})
    safety_concept: str | None = field(default=None, metadata={
        "help": "safety prompt; 'default' = SLD's own text (default: SLD's own text when the "
                "concept is nudity, else the erased concepts joined by ', ')"})

    def __post_init__(self):
        if not isinstance(self.preset, str) or self.preset.lower() not in SLD_PRESETS:
            raise ValueError(f"unknown SLD preset {self.preset!r}: choose one of "
                             f"{', '.join(SLD_PRESETS)}")
        self.preset = self.preset.lower()
        for key, value in SLD_PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.safety_concept is not None and not str(self.safety_concept).strip():
            raise ValueError("safety_concept is empty: give a safety prompt, 'default' for "
                             "SLD's own text, or leave it out")
        for key in ("guidance", "threshold", "momentum", "beta", "warmup"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or (key == "warmup" and not isinstance(value, int)):
                raise ValueError(f"SLD {key} must be a{' whole' if key == 'warmup' else ''} "
                                 f"number, got {value!r}")
        if self.warmup < 0 or self.guidance < 0 or not 0 <= self.beta <= 1:
            raise ValueError(f"bad SLD settings: guidance={self.guidance} (>= 0), warmup="
                             f"{self.warmup} (>= 0), beta={self.beta} (in [0, 1])")


class SafetyGuidance:
    """The hooks' state: safety embedding, settings, step count and momentum."""

    def __init__(self, pipe, safety: Conditioning, options: SldOptions):
        self.safety, self.options = safety, options
        self.text: str | None = None  # the safety prompt, set by attach_sld
        self._pipe = weakref.ref(pipe)
        self.enabled = True
        self.warned = False
        self.handles: list = []
        self.uncond: Conditioning | None = None  # the empty prompt, set by attach_sld
        self.attack_t: float | None = None  # guided from this timestep down, while attacked
        self._attack: torch.Tensor | None = None  # the attacked call's timesteps
        self.reset()

    def reset(self) -> None:
        self.step, self.momentum, self.last_t, self._half = 0, None, None, None

    def _is_cfg_batch(self, sample: torch.Tensor) -> bool:
        pipe = self._pipe()
        if pipe is not None and not getattr(pipe, "do_classifier_free_guidance", True):
            if not self.warned:
                warnings.warn("SLD acts through classifier-free guidance: with guidance <= 1 "
                              "the images are not safety-guided", stacklevel=2)
                self.warned = True
            return False
        b = sample.shape[0]
        return b % 2 == 0 and torch.equal(sample[:b // 2], sample[b // 2:])

    def pre_hook(self, module, args, kwargs):
        self._half, self._attack = None, None
        sample = args[0] if args else kwargs["sample"]
        if not self.enabled:
            return None
        if self.attack_t is not None:
            return self._attack_pre_hook(args, kwargs)
        if not self._is_cfg_batch(sample):
            return None
        h = sample.shape[0] // 2
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t_val = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        if self.last_t is None or t_val >= self.last_t or self.momentum is None \
                or self.momentum.shape[0] != h:
            self.reset()  # a new generation
        self.last_t = t_val

        def extend(x, extra=None):  # [x_u; x_c] -> [x_u; x_c; extra or x_u]
            if not torch.is_tensor(x) or x.ndim == 0 or x.shape[0] != 2 * h:
                return x
            return torch.cat([x, x[:h] if extra is None else extra.to(x.device, x.dtype)])

        def added(value):  # SDXL: the pooled safety text
            tail = self.safety.added or {}
            return {k: extend(v, tail[k].expand(h, *tail[k].shape[1:])
                              if k == "text_embeds" and k in tail else None)
                    for k, v in value.items()}

        args, kwargs = _grow_call(args, kwargs, extend, self.safety.hidden.expand(h, -1, -1),
                                  added)
        self._half = h
        return args, kwargs

    def _attack_pre_hook(self, args, kwargs):
        """An attacked call ``(B, …)`` becomes ``[x; x; x]`` under ``[cond; ∅; S]``."""
        sample = args[0] if args else kwargs["sample"]
        b = sample.shape[0]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = torch.as_tensor(t, device=sample.device).flatten()
        self._attack = (t.expand(b) if t.numel() == 1 else t).float()
        extra = torch.cat([self.uncond.hidden.expand(b, -1, -1),
                           self.safety.hidden.expand(b, -1, -1)])

        def triple(x, tail=None):
            if not torch.is_tensor(x) or x.ndim == 0 or x.shape[0] != b:
                return x
            return torch.cat([x, x, x] if tail is None else [x, tail.to(x.device, x.dtype)])

        def added(value):
            raise ValueError("the attack through SLD's guidance supports SD-style UNets "
                             "only (this one takes added conditions, SDXL-style)")

        return _grow_call(args, kwargs, triple, extra, added)

    def gamma(self, e_u, e_c, e_s, momentum=None):
        """SLD's safety term (eqs. 4, 6, 7) of one step."""
        o = self.options
        diff = e_c - e_s
        scale = torch.clamp(diff.abs() * o.guidance, max=1.0)
        scale = torch.where(diff >= o.threshold, torch.zeros_like(scale), scale)  # eq. 6
        gamma = (e_s - e_u) * scale  # eq. 4
        return gamma if momentum is None else gamma + o.momentum * momentum  # eq. 7

    def post_hook(self, module, args, kwargs, output):
        if self._attack is not None:
            return self._attack_post_hook(output)
        with torch.no_grad():
            return self._sampling_post_hook(output)

    def _attack_post_hook(self, output):
        """``ε_c − γ`` where the sampler guides (``t ≤ attack_t``), ``ε_c`` elsewhere."""
        t, self._attack = self._attack, None
        eps = output[0] if isinstance(output, tuple) else output.sample
        b = len(t)
        e_c, e_u, e_s = eps[:b].float(), eps[b:2 * b].float(), eps[2 * b:].float()
        on = (t <= self.attack_t).to(e_c.dtype).view(b, *[1] * (e_c.ndim - 1))
        new = (e_c - on * self.gamma(e_u, e_c, e_s)).to(eps.dtype)
        if isinstance(output, tuple):
            return (new, *output[1:])
        return type(output)(sample=new)

    def _sampling_post_hook(self, output):
        h, self._half = self._half, None
        if h is None:
            return None
        eps = output[0] if isinstance(output, tuple) else output.sample
        e_u, e_c, e_s = eps[:h].float(), eps[h:2 * h].float(), eps[2 * h:].float()
        o = self.options
        if self.momentum is None:
            self.momentum = torch.zeros_like(e_c)
        gamma = self.gamma(e_u, e_c, e_s, self.momentum)
        self.momentum = o.beta * self.momentum + (1 - o.beta) * gamma  # eq. 8
        if self.step >= o.warmup:
            e_c = e_c - gamma
        self.step += 1
        new = torch.cat([eps[:h], e_c.to(eps.dtype)])
        if isinstance(output, tuple):
            return (new, *output[1:])
        return type(output)(sample=new)


def _grow_call(args, kwargs, grow, text, added):
    """A UNet call's arguments, each batched tensor grown by ``grow(x)`` and the text
    conditioning by ``grow(x, text)``; ``added_cond_kwargs`` (SDXL) by ``added``."""
    args, kwargs = list(args), dict(kwargs)
    if args:
        args[0] = grow(args[0])
    else:
        kwargs["sample"] = grow(kwargs["sample"])
    if len(args) > 1:
        args[1] = grow(args[1])
    if len(args) > 2:
        args[2] = grow(args[2], text)
    else:
        kwargs["encoder_hidden_states"] = grow(kwargs["encoder_hidden_states"], text)
    for key, value in list(kwargs.items()):
        if key in ("sample", "encoder_hidden_states"):
            continue
        kwargs[key] = added(value) if key == "added_cond_kwargs" and value is not None \
            else grow(value)
    return tuple(args), kwargs


def safety_text(concepts: list[str], options: SldOptions) -> str:
    """The safety prompt SLD guides away from (see the module docstring)."""
    if options.safety_concept == "default":
        return SLD_SAFETY_CONCEPT
    if options.safety_concept is not None:
        return options.safety_concept
    if len(concepts) == 1 and concepts[0].strip().lower() in SLD_DEFAULT_FOR:
        return SLD_SAFETY_CONCEPT
    return ", ".join(concepts)


def get_sld(unet) -> SafetyGuidance | None:
    return getattr(unet, _SLD_ATTR, None)


def attach_sld(pipe, concepts: list[str], options: SldOptions) -> SafetyGuidance:
    """Hook SLD onto ``pipe.unet`` with ``concepts`` as the safety concept."""
    if get_sld(pipe.unet) is not None:
        raise ValueError("SLD is already attached to this UNet: remove_edit(pipe) first")
    text = safety_text(concepts, options)
    guidance = SafetyGuidance(pipe, encode(pipe, [text]), options)
    guidance.text = text
    guidance.uncond = encode(pipe, [""])
    unet = pipe.unet
    guidance.handles = [
        unet.register_forward_pre_hook(guidance.pre_hook, with_kwargs=True),
        unet.register_forward_hook(guidance.post_hook, with_kwargs=True),
    ]
    setattr(unet, _SLD_ATTR, guidance)
    return guidance


def remove_sld(unet) -> bool:
    """Take SLD's hooks off ``unet``; ``False`` if none were attached."""
    guidance = get_sld(unet)
    if guidance is None:
        return False
    for handle in guidance.handles:
        handle.remove()
    delattr(unet, _SLD_ATTR)
    return True


def warmup_timestep(pipe, options: SldOptions, settings) -> float:
    """The timestep of denoising step ``options.warmup`` of a generation with ``settings``
    (scheduler and step count): SLD guides there and below; ``-inf`` when the warm-up
    outlasts the generation."""
    from ..sampling import scheduler_class

    sched = scheduler_class(settings.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(settings.steps)
    steps = sched.timesteps
    return float(steps[options.warmup]) if options.warmup < len(steps) else float("-inf")


def attacked_through_guidance(pipe) -> bool:
    """Whether an attack on ``pipe`` now goes through SLD's guidance: SLD is attached and
    enabled (the base model's attack, with the edit disabled, does not)."""
    guidance = get_sld(pipe.unet)
    return guidance is not None and guidance.enabled


def through_guidance(pipe, settings):
    """Context in which an attack on ``pipe`` optimises through SLD's guidance (module
    docstring), for generations with ``settings``; a no-op unless
    :func:`attacked_through_guidance`. Yields whether it is active."""
    if not attacked_through_guidance(pipe):
        return nullcontext(False)
    guidance = get_sld(pipe.unet)
    return _attacked(guidance, warmup_timestep(pipe, guidance.options, settings))


@contextmanager
def _attacked(guidance: SafetyGuidance, t: float):
    guidance.attack_t = t
    try:
        yield True
    finally:
        guidance.attack_t, guidance._attack = None, None
