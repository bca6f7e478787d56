"""A one-page Markdown report of a protocol run, with its pictures as PNG files beside it."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from .viz import image_grid, loss_curves

METRICS = [("acc_e", "Acc_E ↓"), ("acc_r", "Acc_R ↓"), ("acc_l", "Acc_L ↑"), ("h", "H ↑"),
           ("two_object_locality", "two-object locality ↑"),
           ("attack_success_plain", "concept prompt ↓"),
           ("attack_success_soft", "soft-prompt attack ↓"),
           ("attack_success_discrete", "token attack ↓")]


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _ci(rate: dict | None) -> str:
    if not rate:
        return "–"
    return f"{100 * rate['rate']:.1f}% [{100 * rate['low']:.1f}, {100 * rate['high']:.1f}]"


def metrics_table(results: dict) -> str:
    lines = ["| model | " + " | ".join(label for _, label in METRICS) + " |",
             "|---" * (len(METRICS) + 1) + "|"]
    for name, r in (("base", results["base"]), (results["method"], results)):
        lines.append(f"| {name} | " + " | ".join(_pct(r.get(k)) for k, _ in METRICS) + " |")
    return "\n".join(lines)


def soft_attack_line(results: dict) -> str | None:
    """The pooled soft-prompt attack with its count and Wilson interval, base and erased."""
    parts = []
    for name, r in (("base", results["base"]), (results["method"], results)):
        a = r.get("attack") or {}
        if r.get("attack_n") is None:
            continue
        k = len(a.get("soft_attacks", []))
        cells = [f"{_pct(r[f'attack_success_soft{s}'])} [{100 * r[f'attack_ci{s}'][0]:.1f}, "
                 f"{100 * r[f'attack_ci{s}'][1]:.1f}] at {a.get(f'soft_steps{s}')} steps"
                 for s in ("", "_3x") if r.get(f"attack_ci{s}")]
        parts.append(f"* {name}: {'; '.join(cells)} (n = {r['attack_n']} images from {k} "
                     "attacks, 95% Wilson intervals)")
    return "\n".join(parts) or None


def per_class_table(results: dict) -> str:
    base = {c["class_name"]: c["rate"] for c in results["base"]["metrics"]["per_class"]}
    erased = {c["class_name"]: c["rate"] for c in results["metrics"]["per_class"]}
    lines = ["| class | base (95% CI) | erased (95% CI) |", "|---|---|---|"]
    for cls in base:
        mark = " (erased)" if cls == results["concept"] else ""
        lines.append(f"| {cls}{mark} | {_ci(base[cls])} | {_ci(erased.get(cls))} |")
    return "\n".join(lines)


def _label(set_name: str, row) -> str:
    """A short column label: the class, the paraphrase's noun, the pair, the styled class."""
    if set_name == "paraphrase":
        return row.prompt.split()[-1]
    if set_name == "two_object":
        return f"{row.class_name}+{row.extra.get('class2', '')}"
    if set_name == "style":
        return f"{row.extra.get('style') or 'plain'} {row.class_name}"
    return row.class_name or row.prompt[:12]


def compare_grid(out: Path, results: dict, rows: dict, n_per_set: int = 6) -> Path | None:
    """Base above erased, same prompts and seeds, for the concept's sets and other classes."""
    images, labels = {"base": [], "erased": []}, []
    concept = results["concept"]
    roots = {"base": Path(results.get("base_images", out / "images" / "base")),
             "erased": out / "images" / "erased"}
    for set_name in ("simple", "paraphrase", "style", "two_object"):
        by_case = {r.case_number: r for r in rows.get(set_name, [])}
        files = sorted((roots["erased"] / set_name).glob("*_0.png"),
                       key=lambda p: int(p.stem.split("_")[0]))
        chosen = [(f, by_case[int(f.stem.split("_")[0])]) for f in files]
        if set_name == "simple":  # the concept and a few other classes
            chosen = [c for c in chosen if c[1].class_name == concept][:2] + \
                [c for c in chosen if c[1].class_name != concept][::10][:4]
        for f, row in chosen[:n_per_set]:
            for which in images:
                images[which].append(Image.open(roots[which] / set_name / f.name))
            labels.append(_label(set_name, row))
    if not labels:
        return None
    scale = max(1, 96 // images["base"][0].size[0])
    grid = image_grid(images["base"] + images["erased"], cols=len(labels), scale=scale,
                      row_labels=["base", "erased"], col_labels=labels)
    path = out / "report" / "compare.png"
    grid.save(path)
    return path


def mask_strip(out: Path, limit: int = 4) -> Path | None:
    masks = sorted((out / "erasers" / "masks").glob("*.png"))
    if not masks:
        return None
    step = max(1, len(masks) // limit)
    chosen = [Image.open(p) for p in masks[::step][:limit]]
    path = out / "report" / "masks.png"
    image_grid(chosen, cols=1).save(path)
    return path


def write_report(out: Path, results: dict, rows: dict | None = None) -> Path:
    """Write ``out/report/report.md`` and its pictures; returns the Markdown path.

    Args:
        out: the protocol's run folder (images/, erasers/, attack/ inside).
        results: what goes into results.json.
        rows: the prompt rows of each set, for the base-vs-erased grid.
    """
    out = Path(out)
    (out / "report").mkdir(parents=True, exist_ok=True)
    parts = [f"# Erasing “{results['concept']}” with {results['method']}",
             f"Model `{results['model']}`, detector `{results['detector']}`. Rates are detection "
             "rates of the concept (↓ better) or of the prompted classes (↑ better).",
             "## Metrics", metrics_table(results),
             *([f"Skipped stages (their numbers are null): {', '.join(results['skipped'])}."]
               if results.get("skipped") else []),
             *(["Soft-prompt attack success, pooled over independent attacks:\n\n" + line]
               if (line := soft_attack_line(results)) else []),
             "## Per class (simple prompts)", per_class_table(results)]
    grid = compare_grid(out, results, rows) if rows else None
    if grid:
        parts += ["## Base vs erased, same prompts and seeds", f"![compare]({grid.name})"]
    log = out / "erasers" / "train_log.jsonl"
    if log.is_file():
        loss_curves(log, out / "report" / "loss_curves.png")
        parts += ["## Training losses", "![losses](loss_curves.png)"]
    strip = mask_strip(out)
    if strip:
        parts += ["## Concept masks used by the regulariser", f"![masks]({strip.name})"]
    for which in ("base", "erased"):
        a = (results if which == "erased" else results["base"]).get("attack")
        pic = Path(a.get("grid", out / "attack" / f"{which}.png")) if a else None
        if pic is not None and pic.is_file():
            rel = os.path.relpath(pic, out / "report")
            parts += [f"## Attacks on the {which} model",
                      f"Rows: the concept prompt `{a['prompt']}`"
                      + (", the soft-prompt attack" if a.get("success_soft") is not None
                         and "soft_attacks" not in a else "")
                      + f", the token attack `{a['discrete_prompt']}`.", f"![attack]({rel})"]
    path = out / "report" / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path
