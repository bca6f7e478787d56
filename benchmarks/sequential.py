"""Sequential erasure: erase one concept, then a second one on top of the first's erasers.
Does the first stay erased, and what does the second erasure cost?

1. The first concept's erasers: ``--first-erasers DIR`` (a finished ``receler erase``), or
   trained into ``WORK/FIRST_sSEED/erasers``; measured alone by the protocol into
   ``--first-run DIR`` or ``WORK/FIRST_sSEED/FIRST``.
2. ``receler erase --concept FIRST --concept THEN --init-erasers FIRST_ERASERS --seed SEED``
   into ``WORK/FIRST_then_THEN_sSEED/erasers``: the first set trained further on both
   concepts, with the model's recommended iterations for one run (the concepts take turns).
3. ``receler protocol --erasers ...`` for each concept into ``WORK/FIRST_then_THEN_sSEED/C``,
   sharing ``BASE/C/base``; the protocol leaves both erased concepts out of Acc_L.

    python benchmarks/sequential.py --first star --then heart --seed 1 \\
        --first-erasers runs/w15/star/seed1/erasers --first-run runs/w15/star/seed1 \\
        --then-run runs/w15/heart/seed1 --work runs/seq --base-work runs/w15

Finished steps are reused, so a killed run resumes where it stopped. Writes
``sequential_FIRST_THEN_sSEED.json`` and ``.md`` into ``--out`` (default
benchmarks/results/multi):
one row per erasure set and measured concept (the first alone, the second alone when
``--then-run`` is given, and the sequential set on each concept).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from multi import fmt, remaining_locality, run  # noqa: E402 - a sibling script


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--first", required=True, help="the concept erased first")
    p.add_argument("--then", required=True, help="the concept erased on top of it")
    p.add_argument("--seed", type=int, default=0, help="training seed of both erasures")
    p.add_argument("--first-erasers", type=Path, default=None,
                   help="a finished `receler erase` folder of the first concept (default: "
                        "train one)")
    p.add_argument("--first-run", type=Path, default=None,
                   help="a finished protocol run of the first erasers alone (default: measure "
                        "them)")
    p.add_argument("--then-run", type=Path, default=None,
                   help="a finished protocol run of the second concept erased alone, for "
                        "comparison (optional)")
    p.add_argument("--work", type=Path, default=Path("runs/seq"), help="run folders")
    p.add_argument("--base-work", type=Path, default=Path("runs/benchmark/full"),
                   help="BASE/CONCEPT/base: base-model folders shared with compare.py")
    p.add_argument("--out", type=Path, default=HERE / "results" / "multi")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", default="latency", help="protocol stages to leave out")
    p.add_argument("--erase-flag", action="append", default=[], metavar="FLAG",
                   help="passed to both `receler erase` runs (e.g. --erase-flag=--rank=16)")
    p.add_argument("--protocol-flag", action="append", default=[], metavar="FLAG",
                   help="passed to every protocol run")
    args = p.parse_args(argv)
    if args.first == args.then:
        p.error(f"--first and --then are both {args.first!r}: name two concepts")
    for name in ("first_erasers", "first_run", "then_run"):
        path = getattr(args, name)
        want = "eraser_config.json" if name == "first_erasers" else "results.json"
        if path is not None and not (path / want).is_file():
            p.error(f"--{name.replace('_', '-')} {path} holds no {want}: pass a finished "
                    f"`receler {'erase' if name == 'first_erasers' else 'protocol'}` folder")
    return args


def erase(args, concepts: list[str], out: Path, init: Path | None = None) -> Path:
    from receler.serialization import CHECKPOINT_FILE, CONFIG_FILE

    if (out / CONFIG_FILE).is_file():
        return out
    cmd = ["erase", *(f"--concept={c}" for c in concepts), "--out", str(out), "--seed",
           str(args.seed), "--threads", str(args.threads), "--quiet", *args.erase_flag]
    if init is not None:
        cmd += ["--init-erasers", str(init)]
    if (out / CHECKPOINT_FILE).is_file():
        cmd.append("--resume")
    run(cmd, out.parent / "erase.log", args.threads)
    return out


def measure(args, erasers: Path, concept: str, out: Path) -> dict:
    if not (out / "results.json").is_file():
        run(["protocol", "--concept", concept, "--erasers", str(erasers), "--out", str(out),
             "--base-dir", str(args.base_work / concept / "base"), "--skip", args.skip,
             "--threads", str(args.threads), *args.protocol_flag],
            out.parent / f"{concept}.log", args.threads)
    return json.loads((out / "results.json").read_text())


def row(erased: str, concept: str, res: dict, run_dir: Path) -> dict:
    from receler.runs import training_passes

    local = remaining_locality(res)
    return {"erased": erased, "concept": concept, "run": str(run_dir),
            "acc_e": res["acc_e"], "acc_r": res["acc_r"],
            "attack_success_soft": res["attack_success_soft"], "attack_n": res["attack_n"],
            "attack_ci": res["attack_ci"], "attack_success_soft_3x": res["attack_success_soft_3x"],
            "attack_ci_3x": res["attack_ci_3x"], "acc_l_remaining": local["acc_l"],
            "acc_l_remaining_n": local["n"], "worst_remaining_class": local["worst_class"],
            "worst_remaining_ratio": local["worst_ratio"], "unet_passes": training_passes(res)}


def to_markdown(s: dict) -> str:
    lines = [f"# Sequential erasure: {s['first']}, then {s['then']} (seed {s['seed']}, "
             f"{s['date']})", "", f"`{s['command']}`", "",
             f"The second erasure trains the first set further on both concepts "
             f"(`--init-erasers`). UNet passes: the training of that set alone (the "
             f"sequential set's own passes; {s['first']}'s come before them). Acc_L: the "
             f"classes the set does not erase; worst: the one furthest below its base rate.",
             "", "| erasure set | measured on | Acc_E | Acc_R | soft attack | at 3× | "
             "Acc_L remaining | worst remaining | UNet passes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        ci = r["attack_ci"]
        attack = f"{fmt(r['attack_success_soft'])} [{fmt(ci[0])}, {fmt(ci[1])}] of {r['attack_n']}"
        worst = (f"{r['worst_remaining_class']} {fmt(r['worst_remaining_ratio'])}"
                 if r["worst_remaining_class"] else "–")
        cost = f"{r['unet_passes']:,}" if r["unet_passes"] is not None else "–"
        lines.append(f"| {r['erased']} | {r['concept']} | {fmt(r['acc_e'])} | "
                     f"{fmt(r['acc_r'])} | {attack} | {fmt(r['attack_success_soft_3x'])} | "
                     f"{fmt(r['acc_l_remaining'])} | {worst} | {cost} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from receler.serialization import atomic_write

    args = parse_args(argv)
    first, then = args.first, args.then
    alone = args.work / f"{first}_s{args.seed}"
    first_erasers = args.first_erasers or erase(args, [first], alone / "erasers")
    first_run = args.first_run or alone / first
    res_first = (json.loads((first_run / "results.json").read_text()) if args.first_run
                 else measure(args, first_erasers, first, first_run))
    seq = args.work / f"{first}_then_{then}_s{args.seed}"
    seq_erasers = erase(args, [first, then], seq / "erasers", init=first_erasers)
    rows = [row(first, first, res_first, first_run)]
    if args.then_run is not None:
        res_then = json.loads((args.then_run / "results.json").read_text())
        rows.append(row(then, then, res_then, args.then_run))
    for concept in (first, then):
        res = measure(args, seq_erasers, concept, seq / concept)
        rows.append(row(f"{first}, then {then}", concept, res, seq / concept))
    s = {"first": first, "then": then, "seed": args.seed,
         "date": datetime.date.today().isoformat(),
         "command": " ".join(["python", "benchmarks/sequential.py", *sys.argv[1:]]),
         "first_erasers": str(first_erasers), "sequential_erasers": str(seq_erasers),
         "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"sequential_{first}_{then}_s{args.seed}"
    text = json.dumps(s, indent=2) + "\n"
    atomic_write(args.out / f"{name}.json", lambda tmp: tmp.write_text(text))
    md = to_markdown(s)
    atomic_write(args.out / f"{name}.md", lambda tmp: tmp.write_text(md))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
