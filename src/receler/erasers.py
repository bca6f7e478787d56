"""Lightweight erasers on the cross-attention outputs of a diffusers UNet.

An eraser is a residual MLP applied to the output ``a`` of a cross-attention
layer (``attn2`` of every transformer block): ``a + up(GELU(down(a)))``. ``up``
starts at zero, so a freshly attached eraser is an exact identity.

How it is attached: the eraser becomes a submodule of the ``attn2`` module
(``...attn2.eraser``) and a forward hook on ``attn2`` adds its output. A hook on
the attention *module* runs whatever attention processor is installed (SDPA,
xformers, a custom one, the capture processor of :mod:`receler.attention`), and
the base weights keep their names, so ``unet.attn_processors``,
``set_attn_processor`` and LoRA loading keep working. Everything is checked
before the first module is touched, and :func:`remove_erasers` undoes it all.

Two sites (``site``, :data:`SITES`):

* ``"output"`` (the paper): the eraser acts on the attention output ``a``, after the
  attention has mixed the text tokens, and adds ``up(GELU(down(a)))`` to it;
* ``"input"``: the eraser acts on the text tokens the layer attends to, each token on its
  own, before ``to_k`` and ``to_v``: ``e + up(GELU(down(e)))`` for every token ``e`` of
  ``encoder_hidden_states`` (a forward pre-hook). Soft tokens written into the prompt
  embedding pass through it like every other token, so an attacker has to rebuild the
  concept from tokens the eraser has already changed, instead of moving the mixed output
  out of the region where an output eraser fires (docs/robustness.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .config import ERASER_ACTIVATIONS as ACTIVATIONS  # the MLP's non-linearity
from .config import ERASER_SITES as SITES  # where an eraser acts: attn2's output or its tokens

ERASER_ATTR = "eraser"
_HOOK_ATTR = "_receler_eraser_hook"


class Eraser(nn.Module):
    """Residual MLP ``up(GELU(down(a)))``; the caller adds ``a``.

    Args:
        dim: channel count of the cross-attention output it erases from.
        rank: hidden width of the MLP.
    """

    def __init__(self, dim: int, rank: int, *, generator: torch.Generator | None = None,
                 site: str = "output", act: str = "gelu"):
        super().__init__()
        if dim <= 0 or rank <= 0:
            raise ValueError(f"eraser dim and rank must be positive, got dim={dim}, rank={rank}")
        check_site(site)
        check_act(act)
        self.site = site  # what it erases from: attn2's output or its text tokens (SITES)
        self.act = act  # "gelu" (the paper) or "linear": up(down(a)), no non-linearity
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        self.reset_parameters(generator)
        self.enabled = True
        # (store, key) while record_eraser_outputs is active: the hook writes the output there
        self.recorder: tuple[dict[str, torch.Tensor], str] | None = None
        self.shadow = False  # compute and record the output without adding it

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """``down`` as nn.Linear's default, U(±1/√dim), drawn from ``generator`` so a seeded
        run is reproducible; ``up`` at zero so the eraser starts as an exact identity."""
        bound = self.dim**-0.5
        for p in (self.down.weight, self.down.bias):
            p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
        self.up.weight.zero_()
        self.up.bias.zero_()

    @property
    def dim(self) -> int:
        return self.down.in_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        # Functional calls on the submodules' weights: three nn.Module calls per eraser cost
        # about 40 µs on the CPU, as much as the eraser's arithmetic on the toy model.
        # Erasers may be kept in fp32 on a half-precision UNet: compute in their dtype.
        dtype = self.down.weight.dtype
        x = a if a.dtype == dtype else a.to(dtype)
        h = F.linear(x, self.down.weight, self.down.bias)
        out = F.linear(F.gelu(h) if self.act == "gelu" else h, self.up.weight, self.up.bias)
        return out if out.dtype == a.dtype else out.to(a.dtype)


def check_site(site: str) -> None:
    if site not in SITES:
        raise ValueError(f"eraser site must be one of {', '.join(SITES)}, got {site!r}")


def check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"eraser activation must be one of {', '.join(ACTIVATIONS)}, got "
                         f"{act!r}")


def _erase(eraser: Eraser, x: torch.Tensor) -> torch.Tensor:
    """``x`` with the eraser's output added (or only recorded, in shadow mode)."""
    # eraser.forward, not eraser(...): no hooks are put on erasers, and Module.__call__ is
    # overhead on every cross-attention layer at every step
    if eraser.shadow:  # what the eraser would add to the frozen model; graph only through it
        with torch.enable_grad():
            delta = eraser.forward(x.detach())
    else:
        delta = eraser.forward(x)
    if eraser.recorder is not None:
        store, key = eraser.recorder
        store[key] = delta
    return x if eraser.shadow else x + delta


def _eraser_hook(module: nn.Module, args, output):
    eraser: Eraser = getattr(module, ERASER_ATTR)
    if not (eraser.enabled or eraser.shadow):
        return output
    if not torch.is_tensor(output):
        raise TypeError(
            f"the attention processor of {type(module).__name__} returned {type(output).__name__}; "
            "erasers need a tensor output"
        )
    return _erase(eraser, output)


def _input_eraser_hook(module: nn.Module, args, kwargs):
    """Forward pre-hook of the ``"input"`` site: erase from ``encoder_hidden_states``
    ``(B, T, D)``, given by keyword (as diffusers' transformer blocks pass it) or as the
    second positional argument."""
    eraser: Eraser = getattr(module, ERASER_ATTR)
    if not (eraser.enabled or eraser.shadow):
        return None
    if kwargs.get("encoder_hidden_states") is not None:
        kwargs = {**kwargs, "encoder_hidden_states": _erase(eraser, kwargs["encoder_hidden_states"])}
        return args, kwargs
    if len(args) > 1 and torch.is_tensor(args[1]):
        return (args[0], _erase(eraser, args[1]), *args[2:]), kwargs
    raise TypeError(f"{type(module).__name__} was called without encoder_hidden_states: an "
                    "eraser at the 'input' site needs the text tokens of a cross-attention call")


def find_cross_attention(unet: nn.Module) -> dict[str, nn.Module]:
    """Every cross-attention module (``attn2``) of a UNet, keyed by module name."""
    found = {}
    for name, module in unet.named_modules():
        if name.split(".")[-1] == "attn2" and hasattr(module, "to_out"):
            found[name] = module
    return found


def _output_dim(attn: nn.Module) -> int:
    proj = attn.to_out[0] if isinstance(attn.to_out, nn.ModuleList | nn.Sequential) else attn.to_out
    return proj.out_features


def eraser_dim(attn: nn.Module, site: str) -> int:
    """Width of what an eraser at ``site`` acts on: ``attn2``'s output channels, or the
    text tokens' width (``to_k``'s input, the model's ``cross_attention_dim``)."""
    check_site(site)
    return _output_dim(attn) if site == "output" else attn.to_k.in_features


def attach_erasers(
    unet: nn.Module, rank: int = 128, *, dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None, site: str = "output", act: str = "gelu",
) -> dict[str, Eraser]:
    """Attach a fresh eraser to every cross-attention layer of ``unet``.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (or any module with ``attn2`` layers).
        rank: hidden width of each eraser.
        dtype: dtype of the eraser weights (fp32 by default, also on a half-precision UNet).
        generator: CPU generator for the initial ``down`` weights (seeded runs).
        site: ``"output"`` (attn2's output, the paper) or ``"input"`` (its text tokens).
        act: ``"gelu"`` (the paper) or ``"linear"`` (no non-linearity: a low-rank linear map).

    Returns:
        The attached erasers, keyed by the name of their ``attn2`` module.
    """
    check_site(site)
    check_act(act)
    targets = find_cross_attention(unet)
    if not targets:
        raise ValueError(
            f"{type(unet).__name__} has no cross-attention (attn2) layers: erasers need a "
            "text-conditioned UNet such as UNet2DConditionModel"
        )
    already = [name for name, m in targets.items() if hasattr(m, ERASER_ATTR)]
    if already:
        raise ValueError(
            f"erasers are already attached (e.g. at {already[0]}): call remove_erasers(unet) first"
        )
    device = next(unet.parameters()).device
    erasers = {}
    for name, attn in targets.items():  # all checks done: now change modules
        eraser = Eraser(eraser_dim(attn, site), rank, generator=generator,
                        site=site, act=act).to(device=device, dtype=dtype)
        attn.add_module(ERASER_ATTR, eraser)
        hook = (attn.register_forward_hook(_eraser_hook) if site == "output" else
                attn.register_forward_pre_hook(_input_eraser_hook, with_kwargs=True))
        setattr(attn, _HOOK_ATTR, hook)
        erasers[name] = eraser
    return erasers


def get_erasers(unet: nn.Module) -> dict[str, Eraser]:
    """The erasers attached to ``unet``, keyed by ``attn2`` module name (empty if none)."""
    return {
        name: getattr(m, ERASER_ATTR)
        for name, m in find_cross_attention(unet).items()
        if isinstance(getattr(m, ERASER_ATTR, None), Eraser)
    }


def remove_erasers(unet: nn.Module) -> dict[str, Eraser]:
    """Detach all erasers; the UNet is exactly as before :func:`attach_erasers`.

    Returns:
        The removed erasers.
    """
    removed = {}
    for name, attn in find_cross_attention(unet).items():
        if not hasattr(attn, ERASER_ATTR):
            continue
        getattr(attn, _HOOK_ATTR).remove()
        delattr(attn, _HOOK_ATTR)
        removed[name] = getattr(attn, ERASER_ATTR)
        delattr(attn, ERASER_ATTR)
    return removed


def set_erasers_enabled(unet: nn.Module, enabled: bool) -> None:
    for eraser in get_erasers(unet).values():
        eraser.enabled = enabled


@contextmanager
def erasers_disabled(unet: nn.Module) -> Iterator[None]:
    """Run the frozen base model: erasers off inside the block, restored after it."""
    erasers = get_erasers(unet)
    states = {name: e.enabled for name, e in erasers.items()}
    try:
        for e in erasers.values():
            e.enabled = False
        yield
    finally:
        for name, e in erasers.items():
            e.enabled = states[name]


@contextmanager
def record_eraser_outputs(unet: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Collect each eraser's output ``up(GELU(down(a)))`` of the forward passes inside the block.

    Yields a dict, keyed by ``attn2`` name, filled as the UNet runs (the last pass wins).
    Outputs keep their graph so a regulariser can backpropagate through them.
    """
    erasers = get_erasers(unet)
    outputs: dict[str, torch.Tensor] = {}
    for name, e in erasers.items():
        e.recorder = (outputs, name)
    try:
        yield outputs
    finally:
        for e in erasers.values():
            e.recorder = None


@contextmanager
def shadow_eraser_outputs(unet: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Run the frozen model while collecting what each eraser *would* add.

    Inside the block the UNet computes exactly the base model's output, also under
    ``torch.no_grad()``; each eraser sees its layer's (detached) base activation and its
    output is recorded with a graph through the eraser weights only, so a penalty on it
    costs no UNet backward pass. Yields a dict keyed by ``attn2`` name.
    """
    erasers = get_erasers(unet).values()
    for e in erasers:
        e.shadow = True
    try:
        with record_eraser_outputs(unet) as outputs:
            yield outputs
    finally:
        for e in erasers:
            e.shadow = False


def eraser_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of the erasers, found by type."""
    return [p for e in get_erasers(unet).values() for p in e.parameters()]


def count_parameters(erasers: dict[str, Eraser]) -> int:
    return sum(p.numel() for e in erasers.values() for p in e.parameters())
