"""How much the protocol's figures move with the CPU thread count, and with deterministic
algorithms, for one fixed erased model.

The same heart erasure trained with seed 0 read Acc_L 0.84 on one machine and 0.778 on
another. Other machines are out of reach here, but one source of that spread is not: the
order in which a thread pool adds up a matrix product changes its last bits, and across 20
denoising steps a last bit can change a pixel, and a pixel can change a detection. This
script runs ``receler protocol`` on one finished erasers folder (``--erasers``: nothing is
trained) once per variant, each in a process of its own and from nothing (own base images):

* ``1-thread``, ``2-threads``: ``--threads N`` with ``OMP_NUM_THREADS=N``;
* ``1-thread-deterministic``: ``--deterministic`` (``torch.use_deterministic_algorithms``);
* ``2-processes``: one thread each, the work split by ``torch.distributed.run`` (the
  variables ``accelerate launch`` sets), which should change nothing.

Each variant is compared with the first: Acc_E / Acc_R / Acc_L / H of the erased and the
base model, and per image whether its pixels changed (and by how much) and whether its
detections changed. Detections are read again here, in this process with one thread, so a
changed detection comes from a changed image: the top class (argmax over the toy classes)
and the set of labels at or above the detector's threshold.

    python benchmarks/determinism.py --erasers runs/heart_erasers --concept heart \\
        [--per-class 10] [--concept-rows 30] [--variants 1-thread,2-threads,...]

Writes benchmarks/results/determinism.json and determinism.md (``--results``); the runs go
to ``--runs`` (default runs/determinism), and a run with a results.json is reused.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import receler
from receler.eval.prompts import list_images
from receler.serialization import atomic_write

HERE = Path(__file__).resolve().parent
# name -> (torch threads per process, --deterministic, processes)
VARIANTS = {"1-thread": (1, False, 1), "2-threads": (2, False, 1),
            "1-thread-deterministic": (1, True, 1), "2-processes": (1, False, 2)}
METRICS = ("acc_e", "acc_r", "acc_l", "h")


def parse_variants(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise SystemExit(f"error: unknown variant {unknown[0] if unknown else text!r}: choose "
                         f"from {', '.join(VARIANTS)} (comma-separated)")
    return names


def protocol_command(args, name: str, out: Path) -> tuple[list[str], dict]:
    """The command line and environment of variant ``name``'s protocol run."""
    threads, deterministic, processes = VARIANTS[name]
    cmd = [sys.executable]
    if processes > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    cmd += ["-m", "receler", "protocol", "--concept", args.concept, "--erasers",
            str(args.erasers), "--out", str(out), "--per-class", str(args.per_class),
            "--concept-rows", str(args.concept_rows), "--skip", "latency,attack",
            "--device", "cpu", "--threads", str(threads)]
    if args.model:
        cmd += ["--model", args.model]
    if args.sample_steps:
        cmd += ["--sample-steps", str(args.sample_steps)]
    if deterministic:
        cmd.append("--deterministic")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TQDM_DISABLE": "1"}
    return cmd, env


def run_variant(args, name: str) -> dict:
    """Variant ``name``'s results.json, running the protocol unless it already finished."""
    out = args.runs / name
    done = out / "results.json"
    if not done.is_file():
        cmd, env = protocol_command(args, name, out)
        print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: variant {name} failed ({out}):\n{proc.stderr[-3000:]}")
        print(f"[{name}] {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(done.read_text())


def image_sets(run: Path) -> dict[str, Path]:
    """``base/simple``, ``erased/paraphrase``, ...: the run's image folders."""
    root = run / "images"
    return {f"{which.name}/{s.name}": s for which in sorted(root.iterdir()) if which.is_dir()
            for s in sorted(which.iterdir()) if s.is_dir()}


class Reader:
    """Each image's pixels and its detections (top class, labels at the threshold)."""

    def __init__(self, detector=None):
        from receler.eval.detectors import get_detector

        self.detector = detector or get_detector("toy")
        self.classes = list(self.detector.detector.classes) if hasattr(
            self.detector, "detector") else list(self.detector.labels)

    def read(self, folder: Path) -> dict[str, dict]:
        found = list_images(folder)
        images = [Image.open(p).convert("RGB") for _, _, p in found]
        labels = list(self.detector.labels)
        scores = self.detector.detect(images, labels) if images else []
        out = {}
        for (_, _, path), image, s in zip(found, images, scores, strict=True):
            out[path.name] = {
                "pixels": np.asarray(image, dtype=np.int16),
                "scores": s, "top": max(self.classes, key=lambda c: s[c]),
                "present": sorted(k for k, v in s.items() if v >= self.detector.threshold)}
        return out


def compare_sets(reference: dict[str, dict], other: dict[str, dict]) -> dict:
    """How ``other``'s images differ from ``reference``'s (both from :meth:`Reader.read`)."""
    if sorted(reference) != sorted(other):
        raise ValueError(f"the runs hold different images ({len(reference)} against "
                         f"{len(other)}): delete the runs folder and run again")
    diffs = [np.abs(reference[n]["pixels"] - other[n]["pixels"]) for n in sorted(reference)]
    return {"images": len(reference),
            "pixels_changed": sum(int(d.any()) for d in diffs),
            "max_pixel_change": max((int(d.max()) for d in diffs), default=0),
            "changed_pixel_values": sum(int((d > 0).sum()) for d in diffs),
            "max_score_change": max((abs(reference[n]["scores"][k] - other[n]["scores"][k])
                                     for n in reference for k in reference[n]["scores"]),
                                    default=0.0),
            "top_class_changed": sum(reference[n]["top"] != other[n]["top"] for n in reference),
            "detections_changed": sum(reference[n]["present"] != other[n]["present"]
                                      for n in reference),
            "changed": sorted(n for n in reference
                              if reference[n]["present"] != other[n]["present"])}


def metric_rows(results: dict) -> dict:
    return {"erased": {k: results[k] for k in METRICS},
            "base": {k: results["base"][k] for k in METRICS}}


def summarise(args, variants: list[str], results: dict[str, dict], reader: Reader) -> dict:
    reads = {name: {s: reader.read(f) for s, f in image_sets(args.runs / name).items()}
             for name in variants}
    ref = variants[0]
    report = {"receler_version": receler.__version__, "torch_version": torch.__version__,
              "date": datetime.date.today().isoformat(),
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpu_count": os.cpu_count()},
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "settings": {"concept": args.concept, "erasers": str(args.erasers),
                           "model": results[ref]["model"], "per_class": args.per_class,
                           "concept_rows": args.concept_rows,
                           "sample_steps": args.sample_steps, "rows": results[ref]["rows"]},
              "reference": ref, "variants": {}}
    for name in variants:
        threads, deterministic, processes = VARIANTS[name]
        sets = {s: compare_sets(reads[ref][s], reads[name][s]) for s in reads[ref]}
        totals = {k: sum(v[k] for v in sets.values()) for k in
                  ("images", "pixels_changed", "top_class_changed", "detections_changed")}
        metrics = metric_rows(results[name])
        ref_metrics = metric_rows(results[ref])
        report["variants"][name] = {
            "threads": threads, "deterministic": deterministic, "processes": processes,
            "seconds": results[name]["seconds"].get("total"), **metrics,
            "delta": {side: {k: None if v is None else v - ref_metrics[side][k]
                             for k, v in metrics[side].items()} for side in metrics},
            "images": totals, "sets": sets}
    return report


def to_markdown(report: dict) -> str:
    def num(x):
        return "–" if x is None else f"{x:.3f}"

    s, ref = report["settings"], report["reference"]
    rows = ", ".join(f"{n} {k.replace('_', '-')}" for k, n in s["rows"].items())
    sets = list(next(iter(report["variants"].values()))["sets"])
    lines = [f"# Determinism: {s['concept']}, one erasers folder, receler "
             f"{report['receler_version']} ({report['date']})", "",
             f"`{report['command']}`", "",
             f"Prompt rows per model: {rows}; {report['machine']['cpu_count']} CPUs "
             f"({report['machine']['platform']}, torch {report['torch_version']}). Each variant "
             f"ran from nothing; differences are against `{ref}`.", "",
             "| variant | Acc_E | Acc_R | Acc_L | H | base Acc_L | images changed | max pixel "
             "change | max score change | top class changed | detections changed | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in report["variants"].items():
        e, im = v["erased"], v["images"]
        secs = "–" if v["seconds"] is None else f"{v['seconds']:.0f}"
        biggest = max(x["max_pixel_change"] for x in v["sets"].values())
        score = max(x["max_score_change"] for x in v["sets"].values())
        lines.append(
            f"| {name} | {num(e['acc_e'])} | {num(e['acc_r'])} | {num(e['acc_l'])} | "
            f"{num(e['h'])} | {num(v['base']['acc_l'])} | {im['pixels_changed']}/{im['images']} "
            f"| {biggest} | {score:.2g} | {im['top_class_changed']} | {im['detections_changed']} | {secs} |")
    lines += ["", "Per image set (images changed / top class changed / detections changed):",
              "", "| variant | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    for name, v in report["variants"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{x['pixels_changed']}/{x['top_class_changed']}/{x['detections_changed']} "
            f"of {x['images']}" for x in v["sets"].values()) + " |")
    return "\n".join(lines) + "\n"


def write(report: dict, results_dir: Path) -> tuple[Path, Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    js, md = results_dir / "determinism.json", results_dir / "determinism.md"
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(js, lambda tmp: tmp.write_text(text))
    markdown = to_markdown(report)
    atomic_write(md, lambda tmp: tmp.write_text(markdown))
    return js, md


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--erasers", type=Path, required=True,
                   help="a finished `receler erase` folder (nothing is trained here)")
    p.add_argument("--concept", required=True, help="the concept the erasers erased")
    p.add_argument("--model", default=None, help="base model (default: the toy model)")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--concept-rows", type=int, default=30)
    p.add_argument("--sample-steps", type=int, default=None,
                   help="denoising steps (default: the model's)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, the first is the reference ({', '.join(VARIANTS)})")
    p.add_argument("--runs", type=Path, default=Path("runs/determinism"),
                   help="folder of the protocol runs (reused when finished)")
    p.add_argument("--results", type=Path, default=HERE / "results",
                   help="folder for determinism.json and .md")
    args = p.parse_args(argv)
    args.variant_names = parse_variants(args.variants)
    if not (args.erasers / "eraser_config.json").is_file():
        raise SystemExit(f"error: {args.erasers} is not a finished `receler erase` folder (no "
                         "eraser_config.json): train one with `receler erase --concept ... "
                         "--out DIR` and pass --erasers DIR")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the detections read here: the same for every variant
    results = {name: run_variant(args, name) for name in args.variant_names}
    report = summarise(args, args.variant_names, results, Reader())
    js, md = write(report, args.results)
    print(to_markdown(report))
    print(f"wrote {js} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
