"""``receler leaderboard``: many protocol runs in one table and one picture.

Runs are comparable only when they were measured the same way: the same base model,
concept, detector, prompt sets, counts, attack settings and sampler. The first run is the
reference; any other run that differs in one of these is refused with the first
difference named, so a table never mixes, say, a 30-step attack with a 100-step one. The
erasure method and its training settings are what may differ, and so may where the
erased model came from: trained by the protocol, or made elsewhere (``--erasers``,
``--unet``, ``--text-encoder``, ``--lora``). Stages a run skipped show as "–".

The picture plots H against the soft-prompt attack success, one point per run, with the
attack's Wilson 95% interval as a horizontal bar. Lower right is worse, upper left better.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .serialization import atomic_write

# ProtocolConfig fields that are the method's own (or bookkeeping), not the measurement's
_METHOD_FIELDS = {"method", "train", "out", "device", "dtype", "base_dir", "erasers", "unet",
                  "text_encoder", "lora", "name", "skip", "deterministic"}
_COMPARED = ("model", "concept", "detector", "rows")
SCHEMA_VERSION = 1  # the newest results.json this receler reads


def read_run(path: str | Path) -> dict[str, Any]:
    """``results.json`` of a protocol run folder (or the file itself), checked."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no results.json in {path}: pass the --out folder of a "
                                "finished `receler protocol` run")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {file}: {e}; run the protocol again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} is not a protocol result (not a JSON object)")
    if data.get("schema_version", 0) > SCHEMA_VERSION:
        raise ValueError(f"{file} has schema_version {data['schema_version']}, newer than this "
                         f"receler reads ({SCHEMA_VERSION}): upgrade receler")
    missing = [k for k in ("method", "h", "acc_e", "acc_l", "attack_success_soft", "config")
               if k not in data]
    if missing:
        raise ValueError(f"{file} has no {missing[0]!r}: it is not a protocol result, or one "
                         "written by an older receler; run the protocol again")
    data["_path"] = str(file)
    return data


def measurement(run: dict, *, images: bool = True) -> dict[str, Any]:
    """What must agree between runs: the measurement, without the method. With ``images``,
    also the base images' sampler and the digests of their prompts and seeds."""
    config = {k: v for k, v in run["config"].items() if k not in _METHOD_FIELDS}
    out = {**{k: run.get(k) for k in _COMPARED}, **config}
    key = run.get("base_key")
    if images and key:
        out["base_images"] = {"sampler": key.get("sampler"), "prompts": key.get("prompts")}
    return out


def first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    """The first key (dotted) whose values differ, with both values; ``None`` if equal."""
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            inner = first_difference(va, vb, f"{prefix}{key}.")
            if inner:
                return inner
        elif va != vb:
            return f"{prefix}{key}: {va!r} against {vb!r}"
    return None


def _interval(rate: Any) -> list[float] | None:
    if isinstance(rate, dict) and "low" in rate:
        return [rate["low"], rate["high"]]
    return None


def row(run: dict, label: str) -> dict[str, Any]:
    detail = run.get("metrics", {}).get("detail", {})
    train = run.get("train") or {}
    return {"label": label, "method": run["method"], "concept": run.get("concept"),
            "kind": (run.get("candidate") or {}).get("kind", "erase"),
            "acc_e": run["acc_e"], "acc_e_ci": _interval(detail.get("acc_e")),
            "acc_r": run.get("acc_r"), "acc_r_ci": _interval(detail.get("acc_r")),
            "acc_l": run["acc_l"], "acc_l_ci": _interval(detail.get("acc_l")), "h": run["h"],
            "attack_success_soft": run["attack_success_soft"], "attack_n": run.get("attack_n"),
            "attack_ci": run.get("attack_ci"),
            "attack_success_soft_3x": run.get("attack_success_soft_3x"),
            "attack_ci_3x": run.get("attack_ci_3x"),
            # forward plus backward passes through the UNet spent erasing
            "unet_passes": (train.get("unet_forward", 0) + train.get("unet_backward", 0)
                            if train else None),
            "train_seconds": train.get("seconds"), "path": run["_path"]}


def build(paths: list[str | Path], labels: list[str] | None = None) -> dict[str, Any]:
    """The leaderboard of ``paths``, refusing runs measured differently."""
    if not paths:
        raise ValueError("leaderboard needs at least one run folder")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs: give one --label per run")
    runs = [read_run(p) for p in paths]
    images = all(r.get("base_key") for r in runs)  # runs of older receler versions lack it
    ref = measurement(runs[0], images=images)
    for path, run in zip(paths[1:], runs[1:], strict=True):
        diff = first_difference(ref, measurement(run, images=images))
        if diff:
            raise ValueError(f"{path} was measured differently from {paths[0]} ({diff}): "
                             "compare runs of one protocol setting only")
    names = labels or [r.get("name") or r["method"] for r in runs]
    if len(set(names)) < len(names):  # the same method twice: tell the runs apart
        names = [f"{n} ({Path(p).name})" for n, p in zip(names, paths, strict=True)]
    rows = [row(r, n) for r, n in zip(runs, names, strict=True)]
    rows.sort(key=lambda r: (-(r["h"] if r["h"] is not None else -1),
                             2 if r["attack_success_soft"] is None else r["attack_success_soft"]))
    return {"measurement": ref, "rows": rows}


def _cell(value, ci=None) -> str:
    if value is None:
        return "–"
    text = f"{value:.3f}"
    return f"{text} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else text


def to_markdown(board: dict) -> str:
    m = board["measurement"]
    lines = [f"# Leaderboard: {m.get('concept')} on {m.get('model') or 'the toy model'}", "",
             f"Detector {m.get('detector')}; every run measured with the same prompts, seeds "
             "and attack. Rates with their Wilson 95% interval; UNet passes are the forward "
             "plus backward passes spent erasing; – is a stage the run skipped or has none.", "",
             "| method | H | Acc_E | Acc_R | Acc_L | soft attack (n) | attack, 3× steps | "
             "UNet passes |", "|---|---|---|---|---|---|---|---|"]
    for r in board["rows"]:
        n = f" ({r['attack_n']})" if r["attack_n"] else ""
        lines.append(
            f"| {r['label']} | {_cell(r['h'])} | {_cell(r['acc_e'], r['acc_e_ci'])} | "
            f"{_cell(r['acc_r'], r['acc_r_ci'])} | {_cell(r['acc_l'], r['acc_l_ci'])} | "
            f"{_cell(r['attack_success_soft'], r['attack_ci'])}{n} | "
            f"{_cell(r['attack_success_soft_3x'], r['attack_ci_3x'])} | "
            f"{r['unet_passes'] if r['unet_passes'] is not None else '–'} |")
    return "\n".join(lines) + "\n"


def to_picture(board: dict, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """H (y) against soft-attack success (x), with the attack's 95% interval."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = 60, 30, w - 20, h - 50
    d.rectangle((x0, y0, x1, y1), outline="black")
    rows = [r for r in board["rows"]  # a run that skipped the attack has no point
            if r["h"] is not None and r["attack_success_soft"] is not None]
    lo_h = min([r["h"] for r in rows] + [1.0])
    lo_h = max(0.0, min(lo_h - 0.05, 0.9))

    def pt(a, hv):
        return x0 + (x1 - x0) * a, y1 - (y1 - y0) * (hv - lo_h) / (1 - lo_h)

    for i in range(6):
        a = i / 5
        d.text((pt(a, lo_h)[0] - 8, y1 + 4), f"{a:.1f}", fill="black")
        hv = lo_h + (1 - lo_h) * i / 5
        d.text((8, pt(0, hv)[1] - 6), f"{hv:.2f}", fill="black")
    d.text(((x0 + x1) // 2 - 110, h - 24), "soft-prompt attack success (lower is better)",
           fill="black")
    d.text((x0, 8), "H (higher is better), one point per run, bar = 95% interval", fill="black")
    palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
               (23, 190, 207), (140, 86, 75), (227, 119, 194)]
    for i, r in enumerate(rows):
        colour = palette[i % len(palette)]
        x, y = pt(r["attack_success_soft"], r["h"])
        if r["attack_ci"]:
            d.line([pt(r["attack_ci"][0], r["h"]), pt(r["attack_ci"][1], r["h"])], fill=colour,
                   width=2)
        d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
        d.text((x + 6, y - 14), r["label"], fill=colour)
    return img


def write(board: dict, out: Path, *, overwrite: bool = False) -> list[Path]:
    """``leaderboard.json``, ``.md`` and ``.png`` in ``out``, each written atomically."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
    paths = [out / f"leaderboard.{ext}" for ext in ("json", "md", "png")]
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists: pass --overwrite or another --out")
    atomic_write(paths[0], lambda t: t.write_text(json.dumps(board, indent=2) + "\n"))
    atomic_write(paths[1], lambda t: t.write_text(to_markdown(board)))
    atomic_write(paths[2], lambda t: to_picture(board).save(t, format="PNG"))
    return paths
