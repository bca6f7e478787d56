"""Quick check of one erasure setting on the toy model: erase, generate, detect.

    python scripts/toyworld/erase_check.py NAME --method receler --lr 3e-3 --iterations 150

Trains into runs/erase-check/NAME, then generates 16 "a photo of a CONCEPT" images, the
concept's first 16 paraphrase rows and 3 images of every other class, and prints (and
appends to runs/erase-check/results.jsonl) the detection rates: acc_e on the simple
prompts, acc_r on the paraphrases, acc_l = other classes still detected. Much smaller
than `receler protocol`; it was used to find the toy model's recommended settings.
Training flags not given take the model's recommendations, as in `receler erase`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch


def main() -> int:
    from receler.cli import _add_train_flags, _train_config
    from receler.eval.detectors import get_detector
    from receler.eval.prompts import read_prompts
    from receler.methods import erase_with, method_config
    from receler.pipeline import default_model, load_pipeline
    from receler.sampling import SamplerSettings, generate
    from receler.toyworld import prompt_file
    from receler.viz import image_grid

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help="run name (folder under --work)")
    p.add_argument("--method", default="receler")
    p.add_argument("--concept", default="star")
    p.add_argument("--model", default=None, help="default: the shipped toy model")
    p.add_argument("--work", type=Path, default=Path("runs/erase-check"))
    p.add_argument("--threads", type=int, default=1)
    _add_train_flags(p)  # the flags of `receler erase`
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = args.model = args.model or default_model()
    config = method_config(args.method, _train_config(args, args.concept, args.method))
    pipe = load_pipeline(model, device="cpu")
    out = args.work / args.name
    t = time.time()
    erase_with(args.method, pipe, config, out, overwrite=True)
    train_s = time.time() - t

    para = [r for r in read_prompts(prompt_file("paraphrase"))
            if r.class_name == args.concept][:16]
    detector = get_detector("toy")
    others = [c for c in detector.detector.classes if c != args.concept]
    prompts = [f"a photo of a {args.concept}"] * 16 + [r.prompt for r in para]
    seeds = list(range(16)) + [r.evaluation_seed for r in para]
    prompts += [f"a photo of a {c}" for c in others for _ in range(3)]
    seeds += [100 + j for _ in others for j in range(3)]
    images = generate(pipe, prompts, seeds, settings=SamplerSettings.for_model(model),
                      batch_size=16)
    scores = detector.detect(images, [args.concept, *others])
    hit = [s[args.concept] >= detector.threshold for s in scores]
    kept = [scores[32 + i][c] >= detector.threshold
            for i, c in enumerate(c for c in others for _ in range(3))]
    n_p = len(para)
    settings = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "concepts"}
    result = {"name": args.name, "method": args.method, "settings": settings,
              "train_s": round(train_s), "acc_e": sum(hit[:16]) / 16,
              "acc_r": sum(hit[16:16 + n_p]) / max(n_p, 1), "acc_l": sum(kept) / len(kept)}
    print(json.dumps(result))
    with (args.work / "results.jsonl").open("a") as f:
        f.write(json.dumps(result) + "\n")
    image_grid(images, cols=16).save(out / "check_grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
