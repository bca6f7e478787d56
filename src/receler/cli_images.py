"""``receler generate`` and ``receler evaluate``: images from a model, and their metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm.auto import tqdm

from .cli_common import _add_model_flags, _load, _refuse_existing, _say_safety_checker_off


def add_image_commands(sub) -> None:
    """The ``generate`` and ``evaluate`` subcommands of ``sub``."""
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


def _load_for_generation(args, device=None):
    from .config import default_model
    from .methods import load_edit
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
    from .eval.prompts import read_prompts
    from .sampling import generate_prompt_file, process_state

    rows = read_prompts(args.prompts)
    if args.num_images is not None and args.num_images <= 0:
        raise ValueError(f"--num-images must be positive, got {args.num_images}")
    if args.compare:
        raise ValueError("--compare works with --prompt; for a prompt file generate twice, "
                         "with and without --erasers, into two folders")
    state = process_state(args.device)
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
