"""Every erasure method in the same harness: same model, prompts, seeds and detector.

Each (method, concept) pair runs ``receler protocol`` in its own process, so that its peak
memory is its own (``os.wait4`` reports the child's max RSS); the base model's images and
attack results are shared by all methods of a concept. The table goes to
``benchmarks/results/compare.json`` (a list of rows) and ``compare.md``.

    python benchmarks/compare.py            # full: 3 concepts, every method, published recipe
    python benchmarks/compare.py --quick    # one object concept, fewer images and attack steps
    python benchmarks/compare.py --quick --seeds 0,1,2   # every training seed: mean ± sd

A finished run folder (one with ``results.json``) is reused, not run again, so a killed
benchmark picks up where it stopped; delete a folder to run it again. A finished folder run
with other settings stops the benchmark with the setting named. ``--seeds`` trains every
method once per seed (the evaluation prompts and their seeds stay the same, so the base model is
measured once); the per-seed rows go to ``compare.json`` with a ``seed`` key, and the mean,
standard deviation and range over the seeds to ``compare_seeds.json`` and ``compare.md``.
Each concept also gets ``compare_<concept>.png``: every method's images of the same prompts
and seeds, the concept's first, then one of each other class.

Every method trains with its default settings for the model (on the toy model: the settings
its ``receler_defaults.json`` recommends, else the paper's). ``--jobs 2`` runs two protocols
at a time, across concepts; a concept's other runs wait for its first one while that one
measures the base model they share. Training times then share the CPU.
So does the protocol's latency measurement, so after the runs each run's overhead is measured
again, one run at a time with every core (``--latency-repeats``), and that figure goes into
the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ["receler", "receler-exported", "receler-eraser-only", "receler-eraser-reg", "receler-eraser-adv",
           "esd-x", "esd-u", "uce", "rece", "speed", "mace", "sld", "advunlearn"]
COLUMNS = ["method", "concept", "acc_e", "acc_r", "acc_l", "h", "attack_success_soft",
           "attack_ci", "attack_n", "attack_success_soft_3x", "two_object_locality", "classes_lost", "pixel_change_others", "train_seconds", "unet_passes",
           "trainable_params", "overhead_ratio", "peak_mem_mb"]
# The paper's recipe: what the official code trains (`receler protocol --preset paper`:
# 500 iterations, rank 128, regulariser 0.1, 50 attack steps of Adam lr 0.1 with weight
# decay 0.1 on U[0,1) soft tokens from the first iteration, the eraser step on the
# attacked prompt only), with none of the toy model's recommendations, so that any gain of
# the recommended recipe is shown against it.
PUBLISHED = {"label": "receler (paper)", "method": "receler", "flags": ["--preset", "paper"]}
# Receler as the README recommends shipping it: the erasers trained, then merged into the
# UNet's own weights (`receler protocol --export`, the export's defaults); its cost is both
# stages'. It starts from the erasers of the same seed's `receler` run when that one has
# finished (the same training), and trains its own otherwise.
EXPORTED = {"label": "receler (exported)", "method": "receler", "flags": ["--export"]}
ALIASES = {"receler-exported": EXPORTED}


def entry(name: str) -> tuple[str, str, list[str]]:
    """``(label, method, flags)`` of a ``--methods`` name."""
    e = ALIASES.get(name)
    return (e["label"], e["method"], list(e["flags"])) if e else (name, name, [])


def variant(flags: str) -> dict:
    """A ``receler`` run with other flags (``--variant``), labelled by them."""
    return {"label": f"receler ({flags})", "method": "receler", "flags": shlex.split(flags)}


def run_folder(work: Path, concept: str, label: str, seed: int = 0) -> Path:
    """``WORK/CONCEPT/LABEL[_seedN]``, the label without spaces, brackets, quotes or pipes."""
    name = label.replace(" ", "_")
    for c in "()'\"|":
        name = name.replace(c, "")
    return work / concept / (f"{name}_seed{seed}" if seed else name)


def plan(concepts: list[str], seeds: list[int], methods: list[str], variants: list[str],
         published: str, seeded, published_seed: int | None = None
         ) -> list[tuple[str, list[tuple[str, str, list[str], int]]]]:
    """The runs of each concept, seed by seed: ``(concept, [(label, method, flags, seed)])``.
    A method without a training seed (``seeded(method)`` false) runs once, on the first
    seed, and is given no ``--seed`` (the CLI refuses a setting the method would ignore).
    The published recipe runs once per concept it is asked for, with ``published_seed``
    (default: the first seed)."""
    def with_seed(label, m, f, seed):
        return label, m, f + (["--seed", str(seed)] if seed and seeded(m) else []), seed

    order = []
    for i, concept in enumerate(concepts):
        runs = []
        for j, seed in enumerate(seeds):
            by_seed = [entry(m) for m in methods]
            by_seed += [(v["label"], v["method"], v["flags"]) for v in map(variant, variants)]
            runs += [with_seed(label, m, f, seed) for label, m, f in by_seed
                     if j == 0 or seeded(m)]
        if published == "all" or (published == "first" and i == 0):
            # the longest run early, so that it overlaps the others with --jobs > 1
            seed = seeds[0] if published_seed is None else published_seed
            runs.insert(1, with_seed(PUBLISHED["label"], PUBLISHED["method"],
                                     list(PUBLISHED["flags"]), seed))
        order.append((concept, runs))
    return order


def run_protocol(concept: str, method: str, out: Path, base: Path, flags: list[str],
                 model: str | None, threads: int) -> tuple[dict, float]:
    """One protocol run in a child process with ``threads`` torch threads (unless
    OMP_NUM_THREADS is set); returns its results and peak RSS in MB."""
    env = {"OMP_NUM_THREADS": str(threads), **os.environ}
    cmd = [sys.executable, "-m", "receler", "protocol", "--concept", concept, "--method", method,
           "--out", str(out), "--base-dir", str(base), *flags]
    if model:
        cmd += ["--model", model]
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log}")
    return json.loads((out / "results.json").read_text()), usage.ru_maxrss / 1024


def protocol_args(out: Path, concept: str, method: str, flags: list[str], model: str | None):
    """The ``receler protocol`` arguments these flags give, and the training settings they
    ask for."""
    from receler.cli import _train_config, build_parser

    argv = ["protocol", "--concept", concept, "--method", method, "--out", str(out), *flags]
    args = build_parser().parse_args(argv + (["--model", model] if model else []))
    # quiet: no announcement of the model's recommendations (redirecting stderr instead
    # would swallow other jobs' output, stderr being shared by the threads)
    return args, _train_config(args, concept, method, quiet=True)


def stale(out: Path, concept: str, method: str, flags: list[str], model: str | None) -> str | None:
    """How a finished run folder differs from what these flags would run now (a training
    setting of its erasers, or the size of its evaluation); ``None`` when it may be reused."""
    from receler.methods.edits import EditConfig
    from receler.methods.registry import settings_mismatch
    from receler.serialization import CONFIG_FILE

    args, train = protocol_args(out, concept, method, flags, model)
    why = settings_mismatch(method, train, EditConfig.load(out / "erasers" / CONFIG_FILE))
    if why:
        return why
    done = json.loads((out / "results.json").read_text())["config"]
    for key in ("per_class", "concept_rows", "attack_images", "attack_prompts"):
        if done.get(key) != getattr(args, key):
            return f"{key}={done.get(key)}, not {getattr(args, key)}"
    for key in ("steps", "tokens", "space"):
        was = done["attack"].get(key, "output" if key == "space" else None)
        if was != getattr(args, f"attack_{key}"):
            return f"attack_{key}={was}, not {getattr(args, f'attack_{key}')}"
    from receler.attack import AttackConfig
    from receler.cli import token_attack_settings

    token = {"candidates": AttackConfig.candidates, "sweeps": AttackConfig.sweeps,
             **token_attack_settings(args)}
    for key, value in token.items():
        if done["attack"].get(key) != value:
            return f"token_{key}={done['attack'].get(key)}, not {value}"
    from receler.merge import recorded_settings, retain_weight

    asked, export = export_settings(args), done.get("export")
    if export is not None:
        export = recorded_settings(export)
    for settings in (asked, export):  # a run erases one concept: the default weight is 20
        if settings is not None:
            settings["retain_weight"] = retain_weight(settings.get("retain_weight"), 1)
    if export != asked:
        if export is None or asked is None:
            return f"export={'on' if export else 'off'}, not {'on' if asked else 'off'}"
        key = next(k for k in asked if export.get(k) != asked[k])
        return f"export {key}={export.get(key)!r}, not {asked[key]!r}"
    return None


def export_settings(args) -> dict | None:
    """The merged export's settings that ``receler protocol`` flags ask for (None: none)."""
    from receler.cli import _method_options
    from receler.merge import MergeConfig

    if not args.export:
        return None
    return MergeConfig.from_options(_method_options(args.export_option, "--export-option")).to_dict()


def reuse_erasers(source: Path, out: Path, concept: str, method: str, flags: list[str],
                  model: str | None) -> bool:
    """Copy the finished erasers of run ``source`` into run ``out`` (which has none yet) when
    they were trained with the settings these flags ask for; whether they were copied."""
    import shutil

    from receler.methods.edits import EditConfig
    from receler.methods.registry import settings_mismatch
    from receler.serialization import CONFIG_FILE

    src, dst = source / "erasers", out / "erasers"
    if not (src / CONFIG_FILE).is_file() or dst.exists():
        return False
    _, train = protocol_args(out, concept, method, flags, model)
    if settings_mismatch(method, train, EditConfig.load(src / CONFIG_FILE)):
        return False
    tmp = out / ".erasers.copy"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    os.replace(tmp, dst)
    return True


def pixel_change_others(res: dict) -> float | None:
    """Mean |base − edited| of the RGB values (0-1) over the simple-prompt images of the
    other classes, same seeds: what the class detector does not see (colours, sizes, poses).
    0 = those images did not change at all. What the protocol recorded, else measured from
    the run's images (``receler.eval.locality``)."""
    from receler.eval.locality import run_image_change

    change = run_image_change(Path(res["config"]["out"]), res)
    return change and change["pixel"]


def locality_by_class(res: dict) -> dict[str, dict[str, float]]:
    """Detection rate of each other class on its simple prompts, edited and base model (same
    prompts and seeds): Acc_L says how much locality was lost, this says where."""
    def rates(metrics: dict) -> dict[str, float]:
        return {r["class_name"]: r["rate"]["rate"] for r in metrics.get("per_class", [])}

    edited, base = rates(res["metrics"]), rates(res["base"]["metrics"])
    return {c: {"edited": edited[c], "base": base[c]} for c in edited
            if c != res["concept"] and c in base}


def classes_lost(by_class: dict[str, dict[str, float]]) -> list[str]:
    """The other classes detected at less than half their base model's rate."""
    return [c for c, r in by_class.items() if r["edited"] < r["base"] / 2]


def picture(concept: str, runs: list[tuple[str, dict]], n_concept: int = 3, n_others: int = 6):
    """One row per method (base first): the same prompts and seeds, the concept's images
    first (its simple prompts, or for a style its style prompts), then one image of each of
    ``n_others`` other classes, which should not change."""
    from PIL import Image

    from receler.eval.prompts import read_prompts
    from receler.protocol import PromptSets
    from receler.viz import image_grid

    res0 = runs[0][1]
    given = res0["config"].get("prompts")
    rows = read_prompts(Path(given["simple"]) if given else PromptSets.toy().simple)
    base = Path(res0["base_images"])
    if (base / "style").is_dir():
        cells = [("style", p.name, concept) for p in sorted((base / "style").glob("*_0.png"),
                                                           key=lambda p: int(p.stem[:-2]))]
    else:
        cells = [("simple", f"{r.case_number}_0.png", concept) for r in rows
                 if r.class_name == concept]
    cells = cells[:n_concept]
    seen: set[str] = set()
    for r in rows:
        if r.class_name not in (concept, None) and r.class_name not in seen and \
                len(seen) < n_others:
            seen.add(r.class_name)
            cells.append(("simple", f"{r.case_number}_0.png", r.class_name))
    folders = [("base", base)] + [(label, Path(res["config"]["out"]) / "images" / "erased")
                                  for label, res in runs]
    images = []
    for _, folder in folders:
        for kind, name, _ in cells:
            f = folder / kind / name
            images.append(Image.open(f).convert("RGB") if f.is_file()
                          else Image.new("RGB", (32, 32), (128, 128, 128)))
    scale = max(1, 64 // images[0].size[0])
    return image_grid(images, cols=len(cells), row_labels=[label for label, _ in folders],
                      col_labels=[c for _, _, c in cells], scale=scale)


LATENCY_FILE = "latency_alone.json"


def latency_alone(out: Path, repeats: int) -> dict | None:
    """The run's latency measured alone with ``repeats`` ABBA repeats, if it has been."""
    f = out / LATENCY_FILE
    lat = json.loads(f.read_text()) if repeats and f.is_file() else None
    return lat if lat and lat.get("repeats") == repeats else None


def measure_alone(outs: list[Path], repeats: int) -> None:
    """Re-measure the latency overhead of finished runs one at a time, with every core and
    nothing else running (the protocol's own figure shares the CPU with the other jobs).
    Each run gets ``LATENCY_FILE`` in its folder; runs measured with ``repeats`` are skipped."""
    import torch

    from receler.methods import load_edit, remove_edit
    from receler.pipeline import load_pipeline
    from receler.protocol import measure_latency
    from receler.sampling import SamplerSettings
    from receler.serialization import atomic_write

    previous = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    pipes: dict[str, object] = {}
    try:
        for out in (o for o in outs if latency_alone(o, repeats) is None):
            res = json.loads((out / "results.json").read_text())
            model = res["model"]
            if model not in pipes:
                pipes[model] = load_pipeline(model, device="cpu")
            pipe = pipes[model]
            exported = res["candidate"]["kind"] == "erase+export"
            if exported:  # the merged UNet swapped in for the base one
                from receler.external import resolve_candidate
                from receler.protocol import EXPORT_FOLDER

                swap = resolve_candidate(res["concept"], model, unet=str(out / EXPORT_FOLDER))
                swap.apply(pipe)
            else:
                load_edit(pipe, out / "erasers")
            try:  # the base model: the original UNet put back, or the edit disabled
                lat = measure_latency(pipe, res["attack"]["prompt"],
                                      SamplerSettings.for_model(model), repeats=repeats,
                                      base=partial(swap.base, pipe) if exported else None)
            finally:
                if exported:
                    swap.remove(pipe)
                else:
                    remove_edit(pipe)
            lat.update(repeats=repeats, threads=torch.get_num_threads())
            text = json.dumps(lat, indent=2) + "\n"
            atomic_write(out / LATENCY_FILE, lambda tmp, text=text: tmp.write_text(text))
            print(f"{out}: overhead {lat['overhead_ratio']:+.3f} (alone, {repeats} ABBA "
                  "repeats)", flush=True)
    finally:
        torch.set_num_threads(previous)


def row(label: str, concept: str, res: dict, peak_mb: float | None,
        alone: dict | None = None, seed: int = 0) -> dict:
    from receler.runs import training_passes

    train = res.get("train") or {}  # the method's stats from eraser_config.json
    by_class = locality_by_class(res)
    passes = training_passes(res)
    return {"method": label, "concept": concept, "seed": seed, "acc_e": res["acc_e"],
            "acc_r": res["acc_r"], "acc_l": res["acc_l"], "h": res["h"],
            **attack_columns(res),
            "attack_success_discrete": res["attack_success_discrete"],
            "two_object_locality": res.get("two_object_locality"),
            "classes_lost": classes_lost(by_class), "locality_by_class": by_class,
            "pixel_change_others": pixel_change_others(res),
            "train_seconds": train.get("seconds"), "unet_passes": passes,
            "unet_forward": train.get("unet_forward"), "unet_backward": train.get("unet_backward"),
            "trainable_params": train.get("trainable_parameters"),
            "overhead_ratio": alone["overhead_ratio"] if alone else res["overhead_ratio"],
            "overhead_ratio_protocol": res["overhead_ratio"],
            "overhead_measured_alone": alone is not None,
            "peak_mem_mb": None if peak_mb is None else round(peak_mb, 1)}


def attack_columns(res: dict) -> dict:
    """The pooled soft-attack rate at the budget and at 3× it, with n and Wilson 95% CI."""
    return {k: res.get(k) for k in ("attack_success_soft", "attack_n", "attack_ci",
                                    "attack_success_soft_3x", "attack_n_3x", "attack_ci_3x")}


def base_row(concept: str, res: dict) -> dict:
    b = res["base"]
    return {"method": "base (no erasure)", "concept": concept, "acc_e": b["acc_e"],
            "acc_r": b["acc_r"], "acc_l": b["acc_l"], "h": b["h"],
            **attack_columns(b),
            "attack_success_discrete": b["attack_success_discrete"],
            "two_object_locality": b.get("two_object_locality"), "classes_lost": [],
            "pixel_change_others": 0.0,
            "train_seconds": 0,
            "unet_passes": 0, "trainable_params": 0, "overhead_ratio": 0.0, "peak_mem_mb": None}


SPREAD = ["acc_e", "acc_r", "acc_l", "h", "attack_success_soft", "attack_success_soft_3x",
          "two_object_locality", "pixel_change_others"]


def across_seeds(rows: list[dict]) -> list[dict]:
    """One row per (method, concept) over its seeds: the mean, sample standard deviation and
    range of each quality column (``None`` where a seed lacks the value, e.g. H of a style)."""
    import statistics

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["method"] != "base (no erasure)":
            groups.setdefault((r["method"], r["concept"]), []).append(r)
    out = []
    for (method, concept), rs in groups.items():
        s = {"method": method, "concept": concept, "seeds": sorted(r["seed"] for r in rs)}
        for c in SPREAD:
            vals = [r.get(c) for r in rs]
            if any(v is None for v in vals):
                s[c] = s[c + "_sd"] = s[c + "_min"] = s[c + "_max"] = None
                continue
            s[c] = statistics.fmean(vals)
            s[c + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
            s[c + "_min"], s[c + "_max"] = min(vals), max(vals)
        # the attacked images of every seed pooled: one rate with its Wilson interval
        if all(r.get("attack_n") for r in rs):
            from receler.eval.metrics import wilson

            hits = sum(round(r["attack_success_soft"] * r["attack_n"]) for r in rs)
            n = sum(r["attack_n"] for r in rs)
            pooled = wilson(hits, n)
            s["attack_pooled"] = {"successes": hits, "n": n, "rate": pooled.rate,
                                  "ci": [pooled.low, pooled.high]}
        # per class, the seeds that lost it, in the order first lost
        s["classes_lost"] = dict(Counter(c for r in rs for c in r.get("classes_lost", [])))
        out.append(s)
    return out


def spread_markdown(summary: list[dict]) -> str:
    """``mean ± sd (min–max)`` per column."""
    def cell(s: dict, c: str) -> str:
        if s[c] is None:
            return "–"
        if s[c + "_sd"] is None:
            return f"{s[c]:.3f}"
        return f"{s[c]:.3f} ± {s[c + '_sd']:.3f} ({s[c + '_min']:.2f}–{s[c + '_max']:.2f})"

    def lost(s: dict) -> str:  # "diamond 3/3": lost on 3 of the 3 seeds
        n = len(s["seeds"])
        return ", ".join(f"{c} {k}/{n}" for c, k in s["classes_lost"].items()) or "none"

    def pooled(s: dict) -> str:  # every seed's attacked images as one rate
        p = s.get("attack_pooled")
        return "–" if p is None else f"{p['rate']:.3f} [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}] " \
                                     f"(n = {p['n']})"

    cols = ["method", "concept", "seeds"] + SPREAD + ["soft attack, seeds pooled",
                                                      "classes_lost"]
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    lines += ["| " + " | ".join([fmt(s["method"]), s["concept"], ",".join(map(str, s["seeds"]))]
                                + [cell(s, c) for c in SPREAD] + [pooled(s), lost(s)]) + " |"
              for s in summary]
    return "\n".join(lines) + "\n"


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, list):
        return ", ".join(map(fmt, v)) or "none"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v).replace("|", "\\|")  # a pipe in a label would end the table cell


def markdown(rows: list[dict], header: str) -> str:
    cols = COLUMNS if len({r.get("seed", 0) for r in rows}) == 1 else COLUMNS[:2] + ["seed"] + COLUMNS[2:]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one concept, fewer images and attack steps")
    p.add_argument("--concepts", default=None, help="comma-separated (default: star,heart,striped)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--model", default=None, help="default: the toy model")
    p.add_argument("--work", type=Path, default=Path("runs/benchmark"), help="run folders")
    p.add_argument("--out", type=Path, default=HERE / "results" / "compare.json")
    p.add_argument("--published", choices=["first", "all", "none"], default=None,
                   help="run the published recipe for the first concept, every concept or none "
                        "(default: all; with --quick: none)")
    p.add_argument("--published-seed", type=int, default=None,
                   help="training seed of the published recipe's runs (default: the first of "
                        "--seeds)")
    p.add_argument("--jobs", type=int, default=1, help="protocols run at a time")
    p.add_argument("--latency-repeats", type=int, default=10,
                   help="after the runs, re-measure the latency overhead of each run of the "
                        "first seed alone with this many ABBA repeats (0: keep the protocol's "
                        "figure, measured beside the other jobs)")
    p.add_argument("--variant", action="append", default=[], metavar="FLAGS",
                   help='also run receler with these flags on every concept, e.g. '
                        '--variant="--reg-weight 5" (repeatable)')
    p.add_argument("--seeds", default="0",
                   help="comma-separated training seeds; every method is trained once per seed "
                        "and the table gains mean ± sd over them (the published recipe, and "
                        "methods that do not train (uce, sld), run on the first seed only)")
    p.add_argument("--collect", action="store_true",
                   help="rebuild the table from the run folders that finished, training "
                        "nothing (it still measures the latency of runs that lack it)")
    args = p.parse_args()
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {args.seeds!r}")
    if len(set(seeds)) != len(seeds):
        p.error(f"--seeds lists a seed twice: {args.seeds!r}")
    # Jobs share the cores instead of each taking all of them (oversubscribed threads made
    # the interleaved latency measurement noise).
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    if args.quick:
        concepts = (args.concepts or "star").split(",")
        flags = ["--per-class", "5", "--concept-rows", "10", "--attack-images", "6",
                 "--attack-steps", "30"]
    else:
        concepts = (args.concepts or "star,heart,striped").split(",")
        flags = []
    published = args.published or ("none" if args.quick else "all")
    methods = [m for m in args.methods.split(",") if m]  # "" with --variant: variants only
    work = args.work / ("quick" if args.quick else "full")
    results: dict[tuple[str, str, int], tuple[dict, float | None]] = {}
    started = time.time()
    lock = threading.Lock()

    def folder(concept: str, label: str, seed: int = 0) -> Path:
        return run_folder(work, concept, label, seed)

    from receler.methods import get_method

    order = plan(concepts, seeds, methods, args.variant, published,
                 lambda m: get_method(m).seeded, args.published_seed)

    def write() -> None:
        """The table of every finished run so far (a killed benchmark keeps its rows)."""
        rows, missing = [], []
        for concept, runs in order:
            done = [(label, seed) for label, _, _, seed in runs
                    if (concept, label, seed) in results]
            if done:
                rows.append(base_row(concept, results[(concept, *done[0])][0]))
            rows += [row(label, concept, *results[concept, label, seed], seed=seed,
                         alone=latency_alone(folder(concept, label, seed), args.latency_repeats))
                     for label, seed in done]
            missing += [str(folder(concept, label, seed).relative_to(work))
                        for label, _, _, seed in runs if (label, seed) not in done]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
        summary = across_seeds(rows) if len(seeds) > 1 else []
        if summary:
            text = json.dumps(summary, indent=2) + "\n"
            args.out.with_name(args.out.stem + "_seeds.json").write_text(text)
        cmd = "python " + shlex.join(["benchmarks/compare.py", *sys.argv[1:]])
        header = (f"# Erasure methods side by side ({'quick' if args.quick else 'full'})\n\n"
                  f"`{cmd}`" + (", collected from the run folders" if args.collect else
                                f", {time.time() - started:.0f} s so far") + ". unet_passes counts UNet "
                  "forward and backward passes per sample; overhead_ratio is the extra "
                  "generation latency of the edited model against the base model, measured "
                  "interleaved in one process" + (
                      f" after the runs, one run at a time with every core, for the first seed's runs ({args.latency_repeats}"
                      " ABBA repeats of 4 images; the protocol's own figure, measured beside the "
                      "other jobs, is overhead_ratio_protocol in the JSON)"
                      if args.latency_repeats else "") + ".")
        if missing:
            header += f"\n\nNot finished: {', '.join(missing)}."
        text = markdown(rows, header)
        for concept, runs in order:
            first = [(label, results[concept, label, seed][0]) for label, _, _, seed in runs
                     if (seed == seeds[0] or label == PUBLISHED["label"])
                     and (concept, label, seed) in results]
            if first:
                png = args.out.with_name(f"{args.out.stem}_{concept}.png")
                picture(concept, first).save(png)
                text += f"\n![{concept}: what each method generates]({png.name})\n"
        if summary:
            text += (f"\n## Across training seeds {','.join(map(str, seeds))}\n\nmean ± sample "
                     "standard deviation (min–max) of each method's per-seed figures.\n\n"
                     + spread_markdown(summary))
        args.out.with_suffix(".md").write_text(text)

    def finished(concept: str, label: str, method: str, extra: list[str], seed: int) -> bool:
        """Load a run whose folder already holds its results (reused, not run again), after
        checking that it was run with the settings these flags ask for."""
        out = folder(concept, label, seed)
        if not (out / "results.json").is_file():
            return False
        why = stale(out, concept, method, flags + extra, args.model)
        if why:
            raise SystemExit(f"error: {out} holds a finished run with {why}: delete that folder "
                             "to run it with the current settings, or choose another --work")
        peak_file = out / "peak_mem_mb.txt"
        peak = float(peak_file.read_text()) if peak_file.is_file() else None
        res = json.loads((out / "results.json").read_text())
        res["config"]["out"] = str(out)  # where the run lies now: a folder may have been renamed
        results[concept, label, seed] = res, peak
        return True

    # the exported row waits for the same seed's receler run, to start from its erasers
    trained = {(concept, seed): threading.Event() for concept, runs in order
               for label, _, _, seed in runs if label == "receler"}

    def one(concept: str, label: str, method: str, extra: list[str], seed: int) -> None:
        try:
            run_one(concept, label, method, extra, seed)
        finally:
            if label == "receler":
                trained[concept, seed].set()

    def run_one(concept: str, label: str, method: str, extra: list[str], seed: int) -> None:
        if finished(concept, label, method, extra, seed):
            print(f"{concept:>10} {label:<28} seed {seed}: reused {folder(concept, label, seed)}",
                  flush=True)
            return
        out, t = folder(concept, label, seed), time.time()
        if "--export" in extra and (concept, seed) in trained:
            trained[concept, seed].wait()
        if "--export" in extra and reuse_erasers(folder(concept, "receler", seed), out, concept,
                                                 method, flags + extra, args.model):
            print(f"{concept:>10} {label:<28} seed {seed}: erasers of "
                  f"{folder(concept, 'receler', seed)}", flush=True)
        res, peak = run_protocol(concept, method, out, work / concept / "base", flags + extra,
                                 args.model, threads)
        (out / "peak_mem_mb.txt").write_text(f"{peak:.1f}\n")
        with lock:
            results[concept, label, seed] = res, peak
            write()
        print(f"{concept:>10} {label:<28} seed {seed}: H={fmt(res['h'])} "
              f"Acc_E={fmt(res['acc_e'])} soft={fmt(res['attack_success_soft'])} "
              f"({time.time() - t:.0f} s)", flush=True)

    if args.collect:  # rebuild the table from finished run folders, run nothing
        for concept, runs in order:
            for label, method, extra, seed in runs:
                finished(concept, label, method, extra, seed)
        write()
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            def first_then_rest(concept: str, runs: list) -> list:
                one(concept, *runs[0])  # before the rest: it measures the base model they share
                return [pool.submit(one, concept, *r) for r in runs[1:]]

            pending = []  # every concept's runs share the jobs
            for concept, runs in order:
                if (work / concept / "base" / "attack.json").is_file():
                    pending += [pool.submit(one, concept, *r) for r in runs]
                elif runs:
                    pending.append(pool.submit(first_then_rest, concept, runs))
            while pending:
                pending += pending.pop(0).result() or []
    if args.latency_repeats:
        # the first seed's runs: another seed's erasers have the same shapes and cost the same
        measure_alone([folder(*key) for key in results if key[2] == seeds[0]],
                      args.latency_repeats)
        write()
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
