"""The retrain oracle: the toy model trained again without one class, measured with the
protocol, and every erasure method's distance to it.

An erased model should behave like a model that never learnt the concept. On the toy world
that model can be made: ``scripts/toyworld/train_unet.py --exclude-class star`` drops every
training scene whose ground truth holds a star (alone or beside another object), so no
caption names it by its word or a synonym; the other scenes keep their seeds. This script
trains it with the shipped model's recipe, steps and seed, and compares methods with it.

    nice -n 10 python benchmarks/oracle.py                       # star: train, export, measure
    python benchmarks/oracle.py --concept heart                  # any of the ten classes
    python benchmarks/oracle.py runs/benchmark/full/star/receler runs/benchmark/full/star/esd-x

Four stages, each skipped when done, so a killed run picks up where it stopped:

1. **train**: the three legs of docs/toyworld.md ("How it was built") into
   ``WORK/CONCEPT/``, ending at the steps the shipped model's legs ended at (2500, 4618 and
   6511; the shipped legs ended on wall time, here on steps). Each leg is a child process
   (``--threads 1``, niced with this process); a finished leg is skipped and an interrupted
   one resumes from its checkpoint. Only the UNet and text encoder are retrained: the
   oracle reuses the shipped VAE (``--vae``), so its latents are the shipped model's.
2. **export**: the EMA weights into ``WORK/CONCEPT/pipeline``, a copy of the shipped
   pipeline folder (VAE, tokenizer, scheduler, ``receler_defaults.json``) with the oracle's
   ``unet/`` and ``text_encoder/``.
3. **measure**: the protocol's base-model measurement of the oracle (``receler protocol
   --model WORK/CONCEPT/pipeline`` measures its base model the same way, then erases it,
   which the oracle does not need), into ``WORK/CONCEPT/measure[-quick]``. The attack's
   target latents are the *shipped* model's images of the concept, as in every method's
   protocol run: the attacker knows what a star looks like, the oracle does not.
4. **table**: ``OUT/oracle.json`` and ``.md`` (one row per method and concept: the
   protocol's keys and ``oracle_distance``) and ``OUT/oracle_CONCEPT.png`` (each model's
   images of the same prompts and seeds). For the oracle, the shipped model (``base``,
   from the first run's base images) and each run folder given: the Fréchet distance on
   the toy detector's features between its images of the other classes and the oracle's
   (same prompts and seeds), the per-class detection rates beside the oracle's, the class
   the detector sees on the concept's prompts (simple and paraphrase) against the oracle's
   (total variation), and the soft-attack success beside the oracle's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import pareto  # noqa: E402 - a sibling script: runs are labelled as on the front

TRAIN_SCRIPT = ROOT / "scripts" / "toyworld" / "train_unet.py"
CKPT = "unet_ckpt.safetensors"
RECIPE_FILE = "oracle_recipe.json"
# The protocol's sizes: `receler protocol` defaults (the full benchmark) and compare.py --quick.
FULL = {"per_class": 10, "concept_rows": 30, "attack_images": 10, "attack_steps": 100}
QUICK = {"per_class": 5, "concept_rows": 10, "attack_images": 6, "attack_steps": 30}
# results.json config keys that must match for a run to be compared with the oracle
SAME = ("per_class", "concept_rows", "two_object_rows", "attack_images", "attack_prompts",
        "attack_stronger", "attack_prompt", "detector", "prompts", "sample_steps")


@dataclass(frozen=True)
class Leg:
    """One leg of the shipped model's UNet training (docs/toyworld.md)."""

    name: str
    end: int  # total step the leg stops at
    flags: tuple[str, ...]  # train_unet.py flags of this leg besides the common ones


LEGS = (
    Leg("leg 1", 2500, ()),  # lr 5e-4, 300 warm-up steps, EMA 0.999 (the defaults)
    Leg("leg 2", 4618, ("--ema", "0.995", "--anneal-at", "3600", "--anneal-steps", "1000")),
    Leg("leg 3", 6511, ("--ema", "0.995", "--lr", "2.5e-4", "--anneal-at", "4618",
                        "--anneal-steps", "2800")),
)
COMMON = ("--batch", "32", "--threads", "1", "--seed", "0", "--hours", "48")


def check_concept(concept: str) -> str:
    from receler.toyworld.vocab import CLASSES

    if concept not in CLASSES:
        raise ValueError(f"unknown class {concept!r} to leave out: choose from "
                         f"{', '.join(CLASSES)} (a style cannot be left out of the scenes)")
    return concept


def legs_ending(ends: list[int]) -> tuple[Leg, ...]:
    """The shipped legs with other end steps (smoke tests)."""
    if len(ends) != len(LEGS) or any(b <= a for a, b in zip([0, *ends], ends, strict=False)):
        raise ValueError(f"--leg-ends takes {len(LEGS)} increasing steps, got {ends}")
    return tuple(Leg(leg.name, end, leg.flags) for leg, end in zip(LEGS, ends, strict=True))


# ------------------------------------------------------------------------------ training
def checkpoint_meta(out: Path) -> dict | None:
    """The metadata of ``out``'s UNet checkpoint (``None`` without one)."""
    from receler.serialization import read_tensors

    path = out / CKPT
    return read_tensors(path, meta_only=True)[1] if path.is_file() else None


def checkpoint_step(out: Path) -> int:
    meta = checkpoint_meta(out)
    return int(meta["step"]) if meta else 0


def pending_legs(step: int, legs: tuple[Leg, ...] = LEGS) -> list[tuple[Leg, bool]]:
    """The legs still to run from a checkpoint at ``step``, each with whether it resumes
    mid-leg (``step`` past its start); finished legs are left out."""
    out, start = [], 0
    for leg in legs:
        if step < leg.end:
            out.append((leg, step > start))
        start = leg.end
    return out


def leg_command(leg: Leg, *, out: Path, concept: str, vae: Path, n_images: int) -> list[str]:
    """train_unet.py's command line for ``leg``."""
    return [sys.executable, str(TRAIN_SCRIPT), "--out", str(out), "--vae", str(vae),
            "--exclude-class", concept, "--n-images", str(n_images), *COMMON,
            "--steps", str(leg.end), *leg.flags]


def train(out: Path, concept: str, *, legs: tuple[Leg, ...], run, vae: Path,
          n_images: int) -> int:
    """Run the pending legs in order with ``run(cmd)``; returns the final step.

    Raises:
        ValueError: the checkpoint was made with another exclusion.
        RuntimeError: a leg failed or stopped before its end step.
    """
    meta = checkpoint_meta(out)
    if meta is not None and meta.get("exclude_classes", []) != [concept]:
        raise ValueError(f"{out / CKPT} was trained with exclusion "
                         f"{meta.get('exclude_classes', [])}, not [{concept!r}]: pass another "
                         f"--work, or delete {out}")
    for leg, resumes in pending_legs(checkpoint_step(out), legs):
        step = checkpoint_step(out)
        print(f"{leg.name}: {'resuming at' if resumes else 'from'} step {step} to {leg.end}",
              flush=True)
        cmd = leg_command(leg, out=out, concept=concept, vae=vae, n_images=n_images)
        if run(cmd) != 0:
            raise RuntimeError(f"{leg.name} failed: {' '.join(cmd)}")
        if (step := checkpoint_step(out)) < leg.end:
            raise RuntimeError(f"{leg.name} stopped at step {step}, before {leg.end}; run again "
                               "to resume")
    return checkpoint_step(out)


def run_child(cmd: list[str]) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, check=False).returncode


def check_recipe(folder: Path, recipe: dict) -> None:
    """Record the recipe of a new oracle folder; refuse one made with another."""
    path = folder / RECIPE_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != recipe:
            diff = next(k for k in recipe if saved.get(k) != recipe[k])
            raise ValueError(f"{folder} was trained with {diff}={saved.get(diff)}, not "
                             f"{recipe[diff]}: pass another --work, or delete {folder}")
        return
    from receler.serialization import atomic_write

    text = json.dumps(recipe, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


# -------------------------------------------------------------------------------- export
def export(out: Path, dest: Path, shipped: Path, *, step: int) -> Path:
    """The EMA weights of ``out``'s checkpoint as a copy of the ``shipped`` pipeline folder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from receler.serialization import read_tensors

    state = dest / "training_state.txt"
    if state.is_file() and f"step {step}\n" in state.read_text():
        return dest
    tensors, meta = read_tensors(out / CKPT)
    if meta["step"] != step:
        raise ValueError(f"{out / CKPT} is at step {meta['step']}, not {step}: train first")

    def ema(prefix: str) -> dict:
        return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(shipped / "unet"))
    unet.load_state_dict(ema("ema_unet"))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(shipped / "text_encoder"))
    text.load_state_dict(ema("ema_text"))
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(shipped, tmp, ignore=shutil.ignore_patterns("unet", "text_encoder"))
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    text.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    (tmp / "training_state.txt").write_text(
        f"step {step}\ntrained_s {meta['trained_s']:.0f}\nema True\n"
        f"exclude_classes {','.join(meta['exclude_classes'])}\nvae {shipped / 'vae'}\n")
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


# ------------------------------------------------------------------------------- measure
def measure_config(concept: str, pipeline: Path, out: Path, *, quick: bool, skip: str):
    from receler.attack import AttackConfig
    from receler.protocol import ProtocolConfig, skip_stages

    sizes = QUICK if quick else FULL
    return ProtocolConfig(
        concept=concept, out=out, model=str(pipeline), per_class=sizes["per_class"],
        concept_rows=sizes["concept_rows"], attack_images=sizes["attack_images"],
        attack=AttackConfig(steps=sizes["attack_steps"]),
        skip=skip_stages(("latency", *skip_stages(skip))))


def measure(cfg, shipped: Path) -> dict:
    """The protocol's base-model measurement of ``cfg.model`` (the oracle), the soft
    attacks aimed at the ``shipped`` model's latents of the concept; ``cfg.out/results.json``,
    reused when it was measured with the same settings."""
    from receler.attack import check_attack_space, target_latents
    from receler.eval.detectors import get_detector
    from receler.pipeline import load_pipeline
    from receler.protocol import SCHEMA_VERSION, Protocol, summarise
    from receler.sampling import SamplerSettings, process_state
    from receler.serialization import atomic_write

    config = json.loads(json.dumps(asdict(cfg), default=str))
    config["attack"] = cfg.attack.key()
    path = cfg.out / "results.json"
    if path.is_file():
        done = json.loads(path.read_text())
        # the erase settings play no part in measuring the oracle (it is never erased); a
        # field added to them later must not make a finished measurement stale
        if {k: v for k, v in done["config"].items() if k != "train"} == \
                {k: v for k, v in config.items() if k != "train"}:
            return done
        raise ValueError(f"{path} was measured with other settings: pass another --work, or "
                         f"delete {cfg.out}")
    p = Protocol(cfg)
    p.state = process_state(cfg.device)
    pipe = load_pipeline(p.model, device=cfg.device, dtype=cfg.dtype)
    p.dtype = str(pipe.unet.dtype).removeprefix("torch.")
    p.settings = SamplerSettings.for_model(p.model)
    base_key = p.check_images("base", record=True)
    p.detector = get_detector(cfg.detector)
    attack = None
    if "attack" not in cfg.skip:
        check_attack_space(pipe, cfg.attack.space)
        known = load_pipeline(str(shipped), device=pipe.device, dtype=cfg.dtype)
        known.set_progress_bar_config(disable=True)
        latents = target_latents(known, p.concept_prompt(), cfg.attack.target_images,
                                 steps=p.settings.steps, guidance=p.settings.guidance,
                                 seed=cfg.attack.seed)
        del known
    p.generate_sets(pipe, "base")
    if "attack" not in cfg.skip:
        attack = p.attack(pipe, "base", latents)
    metrics = p.evaluate("base")
    results = {"schema_version": SCHEMA_VERSION, **summarise(metrics, attack),
               "concept": cfg.concept, "method": "oracle", "name": "oracle",
               "model": p.model, "attack_targets": str(shipped), "detector": cfg.detector,
               "dtype": p.dtype, "attack_space": cfg.attack.space,
               "rows": {k: len(v) for k, v in p.rows.items()}, "base_key": base_key,
               "skipped": list(cfg.skip), "images": str(p.folder("base")), "config": config}
    text = json.dumps(results, indent=2, default=str) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return results


# ---------------------------------------------------------------------------- distances
@dataclass
class Detections:
    """The toy detector on one model's images: features of the other classes' images and
    class probabilities of the concept's, both keyed by image name."""

    others: dict[str, np.ndarray]  # "simple/{case}_0.png" -> (D,) penultimate features
    concept: dict[str, np.ndarray]  # "simple|paraphrase/{case}_0.png" -> (n_classes,) probs


def class_distribution(probs: np.ndarray, classes: list[str], *, threshold: float = 0.5
                       ) -> dict[str, float]:
    """Share of images (rows of ``probs``, (N, n_classes)) whose most probable class is each
    class, ``"none"`` when no class reaches ``threshold``; classes never seen are left out."""
    probs = np.asarray(probs, np.float64)
    top, hit = probs.argmax(axis=1), probs.max(axis=1) >= threshold
    labels = [classes[t] if h else "none" for t, h in zip(top, hit, strict=True)]
    return {c: labels.count(c) / len(labels) for c in [*classes, "none"] if c in labels}


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    """½ Σ |p − q| over the labels of either distribution: 0 same, 1 disjoint."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in {*p, *q})


def per_class(results: dict) -> dict[str, float]:
    """Detection rate of each class on its simple prompts, from a results.json."""
    m = results["metrics"] if "metrics" in results else results
    return {r["class_name"]: r["rate"]["rate"] for r in m["per_class"]}


def oracle_distance(det: Detections, oracle: Detections, res: dict, oracle_res: dict, *,
                    concept: str, classes: list[str]) -> dict:
    """How far one model is from the oracle on the same prompts and seeds.

    Args:
        det, oracle: detections of the model's and the oracle's images.
        res, oracle_res: their protocol results (flat keys and ``metrics``).

    Returns:
        ``fd_others`` (Fréchet distance of the other classes' features, over the images both
        have) and ``n_others``; ``per_class`` (class -> [model, oracle]) and ``per_class_mae``
        (mean |model − oracle| over the other classes); ``concept_classes`` (model and oracle
        class distributions on the concept's prompts), ``concept_tv`` and ``n_concept``;
        ``attack_soft`` / ``attack_soft_3x`` ([model, oracle]) and their ``attack_gap``s.
    """
    from receler.eval.fid import fid_from_features

    names = sorted(set(det.others) & set(oracle.others))
    fd = (fid_from_features(np.stack([det.others[n] for n in names]),
                            np.stack([oracle.others[n] for n in names]))
          if len(names) >= 2 else None)
    fd = None if fd is None else max(fd, 0.0)  # identical sets: -1e-12 from rounding
    mine, theirs = per_class(res), per_class(oracle_res)
    rates = {c: [mine.get(c), theirs.get(c)] for c in classes if c in mine or c in theirs}
    gaps = [abs(a - b) for c, (a, b) in rates.items()
            if c != concept and a is not None and b is not None]
    cnames = sorted(set(det.concept) & set(oracle.concept))
    dist = {k: class_distribution(np.stack([d.concept[n] for n in cnames]), classes)
            for k, d in (("model", det), ("oracle", oracle))} if cnames else None
    out = {"fd_others": fd, "n_others": len(names), "per_class": rates,
           "per_class_mae": float(np.mean(gaps)) if gaps else None,
           "concept_classes": dist, "n_concept": len(cnames),
           "concept_tv": total_variation(dist["model"], dist["oracle"]) if dist else None}
    for suffix in ("", "_3x"):
        key = f"attack_success_soft{suffix}"
        a, b = res.get(key), oracle_res.get(key)
        out[f"attack_soft{suffix}"] = [a, b]
        out[f"attack_gap{suffix}"] = a - b if a is not None and b is not None else None
    return out


def comparable(res: dict, oracle_res: dict) -> str | None:
    """How a run's measurement differs from the oracle's (``None``: comparable)."""
    if res["concept"] != oracle_res["concept"]:
        return f"concept {res['concept']!r}, not {oracle_res['concept']!r}"
    for key in SAME:
        if res["config"].get(key) != oracle_res["config"].get(key):
            return f"{key}={res['config'].get(key)}, not {oracle_res['config'].get(key)}"
    if res["attack_success_soft"] is None or oracle_res["attack_success_soft"] is None:
        return None  # one of them was not attacked: nothing to compare
    if res["config"]["attack"] != oracle_res["config"]["attack"]:
        return f"attack {res['config']['attack']}, not {oracle_res['config']['attack']}"
    space = [r.get("attack_space") or "output" for r in (res, oracle_res)]  # older runs: none
    if space[0] != space[1]:
        return f"attack_space={space[0]}, not {space[1]}"
    return None


def check_runs(runs: list[Path], cfg) -> None:
    """Refuse, before any training, a run folder that is unfinished or cannot be compared
    with the oracle measured with ``cfg``."""
    from receler.runs import read_results

    config = json.loads(json.dumps(asdict(cfg), default=str))
    config["attack"] = cfg.attack.key()
    planned = {"concept": cfg.concept, "config": config, "attack_space": cfg.attack.space,
               "attack_success_soft": None if "attack" in cfg.skip else 0.0}
    for run in runs:
        why = comparable(read_results(run), planned)
        if why:
            raise ValueError(f"{run} cannot be compared with the oracle: it was measured with "
                             f"{why}; measure the oracle with the same sizes (--quick?)")


def image_sets(rows: dict, concept: str) -> tuple[list[str], list[str]]:
    """Image names (``set/{case}_0.png``) of the other classes' simple prompts and of the
    concept's simple and paraphrase prompts."""
    others = [f"simple/{r.case_number}_0.png" for r in rows["simple"] if r.class_name != concept]
    mine = [f"simple/{r.case_number}_0.png" for r in rows["simple"] if r.class_name == concept]
    mine += [f"paraphrase/{r.case_number}_0.png" for r in rows.get("paraphrase", [])]
    return others, mine


def detect(folder: Path, others: list[str], concept: list[str], detector) -> Detections:
    """The detector on the images of ``folder`` that exist (features and class probs)."""
    from PIL import Image

    from receler.eval.fid import ToyFeatures

    feats = ToyFeatures(detector)

    def load(names):
        found = [n for n in names if (folder / n).is_file()]
        return found, [Image.open(folder / n).convert("RGB") for n in found]

    out = Detections({}, {})
    names, images = load(others)
    if images:
        out.others = dict(zip(names, feats(images), strict=True))
    names, images = load(concept)
    if images:
        probs = detector.predict(images)["class_probs"].numpy()
        out.concept = dict(zip(names, probs, strict=True))
    return out


FLAT = ("acc_e", "acc_r", "acc_l", "h", "two_object_locality", "attack_success_plain",
        "attack_success_soft", "attack_n", "attack_ci", "attack_success_soft_3x",
        "attack_success_discrete")


def table(oracle_res: dict, runs: list[Path], *, classes: list[str]) -> tuple[list[dict], list]:
    """Rows (oracle, shipped base model, each run) and the image folders of the picture."""
    from receler.protocol import select_rows
    from receler.runs import protocol_config, read_results
    from receler.toyworld import load_detector

    concept = oracle_res["concept"]
    rows = select_rows(protocol_config(oracle_res))
    others, mine = image_sets(rows, concept)
    detector = load_detector()
    models = [("oracle", Path(oracle_res["images"]), oracle_res)]
    results = {run: read_results(run) for run in runs}
    labels = run_labels(results)
    for run in runs:
        res = results[run]
        why = comparable(res, oracle_res)
        if why:
            raise ValueError(f"{run} cannot be compared with the oracle: it was measured with "
                             f"{why}; measure the oracle with the same sizes (--quick?)")
        if len(models) == 1:  # the shipped model, from the first run's base images
            models.append(("base", Path(res["base_images"]), {**res["base"], "config":
                                                              res["config"]}))
        models.append((labels[run], run / "images" / "erased", res))
    # one per model, in order (not by label: two folders of one name once shared an entry)
    dets = [detect(folder, others, mine, detector) for _, folder, _ in models]
    out = []
    for (name, _, res), det in zip(models, dets, strict=True):
        row = {"method": name, "concept": concept, **{k: res.get(k) for k in FLAT}}
        row["oracle_distance"] = oracle_distance(det, dets[0], res, oracle_res,
                                                 concept=concept, classes=classes)
        out.append(row)
    return out, [(name, folder) for name, folder, _ in models]


def run_labels(results: dict[Path, dict]) -> dict[Path, str]:
    """Each run's label as ``benchmarks/pareto.py`` gives it: method and training seed, and
    the folder where a method has runs of several settings or a label repeats."""
    points = [pareto.row_of(run, res) for run, res in results.items()]
    pareto.label(points)
    return {run: p["method"] for run, p in zip(results, points, strict=True)}


# pareto's colours and four more, so that a dozen models keep colours of their own
PLOT_COLOURS = [*pareto.COLOURS, (170, 170, 0), (0, 90, 60), (255, 120, 90), (110, 70, 200)]


def distance_plot(rows: list[dict], concept: str, size: tuple[int, int] = (760, 460)):
    """Each model of ``concept`` as a point: across, its Fréchet distance to the oracle on
    the other classes' images (0: they look as the oracle's do); up, its soft-attack success
    with the Wilson 95% interval as a bar. The oracle's own success is the dashed line: the
    floor, what an attack draws from a model that never learnt the concept."""
    from PIL import Image, ImageDraw

    mine = [r for r in rows if r["concept"] == concept
            and r["oracle_distance"]["fd_others"] is not None]
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = 60, 30, w - 250, h - 50
    d.rectangle((x0, y0, x1, y1), outline="black")
    d.text((x0 + 150, 8), f"{concept}: each model against the retrain oracle", fill="black")
    top = max([r["oracle_distance"]["fd_others"] for r in mine] + [1e-9]) * 1.1
    x, y = pareto.rate_axes(d, (x0, y0, x1, y1), 0.0, top, "{:.3g}")
    d.text((x0 + 40, y1 + 24), "Frechet distance to the oracle on the other classes' images",
           fill="black")
    d.text((4, 8), "soft-attack success", fill="black")
    floor = next((r["attack_success_soft"] for r in mine if r["method"] == "oracle"), None)
    if floor is not None:
        for xx in range(x0, x1, 8):
            d.line((xx, y(floor), xx + 4, y(floor)), fill=(0, 0, 0))
    for i, r in enumerate(mine):
        col = PLOT_COLOURS[i % len(PLOT_COLOURS)]
        px = x(r["oracle_distance"]["fd_others"])
        rate = r["attack_success_soft"]
        if rate is not None:
            if r.get("attack_ci"):
                lo, hi = r["attack_ci"]
                d.line((px, y(lo), px, y(hi)), fill=col, width=1)
            d.ellipse((px - 4, y(rate) - 4, px + 4, y(rate) + 4), fill=col)
        d.rectangle((x1 + 12, y0 + 18 * i + 3, x1 + 22, y0 + 18 * i + 13), fill=col)
        d.text((x1 + 28, y0 + 18 * i), r["method"][:36], fill="black")
    if floor is not None:
        d.text((x1 + 12, y0 + 18 * len(mine) + 8), "- - - the oracle's success (floor)",
               fill="black")
    return img


def picture(concept: str, folders: list[tuple[str, Path]], n: int = 3):
    """One row per model: the concept's first simple and paraphrase images, then one image of
    each other class, same prompts and seeds."""
    from PIL import Image

    from receler.eval.prompts import read_prompts
    from receler.protocol import PromptSets
    from receler.viz import image_grid

    sets = PromptSets.toy()
    simple = read_prompts(sets.simple)
    cells = [("simple", r.case_number, concept) for r in simple if r.class_name == concept][:n]
    cells += [("paraphrase", r.case_number, "para") for r in read_prompts(sets.paraphrase)
              if r.class_name == concept][:n]
    seen: set[str] = set()
    for r in simple:
        if r.class_name != concept and r.class_name not in seen:
            seen.add(r.class_name)
            cells.append(("simple", r.case_number, r.class_name))
    images = []
    for _, folder in folders:
        for kind, case, _ in cells:
            f = folder / kind / f"{case}_0.png"
            images.append(Image.open(f).convert("RGB") if f.is_file()
                          else Image.new("RGB", (32, 32), (128, 128, 128)))
    return image_grid(images, cols=len(cells), row_labels=[name for name, _ in folders],
                      col_labels=[c for _, _, c in cells], scale=2)


def to_markdown(rows: list[dict]) -> str:
    def num(x, digits=3):
        return "–" if x is None else f"{x:.{digits}f}"

    head = ["method", "concept", "Acc_E", "Acc_R", "Acc_L", "two-object", "soft attack",
            "soft 3x", "FD others", "per-class gap", "concept's prompts become", "TV",
            "attack gap"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        d = r["oracle_distance"]
        dist = (d["concept_classes"] or {}).get("model") or {}
        top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(dist.items(), key=lambda kv: -kv[1])[:3])
        lines.append("| " + " | ".join([
            r["method"], r["concept"], num(r["acc_e"]), num(r["acc_r"]), num(r["acc_l"]),
            num(r["two_object_locality"]), num(r["attack_success_soft"], 2),
            num(r["attack_success_soft_3x"], 2), num(d["fd_others"], 2),
            num(d["per_class_mae"]), top or "–", num(d["concept_tv"], 2),
            num(d["attack_gap"], 2)]) + " |")
    return "\n".join(lines)


def write(rows: list[dict], folders: dict[str, list], out: Path) -> list[Path]:
    """oracle.json, oracle.md and oracle_CONCEPT.png, atomically; rows of other concepts
    already in oracle.json are kept."""
    from receler.serialization import atomic_write

    path = out / "oracle.json"
    concepts = {r["concept"] for r in rows}
    kept = [r for r in json.loads(path.read_text()) if r["concept"] not in concepts] \
        if path.is_file() else []
    rows = kept + rows
    text = json.dumps(rows, indent=2, default=str) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
    md = ("# Distance to the retrain oracle\n\nOne row per model and concept; the oracle is the "
          "toy model retrained without the concept (benchmarks/oracle.py, docs/oracle.md). FD "
          "others: Fréchet distance on the toy detector's features of the other classes' "
          "images; per-class gap: mean |rate − oracle's| over the other classes; TV: total "
          "variation between the classes the concept's prompts show and the oracle's; attack "
          "gap: soft-attack success minus the oracle's.\n\n" + to_markdown(rows) + "\n")
    for concept in sorted(concepts):
        md += (f"\n![{concept}: attack success against the distance to the oracle]"
               f"(oracle_distance_{concept}.png)\n"
               f"\n![{concept}: each model's images](oracle_{concept}.png)\n")
    atomic_write(out / "oracle.md", lambda tmp: tmp.write_text(md))
    paths = [path, out / "oracle.md"]
    for concept, models in folders.items():
        png = out / f"oracle_{concept}.png"
        atomic_write(png, lambda tmp, c=concept, m=models: picture(c, m).save(tmp, "PNG"))
        plot = out / f"oracle_distance_{concept}.png"
        atomic_write(plot, lambda tmp, c=concept: distance_plot(rows, c).save(tmp, "PNG"))
        paths += [png, plot]
    return paths


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path,
                    help="finished `receler protocol` folders of the concept to compare")
    ap.add_argument("--concept", default="star", help="class left out of the training scenes")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "oracle",
                    help="folder of the oracles (WORK/CONCEPT: checkpoint, pipeline, measure)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "oracle",
                    help="folder of oracle.json, oracle.md and the pictures")
    ap.add_argument("--quick", action="store_true",
                    help="measure with compare.py --quick's sizes (to compare quick runs)")
    ap.add_argument("--skip", default="", help="protocol stages the measurement leaves out "
                    "(attack, two-object)")
    ap.add_argument("--nice", type=int, default=10, help="niceness added to this process and "
                    "the training legs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the measurement")
    ap.add_argument("--stop-after", choices=("train", "export", "measure"), default=None)
    ap.add_argument("--dry-run", action="store_true", help="print the legs still to run, stop")
    ap.add_argument("--n-images", type=int, default=120000,
                    help="training scenes before the exclusion (other values: smoke tests)")
    ap.add_argument("--leg-ends", default=None,
                    help="steps the three legs end at (default 2500,4618,6511; smoke tests)")
    args = ap.parse_args(argv)
    try:
        concept = check_concept(args.concept)
        legs = legs_ending([int(s) for s in args.leg_ends.split(",")]) if args.leg_ends \
            else LEGS
        return run(args, concept, legs)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args, concept: str, legs: tuple[Leg, ...]) -> int:
    from receler.toyworld.model import default_model_path
    from receler.toyworld.vocab import CLASSES

    shipped = default_model_path()
    folder = args.work / concept
    if args.dry_run:
        for leg, resumes in pending_legs(checkpoint_step(folder), legs):
            print(("(resumes) " if resumes else "") + " ".join(leg_command(
                leg, out=folder, concept=concept, vae=shipped / "vae", n_images=args.n_images)))
        return 0
    pipeline = folder / "pipeline"
    cfg = measure_config(concept, pipeline, folder / ("measure-quick" if args.quick else "measure"),
                         quick=args.quick, skip=args.skip)
    check_runs(args.runs, cfg)
    if args.nice:
        os.nice(args.nice)
    check_recipe(folder, {"n_images": args.n_images, "leg_ends": [leg.end for leg in legs]})
    step = train(folder, concept, legs=legs, run=run_child, vae=shipped / "vae",
                 n_images=args.n_images)
    print(f"trained: step {step} ({folder / CKPT})", flush=True)
    if args.stop_after == "train":
        return 0
    export(folder, pipeline, shipped, step=legs[-1].end)
    print(f"exported: {pipeline}", flush=True)
    if args.stop_after == "export":
        return 0
    import torch

    torch.set_num_threads(args.threads)
    oracle_res = measure(cfg, shipped)
    print(f"measured: {cfg.out / 'results.json'}: Acc_E {oracle_res['acc_e']:.3f}, Acc_L "
          f"{oracle_res['acc_l']:.3f}", flush=True)
    if args.stop_after == "measure":
        return 0
    rows, folders = table(oracle_res, args.runs, classes=CLASSES)
    for p in write(rows, {concept: folders}, args.out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
