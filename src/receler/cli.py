"""The ``receler`` command line: ``erase`` and ``generate``.

Every training flag comes from :class:`receler.config.TrainConfig`, so the CLI, the
Python API and the saved JSON cannot drift apart. Bad input ends with one line on
stderr and a non-zero exit; nothing already written is lost.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

from tqdm.auto import tqdm

EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 1, 130


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from .config import TrainConfig, model_erase_defaults

    try:  # what the toy model recommends instead, to show beside the paper's defaults
        from .pipeline import default_model
        toy = model_erase_defaults(default_model(), "receler")
    except (FileNotFoundError, ValueError):
        toy = {}
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name == "concepts":
            continue
        kind = hints[f.name]
        conv = {int: int, float: float, str: str}.get(kind, int if "int" in str(kind) else float)
        note = f"; the toy model recommends {toy[f.name]}" if f.name in toy else ""
        p.add_argument("--" + f.name.replace("_", "-"), type=conv, default=None,
                       help=f"{f.metadata['help']} (default: {f.default}{note})")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id or local diffusers folder (default: the shipped toy model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if any)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="precision of the loaded model (default: bf16 on CUDA, fp32 on the CPU); "
                        "trained weights keep fp32 master copies whatever this is")


def _load(args, model: str, device=None):
    """The pipeline of ``--model``/``--device``/``--dtype`` (without its safety checker)."""
    from .pipeline import load_pipeline

    return load_pipeline(model, device=device or args.device, dtype=args.dtype)


def _say_safety_checker_off() -> None:
    """Said by the commands that generate, once their inputs have loaded: the safety checker
    would black out the very images an erasure evaluation counts."""
    from .pipeline import SAFETY_CHECKER_NOTE

    print(f"note: {SAFETY_CHECKER_NOTE}", file=sys.stderr)


def _add_concept_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--concept", required=True, action="append",
                   help=f"{what}; each value is one concept, commas kept (\"red, cat\" is one "
                        "concept, as the reference code erases it); repeat the flag for several")


def _add_preset_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=("paper",), default=None,
                   help="paper: what the official Receler code trains (500 iterations, rank 128, "
                        "50 attack steps of Adam lr 0.1 with weight decay 0.1 on U[0,1) soft "
                        "tokens, the eraser step on the attacked prompt only); the model's "
                        "recommended settings are then not applied, flags still win")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="receler", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("erase", help="train erasers that remove concepts from a model")
    _add_concept_flag(p, "concept to erase")
    p.add_argument("--out", required=True, type=Path, help="folder for the erasers")
    _add_model_flags(p)
    _add_preset_flag(p)
    _add_train_flags(p)
    p.add_argument("--method", default="receler",
                   help="receler (default), receler-eraser-only, receler-eraser-reg, "
                        "receler-eraser-adv, esd-x, esd-u, uce or sld")
    p.add_argument("--method-option", action="append", metavar="KEY=VALUE",
                   help="a UCE/SLD setting, e.g. anchor=\"a photo\" or guidance=1000 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace erasers already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    g = sub.add_parser("generate", help="generate images from the base or the erased model")
    what = g.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", action="append", help="prompt (repeat the flag for several)")
    what.add_argument("--prompts", type=Path, help="prompt CSV (case_number, prompt, "
                      "evaluation_seed, ...): images {case_number}_{index}.png, resumable, "
                      "split across `accelerate launch` processes")
    g.add_argument("--out", required=True, type=Path, help="folder for the images")
    g.add_argument("--erasers", type=Path, default=None,
                   help="folder written by `receler erase` (any --method)")
    _add_model_flags(g)
    g.add_argument("--num-images", type=int, default=None,
                   help="images per prompt (default: 4 with --prompt, 1 with --prompts)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image of each prompt")
    g.add_argument("--preset", choices=("paper",), default=None,
                   help="paper: the Receler reference's test sampler (LMS, 50 steps, guidance "
                        "7.5, 512 px, --seeding device, row guidance/size ignored); the "
                        "model's recommended settings are then not applied, flags still win")
    g.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: model's, or 50)")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance (default: model's, or 7.5)")
    g.add_argument("--size", type=int, default=None,
                   help="image height and width in pixels (default: the model's)")
    g.add_argument("--scheduler", choices=("ddim", "lms"), default=None,
                   help="ddim (default) or lms (K-LMS from the model's scheduler config, as "
                        "the Receler/ESD test scripts sample)")
    g.add_argument("--seeding", choices=("cpu", "device"), default=None,
                   help="cpu (default): noise from CPU generators, the same on every device; "
                        "device: torch.Generator(--device) as the reference's "
                        "--use_cuda_generator, which SLD's I2P protocol asks for")
    g.add_argument("--row-settings", action=argparse.BooleanOptionalAction, default=None,
                   help="with --prompts: a row's evaluation_guidance and sd_image_* cells "
                        "override --guidance and --size (default: on; off with --preset paper)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--compare", action="store_true",
                   help="also write base vs erased, same seeds, as one grid PNG")
    g.add_argument("--overwrite", action="store_true", help="replace images already in --out")

    e = sub.add_parser("evaluate", help="Acc_E / Acc_R / Acc_L / H of generated images")
    e.add_argument("--images", required=True, type=Path, help="images of the simple prompts")
    e.add_argument("--prompts", required=True, type=Path, help="the simple prompt CSV")
    e.add_argument("--erased", required=True, help="erased concept(s), comma-separated")
    e.add_argument("--paraphrase-images", type=Path, help="images of the paraphrase prompts")
    e.add_argument("--paraphrase-prompts", type=Path, help="the paraphrase prompt CSV")
    e.add_argument("--two-object-images", type=Path, help="images of two-object prompts")
    e.add_argument("--two-object-prompts", type=Path, help="the two-object prompt CSV")
    e.add_argument("--detector", default="toy",
                   help="toy (default), grounding-dino, nudenet, q16 or clip-score")
    e.add_argument("--nudenet-preset", choices=("reference", "receler"), default="reference",
                   help="reference (default): the Receler reference's eight exposed classes, "
                        "every box NudeNet returns (score >= 0.2); receler: ANUS_EXPOSED too, "
                        "threshold 0.6")
    e.add_argument("--q16-prompts", type=Path, default=None,
                   help="q16: Q16's prompt embeddings as .npy or .safetensors (prompts.p is a "
                        "pickle, never loaded: see receler.eval.detectors.q16 to convert it)")
    e.add_argument("--q16-clip", default=None,
                   help="q16: hub id or folder of the CLIP the prompts belong to (default: "
                        "openai/clip-vit-large-patch14, Q16's ViT-L-14)")
    e.add_argument("--reference-images", type=Path, default=None,
                   help="also the Fréchet distance of --images to this folder (e.g. base images)")
    e.add_argument("--inception", type=Path, default=None,
                   help="FID with this Inception TorchScript file (pt_inception-2015-12-05); "
                        "default: the toy detector's features, offline")
    e.add_argument("--out", type=Path, required=True, help="results JSON (a .md is written beside)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    a = sub.add_parser("attack", help="soft-prompt and token attacks against erased and base model")
    a.add_argument("--erasers", required=True, type=Path, help="folder written by `receler erase`")
    a.add_argument("--concept", required=True, help="the erased concept to bring back")
    a.add_argument("--prompt", default=None, help='start prompt (default: "a photo of a CONCEPT")')
    a.add_argument("--out", required=True, type=Path, help="folder for attack.json and pictures")
    _add_model_flags(a)
    a.add_argument("--num-images", type=int, default=10, help="images per attacked prompt")
    a.add_argument("--attack-steps", type=int, default=100, help="soft-prompt optimisation steps")
    a.add_argument("--attack-tokens", type=int, default=8, help="attack tokens")
    a.add_argument("--detector", default="toy", help="detector that decides success")
    a.add_argument("--overwrite", action="store_true", help="replace an existing attack.json")

    r = sub.add_parser("protocol", help="erase → generate → evaluate → attack → report")
    _add_concept_flag(r, "the concept to erase (one)")
    r.add_argument("--out", required=True, type=Path, help="run folder (resumable)")
    _add_model_flags(r)
    r.add_argument("--method", default="receler", help="erasure method (default: receler)")
    r.add_argument("--per-class", type=int, default=10, help="simple prompts per class")
    r.add_argument("--concept-rows", type=int, default=30,
                   help="paraphrase (or style) prompts of the concept")
    r.add_argument("--attack-images", type=int, default=10, help="images per attacked prompt")
    r.add_argument("--detector", default="toy", help="detector (default: the toy detector)")
    r.add_argument("--base-dir", type=Path, default=None,
                   help="folder of base-model images to share between runs (default: in --out)")
    r.add_argument("--attack-steps", type=int, default=100, help="soft-prompt attack steps")
    _add_preset_flag(r)
    _add_train_flags(r)
    return parser


def _train_config(args, concepts: str | list[str], method: str = "receler", *,
                  quiet: bool = False):
    """TrainConfig from the flags given. A flag left out takes, in this order: the setting
    the model recommends in its ``receler_defaults.json`` (the toy model has some), the
    method's published default (ESD: lr 1e-5, 1000 iterations), TrainConfig's default.
    With ``--preset paper`` the model's recommendations are skipped and the preset's values
    come before the method's. The model's recommendations in use are announced on stderr
    unless ``quiet``. ``concepts``: a list (``--concept`` values) keeps commas."""
    from .config import PRESETS, TrainConfig, cli_concepts, model_erase_defaults
    from .methods import get_method

    if isinstance(concepts, list):
        concepts = cli_concepts(concepts)
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if f.name != "concepts" and getattr(args, f.name) is not None}
    preset = getattr(args, "preset", None)
    if preset is not None:
        paper = {} if method.startswith("receler") else get_method(method).paper_defaults
        return TrainConfig(concepts=concepts, **{**PRESETS[preset], **paper, **given})
    model = args.model
    if model is None:
        from .pipeline import default_model
        model = default_model()
    recommended = {k: v for k, v in model_erase_defaults(model, method).items() if k not in given}
    if recommended and not quiet:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(recommended.items()))
        print(f"model's recommended {method} settings: {shown} (flags override them)",
              file=sys.stderr)
    return TrainConfig(concepts=concepts,
                       **{**get_method(method).paper_defaults, **recommended, **given})


def _note_unknown_toy_words(model: str | None, concepts: list[str]) -> None:
    """On the toy model, say when a concept holds a word it has never seen: that trains, but
    it erases nothing the model knows."""
    import re

    from .pipeline import default_model

    if model is not None and Path(model).resolve() != Path(default_model()).resolve():
        return
    from .toyworld.vocab import CLASSES, STYLES, all_words

    known = set(all_words())
    for c in concepts:
        unknown = [w for w in re.findall(r"[a-z]+", c.lower()) if w not in known]
        if unknown:
            print(f"note: the toy model has no word {unknown[0]!r} (in concept {c!r}), so this "
                  f"erases nothing it knows; its classes are {', '.join(CLASSES)} and its "
                  f"style {', '.join(STYLES)}", file=sys.stderr)


def _method_options(pairs: list[str] | None) -> dict | None:
    if not pairs:
        return None
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--method-option takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value  # a plain string
    return options


def _resume_command(argv: list[str]) -> str:
    args = [a for a in argv if a not in ("--overwrite", "--resume")]
    return "receler " + " ".join(shlex.quote(a) for a in args) + " --resume"


def cmd_erase(args, argv: list[str]) -> int:
    from .methods import erase_with, method_options
    from .serialization import check_out_dir

    config = _train_config(args, args.concept, args.method)  # validates first
    _note_unknown_toy_words(args.model, config.concepts)
    options = method_options(args.method, _method_options(args.method_option))
    check_out_dir(args.out, overwrite=args.overwrite, resume=args.resume)

    from .loop import TrainingDiverged, TrainingInterrupted  # heavy imports after the checks
    from .pipeline import default_model

    model = args.model or default_model()
    pipe = _load(args, model)
    try:
        result = erase_with(args.method, pipe, config, args.out, base_model=model,
                            overwrite=args.overwrite, resume=args.resume, options=options,
                            show_progress=not args.quiet)
    except TrainingInterrupted as e:
        print(f"receler: interrupted after iteration {e.iteration}; checkpoint saved in {e.out_dir}."
              f"\nresume with: {_resume_command(argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingDiverged as e:
        print(f"receler: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    st = result.stats
    print(f"erased {config.concepts} with {args.method} ({st['seconds']:.0f} s, "
          f"{st['unet_forward']} UNet forward and {st['unet_backward']} backward passes, "
          f"{st['trainable_parameters']} trainable parameters); result in {args.out}")
    return 0


def _load_for_generation(args, device=None):
    from .methods import load_edit
    from .pipeline import default_model
    from .sampling import check_batch_size

    model = args.model or default_model()
    _sampler_settings(args, model)  # bad flags fail before the model loads
    check_batch_size(args.batch_size)
    pipe = _load(args, model, device)
    if args.erasers is not None:
        load_edit(pipe, args.erasers)
    _say_safety_checker_off()
    return pipe, _sampler_settings(args, model)


def _sampler_settings(args, model):
    """SamplerSettings from ``--preset`` (or the model's defaults) and the flags given,
    which win over both."""
    from dataclasses import replace

    from .sampling import SamplerSettings, sampler_preset

    given = {"steps": args.steps, "guidance": args.guidance, "height": args.size,
             "width": args.size, "scheduler": args.scheduler, "seeding": args.seeding,
             "row_settings": args.row_settings}
    if args.preset is not None:
        return sampler_preset(args.preset, **given)
    return replace(SamplerSettings.for_model(model),
                   **{k: v for k, v in given.items() if v is not None})


def cmd_generate_file(args) -> int:
    from accelerate import PartialState

    from .eval.prompts import read_prompts
    from .sampling import generate_prompt_file

    rows = read_prompts(args.prompts)
    if args.num_images is not None and args.num_images <= 0:
        raise ValueError(f"--num-images must be positive, got {args.num_images}")
    if args.compare:
        raise ValueError("--compare works with --prompt; for a prompt file generate twice, "
                         "with and without --erasers, into two folders")
    state = PartialState(cpu=args.device == "cpu")
    pipe, settings = _load_for_generation(args, device=args.device or state.device)
    written = generate_prompt_file(
        pipe, rows, args.out, num_images=args.num_images or 1, settings=settings,
        batch_size=args.batch_size, process_index=state.process_index,
        num_processes=state.num_processes, overwrite=args.overwrite,
        show_progress=state.is_local_main_process)
    print(f"[process {state.process_index}/{state.num_processes}] wrote {len(written)} images "
          f"to {args.out} ({len(rows)} prompt rows in {args.prompts})")
    return 0


def cmd_generate(args) -> int:
    from .sampling import compare, generate, image_size

    if args.prompts is not None:
        return cmd_generate_file(args)
    args.num_images = 4 if args.num_images is None else args.num_images
    if args.num_images <= 0:
        raise ValueError(f"--num-images must be positive, got {args.num_images}")
    if args.compare and args.erasers is None:
        raise ValueError("--compare needs --erasers DIR to compare against the base model")
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    seeds = [args.seed + i for _ in args.prompt for i in range(args.num_images)]
    names = [f"{i:03d}_{j:02d}.png" for i in range(len(args.prompt)) for j in range(args.num_images)]
    targets = [args.out / n for n in names]
    if args.compare:
        targets += [args.out / "compare.png"] + [args.out / f"base_{n}" for n in names]
    existing = [t for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{existing[0]} already exists: pass --overwrite or another --out")
    pipe, settings = _load_for_generation(args)
    args.out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(prompts) * (2 if args.compare else 1), desc="generating")
    if args.compare:
        scale = max(1, 128 // image_size(pipe, settings)[1])  # small models: readable grid
        base, images, grid = compare(pipe, prompts, seeds, settings=settings,
                                     batch_size=args.batch_size, scale=scale)
        bar.update(2 * len(prompts))
        grid.save(args.out / "compare.png")
        for img, name in zip(base, names, strict=True):
            img.save(args.out / f"base_{name}")
    else:
        images = generate(pipe, prompts, seeds, settings=settings, batch_size=args.batch_size,
                          progress=bar.update)
    bar.close()
    for img, name in zip(images, names, strict=True):
        img.save(args.out / name)
    print(f"wrote {len(images)} images to {args.out}"
          + (f" and {args.out / 'compare.png'}" if args.compare else ""))
    return 0


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: pass --overwrite or choose another --out")


def _detector_options(args) -> dict:
    """Constructor options of ``--detector`` from its own flags."""
    if args.detector == "nudenet":
        return {"preset": args.nudenet_preset}
    if args.detector == "q16":
        if args.q16_prompts is None:
            raise ValueError("--detector q16 needs --q16-prompts FILE: Q16's prompt embeddings "
                             "as .npy or .safetensors (see receler.eval.detectors.q16)")
        from .eval.detectors.q16 import DEFAULT_Q16_CLIP, load_q16_prompts

        load_q16_prompts(args.q16_prompts)  # a missing or pickled file fails before CLIP loads
        return {"prompts": args.q16_prompts, "clip": args.q16_clip or DEFAULT_Q16_CLIP}
    return {}


def cmd_evaluate(args) -> int:
    from .config import parse_concepts
    from .eval import (
        evaluate_folder,
        get_detector,
        multi_concept_metrics,
        nudity_counts,
        to_dict,
        to_markdown,
        two_object_locality,
    )
    from .eval.detectors.evaluate import prompt_label
    from .eval.metrics import mean_score

    concepts = parse_concepts(args.erased)
    _refuse_existing(args.out, args.overwrite)
    for flag in ("paraphrase", "two_object"):
        imgs, csv = getattr(args, f"{flag}_images"), getattr(args, f"{flag}_prompts")
        if (imgs is None) != (csv is None):
            name = flag.replace("_", "-")
            raise ValueError(f"--{name}-images and --{name}-prompts go together: pass both")
    detector = get_detector(args.detector, **_detector_options(args))
    results: dict = {"detector": args.detector, "erased": concepts}
    md = []
    if args.detector == "nudenet":
        preset = detector.preset
        recs = evaluate_folder(args.images, args.prompts, detector,
                               labels_for=lambda _: list(preset.classes))
        results["nudenet_preset"] = {"name": preset.name, "classes": list(preset.classes),
                                     "threshold": detector.threshold, "source": preset.source}
        results["nudity_counts"] = nudity_counts(recs, preset.classes)
        md.append(f"NudeNet preset {preset.name!r}: {len(preset.classes)} exposed classes, "
                  f"box score >= {detector.threshold} ({preset.source}); {len(recs)} images")
        md.append("| class | images |\n|---|---|\n" + "\n".join(
            f"| {k} | {v} |" for k, v in results["nudity_counts"].items()))
    elif args.detector == "q16":
        from .eval.detectors.q16 import Q16_LABEL
        from .eval.i2p import category_rates

        recs = evaluate_folder(args.images, args.prompts, detector,
                               labels_for=lambda _: [Q16_LABEL])
        results["q16"] = category_rates(recs, Q16_LABEL)
        results["q16_prompts"], results["q16_clip"] = str(args.q16_prompts), detector.clip_name
        md.append(f"Q16 ({detector.clip_name}, prompts {args.q16_prompts}): inappropriate "
                  "images per I2P category\n\n| category | inappropriate | images | rate |\n"
                  "|---|---|---|---|\n" + "\n".join(
                      f"| {c} | {r['inappropriate']} | {r['images']} | {r['rate']:.4f} |"
                      for c, r in results["q16"].items()))
    elif args.detector == "clip-score":
        recs = evaluate_folder(args.images, args.prompts, detector, labels_for=prompt_label)
        results["clip_score"] = mean_score(recs)
        md.append(f"CLIP score: {results['clip_score']:.2f} over {len(recs)} images")
    else:
        simple = evaluate_folder(args.images, args.prompts, detector)
        para = (evaluate_folder(args.paraphrase_images, args.paraphrase_prompts, detector)
                if args.paraphrase_images else None)
        res = multi_concept_metrics(simple, concepts, paraphrase=para)
        results["metrics"] = to_dict(res)
        md.append(to_markdown(res))
        if args.two_object_images:
            two = evaluate_folder(args.two_object_images, args.two_object_prompts, detector)
            results["two_object"] = {c: to_dict(two_object_locality(two, c)) for c in concepts}
            md += [to_markdown(two_object_locality(two, c)) for c in concepts]
    if args.reference_images is not None:
        from .eval.fid import InceptionFeatures, ToyFeatures, compute_fid

        extractor = (InceptionFeatures.from_torchscript(args.inception) if args.inception
                     else ToyFeatures())
        results["fid"] = compute_fid(args.images, args.reference_images, extractor)
        results["fid_features"] = "inception" if args.inception else "toy-detector"
        md.append(f"Fréchet distance to {args.reference_images} "
                  f"({results['fid_features']} features): {results['fid']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n\n".join(md) + "\n")
    print("\n\n".join(md))
    return 0


def cmd_attack(args) -> int:
    from .attack import AttackConfig, target_latents
    from .eval import get_detector
    from .methods import edit_disabled, load_edit
    from .pipeline import default_model
    from .protocol import measure_attacks
    from .sampling import SamplerSettings

    config = AttackConfig(steps=args.attack_steps, tokens=args.attack_tokens)
    if args.num_images <= 0:
        raise ValueError(f"--num-images must be positive, got {args.num_images}")
    _refuse_existing(args.out / "attack.json", args.overwrite)
    model = args.model or default_model()
    pipe = _load(args, model)
    load_edit(pipe, args.erasers)
    _say_safety_checker_off()
    settings = SamplerSettings.for_model(model)
    detector = get_detector(args.detector)
    prompt = args.prompt or f"a photo of a {args.concept}"
    base = lambda: edit_disabled(pipe)  # noqa: E731
    latents = target_latents(pipe, f"a photo of a {args.concept}", config.target_images,
                             steps=settings.steps, guidance=settings.guidance, base=base)
    results = {}
    for which in ("erased", "base"):
        with base() if which == "base" else nullcontext():
            results[which] = measure_attacks(pipe, args.concept, prompt, latents, detector, settings,
                                             config, n_images=args.num_images,
                                             grid_path=args.out / f"{which}.png",
                                             show_progress=True)
    (args.out / "attack.json").write_text(json.dumps(results, indent=2) + "\n")
    for which, r in results.items():
        print(f"{which}: concept detected {100 * r['success_plain']:.0f}% with the prompt, "
              f"{100 * r['success_soft']:.0f}% under the soft attack, "
              f"{100 * r['success_discrete']:.0f}% under the token attack "
              f"({r['discrete_prompt']!r})")
    return 0


def cmd_protocol(args) -> int:
    from .attack import AttackConfig
    from .protocol import Protocol, ProtocolConfig

    if len(args.concept) != 1:
        raise ValueError("protocol measures one concept: pass --concept once")
    concept = args.concept[0]
    cfg = ProtocolConfig(concept=concept, out=args.out, model=args.model, method=args.method,
                         detector=args.detector, per_class=args.per_class,
                         concept_rows=args.concept_rows, attack_images=args.attack_images,
                         device=args.device, dtype=args.dtype,
                         train=_train_config(args, [concept], args.method),
                         attack=AttackConfig(steps=args.attack_steps), base_dir=args.base_dir)
    _say_safety_checker_off()
    results = Protocol(cfg).run()
    print(f"{concept} ({args.method}): Acc_E {results['acc_e']:.3f}  Acc_R "
          f"{results['acc_r'] if results['acc_r'] is None else round(results['acc_r'], 3)}  "
          f"Acc_L {results['acc_l']:.3f}  H {results['h']}  soft attack "
          f"{results['attack_success_soft']:.3f}; base Acc_E {results['base']['acc_e']:.3f}. "
          f"{args.out / 'results.json'}, report in {args.out / 'report' / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no import-time chatter
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "erase":
            return cmd_erase(args, argv)
        commands = {"generate": cmd_generate, "evaluate": cmd_evaluate, "attack": cmd_attack,
                    "protocol": cmd_protocol}
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"receler: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a full or read-only disk, a folder that vanished, ...
        where = f" ({e.filename})" if e.filename else ""
        print(f"receler: error: cannot write or read{where}: {e.strerror or e}; free space, "
              "fix the permissions or choose another --out, then run again", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("receler: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
