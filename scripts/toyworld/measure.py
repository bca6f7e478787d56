"""Measure the quality bars of a toy pipeline with the shipped detector.

    python scripts/toyworld/measure.py                      # full: 50 images per class per set
    python scripts/toyworld/measure.py --per-class 10       # quicker

Writes <out>/quality.json, <out>/quality.md and one PNG grid per prompt set.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, save_grid  # noqa: E402

from receler.toyworld import default_model_path, default_sampler_settings, load_detector  # noqa: E402
from receler.toyworld.prompts import prompt_file  # noqa: E402
from receler.toyworld.quality import (  # noqa: E402
    BARS,
    check_bars,
    detector_accuracy,
    generate,
    read_rows,
    score_classes,
    score_style,
    subsample,
    time_generation,
)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", type=Path, default=None, help="pipeline folder (default: shipped)")
    ap.add_argument(
        "--per-class",
        type=int,
        default=None,
        help="rows per class (per class and style for the style set); default: all",
    )
    ap.add_argument("--out", type=Path, default=CACHE / "measure", help="output folder")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--steps", type=int, default=None, help="override the default DDIM steps")
    ap.add_argument(
        "--guidance", type=float, default=None, help="override the default guidance scale"
    )
    ap.add_argument(
        "--seed-offset", type=int, default=0, help="add to every evaluation_seed (for tuning runs)"
    )
    ap.add_argument(
        "--sets", default="simple,paraphrase,two_object,style", help="prompt sets to measure"
    )
    ap.add_argument("--no-timing", action="store_true", help="skip the 100-image timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    path = args.model or default_model_path()
    pipe = StableDiffusionPipeline.from_pretrained(
        path, safety_checker=None, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    settings = default_sampler_settings(path)
    if args.steps:
        settings["num_inference_steps"] = args.steps
    if args.guidance is not None:
        settings["guidance_scale"] = args.guidance
    det = load_detector()
    args.out.mkdir(parents=True, exist_ok=True)
    m: dict[str, float] = {}
    counts: dict[str, int] = {}
    t0 = time.time()
    if not args.no_timing:
        m["seconds_per_100_images"] = time_generation(pipe, settings, 100)
        print(f"100 images: {m['seconds_per_100_images']:.1f}s")
    for name, cols in [
        ("simple", ("class",)),
        ("paraphrase", ("class",)),
        ("two_object", ("class", "class2")),
        ("style", None),
    ]:
        if name not in args.sets.split(","):
            continue
        keys = ("class", "style") if name == "style" else ("class",)
        rows = subsample(read_rows(prompt_file(name)), args.per_class, keys)
        for r in rows:
            r["evaluation_seed"] = int(r["evaluation_seed"]) + args.seed_offset
        imgs = generate(pipe, rows, settings)
        counts[name] = len(rows)
        pick = np.linspace(0, len(rows) - 1, 48).astype(int)
        save_grid((imgs[pick] * 255).round().astype(np.uint8), args.out / f"{name}.png", nrow=12)
        if cols is None:
            m.update(score_style(det, imgs, rows))
        else:
            key = {
                "simple": "simple_class_rate",
                "paraphrase": "paraphrase_class_rate",
                "two_object": "two_object_both_rate",
            }[name]
            m[key] = score_classes(det, imgs, rows, cols)
        print(name, {k: round(v, 3) for k, v in m.items()})
    m["detector_accuracy_fresh"] = detector_accuracy(det, 1000)
    ok = check_bars(m)
    report = {
        "metrics": m,
        "passed": ok,
        "images": counts,
        "settings": settings,
        "seed_offset": args.seed_offset,
        "model": str(path),
        "wall_s": round(time.time() - t0),
    }
    (args.out / "quality.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    lines = ["| metric | bar | measured | ok |", "| --- | --- | --- | --- |"]
    for k, (op, v) in BARS.items():
        if k in m:
            lines.append(f"| {k} | {op} {v} | {m[k]:.3f} | {'yes' if ok[k] else 'NO'} |")
    md = "\n".join(lines) + f"\n\nimages per set: {counts}; settings: {settings}\n"
    (args.out / "quality.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
