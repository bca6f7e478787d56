"""How an erasure shifts the colours of the classes it should leave alone.

The class detector counts shapes, so an edit that turns a red circle into a black circle
keeps Acc_L. This script reads a benchmark concept folder (``benchmarks/compare.py`` run
folders, each with ``images/erased/simple``) and, over the other classes' simple-prompt
images (same prompts and seeds as the base model's), reports two statistics per run:

* ``dark``: the mean HSV value of each image's darkest quarter of pixels, i.e. how bright
  the object is (toy objects sit on light backgrounds). Lower = darker objects.
* ``saturated``: the mean HSV saturation of each image's most saturated quarter.

    python scripts/toyworld/colour_shift.py runs/benchmark/quick/heart [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from receler.eval.prompts import read_prompts
from receler.protocol import PromptSets


def quarter_stats(folder: Path, names: list[str]) -> dict:
    dark, sat = [], []
    for name in names:
        hsv = np.asarray(Image.open(folder / name).convert("HSV"), np.float32) / 255
        k = hsv.shape[0] * hsv.shape[1] // 4
        dark.append(np.sort(hsv[..., 2].ravel())[:k].mean())
        sat.append(np.sort(hsv[..., 1].ravel())[-k:].mean())
    return {"dark": float(np.mean(dark)), "saturated": float(np.mean(sat)), "images": len(names)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("concept_dir", type=Path, help="WORK/quick/CONCEPT of benchmarks/compare.py")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    base = args.concept_dir / "base" / "simple"
    if not base.is_dir():
        sys.exit(f"error: {base} does not exist: pass a concept folder of a benchmarks/compare.py "
                 "work folder, e.g. runs/benchmark/quick/heart")
    concept = args.concept_dir.name
    names = [f"{r.case_number}_0.png" for r in read_prompts(PromptSets.toy().simple)
             if r.class_name not in (concept, None) and (base / f"{r.case_number}_0.png").is_file()]
    rows = {"base": quarter_stats(base, names)}
    for run in sorted(d for d in args.concept_dir.iterdir() if d.name != "base"):
        folder = run / "images" / "erased" / "simple"
        if folder.is_dir() and all((folder / n).is_file() for n in names):
            rows[run.name] = quarter_stats(folder, names)
    print(f"{concept}: other classes' images ({len(names)}), darkest quarter's value and most "
          "saturated quarter's saturation")
    for name, r in rows.items():
        print(f"  {name:<40} dark {r['dark']:.3f}  saturated {r['saturated']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
