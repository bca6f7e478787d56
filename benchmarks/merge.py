"""How much of an erasure survives the merged export: erasers attached against the same
erasers merged into the UNet's weights (``receler export``), through the same protocol.

Steps, each reused when it has finished (a killed run resumes where it stopped):

1. ``receler export --erasers E --out RUNS/merged_unet`` (``--resume`` from its checkpoint
   when an earlier run was killed while merging);
2. the erasers attached: the protocol run the erasers folder belongs to (or ``--attached``),
   when ``E/../results.json`` was measured with the same base folder and settings (as
   ``runs/benchmark/full/CONCEPT/NAME/erasers`` is), else ``receler protocol --erasers E``
   into ``RUNS/attached``;
3. the merged UNet: ``receler protocol --unet RUNS/merged_unet`` into ``RUNS/merged``.

Both protocol runs share ``--base-dir``, so the base model is measured once.

    python benchmarks/merge.py --erasers runs/benchmark/full/star/receler_seed1/erasers \\
        --concept star --base-dir runs/benchmark/full/star/base [--threads 1]

Writes ``merge.json`` and ``merge.md`` into ``--results`` (default
benchmarks/results/merge); the runs go to ``--runs`` (default runs/merge/CONCEPT).
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

HERE = Path(__file__).resolve().parent
METRICS = ("acc_e", "acc_r", "acc_l", "h", "attack_success_soft", "attack_n", "attack_ci",
           "attack_success_soft_3x", "attack_n_3x", "attack_ci_3x")
# protocol settings that must agree for a reused attached run to be comparable
SAME = ("per_class", "concept_rows", "attack_images", "attack_prompts", "attack_stronger",
        "skip", "sample_steps", "detector", "attack")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--erasers", required=True, type=Path, help="a receler erasers folder")
    p.add_argument("--concept", required=True, help="the concept the erasers erased")
    p.add_argument("--base-dir", required=True, type=Path, help="shared base-model images")
    p.add_argument("--runs", type=Path, default=None, help="default runs/merge/CONCEPT")
    p.add_argument("--results", type=Path, default=HERE / "results" / "merge")
    p.add_argument("--attached", type=Path, default=None,
                   help="a protocol run of these erasers attached to reuse (checked to be "
                        "comparable; default: E/../results.json, else measured into RUNS)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", default="latency", help="protocol stages to leave out")
    p.add_argument("--export-flag", action="append", default=[], metavar="FLAG",
                   help="passed to `receler export` (e.g. --export-flag=--iterations=600)")
    p.add_argument("--protocol-flag", action="append", default=[], metavar="FLAG",
                   help="passed to both protocol runs (e.g. --protocol-flag=--per-class=2)")
    args = p.parse_args(argv)
    args.runs = args.runs or Path("runs") / "merge" / args.concept
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


def export_step(args) -> dict:
    """The merged UNet's merge_config.json, exporting (or resuming) unless it is there."""
    from receler.merge import MERGE_FILE, work_folder

    out = args.runs / "merged_unet"
    if not (out / MERGE_FILE).is_file():
        cmd = ["export", "--erasers", str(args.erasers), "--out", str(out), "--quiet",
               "--threads", str(args.threads), *args.export_flag]
        if (work_folder(out) / "checkpoint.safetensors").is_file():
            cmd.append("--resume")
        run(cmd, args.runs / "export.log", args.threads)
    return json.loads((out / MERGE_FILE).read_text())


def protocol(args, out: Path, candidate: list[str]) -> dict:
    if not (out / "results.json").is_file():
        run(["protocol", "--concept", args.concept, *candidate, "--base-dir", str(args.base_dir),
             "--out", str(out), "--skip", args.skip, "--threads", str(args.threads),
             *args.protocol_flag], args.runs / f"{out.name}.log", args.threads)
    return json.loads((out / "results.json").read_text())


def attached_step(args, merged: dict) -> tuple[dict, Path]:
    """The erasers' own protocol run when it is comparable with ``merged``, else a new one."""
    own = (args.attached or args.erasers.parent) / "results.json"
    if own.is_file():
        r = json.loads(own.read_text())
        same = (Path(r["base_images"]).resolve() == args.base_dir.resolve()
                and all(r["config"].get(k) == merged["config"].get(k) for k in SAME)
                and r["concept"] == args.concept)
        if same and r.get("candidate", {}).get("kind") in ("erase", "erasers"):
            return r, own.parent
        print(f"{own} was measured with other settings: measuring the erasers again", flush=True)
    out = args.runs / "attached"
    return protocol(args, out, ["--erasers", str(args.erasers)]), out


def summary(args, record: dict, rows: dict[str, tuple[dict, Path]]) -> dict:
    import receler
    from receler.eval.locality import run_image_change

    attached = rows["erasers attached"][0]
    table = {"base": {k: attached["base"][k] for k in METRICS}}
    table.update({name: {k: r[k] for k in METRICS} for name, (r, _) in rows.items()})
    # each class's detection rate, so that a lost neighbour is named, not only averaged
    table["base"]["per_class"] = per_class(attached["base"])
    for name, (r, path) in rows.items():
        table[name]["per_class"] = per_class(r)
        # beside Acc_L: what the detector does not see (receler.eval.locality)
        table[name]["two_object_locality"] = r.get("two_object_locality")
        change = run_image_change(path, r)
        table[name]["pixel_change_others"] = change and change["pixel"]
    table["base"].update(two_object_locality=attached["base"].get("two_object_locality"),
                         pixel_change_others=0.0)
    return {"receler_version": receler.__version__, "date": datetime.date.today().isoformat(),
            "command": " ".join(["python", "benchmarks/merge.py", *sys.argv[1:]]),
            "concept": args.concept, "erasers": str(args.erasers),
            "runs": {name: str(path) for name, (_, path) in rows.items()},
            "base_dir": str(args.base_dir), "rows": attached["rows"],
            "skipped": attached["skipped"], "table": table,
            "merge": {"parameters": len(record["parameters"]), "settings": record["merge"],
                      "stats": record["stats"], "fidelity": record["fidelity"],
                      "retain_prompts": record["retain_prompts"]},
            "train_erasers": attached.get("train")}


def per_class(res: dict) -> dict[str, float]:
    """Detection rate of each class's simple prompts (the concept's included)."""
    return {c["class_name"]: c["rate"]["rate"] for c in res["metrics"]["per_class"]}


def to_markdown(s: dict) -> str:
    def num(x, digits=3):
        return "–" if x is None else f"{x:.{digits}f}"

    def sci(x):
        return "–" if x is None else f"{x:.2e}"

    def attack(row, suffix=""):
        rate, n, ci = (row[f"attack_success_soft{suffix}"], row[f"attack_n{suffix}"],
                       row[f"attack_ci{suffix}"])
        if rate is None:
            return "–"
        return f"{rate:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] of {n}"

    m = s["merge"]
    fid, st, cfg = m["fidelity"], m["stats"], m["settings"]
    lines = [f"# Merged export: {s['concept']}, receler {s['receler_version']} ({s['date']})", "",
             f"`{s['command']}`", "",
             f"Erasers: `{s['erasers']}`. Merged into {m['parameters']} attn2 tensors "
             f"({cfg['params']}; {st['trainable_parameters']:,} weights) in {cfg['iterations']} "
             f"iterations of lr {cfg['lr']:g} with {cfg.get('adv_steps', 0)} soft-prompt attack "
             f"steps each: {st['unet_forward']} UNet forward and "
             f"{st['unet_backward']} backward passes, {st['seconds']:.0f} s. Retain prompts: "
             f"{len(m['retain_prompts'])} (with the empty prompt), weight "
             f"{cfg.get('retain_weight', 1.0):g}, distilled towards the "
             f"{cfg.get('retain_target', 'erased')} model. The attacked prompt distilled "
             "towards " + ("the erased model's ε of the plain concept prompt."
                           if cfg.get("adv_target") == "concept" else
                           "the erased model under the same soft tokens."), "",
             "Pixel Δ: the other classes' images against the base model's (mean |Δ| of the RGB "
             "values, 0–1, same prompts and seeds); two-object: the other object kept in prompts "
             "naming both.", "",
             "| model | Acc_E | Acc_R | Acc_L | other classes' pixel Δ | two-object | H | "
             "soft attack [95% CI] of n | at 3× steps |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in s["table"].items():
        lines.append(f"| {name} | {num(row['acc_e'])} | {num(row['acc_r'])} | "
                     f"{num(row['acc_l'])} | {num(row.get('pixel_change_others'))} | "
                     f"{num(row.get('two_object_locality'), 2)} | {num(row['h'])} | "
                     f"{attack(row)} | {attack(row, '_3x')} |")
    classes = list(s["table"]["base"].get("per_class", {}))
    if classes:
        lines += ["", "Detection rate per class (simple prompts):", "",
                  "| model | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(num(row["per_class"].get(c), 2) for c in classes)
                  + " |" for name, row in s["table"].items() if "per_class" in row]
    rows = ", ".join(f"{n} {k.replace('_', '-')}" for k, n in s["rows"].items())
    lines += ["", f"Prompt rows per model: {rows}. Skipped stages: "
              f"{', '.join(s['skipped']) or 'none'}. Base images: `{s['base_dir']}`."]
    if fid:
        c, r = fid["concept"], fid["retain"]
        lines += ["", "Fidelity on held-out trajectories of the erased model (MSE of ε to the "
                  "erased model's):", "",
                  "| prompts | base UNet | merged UNet | merged UNet to the base model's |",
                  "|---|---|---|---|",
                  f"| the concept ({c['prompts']}, {c['trajectories']} trajectories each) | "
                  f"{c['mse_base']:.2e} | {c['mse_merged']:.2e} | "
                  f"{sci(c.get('mse_merged_to_base'))} |",
                  f"| retain ({r['prompts']}, {r['trajectories']} trajectories each) | "
                  f"{r['mse_base']:.2e} | {r['mse_merged']:.2e} | "
                  f"{sci(r.get('mse_merged_to_base'))} |", "",
                  f"Share of the erasers' change of the concept's predictions that the merged "
                  f"weights reproduce: {fid['kept']:.1%}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.erasers / "erasers.safetensors").is_file():
        raise SystemExit(f"error: {args.erasers} holds no erasers.safetensors: pass a finished "
                         "`receler erase` folder of a receler method")
    record = export_step(args)
    merged = protocol(args, args.runs / "merged", ["--unet", str(args.runs / "merged_unet")])
    rows = {"erasers attached": attached_step(args, merged),
            "merged": (merged, args.runs / "merged")}
    s = summary(args, record, rows)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "merge.json").write_text(json.dumps(s, indent=2) + "\n")
    (args.results / "merge.md").write_text(to_markdown(s))
    print(to_markdown(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
