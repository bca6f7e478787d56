"""Many concepts at once: one eraser set (or one edit) for k concepts, each erased concept
measured by the protocol, the classes not erased measured for locality.

For every method, k and seed:

1. ``receler erase --concept C1 ... --concept Ck --method M --seed S`` into
   ``WORK/M/kK_seedS/erasers``. Training methods get k times the iterations the model
   recommends for one concept (and k times its ``adv_start``): the trainer takes the concepts
   in turn, one per iteration, so each concept gets the steps it gets alone. A killed
   training resumes from its checkpoint;
2. ``receler protocol --erasers ERASERS --concept Ci`` for each erased concept into
   ``WORK/M/kK_seedS/Ci``, sharing ``BASE/Ci/base`` with the one-concept benchmark. The
   protocol leaves every erased concept out of Acc_L, so its Acc_L is the locality on the
   classes not erased;
3. one row: the erased concepts' mean Acc_E and Acc_R, the soft attack pooled over their
   attacked images (Wilson 95% interval), Acc_L on the remaining classes (its lowest class
   against its base rate) and the training cost.

    python benchmarks/multi.py --methods receler,uce --k 1,3,5 --seeds 0 \\
        --work runs/multi --base-work runs/benchmark/full

``receler-exported`` in ``--methods``: ``receler``'s eraser set of the same k and seed (trained
first when missing) merged into the UNet's weights, ``receler export --erasers ERASERS --out
WORK/receler-exported/kK_seedS/merged_unet`` with the export's defaults (``--export-flag``
passes others), then ``receler protocol --unet`` for each erased concept; its cost is both
stages'.

Rows trained or exported with ``--erase-flag`` / ``--export-flag`` carry those flags as
their variant (``receler (--concept-balance=1)`` in the table). An eraser set already in
``--work`` is checked against the training settings these flags ask for (and a merged UNet
against the export settings), so a run is neither reused nor labelled with
settings it was not made with. ``--append`` keeps the rows already in
``--out`` (a row of the same method, variant, k and seed is replaced), so runs of several
work folders share one table:

    python benchmarks/multi.py --collect --methods receler --k 5 --seeds 1 \
        --work runs/multi_bal --erase-flag=--concept-balance=1 --append

Finished steps are reused, so a killed run resumes where it stopped. Writes ``multi.json``,
``multi.md`` and ``multi.png`` into ``--out`` (default benchmarks/results/multi).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
# The first k of these are erased: classes before the style, those with a one-concept
# benchmark first (their base folders exist), then classes no benchmark names.
ORDER = ("star", "heart", "moon", "cross", "arrow", "ring", "square", "triangle", "diamond")
SCALED = ("iterations", "adv_start")  # per-concept training settings, times k
EXPORTED = "receler-exported"  # receler's erasers merged into the UNet (`receler export`)

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def trained_by(method: str) -> str:
    """The method whose training a ``--methods`` name runs (``receler`` for EXPORTED)."""
    return "receler" if method == EXPORTED else method


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="receler", help="comma-separated methods")
    p.add_argument("--k", default="1,3,5", help="comma-separated numbers of concepts")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--order", default=",".join(ORDER),
                   help="the concepts, in the order they are added (the first k are erased)")
    p.add_argument("--work", type=Path, default=Path("runs/multi"), help="run folders")
    p.add_argument("--base-work", type=Path, default=Path("runs/benchmark/full"),
                   help="BASE/CONCEPT/base: base-model folders shared with compare.py")
    p.add_argument("--out", type=Path, default=HERE / "results" / "multi")
    p.add_argument("--model", default=None, help="model folder (default: the toy model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", default="latency", help="protocol stages to leave out")
    p.add_argument("--erase-flag", action="append", default=[], metavar="FLAG",
                   help="passed to `receler erase` (e.g. --erase-flag=--rank=16)")
    p.add_argument("--export-flag", action="append", default=[], metavar="FLAG",
                   help=f"passed to `receler export` for {EXPORTED} "
                        "(e.g. --export-flag=--iterations=1200)")
    p.add_argument("--protocol-flag", action="append", default=[], metavar="FLAG",
                   help="passed to every protocol run (e.g. --protocol-flag=--per-class=2)")
    p.add_argument("--collect", action="store_true",
                   help="only tabulate the finished runs; train and measure nothing")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in --out's multi.json (a row of the same "
                        "method, variant, k and seed is replaced)")
    args = p.parse_args(argv)
    try:
        args.k = [int(v) for v in args.k.split(",")]
        args.seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError:
        p.error(f"--k and --seeds take comma-separated integers, e.g. 1,3,5; got {args.k!r} "
                f"and {args.seeds!r}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.order = [c.strip() for c in args.order.split(",") if c.strip()]
    if len(set(args.order)) != len(args.order):
        p.error(f"--order lists a concept twice: {','.join(args.order)}")
    bad = [k for k in args.k if not 1 <= k <= len(args.order)]
    if bad:
        p.error(f"--k {bad[0]} is outside 1..{len(args.order)} (the --order has "
                f"{len(args.order)} concepts): pass a smaller k or a longer --order")
    from receler.methods import get_method

    for m in args.methods:
        try:
            get_method(trained_by(m))
        except ValueError as e:
            p.error(str(e))
    return args


def run(cmd: list[str], log: Path, threads: int) -> None:
    """Run a ``receler`` command, its output appended to ``log``; stop on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TQDM_DISABLE": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ receler {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with log.open("a") as f:
        f.write(f"$ receler {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.run([sys.executable, "-m", "receler", *cmd], env=env, stdout=f,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log.read_text().splitlines()[-5:]
        raise SystemExit(f"error: receler {cmd[0]} failed (exit {code}); see {log}:\n"
                         + "\n".join(tail))
    print(f"  {time.perf_counter() - start:.0f} s", flush=True)


def variant(args, method: str) -> str:
    """The flags a row's run was made with beyond the script's own: the erase flags, and the
    export flags as well for EXPORTED ("" for the defaults)."""
    flags = list(args.erase_flag)
    if method == EXPORTED:
        flags += args.export_flag
    return " ".join(flags)


def erase_argv(args, method: str, concepts: list[str], seed: int) -> list[str]:
    """The ``receler erase`` arguments of a row's eraser set (without --resume)."""
    argv = ["erase", *(f"--concept={c}" for c in concepts), "--method", method, "--out",
            str(folder(args, method, len(concepts), seed) / "erasers"),
            *(["--seed", str(seed)] if seeded(method) else []),
            "--threads", str(args.threads), "--quiet",
            *scaled_flags(method, len(concepts), args.model, args.erase_flag), *args.erase_flag]
    return argv + (["--model", args.model] if args.model else [])


def check_recorded(args, method: str, concepts: list[str], seed: int) -> None:
    """Refuse a finished eraser set trained with other settings than these
    flags ask for (so a row cannot carry another run's label: a balanced set collected
    without its flag is refused, not called ``receler``), and, for EXPORTED, a merged UNet
    exported with other settings than the export flags ask for."""
    from receler.cli import _merge_config, _train_config, build_parser
    from receler.merge import MERGE_FILE, recorded_settings, resolved_config
    from receler.methods.edits import EditConfig
    from receler.methods.registry import settings_mismatch
    from receler.serialization import CONFIG_FILE

    trainer = trained_by(method)
    erasers = folder(args, trainer, len(concepts), seed) / "erasers"
    if not (erasers / CONFIG_FILE).is_file():
        return  # not trained yet, or a checkpoint: `receler erase --resume` checks that itself
    saved = EditConfig.load(erasers / CONFIG_FILE)
    cli = build_parser().parse_args(erase_argv(args, trainer, concepts, seed))
    why = settings_mismatch(trainer, _train_config(cli, cli.concept, trainer, quiet=True), saved)
    if why:
        raise SystemExit(f"error: {erasers} was trained with {why}: pass the flags it was "
                         "trained with (--erase-flag), or another --work")
    merged = folder(args, method, len(concepts), seed) / "merged_unet" / MERGE_FILE
    if method == EXPORTED and merged.is_file():
        # both as the export runs them: None settings taken from the erasers (as the
        # protocol checks a finished export)
        cli = build_parser().parse_args(["export", "--erasers", str(erasers), "--out",
                                         str(merged.parent), *args.export_flag])
        asked = resolved_config(_merge_config(cli), saved).to_dict()
        recorded = recorded_settings(json.loads(merged.read_text())["merge"])
        for key, value in asked.items():
            if key != "checkpoint_every" and key in recorded and recorded[key] != value:
                raise SystemExit(f"error: {merged.parent} was exported with {key}="
                                 f"{recorded[key]!r}, not {value!r}: pass the flags it was "
                                 "exported with (--export-flag), or another --work")


def label(r: dict) -> str:
    return f"{r['method']} ({r['variant']})" if r.get("variant") else r["method"]


def trains(method: str) -> bool:
    """Whether the method trains for a number of iterations (closed-form edits do not)."""
    from receler.methods import get_method

    return "iterations" in get_method(method).config_fields


def seeded(method: str) -> bool:
    """Whether the method's result depends on the training seed (UCE's does not)."""
    from receler.methods import get_method

    return get_method(trained_by(method)).seeded


def scaled_flags(method: str, k: int, model: str | None, given: list[str]) -> list[str]:
    """``--iterations`` and ``--adv-start`` at k times the model's one-concept recommendation
    (those it recommends for ``method``; a flag in ``given`` wins)."""
    from receler.config import model_erase_defaults
    from receler.pipeline import default_model

    if not trains(method):
        return []
    rec = model_erase_defaults(model or default_model(), method)
    flags = []
    for key in SCALED:
        flag = "--" + key.replace("_", "-")
        if key in rec and not any(g == flag or g.startswith(flag + "=") for g in given):
            flags.append(f"{flag}={int(rec[key]) * k}")
    return flags


def folder(args, method: str, k: int, seed: int) -> Path:
    return args.work / method / f"k{k}_seed{seed}"


def erase_step(args, method: str, concepts: list[str], seed: int) -> Path:
    from receler.methods import get_method
    from receler.serialization import CHECKPOINT_FILE, CONFIG_FILE

    out = folder(args, method, len(concepts), seed) / "erasers"

    if (out / CONFIG_FILE).is_file():
        return out
    cmd = erase_argv(args, method, concepts, seed)
    if (out / CHECKPOINT_FILE).is_file() and get_method(method).resumable:
        cmd.append("--resume")
    run(cmd, out.parent / "erase.log", args.threads)
    return out


def export_step(args, erasers: Path, k: int, seed: int) -> Path:
    """``receler export`` of ``erasers`` into ``WORK/receler-exported/kK_seedS/merged_unet``
    (resumed from its checkpoint when killed)."""
    from receler.merge import MERGE_FILE, work_folder
    from receler.serialization import CHECKPOINT_FILE

    out = folder(args, EXPORTED, k, seed) / "merged_unet"
    if (out / MERGE_FILE).is_file():
        return out
    cmd = ["export", "--erasers", str(erasers), "--out", str(out), "--threads",
           str(args.threads), "--quiet", *args.export_flag]
    if args.model:
        cmd += ["--model", args.model]
    if (work_folder(out) / CHECKPOINT_FILE).is_file():
        cmd.append("--resume")
    run(cmd, out.parent / "export.log", args.threads)
    return out


def exported_cost(erasers: Path, merged: Path) -> dict:
    """UNet passes and seconds of both stages: the erasers' training and the export."""
    from receler.merge import MERGE_FILE, both_stages
    from receler.serialization import CONFIG_FILE

    return both_stages(json.loads((erasers / CONFIG_FILE).read_text()).get("stats") or {},
                       json.loads((merged / MERGE_FILE).read_text())["stats"])


def measure_step(args, edit: Path, concept: str, *, unet: bool = False) -> dict:
    """``receler protocol`` of ``concept`` on the eraser set ``edit`` (or, with ``unet``, the
    merged UNet folder ``edit``), into a folder beside it."""
    out = edit.parent / concept
    if not (out / "results.json").is_file():
        cmd = ["protocol", "--concept", concept, "--unet" if unet else "--erasers", str(edit),
               "--out", str(out),
               "--base-dir", str(args.base_work / concept / "base"), "--skip", args.skip,
               "--threads", str(args.threads), *args.protocol_flag]
        if args.model:
            cmd += ["--model", args.model]
        run(cmd, out.parent / f"{concept}.log", args.threads)
    return json.loads((out / "results.json").read_text())


def pooled(results: list[dict], suffix: str = "") -> dict | None:
    """Successes and images of the soft attack summed over the erased concepts."""
    from receler.eval.metrics import wilson

    pairs = [(r[f"attack_success_soft{suffix}"], r[f"attack_n{suffix}"]) for r in results]
    if any(rate is None or n is None for rate, n in pairs):
        return None
    hits, n = sum(round(rate * n) for rate, n in pairs), sum(n for _, n in pairs)
    w = wilson(hits, n)
    return {"rate": w.rate, "n": n, "ci": [w.low, w.high]}


def remaining_locality(res: dict) -> dict:
    """Acc_L over the classes not erased (every run of one eraser set shares these images),
    with each remaining class's rate against its base rate."""
    detail = res["metrics"]["detail"]
    left = set(detail["locality_classes"])
    erased = {c["class_name"]: c["rate"]["rate"] for c in res["metrics"]["per_class"]
              if c["class_name"] in left}
    base = {c["class_name"]: c["rate"]["rate"] for c in res["base"]["metrics"]["per_class"]
            if c["class_name"] in left}
    ratio = {c: erased[c] / base[c] for c in erased if base.get(c)}
    return {"acc_l": detail["acc_l"]["rate"], "n": detail["acc_l"]["total"],
            "ci": [detail["acc_l"]["low"], detail["acc_l"]["high"]], "per_class": erased,
            "base_per_class": base, "worst_class": min(ratio, key=ratio.get) if ratio else None,
            "worst_ratio": min(ratio.values()) if ratio else None}


def row(method: str, k: int, seed: int, concepts: list[str], results: list[dict],
        variant: str = "") -> dict:
    from statistics import fmean

    from receler.eval.locality import run_image_change
    from receler.runs import training_passes

    train = results[0]["train"] or {}
    soft, soft3 = pooled(results), pooled(results, "_3x")
    local = remaining_locality(results[0])
    # how the remaining classes' images changed (every erased concept left out; the runs
    # of one eraser set share these images)
    change = run_image_change(Path(results[0]["config"]["out"]), results[0], {}) or {}
    acc_r = [r["acc_r"] for r in results if r["acc_r"] is not None]
    return {
        "method": method, "variant": variant, "k": k, "seed": seed, "concepts": concepts,
        "acc_e": fmean(r["acc_e"] for r in results), "acc_r": fmean(acc_r) if acc_r else None,
        "acc_e_max": max(r["acc_e"] for r in results),
        "attack_success_soft": soft and soft["rate"], "attack_n": soft and soft["n"],
        "attack_ci": soft and soft["ci"],
        "attack_success_soft_3x": soft3 and soft3["rate"], "attack_ci_3x": soft3 and soft3["ci"],
        "acc_l_remaining": local["acc_l"], "acc_l_remaining_n": local["n"],
        "acc_l_remaining_ci": local["ci"], "worst_remaining_class": local["worst_class"],
        "worst_remaining_ratio": local["worst_ratio"],
        "pixel_change_remaining": change.get("pixel"),
        "feature_change_remaining": change.get("feature"),
        "two_object_locality": fmean(r["two_object_locality"] for r in results
                                     if r["two_object_locality"] is not None)
        if any(r["two_object_locality"] is not None for r in results) else None,
        "unet_passes": training_passes(results[0]),
        "train_seconds": train.get("seconds"),
        "per_concept": {c: {key: r[key] for key in ("acc_e", "acc_r", "attack_success_soft",
                                                     "attack_ci", "attack_success_soft_3x")}
                        for c, r in zip(concepts, results, strict=True)},
    }


def fmt(v, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def to_markdown(rows: list[dict]) -> str:
    lines = [f"# Many concepts at once ({datetime.date.today().isoformat()})", "",
             "One eraser set (or edit) per method, k and seed; each erased concept measured by "
             "the protocol. Soft attack: pooled over the erased concepts' attacked images, "
             "Wilson 95% interval. Acc_L: the classes not erased; worst: the remaining "
             "class furthest below its base rate (rate / base rate); pixel Δ / feature Δ: "
             "how the remaining classes' images changed against the base model's (mean |Δ| "
             "of the RGB values, 0-1; mean cosine distance of the toy detector's features).",
             "",
             "| method | k | seed | concepts | Acc_E | Acc_R | soft attack | at 3× | Acc_L "
             "remaining | worst remaining | pixel Δ | feature Δ | two-object | UNet passes "
             "| train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = r["attack_ci"]
        attack = (f"{fmt(r['attack_success_soft'])} [{fmt(ci[0])}, {fmt(ci[1])}] of "
                  f"{r['attack_n']}") if ci else "–"
        worst = (f"{r['worst_remaining_class']} {fmt(r['worst_remaining_ratio'])}"
                 if r["worst_remaining_class"] else "–")
        passes = f"{r['unet_passes']:,}" if r["unet_passes"] is not None else "–"
        lines.append(f"| {label(r)} | {r['k']} | {r['seed']} | {', '.join(r['concepts'])} "
                     f"| {fmt(r['acc_e'])} | {fmt(r['acc_r'])} | {attack} | "
                     f"{fmt(r['attack_success_soft_3x'])} | {fmt(r['acc_l_remaining'])} | "
                     f"{worst} | {fmt(r.get('pixel_change_remaining'), 3)} | "
                     f"{fmt(r.get('feature_change_remaining'), 4)} | "
                     f"{fmt(r['two_object_locality'])} | {passes} | "
                     f"{fmt(r['train_seconds'], 0)} |")
    return "\n".join(lines) + "\n"


def to_picture(rows: list[dict], width: int = 1180) -> Image.Image:
    """Four panels against k, one line per method and variant (seeds averaged): attack
    success (with the pooled interval), Acc_L on the remaining classes, UNet passes (the
    cost that does not depend on what else shares the CPU; 0 for closed-form edits) and
    training seconds. The legend wraps below them."""
    methods = list(dict.fromkeys(label(r) for r in rows))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend, x, line = [], 40, 0  # (x, line) of each method's entry
    for method in methods:
        entry = 30 + int(probe.textlength(method))
        if x + entry > width - 20 and x > 40:
            x, line = 40, line + 1
        legend.append((x, line))
        x += entry
    size = (width, 340 + 18 * line)
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    ks = sorted({r["k"] for r in rows})
    panels = [("soft attack success", "attack_success_soft", (0.0, 1.0)),
              ("Acc_L, classes not erased", "acc_l_remaining", (0.0, 1.0)),
              ("UNet passes", "unet_passes", None),
              ("training seconds", "train_seconds", None)]
    pw = (w - 40) // len(panels)
    for p, (title, key, span) in enumerate(panels):
        x0, y0, x1, y1 = 40 + p * pw, 40, 40 + p * pw + pw - 40, 280
        vals = [r[key] for r in rows if r[key] is not None]
        lo, hi = span or (0.0, max(vals + [1.0]) * 1.1)
        d.rectangle((x0, y0, x1, y1), outline="black")
        d.text((x0, 12), title, fill="black")
        for i in range(5):
            v = lo + (hi - lo) * i / 4
            yy = y1 - (y1 - y0) * i / 4
            d.line((x0, yy, x1, yy), fill=(225, 225, 225))
            d.text((x0 - 34, yy - 6), f"{v:.2f}" if span else f"{v:.0f}", fill="black")

        def px(k, x0=x0, x1=x1):
            return x0 + (x1 - x0) * ((ks.index(k) + 0.5) / len(ks))

        def py(v, y0=y0, y1=y1, lo=lo, hi=hi):
            return y1 - (y1 - y0) * (v - lo) / (hi - lo)

        for k in ks:
            d.text((px(k) - 8, y1 + 6), f"k={k}", fill="black")
        for m, method in enumerate(methods):
            col = COLOURS[m % len(COLOURS)]
            points = []
            for k in ks:
                mine = [r for r in rows if label(r) == method and r["k"] == k
                        and r[key] is not None]
                if not mine:
                    continue
                v = sum(r[key] for r in mine) / len(mine)
                x = px(k) + (m - len(methods) / 2) * 4
                points.append((x, py(v)))
                if key == "attack_success_soft" and len(mine) == 1 and mine[0]["attack_ci"]:
                    lo_ci, hi_ci = mine[0]["attack_ci"]
                    d.line((x, py(lo_ci), x, py(hi_ci)), fill=col)
                d.ellipse((x - 4, py(v) - 4, x + 4, py(v) + 4), fill=col)
            if len(points) > 1:
                d.line(points, fill=col, width=2)
    for m, (method, (x, line)) in enumerate(zip(methods, legend, strict=True)):
        col = COLOURS[m % len(COLOURS)]
        y = 316 + 18 * line
        d.rectangle((x, y, x + 10, y + 10), fill=col)
        d.text((x + 16, y - 2), method, fill="black")
    return img


def write(rows: list[dict], out: Path) -> list[Path]:
    from receler.serialization import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "multi.json", out / "multi.md", out / "multi.png"]
    text = json.dumps(rows, indent=2) + "\n"
    atomic_write(paths[0], lambda tmp: tmp.write_text(text))
    md = to_markdown(rows) + "\n![attack, locality and cost against k](multi.png)\n"
    atomic_write(paths[1], lambda tmp: tmp.write_text(md))
    atomic_write(paths[2], lambda tmp: to_picture(rows).save(tmp, "PNG"))
    return paths


def row_key(r: dict) -> tuple:
    return r["method"], r.get("variant") or "", r["k"], r["seed"]


def merged_rows(kept: list[dict], rows: list[dict]) -> list[dict]:
    """``kept`` with any row of the same method, variant, k and seed replaced by the one in
    ``rows``, then the rows that are new."""
    new = {row_key(r): r for r in rows}
    out = [new.pop(row_key(r), r) for r in kept]
    return out + [r for r in rows if row_key(r) in new]


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    kept = []  # the rows already in --out, with --append
    if args.append and (args.out / "multi.json").is_file():
        kept = json.loads((args.out / "multi.json").read_text())
    for method in args.methods:
        for k in args.k:
            concepts = args.order[:k]
            for seed in args.seeds:
                if seed != args.seeds[0] and not seeded(method):
                    continue  # a closed-form edit does not depend on the seed
                base = folder(args, method, k, seed)
                check_recorded(args, method, concepts, seed)
                if args.collect:
                    done = [base / c / "results.json" for c in concepts]
                    if not all(f.is_file() for f in done):
                        print(f"{method} k={k} seed {seed}: not finished, left out", flush=True)
                        continue
                    results = [json.loads(f.read_text()) for f in done]
                elif method == EXPORTED:
                    erasers = erase_step(args, "receler", concepts, seed)
                    merged = export_step(args, erasers, k, seed)
                    results = [measure_step(args, merged, c, unet=True) for c in concepts]
                else:
                    erasers = erase_step(args, method, concepts, seed)
                    results = [measure_step(args, erasers, c) for c in concepts]
                if method == EXPORTED:  # the protocol sees a UNet made elsewhere: no cost
                    cost = exported_cost(folder(args, "receler", k, seed) / "erasers",
                                         base / "merged_unet")
                    results = [{**r, "train": cost} for r in results]
                rows.append(row(method, k, seed, concepts, results, variant(args, method)))
                write(merged_rows(kept, rows), args.out)
                r = rows[-1]
                print(f"{method} k={k} seed {seed}: Acc_E {fmt(r['acc_e'])} soft "
                      f"{fmt(r['attack_success_soft'])} Acc_L remaining "
                      f"{fmt(r['acc_l_remaining'])}", flush=True)
    if not rows:
        raise SystemExit("error: no finished run to tabulate: run without --collect first")
    print("\n".join(str(p) for p in write(merged_rows(kept, rows), args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
