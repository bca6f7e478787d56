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


def per_class_table(results: dict) -> str:
    base = {c["class_name"]: c["rate"] for c in results["base"]["metrics"]["per_class"]}
    erased = {c["class_name"]: c["rate"] for c in results["metrics"]["per_class"]}
    lines = ["| class | base (95% CI) | erased (95% CI) |", "|---|---|---|"]
    for cls in base:
        mark = " (erased)" if cls == results["concept"] else ""
        lines.append(f"| {cls}{mark} | {_ci(base[cls])} | {_ci(erased.get(cls))} |")
    return "\n".join(lines)


def compare_grid(out: Path, results: dict, rows: dict, n_per_set: int = 6) -> Path | None:
    """Base above erased, same prompts and seeds, for the concept's sets and other classes."""
    images, labels = {"base": [], "erased": []}, []
    concept = results["concept"]
    for set_name in ("simple", "paraphrase", "style", "two_object"):
        folder = out / "images" / "erased" / set_name
        files = sorted(folder.glob("*_0.png"), key=lambda p: int(p.stem.split("_")[0]))
        if not files:
            continue
        if set_name == "simple":  # the concept and a few other classes
            cls = {r.case_number: r.class_name for r in rows["simple"]}
            of = [cls[int(f.stem.split("_")[0])] for f in files]
            files = [f for f, c in zip(files, of, strict=True) if c == concept][:2] + \
                [f for f, c in zip(files, of, strict=True) if c != concept][::10][:4]
        for f in files[:n_per_set]:
            for which in images:
                root = Path(results.get("base_images", out / "images" / "base")) \
                    if which == "base" else out / "images" / "erased"
                images[which].append(Image.open(root / set_name / f.name))
            labels.append(set_name)
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
                      f"Rows: the concept prompt `{a['prompt']}`, the soft-prompt attack, the "
                      f"token attack `{a['discrete_prompt']}`.", f"![attack]({rel})"]
    path = out / "report" / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path
