"""Which half of classifier-free guidance do trained erasers change the other classes through?

    python scripts/toyworld/cfg_halves.py ERASERS_DIR --concept star [--modes both,cond,uncond]

Generates 5 images of every other class (seeds 200-204) with the base model and with the
erasers applied to both halves of the guidance batch, to the conditional half only, or to
the unconditional half only, plus 10 images of the concept (seeds 300-309). Prints, per mode,
Acc_L (other classes still detected), the mean |base − erased| RGB change (0-1) of the other
classes' images, and Acc_E. Used to find why erasers recolour other objects (README, "Anchor
term").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


def main() -> int:
    from receler.erasers import Eraser
    from receler.eval.detectors import get_detector
    from receler.methods import load_edit
    from receler.pipeline import default_model, load_pipeline
    from receler.sampling import SamplerSettings, generate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("erasers", type=Path, help="folder written by `receler erase`")
    p.add_argument("--concept", required=True)
    p.add_argument("--modes", default="both,cond,uncond")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    if unknown := set(modes) - {"both", "cond", "uncond"}:
        p.error(f"unknown mode(s) {sorted(unknown)}: use both, cond or uncond")

    model = default_model()
    pipe = load_pipeline(model, device="cpu")
    detector = get_detector("toy")
    others = [c for c in detector.detector.classes if c != args.concept]
    labels = [c for c in others for _ in range(5)]
    prompts, seeds = [f"a photo of a {c}" for c in labels], [200 + i % 5 for i in range(len(labels))]
    settings = SamplerSettings.for_model(model)

    def images(ps, ss):
        return generate(pipe, ps, ss, settings=settings, batch_size=15)

    base = [np.asarray(im, dtype=np.float32) / 255 for im in images(prompts, seeds)]
    load_edit(pipe, args.erasers)
    forward = Eraser.forward
    for mode in modes:
        def half(self, a, mode=mode):  # diffusers batches [uncond, cond]
            out = forward(self, a)
            keep = torch.ones(out.shape[0], 1, 1, dtype=out.dtype, device=out.device)
            b = out.shape[0] // 2
            if mode == "cond":
                keep[:b] = 0
            elif mode == "uncond":
                keep[b:] = 0
            return out * keep

        Eraser.forward = half
        try:
            erased = images(prompts, seeds)
            concept = images([f"a photo of a {args.concept}"] * 10, list(range(300, 310)))
        finally:
            Eraser.forward = forward
        kept = np.mean([s[c] >= detector.threshold
                        for s, c in zip(detector.detect(erased, others), labels, strict=True)])
        acc_e = np.mean([s[args.concept] >= detector.threshold
                         for s in detector.detect(concept, [args.concept])])
        change = np.mean([np.abs(np.asarray(e, dtype=np.float32) / 255 - b).mean()
                          for e, b in zip(erased, base, strict=True)])
        print(f"{mode:7s} acc_l {kept:.3f}  pixel change {change:.4f}  acc_e {acc_e:.2f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
