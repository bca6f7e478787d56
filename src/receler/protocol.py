"""The paper's evaluation protocol as one run: erase → generate → evaluate → attack → report.

One pipeline is loaded once. The base model is measured first (no edit applied yet), then
the concept is erased on the same pipeline and the erased model is measured with the same
prompts, seeds and detector, so every difference comes from the erasure. Generation is
resumable (existing images are skipped) and erasing resumes from the run's checkpoint, so
a killed protocol run picks up where it stopped.

The erased model need not be trained here: ``erasers`` (a ``receler erase`` folder of
any method), ``unet`` / ``text_encoder`` (fine-tuned modules in diffusers format) or
``lora`` name a candidate made elsewhere (:mod:`receler.external`), measured the same way.
Each image folder is keyed (:mod:`receler.image_keys`), so a base folder shared between
runs, or a run folder used again, is refused when its images were made differently.

Under ``accelerate launch`` the run is split across processes (one per GPU): each
generates every ``num_processes``-th batch of images and scores every
``num_processes``-th detection batch, so every image is made and scored in the batch a
single process would use, and the merged results are a single process's. Everything else
runs on the main process alone: erasing (the others then load the finished erasers),
attacks, latency, the metrics of the merged detections, the report and
``results.json``. The others wait at barriers meanwhile and return that ``results.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .attack import AttackConfig, check_attack_space, target_latents
from .attack_suite import attack_plan, soft_attack_suite, suite_key
from .config import TrainConfig
from .eval.detectors import default_labels, evaluate_images, get_detector
from .eval.metrics import (
    erasure_metrics,
    per_class_rates,
    to_dict,
    two_object_locality,
)
from .eval.prompts import PromptRow, list_images, read_prompts
from .external import Candidate, erase_candidate, resolve_candidate
from .image_keys import KEY_FILE, folder_key
from .image_keys import check as check_images
from .image_keys import claim as claim_images
from .measure import measure_attacks, measure_latency
from .methods.sld import attacked_through_guidance
from .pipeline import default_model, load_pipeline
from .sampling import SamplerSettings, generate_prompt_file, process_state, shard
from .serialization import CHECKPOINT_FILE, CONFIG_FILE, atomic_write, read_tensors

if TYPE_CHECKING:
    from .merge import MergeConfig

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # of results.json; raised when a key changes meaning or goes away
STAGES = ("latency", "attack", "two-object")  # what --skip may leave out
SOURCES = ("erasers", "unet", "text_encoder", "lora")  # candidates made elsewhere
EXPORT_FOLDER = "merged_unet"  # the run's merged export (ProtocolConfig.export)
DETECT_BATCH = 16  # images per detector call (evaluate_images' default)
# results.json keys that vary between identical runs: wall times, and fingerprints (they
# hold the modification times of the erasers' files)
VARYING_KEYS = ("seconds", "latency_base_s", "latency_s", "overhead_ratio", "fingerprint")


@dataclass
class PromptSets:
    """Prompt files of the protocol; ``None`` leaves that measurement out."""

    simple: Path  # one class per row ("a photo of a {class}"): Acc_E and Acc_L
    paraphrase: Path | None = None  # no class word: Acc_R
    two_object: Path | None = None  # columns class, class2: two-object locality
    style: Path | None = None  # column style: Acc_E of a style concept

    @classmethod
    def toy(cls) -> PromptSets:
        from .toyworld import prompt_file

        return cls(prompt_file("simple"), prompt_file("paraphrase"), prompt_file("two_object"),
                   prompt_file("style"))


@dataclass
class ProtocolConfig:
    """Settings of ``receler protocol``."""

    concept: str  # the concept to erase (an object class or a style)
    out: Path  # run folder
    model: str | None = None  # hub id or folder; None = the toy model
    method: str | None = None  # erasure method to train (default receler); with erasers: checked
    detector: str = "toy"  # detector registered in receler.eval.detectors
    per_class: int = 10  # simple-prompt rows per class
    concept_rows: int = 30  # paraphrase / style rows of the erased concept
    two_object_rows: int = 18  # two-object rows pairing the concept with another class
    attack_images: int = 10  # images generated per attacked prompt (per soft attack)
    attack_prompts: int = 5  # independent soft attacks (own prompt and seed each), pooled
    attack_stronger: int = 3  # the stronger attacker runs attack.steps × this many steps
    attack_prompt: str | None = None  # prompt the attacks start from (default: a simple one)
    device: str | None = None
    dtype: str | None = None  # fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on the CPU)
    train: TrainConfig | None = None  # default: TrainConfig(concepts=concept); None elsewise
    attack: AttackConfig = field(default_factory=AttackConfig)
    prompts: PromptSets | None = None  # default: the toy world's sets
    base_dir: Path | None = None  # base-model images and attack, shareable between runs
    erasers: Path | None = None  # a `receler erase` folder to measure instead of training
    unet: str | None = None  # fine-tuned UNet (diffusers folder, pipeline folder or hub id)
    text_encoder: str | None = None  # fine-tuned CLIPTextModel (folder, pipeline or hub id)
    lora: Path | None = None  # diffusers LoRA .safetensors file (UNet and/or text encoder)
    name: str | None = None  # label in results.json and the leaderboard (default: the method)
    skip: tuple[str, ...] = ()  # stages left out (STAGES); their keys are null
    sample_steps: int | None = None  # denoising steps of every image (default: the model's)
    deterministic: bool = False  # torch.use_deterministic_algorithms(True) during the run
    # After training, merge the erasers into the UNet's weights (`receler export` with these
    # settings, into out/merged_unet) and measure the merged UNet instead of the erasers.
    export: MergeConfig | None = None

    def __post_init__(self):
        self.out = Path(self.out)
        given = [n for n in SOURCES if getattr(self, n) is not None]
        flags = ["--" + n.replace("_", "-") for n in given]
        if len(given) > 1 and ("erasers" in given or "lora" in given):
            raise ValueError(f"{flags[0]} and {flags[1]} are two candidates: measure one per run "
                             "(only --unet and --text-encoder go together)")
        if given and self.train is not None:
            raise ValueError(f"training settings were given, but with {flags[0]} nothing is "
                             "trained: drop them")
        if self.export is not None:
            check_export(self.method, given)
        if not given:
            self.method = self.method or "receler"
            self.train = self.train or TrainConfig(concepts=[self.concept])
            if self.train.concepts != [self.concept]:
                raise ValueError(f"the protocol erases one concept; got train concepts "
                                 f"{self.train.concepts} for concept {self.concept!r}")
        self.skip = skip_stages(self.skip)
        for name in ("per_class", "concept_rows", "attack_images", "attack_prompts",
                     "attack_stronger"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.sample_steps is not None and self.sample_steps < 1:
            raise ValueError(f"sample_steps must be at least 1, got {self.sample_steps}")


def check_export(method: str | None, sources: list[str]) -> None:
    """Refuse a merged export (``--export``) of a run that trains nothing (``sources``: the
    candidates given, :data:`SOURCES`) or whose method leaves no erasers to merge."""
    from .methods import get_method

    if sources:
        raise ValueError(f"--export merges the erasers this run trains, but with --"
                         f"{sources[0].replace('_', '-')} nothing is trained: export them with "
                         "`receler export --erasers DIR --out UNET` and measure with --unet UNET")
    if not get_method(method or "receler").uses_erasers:
        raise ValueError(f"--export merges erasers, and --method {method} leaves none (its edit "
                         "is already in the weights or the sampler): drop --export, or erase "
                         "with a receler method")


def skip_stages(skip: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Stage names to skip (``"a,b"`` or a sequence), checked against :data:`STAGES`."""
    names = skip.split(",") if isinstance(skip, str) else skip
    names = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r} to skip: choose from {', '.join(STAGES)}")
    return names


def select_rows(cfg: ProtocolConfig) -> dict[str, list[PromptRow]]:
    """The prompt rows of each measurement, a fixed subset of each file."""
    sets = cfg.prompts or PromptSets.toy()
    simple, per_class = read_prompts(sets.simple), {}
    for r in simple:
        per_class.setdefault(r.class_name, []).append(r)
    chosen = {"simple": [r for rows in per_class.values() for r in rows[:cfg.per_class]]}
    is_class = cfg.concept in per_class
    if is_class and sets.paraphrase is not None:
        rows = [r for r in read_prompts(sets.paraphrase) if r.class_name == cfg.concept]
        chosen["paraphrase"] = rows[:cfg.concept_rows]
    if is_class and sets.two_object is not None and "two-object" not in cfg.skip:
        rows = [r for r in read_prompts(sets.two_object)
                if cfg.concept in (r.class_name, r.extra.get("class2"))]
        chosen["two_object"] = rows[:cfg.two_object_rows]
    if not is_class:
        styled = [r for r in read_prompts(sets.style) if r.extra.get("style") == cfg.concept] \
            if sets.style is not None else []
        if not styled:
            raise ValueError(f"concept {cfg.concept!r} is neither a class of {sets.simple} nor a "
                             "style of the style prompt set: pass one of them")
        chosen["style"] = styled[:cfg.concept_rows]
    return chosen


class Protocol:
    """Runs the stages and keeps their results and wall times."""

    def __init__(self, cfg: ProtocolConfig, *, show_progress: bool = True):
        self.cfg, self.show_progress = cfg, show_progress
        self.model = cfg.model or default_model()
        self.rows = select_rows(cfg)
        self.seconds: dict[str, float] = {}
        self.results: dict[str, dict] = {}
        # A candidate made elsewhere, checked before anything loads (None: erase here).
        self.candidate: Candidate | None = resolve_candidate(
            cfg.concept, self.model, erasers=cfg.erasers, unet=cfg.unet,
            text_encoder=cfg.text_encoder, lora=cfg.lora, method=cfg.method, name=cfg.name)
        self.method = self.candidate.method if self.candidate else cfg.method
        # Every concept the candidate erased (a multi-concept eraser set measured on one of
        # them): locality leaves them all out.
        self.erased = getattr(self.candidate, "erased", None) or [cfg.concept]

    def timed(self, stage: str, fn: Callable, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        return out

    # ------------------------------------------------------------------ stages
    def folder(self, which: str) -> Path:
        if which == "base" and self.cfg.base_dir is not None:
            return Path(self.cfg.base_dir)
        return self.cfg.out / "images" / which

    def generate_sets(self, pipe, which: str) -> None:
        state = self.state
        for name, rows in self.rows.items():
            written = generate_prompt_file(
                pipe, rows, self.folder(which) / name, settings=self.settings,
                process_index=state.process_index, num_processes=state.num_processes,
                show_progress=self.show_progress)
            logger.info("process %d/%d generated %d %s images of %s", state.process_index,
                        state.num_processes, len(written), which, name)

    def evaluate(self, which: str) -> dict | None:
        """The metrics of ``which``'s images on the main process (``None`` on the others),
        from the detections of every process merged."""
        from accelerate.utils import gather_object

        c, folder, state = self.cfg.concept, self.folder(which), self.state
        mine = [(name, *d) for name, rows in self.rows.items()
                for d in detect_share(folder / name, rows, self.detector,
                                      index=state.process_index, count=state.num_processes)]
        logger.info("process %d/%d scored %d %s images", state.process_index,
                    state.num_processes, len(mine), which)
        merged = gather_object(mine)  # every process's, in process order
        if not state.is_main_process:
            return None
        order = {name: i for i, name in enumerate(self.rows)}
        recs = {name: [] for name in self.rows}
        for name, _, record in sorted(merged, key=lambda d: (order[d[0]], d[1])):
            recs[name].append(record)
        simple = recs["simple"] + recs.get("style", [])
        res = erasure_metrics(simple, c, paraphrase=recs.get("paraphrase"), erased=self.erased)
        out = {"acc_e": res.acc_e.rate, "acc_r": res.acc_r.rate if res.acc_r else None,
               "acc_l": res.acc_l.rate, "h": res.h, "detail": to_dict(res),
               "per_class": to_dict(per_class_rates(recs["simple"]))}
        if "two_object" in recs:
            two = two_object_locality(recs["two_object"], c, erased=self.erased)
            out["two_object_locality"] = two.other_survives.rate
            out["two_object_detail"] = to_dict(two)
        return out

    def image_change_others(self) -> dict | None:
        """How the other classes' simple-prompt images changed against the base model's,
        same prompts and seeds (:func:`receler.eval.locality.image_change`), every concept
        the candidate erased left out (``left_out``)."""
        from .eval.locality import features_of, image_change, other_class_images

        base, erased = self.folder("base") / "simple", self.folder("erased") / "simple"
        names = other_class_images(self.rows["simple"], self.erased, erased)
        change = image_change(base, erased, names, features_of(self.detector))
        return change and {**change, "left_out": sorted(self.erased)}

    def concept_prompt(self) -> str:
        """A prompt that shows the concept: its first style or simple row."""
        if "style" in self.rows:
            return self.rows["style"][0].prompt
        return next(r.prompt for r in self.rows["simple"] if r.class_name == self.cfg.concept)

    def attack(self, pipe, which: str, latents) -> dict:
        """Attack results; the base model's are cached beside its images and reused.

        The plain prompt and the token attack start from one prompt; the soft-prompt attack
        is ``attack_prompts`` independent attacks of ``attack_images`` images each, at
        ``attack.steps`` and at ``attack_stronger`` times as many steps, pooled."""
        cfg = self.cfg
        prompt = cfg.attack_prompt or self.concept_prompt()
        plan = attack_plan(self.rows, cfg.concept, cfg.attack_prompts, first=prompt,
                           seed=cfg.attack.seed)
        budgets = [cfg.attack.steps, cfg.attack.steps * cfg.attack_stronger]
        key = {"prompt": prompt, "attack": cfg.attack.key(), "n": cfg.attack_images,
               "detector": cfg.detector, "plan": [list(p) for p in plan], "budgets": budgets}
        cache = self.folder("base") / "attack.json"
        if which == "base" and cache.is_file():
            cached = json.loads(cache.read_text())
            if cached["key"] == key:
                return cached["result"]
        root = self.folder("base") if which == "base" else cfg.out / "attack"
        grid = root / f"{which}.png"
        result = measure_attacks(pipe, cfg.concept, prompt, latents, self.detector,
                                 self.settings, cfg.attack, n_images=cfg.attack_images,
                                 grid_path=grid, show_progress=self.show_progress, soft=False)
        suite = soft_attack_suite(
            pipe, cfg.concept, plan, latents, self.detector, self.settings, cfg.attack,
            checkpoints=budgets, n_images=cfg.attack_images,
            key=suite_key(which, cfg.detector, self.concept_prompt(), self.settings),
            cache_dir=root / ("soft_attacks" if which == "base" else "soft"),
            grid_path=root / f"{which}_soft.png", show_progress=self.show_progress)
        for suffix, steps in (("", budgets[0]), ("_3x", budgets[1])):
            rate = suite["pooled"][str(steps)]
            result.update({f"success_soft{suffix}": rate["rate"], f"soft_n{suffix}": rate["total"],
                           f"soft_ci{suffix}": [rate["low"], rate["high"]],
                           f"soft_steps{suffix}": steps})
        result.update(soft_attacks=suite["attacks"], grid=str(grid),
                      through_guidance=attacked_through_guidance(pipe))
        if which == "base":
            text = json.dumps({"key": key, "result": result}, indent=2) + "\n"
            atomic_write(cache, lambda tmp: tmp.write_text(text))
        return result

    def latency(self, pipe, repeats: int = 6, n: int = 4) -> dict:
        return measure_latency(pipe, self.concept_prompt(), self.settings, repeats=repeats, n=n,
                               base=lambda: self.candidate.base(pipe))

    def check_erase_folder(self) -> tuple[bool, bool]:
        """Refuse an erase run in ``out/erasers`` made with other settings; returns
        (finished, checkpointed)."""
        from .methods.edits import EditConfig
        from .methods.registry import settings_mismatch

        out = self.cfg.out / "erasers"
        finished, checkpointed = (out / CONFIG_FILE).is_file(), (out / CHECKPOINT_FILE).is_file()
        saved = None  # what an earlier run of this protocol left
        if finished:
            saved = EditConfig.load(out / CONFIG_FILE)
        elif checkpointed:
            meta = read_tensors(out / CHECKPOINT_FILE, meta_only=True)[1]
            saved = EditConfig(method=self.cfg.method, train=meta.get("config", {}))
        why = saved and settings_mismatch(self.cfg.method, self.cfg.train, saved)
        if why:  # reusing it would report the old settings' results under the new ones
            raise ValueError(f"{out} holds an erase run with {why}: choose another --out to "
                             "erase with these settings, or delete that folder")
        return finished, checkpointed

    def check_export_folder(self) -> bool:
        """Refuse a finished export in ``out/merged_unet`` made with other settings or from
        other erasers; returns whether it has finished. (An unfinished export's checkpoint
        is checked by the export itself when it resumes.)"""
        from .merge import erasers_sha256, recorded_settings, resolved_config

        record = self.export_record() if self.cfg.export is not None else None
        if record is None:
            return False
        folder, erasers = self.cfg.out / EXPORT_FOLDER, self.cfg.out / "erasers"
        fix = f"choose another --out to export with these settings, or delete {folder}"
        if (erasers / CONFIG_FILE).is_file():
            from .methods.edits import EditConfig

            asked = resolved_config(self.cfg.export,
                                    EditConfig.load(erasers / CONFIG_FILE)).to_dict()
            done = recorded_settings(record["merge"])
            changed = [k for k, v in asked.items() if done.get(k) != v]
            if changed:
                raise ValueError(f"{folder} holds an export with {changed[0]}="
                                 f"{done.get(changed[0])!r}, not "
                                 f"{asked[changed[0]]!r}: {fix}")
            if record["source"]["sha256"] != erasers_sha256(erasers):
                raise ValueError(f"{folder} merges other erasers than {erasers} holds: {fix}")
        return True

    def export_record(self) -> dict | None:
        """The finished export's ``merge_config.json`` (settings, source, stats, fidelity);
        ``None`` before it has finished."""
        from .merge import MERGE_FILE

        file = self.cfg.out / EXPORT_FOLDER / MERGE_FILE
        return json.loads(file.read_text()) if file.is_file() else None

    def export_candidate(self, record: dict) -> Candidate:
        """The finished export of this run's erasers (``record``: its
        :meth:`export_record`): the merged UNet swapped in for the base one, with the
        compute of both stages (erase + export) as its stats."""
        from .merge import both_stages

        folder, erasers = self.cfg.out / EXPORT_FOLDER, self.cfg.out / "erasers"
        erased = erase_candidate(self.cfg.method, erasers)
        cand = resolve_candidate(self.cfg.concept, self.model, unet=str(folder))
        first, second = erased.stats or {}, record["stats"]
        stats = both_stages(first, second)
        stats.update(trainable_parameters=second["trainable_parameters"], erase=first,
                     export=second)
        cand.kind, cand.method, cand.stats = "erase+export", self.cfg.method, stats
        cand.name = self.cfg.name or f"{self.cfg.method} (exported)"
        cand.identity.update(erasers=erased.identity, merge=record["merge"])
        return cand

    def finished_candidate(self) -> Candidate | None:
        """What this run trains, once its training has finished; ``None`` before."""
        erasers = self.cfg.out / "erasers"
        if not (erasers / CONFIG_FILE).is_file():
            return None
        if self.cfg.export is None:
            return erase_candidate(self.cfg.method, erasers)
        record = self.export_record()
        return None if record is None else self.export_candidate(record)

    def erase(self, pipe) -> None:
        from .methods import erase_with, load_edit

        finished, checkpointed = self.check_erase_folder()
        out = self.cfg.out / "erasers"
        if not finished:
            erase_with(self.cfg.method, pipe, self.cfg.train, out, base_model=self.model,
                       resume=checkpointed,
                       show_progress=self.show_progress)
        elif self.cfg.export is None:  # an export loads the erasers itself
            load_edit(pipe, out)
        if self.cfg.export is not None:
            self.export(pipe)
        else:
            self.candidate = erase_candidate(self.cfg.method, out, name=self.cfg.name)

    def export(self, pipe) -> None:
        """Merge the finished erasers into the UNet's weights (resuming an interrupted
        export) and swap the merged UNet in for the erasers."""
        from .merge import export_merged, work_folder
        from .methods import remove_edit

        remove_edit(pipe)  # the erasers just trained: the export loads them itself
        folder = self.cfg.out / EXPORT_FOLDER
        if not self.check_export_folder():
            resume = (work_folder(folder) / CHECKPOINT_FILE).is_file()
            export_merged(pipe, self.cfg.out / "erasers", folder, self.cfg.export,
                          resume=resume, show_progress=self.show_progress)
        self.candidate = self.export_candidate(self.export_record())
        self.candidate.apply(pipe)

    # -------------------------------------------------------------- image keys
    def check_images(self, which: str, *, record: bool = False) -> dict | None:
        """Refuse a folder whose images were made differently; with ``record``, add this
        run's rows to its key and return the key's summary for results.json."""
        folder, candidate = self.folder(which), None
        what = "--base-dir" if which == "base" and self.cfg.base_dir is not None else "folder"
        fix = (f"pass a --base-dir of its own for these settings, or delete {folder}"
               if which == "base" else f"choose another --out for this model, or delete {folder}")
        if which == "erased":
            candidate = self.candidate or self.finished_candidate()
            if candidate is None:  # the erase stage has not finished: no image can be its
                if (folder / KEY_FILE).is_file() or next(folder.rglob("*.png"), None):
                    raise ValueError(f"{folder} holds images of erasers that {self.cfg.out} "
                                     f"no longer holds finished: {fix}")
                return None
            candidate = candidate.key()
        key = folder_key(self.model, self.dtype, self.settings, self.rows, candidate)
        if record:
            return claim_images(folder, key, what=what, fix=fix)
        check_images(folder, key, what=what, fix=fix)
        return None

    def run(self) -> dict:
        with deterministic_algorithms(self.cfg.deterministic):
            return self._run()

    def _run(self) -> dict:
        cfg, attack = self.cfg, "attack" not in self.cfg.skip
        self.state = state = process_state(cfg.device)
        main, split = state.is_main_process, state.num_processes > 1
        self.show_progress = self.show_progress and state.is_local_main_process
        if self.candidate is None:
            self.check_erase_folder()  # before anything loads or is generated
            self.check_export_folder()
        cfg.out.mkdir(parents=True, exist_ok=True)
        device = cfg.device or (state.device if split else None)  # split: a GPU per process
        pipe = self.timed("load", load_pipeline, self.model, device=device, dtype=cfg.dtype)
        self.dtype = str(pipe.unet.dtype).removeprefix("torch.")
        if attack:
            check_attack_space(pipe, cfg.attack.space)  # before anything is generated
        self.settings = SamplerSettings.for_model(self.model)
        if cfg.sample_steps is not None:
            self.settings = replace(self.settings, steps=cfg.sample_steps)
        base_key = self.check_images("base", record=main)  # every process checks, main records
        self.check_images("erased")
        state.wait_for_everyone()  # the key is recorded before any process adds an image
        self.detector = self.timed("load", get_detector, cfg.detector)
        attack = attack and main  # attacks and latency: the main process alone
        latents = self.timed("attack", target_latents, pipe, self.concept_prompt(),
                             cfg.attack.target_images, steps=self.settings.steps,
                             guidance=self.settings.guidance, seed=cfg.attack.seed) \
            if attack else None
        self.timed("generate_base", self.generate_sets, pipe, "base")
        base_attack = self.timed("attack_base", self.attack, pipe, "base", latents) \
            if attack else None
        if self.candidate is None:
            if main:
                self.timed("erase", self.erase, pipe)
            state.wait_for_everyone()
            if not main:
                self.erase(pipe)  # the main process's erasers, finished: loaded
        else:
            self.timed("apply", self.candidate.apply, pipe)
        erased_key = self.check_images("erased", record=main)
        state.wait_for_everyone()
        self.timed("generate", self.generate_sets, pipe, "erased")
        erased_attack = self.timed("attack", self.attack, pipe, "erased", latents) \
            if attack else None
        latency = self.timed("latency", self.latency, pipe) \
            if "latency" not in cfg.skip and main else \
            dict.fromkeys(("latency_base_s", "latency_s", "overhead_ratio"))
        state.wait_for_everyone()  # every image is on disk before any is scored
        base = self.timed("evaluate", self.evaluate, "base")
        erased = self.timed("evaluate", self.evaluate, "erased")
        if not main:  # the main process merged the detections and writes the results
            state.wait_for_everyone()
            return json.loads((cfg.out / "results.json").read_text())
        change = self.timed("evaluate", self.image_change_others)
        results = {"schema_version": SCHEMA_VERSION, **summarise(erased, erased_attack)}
        # what Acc_L does not see: the other classes' images against the base model's
        results["pixel_change_others"] = change and change["pixel"]
        results["feature_change_others"] = change and change["feature"]
        results["image_change_others"] = change
        results["base"] = summarise(base, base_attack)
        results["train"] = self.candidate.stats
        if cfg.export is not None:  # what the export recorded: its settings and fidelity
            record = self.export_record()
            results["export"] = {k: record[k] for k in ("merge", "fidelity", "stats",
                                                        "retain_prompts")}
        results.update(latency, base_images=str(self.folder("base")))
        results.update(concept=cfg.concept, erased=self.erased, method=self.method, name=self.candidate.name,
                       candidate=self.candidate.describe(), skipped=list(cfg.skip),
                       model=self.model, detector=cfg.detector, seconds=dict(self.seconds),
                       dtype=self.dtype, safety_checker="off",  # load_pipeline never loads it
                       rows={k: len(v) for k, v in self.rows.items()},
                       base_key=base_key, erased_key=erased_key,
                       attack_space=cfg.attack.space,
                       config=json.loads(json.dumps(asdict(cfg), default=str)))
        results["config"]["attack"] = cfg.attack.key()  # as runs before the space recorded it
        from .report import write_report

        self.timed("report", write_report, cfg.out, results, self.rows)
        results["seconds"] = dict(self.seconds, total=sum(self.seconds.values()))
        text = json.dumps(results, indent=2, default=str) + "\n"
        atomic_write(cfg.out / "results.json", lambda tmp: tmp.write_text(text))
        state.wait_for_everyone()
        return results


def detect_share(folder: Path, rows: list[PromptRow], detector, *, index: int = 0,
                 count: int = 1) -> list[tuple[int, object]]:
    """The detections of process ``index`` of ``count`` over the images of ``rows`` in
    ``folder``: ``(position, ImageRecord)`` pairs, positions in (case_number, index) order.

    Images are batched as :func:`evaluate_images` batches them (by the labels they ask
    for, :data:`DETECT_BATCH` at a time) and every ``count``-th batch is this process's, so
    a split run scores each image in the batch one process scores it in: the same scores.
    Images of other rows (a ``--base-dir`` that a run with more rows extended) are left out.
    """
    by_case = {r.case_number: r for r in rows}
    items = [(by_case[c], i, path) for c, i, path in list_images(folder) if c in by_case]
    missing = len(by_case) - len({row.case_number for row, _, _ in items})
    if missing:
        logger.warning("%d prompt row(s) have no image in %s", missing, folder)
    groups: dict[tuple[str, ...], list] = {}
    for pos, item in enumerate(items):
        groups.setdefault(tuple(default_labels(item[0])), []).append((pos, item))
    batches = [group[i:i + DETECT_BATCH] for group in groups.values()
               for i in range(0, len(group), DETECT_BATCH)]
    out = []
    for batch in shard(batches, index, count):
        records = evaluate_images([item for _, item in batch], detector, batch_size=DETECT_BATCH)
        out += [(pos, rec) for (pos, _), rec in zip(batch, records, strict=True)]
    return out


@contextmanager
def deterministic_algorithms(on: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` inside the block (when ``on``); cuBLAS
    gets the workspace setting it needs for that, unless one is set already."""
    if not on:
        yield
        return
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def summarise(metrics: dict, attack: dict | None) -> dict:
    """The flat keys of results.json, plus the details (attack keys null when skipped)."""
    a = attack or {}
    return {"acc_e": metrics["acc_e"], "acc_r": metrics["acc_r"], "acc_l": metrics["acc_l"],
            "h": metrics["h"], "two_object_locality": metrics.get("two_object_locality"),
            "attack_success_plain": a.get("success_plain"),
            "attack_success_soft": a.get("success_soft"),
            "attack_n": a.get("soft_n"), "attack_ci": a.get("soft_ci"),
            "attack_success_soft_3x": a.get("success_soft_3x"),
            "attack_n_3x": a.get("soft_n_3x"), "attack_ci_3x": a.get("soft_ci_3x"),
            "attack_success_discrete": a.get("success_discrete"),
            "metrics": metrics, "attack": attack}
