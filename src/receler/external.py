"""Candidates of ``receler protocol``: the erased model measured against the base model.

A candidate is what the protocol compares with the base: erasers it trains itself, a
folder that ``receler erase`` wrote (any method: Receler erasers, ESD/UCE weight edits,
SLD settings), a fine-tuned UNet or text encoder in diffusers format, or a LoRA file.
:func:`resolve_candidate` checks one before any pipeline loads (the folder exists, it
erased the protocol's concept, the UNet's config fits the base model); ``apply`` then
puts it on the loaded base pipeline, and ``base(pipe)`` gives the base model back for a
block: an edit is disabled, a swapped module is swapped back (both modules stay in
memory, so switching costs nothing), a LoRA is disabled. Base and erased stages thus run
on one pipeline, and the base model always runs with its original weights.

``identity`` says what was measured (paths and a fingerprint of their files); the
protocol keys the erased images by it, so a run folder never mixes two candidates.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LORA_ADAPTER = "receler_candidate"
# Config keys a swapped-in module must share with the base model's: the latent's shape,
# the image size, and the width of the text embedding the UNet attends to.
UNET_KEYS = ("_class_name", "in_channels", "out_channels", "sample_size", "cross_attention_dim",
             "addition_embed_type", "encoder_hid_dim")
TEXT_ENCODER_KEYS = ("model_type", "hidden_size", "vocab_size", "max_position_embeddings")


@dataclass
class Candidate:
    """An erased model to measure; the base is the pipeline without it."""

    kind: str  # erase, erasers, unet, text-encoder, unet+text-encoder or lora
    method: str  # results.json's method
    name: str  # the label in results.json and the leaderboard
    identity: dict[str, Any] = field(default_factory=dict)  # sources and fingerprints
    stats: dict[str, Any] | None = None  # compute spent training it, when known
    erased: list[str] = field(default_factory=list)  # every concept it erased, when known

    def apply(self, pipe) -> None:
        raise NotImplementedError

    @contextmanager
    def base(self, pipe) -> Iterator[None]:
        """The base model inside the block."""
        from .methods import edit_disabled

        with edit_disabled(pipe):
            yield

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "method": self.method, "name": self.name, **self.identity}

    def key(self) -> dict[str, Any]:
        """What decides its images (the name does not)."""
        return {"kind": self.kind, "method": self.method, **self.identity}


@dataclass
class EditCandidate(Candidate):
    """A folder written by ``receler erase`` (or by the protocol's own erase stage)."""

    folder: Path | None = None

    def apply(self, pipe) -> None:
        from .methods import load_edit

        load_edit(pipe, self.folder)


@dataclass
class SwapCandidate(Candidate):
    """Fine-tuned modules (``unet``, ``text_encoder``) swapped in beside the base ones."""

    sources: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # part: (path, sub)
    originals: dict[str, Any] = field(default_factory=dict, repr=False)
    swapped: dict[str, Any] = field(default_factory=dict, repr=False)

    def apply(self, pipe) -> None:
        for part, (path, sub) in self.sources.items():
            current = getattr(pipe, part)
            module = _load_module(part, path, sub, dtype=current.dtype)
            self.originals[part] = current
            self.swapped[part] = module.to(current.device).requires_grad_(False).eval()
        self._put(pipe, self.swapped)

    def remove(self, pipe) -> None:
        """Put the base model's modules back (undoes :meth:`apply`)."""
        self._put(pipe, self.originals)

    @staticmethod
    def _put(pipe, modules: dict[str, Any]) -> None:
        for part, module in modules.items():
            setattr(pipe, part, module)

    @contextmanager
    def base(self, pipe) -> Iterator[None]:
        self._put(pipe, self.originals)
        try:
            yield
        finally:
            self._put(pipe, self.swapped)


@dataclass
class LoraCandidate(Candidate):
    """A diffusers LoRA file on the UNet and/or the text encoder, loaded with
    ``pipe.load_lora_weights`` and disabled (not unloaded) for the base stages."""

    file: Path | None = None

    def apply(self, pipe) -> None:
        from safetensors.torch import load_file

        state = load_file(str(self.file))
        try:
            pipe.load_lora_weights(state, adapter_name=LORA_ADAPTER)
        except Exception as e:  # noqa: BLE001 - diffusers and peft raise many kinds
            raise ValueError(f"--lora {self.file} does not fit the base model: "
                             f"{_first_line(e)}; pass a LoRA trained on this model") from None
        if not _lora_layers(pipe):
            raise ValueError(f"--lora {self.file} holds no LoRA weights for this model's UNet "
                             "or text encoder: pass a diffusers LoRA file trained on it")
        for part in ("unet", "text_encoder"):  # measured, not trained: no gradients kept
            getattr(pipe, part).requires_grad_(False)

    @contextmanager
    def base(self, pipe) -> Iterator[None]:
        layers = _lora_layers(pipe)
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)


def _lora_layers(pipe) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for part in ("unet", "text_encoder") if getattr(pipe, part, None) is not None
            for m in getattr(pipe, part).modules() if isinstance(m, BaseTunerLayer)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --------------------------------------------------------------------------- resolving
def resolve_candidate(concept: str, model: str, *, erasers: str | Path | None = None,
                      unet: str | None = None, text_encoder: str | None = None,
                      lora: str | Path | None = None, method: str | None = None,
                      name: str | None = None) -> Candidate | None:
    """The candidate the sources name, checked; ``None`` when none is given (the protocol
    then erases ``concept`` itself).

    Args:
        concept: the protocol's concept; an erasers folder must have erased it (alone or
            among others).
        model: the base model (hub id or folder) the modules must fit.
        erasers: a folder written by ``receler erase --method ...``.
        unet, text_encoder: a diffusers UNet / transformers CLIPTextModel folder or hub id,
            or a whole pipeline (its ``unet`` / ``text_encoder`` subfolder is used).
        lora: a diffusers LoRA ``.safetensors`` file.
        method: with ``erasers``, the method the caller expects (checked against the folder).
        name: the label (default: the method; ``unet:NAME`` etc. for modules).

    Raises:
        ValueError, FileNotFoundError: with one line naming the problem and the fix.
    """
    if erasers is not None:
        return _erasers_candidate(Path(erasers), concept, method, name)
    if method is not None and (unet or text_encoder or lora):
        raise ValueError(f"--method {method} names an erasure to train or load; with --unet, "
                         "--text-encoder or --lora the model is already erased: drop --method")
    if lora is not None:
        return _lora_candidate(Path(lora), name)
    parts = {k: v for k, v in (("unet", unet), ("text_encoder", text_encoder)) if v is not None}
    if not parts:
        return None
    sources, identity = {}, {}
    for part, src in parts.items():
        path, sub = module_source(src, part)
        check_module_config(part, src, read_module_config(part, path, sub),
                            base_module_config(part, model), model)
        sources[part] = (path, sub)
        identity[part] = {"source": src, "subfolder": sub, "fingerprint": _fingerprint(path, sub)}
    kind = "+".join(p.replace("_", "-") for p in parts)
    label = name or "+".join(f"{p.replace('_', '-')}:{Path(s).name or s}" for p, s in parts.items())
    return SwapCandidate(kind=kind, method=kind, name=label, identity=identity, sources=sources,
                         erased=merged_concepts(concept, sources.get("unet")))


def merged_concepts(concept: str, source: tuple[str, str | None] | None) -> list[str]:
    """Every concept a UNet made by ``receler export`` erased (its ``merge_config.json``),
    so that Acc_L leaves all of them out, as it does for their erasers; ``[]`` for any other
    UNet (the protocol's concept alone)."""
    from .merge import MERGE_FILE

    if source is None:
        return []
    path, sub = source
    file = Path(path) / (sub or "") / MERGE_FILE
    if not file.is_file():
        return []
    concepts = list(json.loads(file.read_text()).get("concepts") or [])
    if concepts and concept not in concepts:
        raise ValueError(f"--unet {path} was exported from erasers of {concepts}, not "
                         f"{concept!r}: pass --concept {concepts[0]!r} or the export of "
                         f"{concept!r}'s erasers")
    return concepts


def _erasers_candidate(folder: Path, concept: str, method: str | None,
                       name: str | None) -> EditCandidate:
    from .methods import EditConfig, get_method
    from .serialization import CONFIG_FILE

    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"--erasers {folder} {what}: pass the --out folder of a finished "
                                "`receler erase` run")
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"--erasers {folder} has no {CONFIG_FILE}: pass the --out folder "
                                "of a finished `receler erase` run (an unfinished one resumes "
                                "with `receler erase --resume`)")
    try:
        saved = EditConfig.load(folder / CONFIG_FILE)
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"cannot read {folder / CONFIG_FILE}: {_first_line(e)}; copy the "
                         "folder again from where it was trained") from None
    get_method(saved.method)  # a method this receler knows
    if concept not in saved.concepts:
        raise ValueError(f"--erasers {folder} erased {saved.concepts}, not {concept!r}: pass "
                         f"--concept {saved.concepts[0]!r} or the erasers of {concept!r}")
    if method is not None and method != saved.method:
        raise ValueError(f"--erasers {folder} was made with method {saved.method!r}, not "
                         f"{method!r}: drop --method (it is read from the folder)")
    identity = {"source": str(folder), "base_model": saved.base_model,
                "fingerprint": _fingerprint(str(folder), None)}
    return EditCandidate(kind="erasers", method=saved.method, name=name or saved.method,
                         identity=identity, stats=saved.stats or None, folder=folder,
                         erased=list(saved.concepts))


def _lora_candidate(file: Path, name: str | None) -> LoraCandidate:
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise FileNotFoundError(f"--lora {file} {what}: pass a diffusers LoRA .safetensors file")
    if file.suffix != ".safetensors":
        raise ValueError(f"--lora {file} is not a .safetensors file: receler never unpickles "
                         "weights; convert it to safetensors")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read --lora {file}: {_first_line(e)}") from None
    if not any("lora" in k for k in keys):
        raise ValueError(f"--lora {file} holds no LoRA weights (no key names 'lora'): pass a "
                         "diffusers LoRA file (save_lora_weights)")
    if importlib.util.find_spec("peft") is None:
        raise ValueError("--lora needs peft, which diffusers loads LoRA with: "
                         "pip install 'receler[lora]'")
    identity = {"source": str(file), "fingerprint": _fingerprint(str(file), None)}
    return LoraCandidate(kind="lora", method="lora", name=name or f"lora:{file.stem}",
                         identity=identity, file=file)


# --------------------------------------------------------------------------- modules
def _flag(part: str) -> str:
    return "--" + part.replace("_", "-")


def _looks_local(src: str) -> bool:
    """A path rather than a hub id (``owner/name``): absolute, relative with a dot, deeper,
    or inside a folder that exists here (``runs/my-unet``)."""
    return (src.startswith((".", "/", "~")) or src.count("/") != 1 or "\\" in src
            or Path(src).parent.is_dir())


def module_source(src: str, part: str) -> tuple[str, str | None]:
    """``(path or hub id, subfolder)`` of a module: a folder (or hub repository) with its
    ``config.json``, or a whole pipeline with ``{part}/config.json``."""
    path = Path(src).expanduser()
    if path.is_file():
        raise ValueError(f"{_flag(part)} {src} is a file: pass a folder written by "
                         "save_pretrained (config.json and safetensors weights), a pipeline "
                         "folder or a hub id")
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), None
        if (path / part / "config.json").is_file():
            return str(path), part
        raise ValueError(f"{_flag(part)} {src} has neither config.json nor {part}/config.json: "
                         "pass a folder written by save_pretrained, or a whole pipeline folder")
    if _looks_local(src):
        raise FileNotFoundError(f"{_flag(part)} {src} does not exist: pass a diffusers folder "
                                "or a hub id (owner/name)")
    from huggingface_hub import file_exists

    try:
        for sub in (None, part):
            if file_exists(src, f"{sub}/config.json" if sub else "config.json"):
                return src, sub
    except Exception as e:  # noqa: BLE001 - the hub client raises many kinds
        raise ValueError(f"cannot look up {_flag(part)} {src} on the hub: {_first_line(e)} "
                         "(pass a local folder, or a hub id reachable from here)") from None
    raise ValueError(f"{_flag(part)} {src}: the hub repository has neither config.json nor "
                     f"{part}/config.json; pass a UNet, text encoder or pipeline repository")


def read_module_config(part: str, path: str, sub: str | None) -> dict[str, Any]:
    """The module's config as plain JSON values (no weights are read)."""
    try:
        if part == "unet":
            from diffusers import UNet2DConditionModel

            config = dict(UNet2DConditionModel.load_config(path, subfolder=sub))
        else:
            from transformers import CLIPTextConfig

            config = CLIPTextConfig.from_pretrained(path, subfolder=sub or "").to_dict()
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the config of {_flag(part)} {path}: {_first_line(e)}") \
            from None
    return json.loads(json.dumps(config, default=str))


def base_module_config(part: str, model: str) -> dict[str, Any]:
    return read_module_config(part, model, part)


def check_module_config(part: str, src: str, config: dict, base: dict, model: str) -> None:
    """Refuse a module whose config differs from the base model's in a key that matters."""
    for key in UNET_KEYS if part == "unet" else TEXT_ENCODER_KEYS:
        if config.get(key) != base.get(key):
            raise ValueError(f"{_flag(part)} {src} does not fit the base model: its {key} is "
                             f"{config.get(key)!r}, the base {part.replace('_', ' ')}'s is "
                             f"{base.get(key)!r}; pass one fine-tuned from {model}")


def _load_module(part: str, path: str, sub: str | None, *, dtype):
    """The module in safetensors format only (nothing is unpickled)."""
    try:
        if part == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_pretrained(path, subfolder=sub, dtype=dtype,
                                                        use_safetensors=True)
        from transformers import CLIPTextModel

        return CLIPTextModel.from_pretrained(path, subfolder=sub or "", dtype=dtype,
                                             use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load {_flag(part)} {path}: {_first_line(e)} (receler loads "
                         "safetensors weights only)") from None


def _fingerprint(path: str, sub: str | None) -> str:
    """A file's sha256, or for a folder the sha256 of its top-level files' names, sizes and
    modification times and of its JSON files' text; a hub id is its own fingerprint."""
    p = Path(path) / sub if sub else Path(path)
    if not p.exists():
        return f"hub:{path}" + (f"/{sub}" if sub else "")
    h = hashlib.sha256()
    if p.is_file():
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()[:16]
    for f in sorted(x for x in p.iterdir() if x.is_file() and not x.name.startswith(".")):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        if f.suffix == ".json":
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def erase_candidate(method: str, folder: Path, name: str | None = None) -> EditCandidate:
    """The protocol's own erase stage, once finished in ``folder``, as a candidate."""
    from .serialization import CONFIG_FILE

    stats = json.loads((folder / CONFIG_FILE).read_text()).get("stats")
    return EditCandidate(kind="erase", method=method, name=name or method, stats=stats,
                         identity={"source": str(folder),
                                   "fingerprint": _fingerprint(str(folder), None)},
                         folder=folder)
