"""Every erasure method in the same harness: same model, prompts, seeds and detector.

Each (method, concept) pair runs ``receler protocol`` in its own process, so that its peak
memory is its own (``os.wait4`` reports the child's max RSS); the base model's images and
attack results are shared by all methods of a concept. The table goes to
``benchmarks/results/compare.json`` (a list of rows) and ``compare.md``.

    python benchmarks/compare.py            # full: 3 concepts, every method, published recipe
    python benchmarks/compare.py --quick    # one object concept, fewer images and iterations
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ["receler", "receler-eraser-only", "receler-eraser-reg", "receler-eraser-adv",
           "esd-x", "esd-u", "uce", "sld"]
COLUMNS = ["method", "concept", "acc_e", "acc_r", "acc_l", "h", "attack_success_soft",
           "two_object_locality", "train_seconds", "unet_passes", "trainable_params",
           "overhead_ratio", "peak_mem_mb"]
# The published Receler recipe's compute: 500 iterations × 50 inner adversarial steps.
PUBLISHED = {"label": "receler (published recipe)", "method": "receler",
             "flags": ["--iterations", "500", "--adv-steps", "50"]}


def run_protocol(concept: str, method: str, out: Path, base: Path, flags: list[str],
                 model: str | None) -> tuple[dict, float]:
    """One protocol run in a child process; returns its results and peak RSS in MB."""
    cmd = [sys.executable, "-m", "receler", "protocol", "--concept", concept, "--method", method,
           "--out", str(out), "--base-dir", str(base), *flags]
    if model:
        cmd += ["--model", model]
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log}")
    return json.loads((out / "results.json").read_text()), usage.ru_maxrss / 1024


def row(label: str, concept: str, res: dict, peak_mb: float) -> dict:
    train = res.get("train") or {}  # the method's stats from eraser_config.json
    passes = None
    if "unet_forward" in train:
        passes = train["unet_forward"] + train["unet_backward"]
    return {"method": label, "concept": concept, "acc_e": res["acc_e"], "acc_r": res["acc_r"],
            "acc_l": res["acc_l"], "h": res["h"],
            "attack_success_soft": res["attack_success_soft"],
            "attack_success_discrete": res["attack_success_discrete"],
            "two_object_locality": res.get("two_object_locality"),
            "train_seconds": train.get("seconds"), "unet_passes": passes,
            "unet_forward": train.get("unet_forward"), "unet_backward": train.get("unet_backward"),
            "trainable_params": train.get("trainable_parameters"),
            "overhead_ratio": res["overhead_ratio"], "peak_mem_mb": round(peak_mb, 1)}


def base_row(concept: str, res: dict) -> dict:
    b = res["base"]
    return {"method": "base (no erasure)", "concept": concept, "acc_e": b["acc_e"],
            "acc_r": b["acc_r"], "acc_l": b["acc_l"], "h": b["h"],
            "attack_success_soft": b["attack_success_soft"],
            "attack_success_discrete": b["attack_success_discrete"],
            "two_object_locality": b.get("two_object_locality"), "train_seconds": 0,
            "unet_passes": 0, "trainable_params": 0, "overhead_ratio": 0.0, "peak_mem_mb": None}


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one concept, fewer images/iterations")
    p.add_argument("--concepts", default=None, help="comma-separated (default: star,heart,striped)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--model", default=None, help="default: the toy model")
    p.add_argument("--work", type=Path, default=Path("runs/benchmark"), help="run folders")
    p.add_argument("--out", type=Path, default=HERE / "results" / "compare.json")
    p.add_argument("--no-published", action="store_true", help="skip the published recipe")
    args = p.parse_args()

    if args.quick:
        concepts = (args.concepts or "star").split(",")
        flags = ["--per-class", "5", "--concept-rows", "10", "--attack-images", "6",
                 "--attack-steps", "30", "--iterations", "100"]
    else:
        concepts = (args.concepts or "star,heart,striped").split(",")
        flags = []
    methods = args.methods.split(",")
    work = args.work / ("quick" if args.quick else "full")
    rows, started = [], time.time()
    for concept in concepts:
        base = work / concept / "base"
        runs = [(m, m, []) for m in methods]
        if not args.quick and not args.no_published:
            runs.append((PUBLISHED["label"], PUBLISHED["method"], PUBLISHED["flags"]))
        for label, method, extra in runs:
            out = work / concept / label.replace(" ", "_").replace("(", "").replace(")", "")
            t = time.time()
            res, peak = run_protocol(concept, method, out, base, flags + extra, args.model)
            if not any(r["concept"] == concept and r["method"].startswith("base") for r in rows):
                rows.append(base_row(concept, res))
            rows.append(row(label, concept, res, peak))
            print(f"{concept:>10} {label:<28} H={fmt(res['h'])} Acc_E={fmt(res['acc_e'])} "
                  f"soft={fmt(res['attack_success_soft'])} ({time.time() - t:.0f} s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    cmd = "python benchmarks/compare.py" + (" --quick" if args.quick else "")
    header = (f"# Erasure methods side by side ({'quick' if args.quick else 'full'})\n\n"
              f"`{cmd}`, {time.time() - started:.0f} s in all. unet_passes counts UNet forward "
              "and backward passes per sample; overhead_ratio is the extra generation latency "
              "of the edited model against the base model, measured interleaved in one process.")
    args.out.with_suffix(".md").write_text(markdown(rows, header))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
