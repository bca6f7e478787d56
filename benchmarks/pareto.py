"""The robustness–locality trade-off: every finished run as one point per concept.

For each protocol run given (any method or setting), soft-prompt attack success (pooled
over the protocol's independent attacks, with its Wilson 95% interval) against Acc_L, at
the evaluation's attack budget and at 3× it. A run is on the Pareto front when no other run
of the same concept has both a higher (or equal) Acc_L and a lower (or equal) attack
success, one of them strictly; runs that do not erase (Acc_E above 0.5) are never on it.

    python benchmarks/pareto.py runs/benchmark/full/*/* --out benchmarks/results/pareto

writes ``pareto.json`` (one row per run: method, concept, seed, acc_e, acc_r, acc_l, h,
attack rate with n and interval at both budgets, on_front), ``pooled.json`` (runs that
differ only in their training seed pooled: attacked images summed, the rest averaged),
``pareto.md`` and
``pareto_<concept>.png`` (Acc_L across, attack success up; 95% intervals as bars; the
front's points ringed). Folders without ``results.json`` (base folders, unfinished runs)
are skipped with their names printed.

The cost of robustness: the pooled runs that erase and keep the other classes (Acc_L at
least ``LOCAL``) as attack success at 3× the budget against the UNet passes their training
took (forward and backward; 0 for closed-form edits), the front where no run is both
cheaper (or as cheap) and more robust (or as robust), in ``pareto.md`` and
``cost_<concept>.png``, with a line at 1.5× ESD-x's passes where ESD-x was run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(200, 40, 40), (40, 110, 200), (30, 150, 60), (150, 60, 160), (230, 140, 20),
           (20, 160, 160), (120, 120, 120), (90, 50, 20), (220, 90, 170), (0, 0, 0),
           (190, 170, 0), (60, 60, 150), (120, 200, 90)]  # 13: every method of the harness


def seeded(method: str | None) -> bool:
    """Whether the method's result depends on a training seed (UCE, MACE, RECE, SPEED and
    SLD record one in their settings but do not read it; a model swapped in whole has
    none known)."""
    from receler.methods import get_method

    try:
        return get_method(method).seeded
    except ValueError:  # not a method of the registry (a whole UNet swapped in)
        return False


def row_of(run: Path, res: dict) -> dict:
    """One point: the run's label (its method and training seed), its quality and both
    attack budgets."""
    from receler.runs import training_passes

    conf = run / "erasers" / "eraser_config.json"  # the training seed, where one trained
    saved = json.loads(conf.read_text()) if conf.is_file() else {}
    seed = (saved.get("train") or {}).get("seed") if seeded(res.get("method")) else None
    # the label without seed or folder; the erasers merged into the UNet (`receler protocol
    # --export`) are a model of their own, named so and never pooled with the erasers
    export = (res.get("export") or {}).get("merge")
    name = (res.get("name") if export else res.get("method")) or run.name
    row = {"method": name + (f" s{seed}" if seed is not None else ""), "name": name,
           "concept": res["concept"], "run": str(run), "seed": seed}
    # runs that differ only in the training seed pool (pooled()); others never do
    train = saved.get("train") or {}
    if train:  # receler's and the fine-tuning baselines' (ESD) training settings
        from receler.config import TrainConfig

        try:  # a field added later (eraser_site) reads as its default, as when it loads
            train = TrainConfig.from_dict(train).to_dict()
        except (TypeError, ValueError):
            pass
    train = {k: v for k, v in train.items() if k not in UNPOOLED}
    row["settings"] = json.dumps([res.get("method"), saved.get("rank"), saved.get("options"),
                                  train, res.get("attack_space"), export], sort_keys=True) \
        if saved and seed is not None else str(run)
    for k in ("acc_e", "acc_r", "acc_l", "h", "two_object_locality"):
        row[k] = res.get(k)
    row["unet_passes"] = training_passes(res)
    # the other classes' image change (runs before the protocol recorded it: run_image_change())
    row["pixel_change"] = res.get("pixel_change_others")
    row["feature_change"] = res.get("feature_change_others")
    for suffix in ("", "_3x"):
        row[f"attack{suffix}"] = res.get(f"attack_success_soft{suffix}")
        row[f"attack{suffix}_n"] = res.get(f"attack_n{suffix}")
        row[f"attack{suffix}_ci"] = res.get(f"attack_ci{suffix}")
    return row


ERASES = 0.5  # a run with Acc_E above this does not erase: it is listed, never on the front
LOCAL = 0.97  # the Acc_L a run must keep to be on the cost front (the robustness goal's)
BUDGET = 1.5  # the training cost allowed, in multiples of ESD-x's UNet passes (drawn)
# training settings that do not make two runs different settings: pooled over
UNPOOLED = ("seed", "checkpoint_every", "mask_image_every")


def pooled(rows: list[dict]) -> list[dict]:
    """Runs of one concept that differ only in their training seed, pooled: attacked
    images summed (Wilson 95% interval), the other metrics averaged (Acc_L also its
    lowest)."""
    from statistics import fmean

    from receler.eval.metrics import wilson

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["concept"], r["settings"]), []).append(r)
    out = []
    for (concept, _), runs in groups.items():
        def mean(key, runs=runs):
            vals = [r[key] for r in runs if r[key] is not None]
            return fmean(vals) if vals else None

        first = runs[0]  # its label without the seed (label() set the folder where needed)
        name = first["name"] + (f" ({first['where']})" if "where" in first else "")
        row = {"method": name, "concept": concept,
               "seeds": sorted(r["seed"] for r in runs if r["seed"] is not None),
               "runs": [r["run"] for r in runs],
               **{k: mean(k) for k in ("acc_e", "acc_r", "acc_l", "h", "two_object_locality",
                                       "pixel_change", "feature_change", "unet_passes")},
               "acc_l_min": min((r["acc_l"] for r in runs if r["acc_l"] is not None),
                                default=None)}
        for s in ("", "_3x"):
            if any(r[f"attack{s}"] is None or r[f"attack{s}_n"] is None for r in runs):
                row[f"attack{s}"] = row[f"attack{s}_n"] = row[f"attack{s}_ci"] = None
                continue
            hits = sum(round(r[f"attack{s}"] * r[f"attack{s}_n"]) for r in runs)
            n = sum(r[f"attack{s}_n"] for r in runs)
            w = wilson(hits, n)
            row.update({f"attack{s}": w.rate, f"attack{s}_n": n,
                        f"attack{s}_ci": [w.low, w.high]})
        out.append(row)
    return out


def label(rows: list[dict]) -> None:
    """Where one method has runs of several settings within a concept, or one label
    repeats, each of those runs is named by its folder as well (relative to the folders'
    common parent), so that settings are not mistaken for seeds."""
    import os

    root = Path(os.path.commonpath([os.path.abspath(r["run"]) for r in rows])) \
        if len(rows) > 1 else None

    def where(r):
        run = Path(os.path.abspath(r["run"]))
        return str(run.relative_to(root)) if root and run != root else run.name

    base = [(r["concept"], r["name"]) for r in rows]
    settings = {key: {r["settings"] for r, k in zip(rows, base, strict=True) if k == key}
                for key in set(base)}
    names = [(r["concept"], r["method"]) for r in rows]
    for r, key, name in zip(rows, base, names, strict=True):
        if len(settings[key]) > 1 or names.count(name) > 1:
            r["where"] = where(r)
            r["method"] = f"{r['method']} ({r['where']})"


def mark_front(rows: list[dict], attack: str = "attack") -> None:
    """``on_front``: not dominated in (higher Acc_L, lower attack success) within a concept,
    among the runs that erase (Acc_E ≤ ``ERASES``): a model that keeps the concept keeps
    Acc_L too, and would sit on the front for nothing."""
    for r in rows:
        if r["acc_l"] is None or r[attack] is None or (r["acc_e"] or 0) > ERASES:
            r[f"on_front{attack[6:]}"] = False
            continue
        r[f"on_front{attack[6:]}"] = not any(
            o is not r and o["concept"] == r["concept"] and o["acc_l"] is not None
            and (o["acc_e"] or 0) <= ERASES
            and o[attack] is not None and o["acc_l"] >= r["acc_l"] and o[attack] <= r[attack]
            and (o["acc_l"] > r["acc_l"] or o[attack] < r[attack]) for o in rows)


def fits(r: dict) -> bool:
    """Whether a pooled row is weighed on the cost front: it erases (Acc_E ≤ ``ERASES``),
    keeps Acc_L ≥ ``LOCAL``, and has both its training's passes and the 3× attack."""
    return (r["acc_l"] is not None and r["acc_l"] >= LOCAL and (r["acc_e"] or 0) <= ERASES
            and r["attack_3x"] is not None and r["unet_passes"] is not None)


def mark_cost_front(pool: list[dict]) -> None:
    """``on_cost_front`` of pooled rows: among those that :func:`fits`, no other run of the
    concept takes as few UNet passes or fewer and lets the 3× attack win as rarely or more
    rarely, one of them strictly."""
    for r in pool:
        r["on_cost_front"] = fits(r) and not any(
            o is not r and fits(o) and o["concept"] == r["concept"]
            and o["unet_passes"] <= r["unet_passes"] and o["attack_3x"] <= r["attack_3x"]
            and (o["unet_passes"] < r["unet_passes"] or o["attack_3x"] < r["attack_3x"])
            for o in pool)


def esd_x_runs(pool: list[dict], concept: str) -> list[dict]:
    """ESD-x's pooled runs on the concept."""
    return [p for p in pool if p["concept"] == concept and p["method"].split(" ")[0] == "esd-x"]


def esd_x_passes(pool: list[dict], concept: str) -> float | None:
    """ESD-x's mean UNet passes on the concept (its pooled runs), the cost yardstick."""
    mine = [p["unet_passes"] for p in esd_x_runs(pool, concept) if p["unet_passes"]]
    return sum(mine) / len(mine) if mine else None


def to_markdown(rows: list[dict]) -> str:
    def rate(r, s):
        if r[f"attack{s}"] is None:
            return "–"
        ci = r[f"attack{s}_ci"]
        return (f"{r[f'attack{s}']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] (n {r[f'attack{s}_n']})"
                if ci else f"{r[f'attack{s}']:.2f}")

    def num(v, digits=2):
        return "–" if v is None else f"{v:.{digits}f}"

    lines = ["# Robustness against locality", "",
             "Soft-prompt attack success (pooled over independent attacks, Wilson 95% "
             "interval, n attacked images) against Acc_L. **front**: no other run of the "
             "concept has both higher-or-equal Acc_L and lower-or-equal attack success "
             "(at the evaluation's budget; `3×` at three times it). Runs with Acc_E above "
             f"{ERASES} do not erase and are never on the front. **pixel Δ** / **feature Δ**: "
             "how the other classes' images changed against the base model's, same prompts "
             "and seeds (mean |Δ| of the RGB values, 0-1; mean cosine distance of the toy "
             "detector's features), what Acc_L does not see.", ""]
    for concept in dict.fromkeys(r["concept"] for r in rows):
        lines += [f"## {concept}", "",
                  "| run | Acc_E | Acc_R | Acc_L | pixel Δ | feature Δ | H | attack | attack 3× "
                  "| front | front 3× |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        mine = sorted((r for r in rows if r["concept"] == concept),
                      key=lambda r: (r["attack"] is None, r["attack"] or 0, -(r["acc_l"] or 0)))
        for r in mine:
            lines.append(f"| {r['method']} | {num(r['acc_e'])} | {num(r['acc_r'])} | "
                         f"{num(r['acc_l'])} | {num(r.get('pixel_change'), 3)} | "
                         f"{num(r.get('feature_change'), 4)} | {num(r['h'])} | {rate(r, '')} | "
                         f"{rate(r, '_3x')}"
                         f" | {'yes' if r['on_front'] else ''} | "
                         f"{'yes' if r['on_front_3x'] else ''} |")
        lines.append("")
    pool = pooled(rows)
    if any(len(p["runs"]) > 1 for p in pool):
        lines += ["## Pooled over training seeds", "",
                  "Runs that differ only in their training seed: attacked images summed, the "
                  "other metrics averaged (Acc_L: mean, lowest).", "",
                  "| concept | run | seeds | Acc_E | Acc_R | Acc_L (lowest) | pixel Δ | feature Δ "
                  "| H | two-object | attack | attack 3× |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in sorted(pool, key=lambda p: (p["concept"], p["attack"] is None,
                                             p["attack"] or 0)):
            seeds = ", ".join(map(str, p["seeds"])) or "–"
            lines.append(f"| {p['concept']} | {p['method']} | {seeds} | {num(p['acc_e'])} | "
                         f"{num(p['acc_r'])} | {num(p['acc_l'])} ({num(p['acc_l_min'])}) | "
                         f"{num(p['pixel_change'], 3)} | {num(p['feature_change'], 4)} | "
                         f"{num(p['h'])} | {num(p['two_object_locality'])} | {rate(p, '')} | "
                         f"{rate(p, '_3x')} |")
        lines.append("")
    mark_cost_front(pool)
    lines += ["## The cost of robustness", "",
              f"Pooled runs that erase and keep Acc_L ≥ {LOCAL}: the 3× attack against the "
              "UNet passes of their training (both stages of an exported run; 0 for "
              "closed-form edits). **front**: no such run of the concept is as cheap or "
              f"cheaper and as robust or more, one strictly. **× ESD-x**: passes over "
              f"ESD-x's on the concept (the goal allows {BUDGET}×).", ""]
    for concept in dict.fromkeys(p["concept"] for p in pool):
        esd = esd_x_passes(pool, concept)
        fit = sorted((p for p in pool if p["concept"] == concept and fits(p)),
                     key=lambda p: p["unet_passes"])
        if not fit:
            continue
        lines += [f"### {concept}", ""]
        esd_runs = esd_x_runs(pool, concept)
        if esd and all((p["acc_e"] or 0) > ERASES for p in esd_runs):
            worst = min(p["acc_e"] for p in esd_runs)
            lines += [f"ESD-x does not erase {concept} (Acc_E {worst:.2f}): × ESD-x compares "
                      "with the cost of its training, not with the cost of an erasure.", ""]
        lines += ["| run | seeds | UNet passes | × ESD-x | Acc_L | attack 3× | front |",
                  "|---|---|---|---|---|---|---|"]
        for p in fit:
            times = f"{p['unet_passes'] / esd:.2f}" if esd else "–"
            lines.append(f"| {p['method']} | {', '.join(map(str, p['seeds'])) or '–'} | "
                         f"{p['unet_passes']:,.0f} | {times} | {num(p['acc_l'])} | "
                         f"{rate(p, '_3x')} | {'yes' if p['on_cost_front'] else ''} |")
        lines.append("")
    return "\n".join(lines)


def rate_axes(d, box: tuple[int, int, int, int], lo: float, hi: float, fmt: str):
    """Grid lines and labels of a plot with a rate (0-1) up and ``lo``..``hi`` across, in
    ``box`` (x0, y0, x1, y1); returns the two maps from values to pixels."""
    x0, y0, x1, y1 = box

    def x(v):
        return x0 + (x1 - x0) * (v - lo) / (hi - lo)

    def y(v):
        return y1 - (y1 - y0) * v

    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.line((x0, y(v), x1, y(v)), fill=(225, 225, 225))
        d.text((x0 - 34, y(v) - 6), f"{v:.2f}", fill="black")
    for i in range(5):
        v = lo + (hi - lo) * i / 4
        d.text((x(v) - 12, y1 + 6), fmt.format(v), fill="black")
    return x, y


def panel(size: tuple[int, int], title: str):
    """A white picture with the plot's frame (room for the legend on the right) and its
    title; returns the picture, its drawing context and the frame (x0, y0, x1, y1)."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    box = (60, 30, w - 290, h - 50)
    d.rectangle(box, outline="black")
    d.text((box[0], 8), title, fill="black")
    return img, d, box


def to_picture(rows: list[dict], concept: str, size: tuple[int, int] = (760, 460)
               ) -> Image.Image:
    """Acc_L across (its range, padded), attack success up (0-1); filled dots at the
    evaluation's budget, hollow at 3×, joined per run; intervals as bars."""
    mine = [r for r in rows if r["concept"] == concept and r["acc_l"] is not None
            and r["attack"] is not None]
    img, d, (x0, y0, x1, y1) = panel(size, f"{concept}: attack success (filled: eval "
                                           "budget, hollow: 3x) against Acc_L")
    lo = min([r["acc_l"] for r in mine] + [0.9]) - 0.02
    x, y = rate_axes(d, (x0, y0, x1, y1), lo, 1.0 + 0.01, "{:.2f}")
    d.text(((x0 + x1) // 2 - 20, y1 + 24), "Acc_L", fill="black")
    for i, r in enumerate(mine):
        col = COLOURS[i % len(COLOURS)]
        px = x(r["acc_l"]) + (i - len(mine) / 2) * 1.5  # keep equal Acc_L apart
        for s, filled in (("", True), ("_3x", False)):
            if r[f"attack{s}"] is None:
                continue
            py = y(r[f"attack{s}"])
            if r[f"attack{s}_ci"]:
                d.line((px, y(r[f"attack{s}_ci"][0]), px, y(r[f"attack{s}_ci"][1])), fill=col)
            box = (px - 4, py - 4, px + 4, py + 4)
            d.ellipse(box, fill=col if filled else None, outline=col, width=2)
            if r[f"on_front{s}"]:
                d.ellipse((px - 7, py - 7, px + 7, py + 7), outline="black")
        if r["attack_3x"] is not None:
            d.line((px, y(r["attack"]), px, y(r["attack_3x"])), fill=col)
        d.rectangle((x1 + 12, y0 + 18 * i + 3, x1 + 22, y0 + 18 * i + 13), fill=col)
        d.text((x1 + 28, y0 + 18 * i), r["method"][:42], fill="black")
    return img


def cost_picture(pool: list[dict], concept: str, size: tuple[int, int] = (760, 460)
                 ) -> Image.Image:
    """UNet passes across, the 3× attack up (0-1, intervals as bars), for the pooled runs
    that erase and keep Acc_L ≥ ``LOCAL``; the cost front ringed, and a dashed line at
    ``BUDGET``× ESD-x's passes."""
    mine = [p for p in pool if p["concept"] == concept and fits(p)]
    img, d, (x0, y0, x1, y1) = panel(size, f"{concept}: attack success at 3x budget against "
                                           f"training UNet passes (Acc_L >= {LOCAL})")
    esd = esd_x_passes(pool, concept)
    hi = max([p["unet_passes"] for p in mine] + [BUDGET * (esd or 0), 1.0]) * 1.05
    x, y = rate_axes(d, (x0, y0, x1, y1), 0.0, hi, "{:,.0f}")
    d.text(((x0 + x1) // 2 - 30, y1 + 24), "UNet passes", fill="black")
    if esd:
        for yy in range(y0, y1, 8):
            d.line((x(BUDGET * esd), yy, x(BUDGET * esd), yy + 4), fill=(120, 120, 120))
        d.text((x(BUDGET * esd) + 3, y0 + 3), f"{BUDGET}x ESD-x", fill=(120, 120, 120))
    for i, p in enumerate(mine):
        col = COLOURS[i % len(COLOURS)]
        px, py = x(p["unet_passes"]), y(p["attack_3x"])
        if p["attack_3x_ci"]:
            d.line((px, y(p["attack_3x_ci"][0]), px, y(p["attack_3x_ci"][1])), fill=col)
        d.ellipse((px - 4, py - 4, px + 4, py + 4), fill=col)
        if p.get("on_cost_front"):
            d.ellipse((px - 7, py - 7, px + 7, py + 7), outline="black")
        d.rectangle((x1 + 12, y0 + 18 * i + 3, x1 + 22, y0 + 18 * i + 13), fill=col)
        d.text((x1 + 28, y0 + 18 * i), p["method"][:42], fill="black")
    return img


def write(rows: list[dict], out: Path) -> list[Path]:
    from receler.serialization import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "pareto.json", out / "pareto.md", out / "pooled.json"]
    text = json.dumps(rows, indent=2) + "\n"
    atomic_write(paths[0], lambda tmp: tmp.write_text(text))
    pool = pooled(rows)
    mark_cost_front(pool)
    text_pool = json.dumps(pool, indent=2) + "\n"
    atomic_write(paths[2], lambda tmp: tmp.write_text(text_pool))
    md = to_markdown(rows) + "\n"
    atomic_write(paths[1], lambda tmp: tmp.write_text(md))
    for concept in dict.fromkeys(r["concept"] for r in rows):
        p = out / f"pareto_{concept}.png"
        atomic_write(p, lambda tmp, c=concept: to_picture(rows, c).save(tmp, "PNG"))
        paths.append(p)
        if any(q["concept"] == concept and q["on_cost_front"] for q in pool):
            p = out / f"cost_{concept}.png"
            atomic_write(p, lambda tmp, c=concept: cost_picture(pool, c).save(tmp, "PNG"))
            paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="`receler protocol` run folders")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pareto")
    args = ap.parse_args(argv)
    from receler.eval.locality import run_image_change
    from receler.runs import read_results

    rows, features = [], {}
    first: dict[Path, Path] = {}  # a folder named twice (or by two paths): counted once
    for run in args.runs:
        first.setdefault(run.resolve(), run)
    if len(first) < len(args.runs):
        print(f"{len(args.runs) - len(first)} folder(s) named twice, counted once",
              file=sys.stderr)
    for run in first.values():
        if not (run / "results.json").is_file():
            print(f"skipped {run}: no results.json", file=sys.stderr)
            continue
        try:
            res = read_results(run)
            rows.append(row_of(run, res))
            if rows[-1]["pixel_change"] is None and \
                    (change := run_image_change(run, res, features)):
                rows[-1]["pixel_change"], rows[-1]["feature_change"] = change["pixel"], \
                    change["feature"]
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if not rows:
        print("error: none of the folders holds a finished run (results.json): pass "
              "`receler protocol --out` folders", file=sys.stderr)
        return 2
    label(rows)
    mark_front(rows)
    mark_front(rows, "attack_3x")
    for p in write(rows, args.out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
