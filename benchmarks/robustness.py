"""Robustness curves: soft-prompt attack success against the attacker's steps and tokens.

For every finished protocol run given (``receler protocol --out RUN``, any method), the
same pooled attack suite as the protocol's (``--attack-prompts`` independent attacks, each
from its own prompt of the concept and with its own seed, ``--attack-images`` images each)
is measured after 0, 10, 30, 100 and 300 steps, and at 100 steps with 1, 4, 8 and 16 soft
tokens. One optimisation per attack measures every step budget (Adam has no schedule), and
every attack is cached under the run's ``attack/soft`` folder with the protocol's own key,
so the budgets the protocol measured are not run again and a killed run resumes. The base
model is measured once per concept (cached in the protocol's base folder).

    python benchmarks/robustness.py RUN [RUN ...] --out benchmarks/results/robustness

writes ``robustness.json`` (one row per run, tokens and steps, with ``successes``, ``n``,
``rate`` and its Wilson 95% interval ``low``/``high``), ``robustness_pooled.json`` (runs
that differ only in their training seed pooled: attacked images summed), ``robustness.md``
and ``robustness_<concept>.png`` (pooled success against steps, one line per method,
intervals as bars). Runs are labelled as ``benchmarks/pareto.py`` labels them: method and
training seed, and the folder where a method has runs of several settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import pareto  # noqa: E402 - a sibling script: one way of labelling and pooling runs

STEPS = [0, 10, 30, 100, 300]
TOKENS = [1, 4, 8, 16]
TOKEN_STEPS = 100
BASE = "base (no erasure)"
COLOURS = pareto.COLOURS


def label_of(run: Path, results: dict) -> str:
    """The run's method, or its folder name when that says more (variants, seeds)."""
    return run.name if run.name not in (results["method"], "erasers") else results["method"]


def measure_run(run: Path, steps: list[int], tokens: list[int], token_steps: int,
                include_base: bool) -> list[dict]:
    """The curves of one finished protocol run (and of its base model)."""
    from receler import load_pipeline
    from receler.attack import target_latents
    from receler.attack_suite import attack_plan, soft_attack_suite, suite_key
    from receler.eval.detectors import get_detector
    from receler.protocol import Protocol
    from receler.runs import protocol_config, read_results
    from receler.sampling import SamplerSettings

    res = read_results(run)
    c = res["config"]
    cfg = protocol_config(res, run)
    proto = Protocol(cfg, show_progress=False)
    settings = SamplerSettings.for_model(proto.model)
    if cfg.sample_steps is not None:  # the run's own sampler steps
        settings = replace(settings, steps=cfg.sample_steps)
    detector = get_detector(cfg.detector)
    pipe = load_pipeline(proto.model, device=c["device"], dtype=c["dtype"])
    # what the run measured: its erasers or edit, its merged export (not the erasers it was
    # merged from, whose cached budgets would otherwise be mixed with the export's), or a
    # candidate made elsewhere
    candidate = proto.candidate or proto.finished_candidate()
    if candidate is None:
        raise ValueError(f"{run}: its training has not finished; finish the protocol run first")
    candidate.apply(pipe)
    latents = target_latents(pipe, proto.concept_prompt(), cfg.attack.target_images,
                             steps=settings.steps, guidance=settings.guidance,
                             seed=cfg.attack.seed, base=lambda: candidate.base(pipe))
    prompt = cfg.attack_prompt or proto.concept_prompt()
    plan = attack_plan(proto.rows, cfg.concept, cfg.attack_prompts, first=prompt,
                       seed=cfg.attack.seed)
    label = label_of(run, res)
    rows = []
    for which in (["base"] if include_base else []) + ["erased"]:
        cache = (proto.folder("base") / "soft_attacks" if which == "base"
                 else run / "attack" / "soft")
        budgets = {t: ([token_steps] if t != cfg.attack.tokens else []) for t in tokens}
        budgets[cfg.attack.tokens] = sorted(set(steps) | {token_steps})
        for t, checkpoints in budgets.items():
            key = suite_key(which, cfg.detector, proto.concept_prompt(), settings)
            with (candidate.base(pipe) if which == "base" else nullcontext()):
                suite = soft_attack_suite(pipe, cfg.concept, plan, latents, detector, settings,
                                          replace(cfg.attack, tokens=t), checkpoints=checkpoints,
                                          n_images=cfg.attack_images, key=key, cache_dir=cache)
            for s in checkpoints:
                rate = suite["pooled"][str(s)]
                rows.append({"method": BASE if which == "base" else label,
                             "concept": cfg.concept, "run": str(run), "tokens": t, "steps": s,
                             "attacks": len(plan), "successes": rate["successes"],
                             "n": rate["total"], "rate": rate["rate"], "low": rate["low"],
                             "high": rate["high"]})
    return rows


def name_runs(rows: list[dict], results: dict[str, dict]) -> None:
    """Label each run's rows as ``benchmarks/pareto.py`` labels the run (method and training
    seed; the folder where a method has runs of several settings) and keep what pooling
    needs: ``name``, ``seed`` and ``settings`` (runs differing only in the seed share it)."""
    runs = list(dict.fromkeys(r["run"] for r in rows if r["method"] != BASE))
    points = [pareto.row_of(Path(run), results[run]) for run in runs]
    pareto.label(points)
    by_run = {p["run"]: p for p in points}
    for r in rows:
        if r["method"] != BASE:
            p = by_run[r["run"]]
            r.update(method=p["method"], seed=p["seed"], settings=p["settings"],
                     name=p["name"] + (f" ({p['where']})" if "where" in p else ""))


def pooled(rows: list[dict]) -> list[dict]:
    """Runs of one concept that differ only in their training seed, pooled per tokens and
    steps: attacked images summed, Wilson 95% interval. A run alone stays as it is, named
    without its seed; the base model's rows are kept."""
    from receler.eval.metrics import wilson

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        who = r.get("settings") if r["method"] != BASE and "settings" in r else \
            f"{r['method']}|{r['run']}"
        groups.setdefault((r["concept"], who, r["tokens"], r["steps"]), []).append(r)
    out = []
    for (concept, _, tokens, steps), runs in groups.items():
        first = runs[0]
        if len(runs) == 1 and first["method"] == BASE:
            out.append(dict(first))
            continue
        seeds = sorted(r["seed"] for r in runs if r.get("seed") is not None)
        hits, n = sum(r["successes"] for r in runs), sum(r["n"] for r in runs)
        w = wilson(hits, n)
        name = first.get("name", first["method"])
        if len(seeds) > 1:
            name += " (seeds " + ", ".join(map(str, seeds)) + ")"
        out.append({"method": name, "concept": concept, "runs": [r["run"] for r in runs],
                    "seeds": seeds, "tokens": tokens, "steps": steps,
                    "attacks": sum(r["attacks"] for r in runs), "successes": hits, "n": n,
                    "rate": w.rate, "low": w.low, "high": w.high})
    return out


def to_markdown(rows: list[dict], default_tokens: int, token_steps: int = TOKEN_STEPS,
                pool: list[dict] | None = None) -> str:
    """The curves as tables; ``pool`` is ``pooled(rows)`` when the caller has it already."""
    def cell(r):
        return f"{r['rate']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"

    def table(title: str, key: str, values: list[int], sel: list[dict]) -> list[str]:
        """One row per method, one column per value of ``key`` (steps or tokens)."""
        out = [f"## {title}", "", "| method | n per cell | "
               + " | ".join(f"{v} {key}" for v in values) + " |",
               "|---|---|" + "---|" * len(values)]
        for m in dict.fromkeys(r["method"] for r in sel):
            by = {r[key]: r for r in sel if r["method"] == m}
            ns = sorted({r["n"] for r in by.values()})
            out.append(f"| {m} | {', '.join(map(str, ns))} | "
                       + " | ".join(cell(by[v]) if v in by else "–" for v in values) + " |")
        return out

    pool = pooled(rows) if pool is None else pool
    lines = ["# Soft-prompt attack success against the attacker's strength", "",
             "Pooled over independent attacks (own prompt and seed each) and, where a method "
             "has runs that differ only in the training seed, over those runs; each cell is "
             "the rate with its Wilson 95% interval, out of n attacked images.", ""]
    for concept in dict.fromkeys(r["concept"] for r in rows):
        mine = [r for r in pool if r["concept"] == concept]
        steps = sorted({r["steps"] for r in mine if r["tokens"] == default_tokens})
        tokens = sorted({r["tokens"] for r in mine if r["steps"] == token_steps})
        lines += table(f"{concept}: against steps ({default_tokens} tokens)", "steps", steps,
                       [r for r in mine if r["tokens"] == default_tokens])
        lines += [""] + table(f"{concept}: against tokens ({token_steps} steps)", "tokens",
                              tokens, [r for r in mine if r["steps"] == token_steps])
        runs = [r for r in rows if r["concept"] == concept and r["tokens"] == default_tokens]
        if any(len(r.get("runs", ())) > 1 for r in mine):  # some runs pooled: each one too
            lines += [""] + table(f"{concept}: each run, against steps ({default_tokens} "
                                  "tokens)", "steps", steps, runs)
        lines.append("")
    return "\n".join(lines)


def to_picture(rows: list[dict], concept: str, default_tokens: int,
               size: tuple[int, int] = (720, 440), pool: list[dict] | None = None) -> Image.Image:
    """Attack success (0-1) against steps on a log-like axis, one line per method (runs
    pooled over training seeds), 95% intervals as vertical bars; ``pool`` is
    ``pooled(rows)`` when the caller has it already."""
    mine = [r for r in (pooled(rows) if pool is None else pool) if r["concept"] == concept
            and r["tokens"] == default_tokens]
    steps = sorted({r["steps"] for r in mine})
    methods = list(dict.fromkeys(r["method"] for r in mine))
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = 60, 30, w - 270, h - 50
    d.rectangle((x0, y0, x1, y1), outline="black")
    d.text((x0, 8), f"{concept}: soft-prompt attack success against attack steps "
                    f"({default_tokens} tokens)", fill="black")
    xs = {s: x0 + (x1 - x0) * i / max(len(steps) - 1, 1) for i, s in enumerate(steps)}

    def y(v):
        return y1 - (y1 - y0) * v

    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.line((x0, y(v), x1, y(v)), fill=(225, 225, 225))
        d.text((x0 - 34, y(v) - 6), f"{v:.2f}", fill="black")
    for s, x in xs.items():
        d.text((x - 8, y1 + 6), str(s), fill="black")
    d.text(((x0 + x1) // 2 - 30, y1 + 24), "attack steps", fill="black")
    for i, m in enumerate(methods):
        col = COLOURS[i % len(COLOURS)]
        pts = sorted((r for r in mine if r["method"] == m), key=lambda r: r["steps"])
        off = (i - len(methods) / 2) * 3  # keep overlapping bars apart
        line = [(xs[r["steps"]] + off, y(r["rate"])) for r in pts]
        if len(line) > 1:
            d.line(line, fill=col, width=2)
        for r in pts:
            x = xs[r["steps"]] + off
            d.line((x, y(r["low"]), x, y(r["high"])), fill=col, width=1)
            d.ellipse((x - 3, y(r["rate"]) - 3, x + 3, y(r["rate"]) + 3), fill=col)
        d.rectangle((x1 + 12, y0 + 18 * i + 3, x1 + 22, y0 + 18 * i + 13), fill=col)
        d.text((x1 + 28, y0 + 18 * i), m[:38], fill="black")
    return img


def write(rows: list[dict], out: Path, default_tokens: int, token_steps: int = TOKEN_STEPS
          ) -> list[Path]:
    from receler.serialization import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    pool = pooled(rows)
    paths = [out / "robustness.json", out / "robustness_pooled.json", out / "robustness.md"]
    for path, data in zip(paths[:2], (rows, pool), strict=True):
        text = json.dumps(data, indent=2) + "\n"
        atomic_write(path, lambda tmp, text=text: tmp.write_text(text))
    md = to_markdown(rows, default_tokens, token_steps, pool=pool) + "\n"
    atomic_write(paths[2], lambda tmp: tmp.write_text(md))
    for concept in dict.fromkeys(r["concept"] for r in rows):
        p = out / f"robustness_{concept}.png"
        atomic_write(p, lambda tmp, c=concept: to_picture(rows, c, default_tokens, pool=pool)
                     .save(tmp, "PNG"))
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished `receler protocol` run folders")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "robustness")
    ap.add_argument("--steps", default=",".join(map(str, STEPS)))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    try:
        steps = sorted({int(s) for s in args.steps.split(",")})
        tokens = sorted({int(t) for t in args.tokens.split(",")})
    except ValueError:
        print("error: --steps and --tokens take comma-separated integers, e.g. --steps "
              "0,10,100", file=sys.stderr)
        return 2
    from receler.runs import read_results

    try:
        results = {run: read_results(run) for run in args.runs}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows: list[dict] = []
    paths: list[Path] = []
    seen_base: set[str] = set()
    default_tokens = None
    for run in tqdm(args.runs, desc="runs"):
        res = results[run]
        default_tokens = default_tokens or res["config"]["attack"]["tokens"]
        c = res["config"]  # the base model's attack, whichever folder caches it
        base_key = json.dumps([res["concept"], c["model"], c["detector"], c["attack"],
                               c["attack_images"], c["attack_prompts"], c.get("sample_steps")],
                              sort_keys=True)
        rows += measure_run(run, steps, tokens, TOKEN_STEPS, include_base=base_key not in seen_base)
        seen_base.add(base_key)
        name_runs(rows, {str(r): res for r, res in results.items()})
        paths = write(rows, args.out, default_tokens)  # after each run: a killed run keeps them
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
