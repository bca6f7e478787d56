"""The ``receler`` command line: ``erase``, ``generate``, ``evaluate``, ``attack``,
``protocol`` and ``export`` (``generate`` and ``evaluate`` live in ``cli_images``).

Every training flag comes from :class:`receler.config.TrainConfig`, so the CLI, the
Python API and the saved JSON cannot drift apart. Bad input ends with one line on
stderr and a non-zero exit; nothing already written is lost.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

from .cli_common import (
    _add_candidate_flags,
    _add_model_flags,
    _load,
    _refuse_existing,
    _say_safety_checker_off,
    _skip_stages,
)
from .cli_images import add_image_commands, cmd_evaluate, cmd_generate

EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 1, 130


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from .config import TrainConfig, model_erase_defaults, scalar_type

    try:  # what the toy model recommends instead, to show beside the paper's defaults
        from .config import default_model
        toy = model_erase_defaults(default_model(), "receler")
    except (FileNotFoundError, ValueError):
        toy = {}
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name == "concepts":
            continue
        note = f"; the toy model recommends {toy[f.name]}" if f.name in toy else ""
        p.add_argument("--" + f.name.replace("_", "-"), type=scalar_type(hints[f.name])[0],
                       default=None, help=f"{f.metadata['help']} (default: {f.default}{note})")


def _add_token_attack_flags(p: argparse.ArgumentParser) -> None:
    from .attack import AttackConfig  # torch, not diffusers

    p.add_argument("--token-candidates", type=int, default=None,
                   help="token attack: vocabulary words tried at each position (default "
                        f"{AttackConfig.candidates})")
    p.add_argument("--token-sweeps", type=int, default=None,
                   help=f"token attack: passes over every position (default {AttackConfig.sweeps})")


def token_attack_settings(args) -> dict:
    """The token attack's settings the flags give (``AttackConfig``'s default where not)."""
    given = {k: v for k, v in (("candidates", args.token_candidates),
                               ("sweeps", args.token_sweeps)) if v is not None}
    for k, v in given.items():
        if v <= 0:
            raise ValueError(f"--token-{k} must be positive, got {v}")
    return given


def _add_concept_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--concept", required=True, action="append",
                   help=f"{what}; each value is one concept, commas kept (\"red, cat\" is one "
                        "concept, as the reference code erases it); repeat the flag for several")


def _add_preset_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=("paper",), default=None,
                   help="paper: what the official Receler code trains (500 iterations, rank 128, "
                        "50 attack steps of Adam lr 0.1 with weight decay 0.1 on U[0,1) soft "
                        "tokens, the eraser step on the attacked prompt only); the model's "
                        "recommended settings are then not applied, flags still win")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="receler", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("erase", help="train erasers that remove concepts from a model")
    _add_concept_flag(p, "concept to erase")
    p.add_argument("--out", required=True, type=Path, help="folder for the erasers")
    _add_model_flags(p)
    _add_preset_flag(p)
    _add_train_flags(p)
    p.add_argument("--method", default="receler",
                   help="receler (default), receler-eraser-only, receler-eraser-reg, "
                        "receler-eraser-adv, esd-x, esd-u, uce, rece, speed, mace, sld or "
                        "advunlearn")
    p.add_argument("--method-option", action="append", metavar="KEY=VALUE",
                   help="a UCE/RECE/SPEED/SLD setting, e.g. anchor=\"a photo\", rounds=2 or "
                        "preset=max (repeatable; replaces the model's recommended options)")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace erasers already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    add_image_commands(sub)

    a = sub.add_parser("attack", help="soft-prompt and token attacks against erased and base model")
    a.add_argument("--erasers", required=True, type=Path, help="folder written by `receler erase`")
    a.add_argument("--concept", required=True, help="the erased concept to bring back")
    a.add_argument("--prompt", default=None, help='start prompt (default: "a photo of a CONCEPT")')
    a.add_argument("--out", required=True, type=Path, help="folder for attack.json and pictures")
    _add_model_flags(a)
    a.add_argument("--num-images", type=int, default=10, help="images per attacked prompt")
    a.add_argument("--attack-steps", type=int, default=100, help="soft-prompt optimisation steps")
    a.add_argument("--attack-tokens", type=int, default=8, help="attack tokens")
    _add_token_attack_flags(a)
    a.add_argument("--detector", default="toy", help="detector that decides success")
    a.add_argument("--overwrite", action="store_true", help="replace an existing attack.json")

    from .config import SPACES

    r = sub.add_parser("protocol", help="erase → generate → evaluate → attack → report, or "
                       "measure a model erased elsewhere (--erasers, --unet, --lora)")
    _add_concept_flag(r, "the concept to erase (one)")
    r.add_argument("--out", required=True, type=Path, help="run folder (resumable)")
    _add_model_flags(r)
    r.add_argument("--method", default=None,
                   help="erasure method to train (default: receler); with --erasers, read from "
                        "the folder")
    _add_candidate_flags(r)
    r.add_argument("--per-class", type=int, default=10, help="simple prompts per class")
    r.add_argument("--concept-rows", type=int, default=30,
                   help="paraphrase (or style) prompts of the concept")
    r.add_argument("--attack-images", type=int, default=10,
                   help="images per soft attack (and per plain / token-attacked prompt)")
    r.add_argument("--attack-prompts", type=int, default=5,
                   help="independent soft attacks, each from its own prompt of the concept "
                        "and with its own seed; their images are pooled (default 5: 50 images)")
    r.add_argument("--detector", default="toy", help="detector (default: the toy detector)")
    r.add_argument("--base-dir", type=Path, default=None,
                   help="folder of base-model images to share between runs (default: in --out)")
    r.add_argument("--attack-steps", type=int, default=100,
                   help="soft-prompt attack steps (also measured at 3× this: *_3x keys)")
    r.add_argument("--attack-tokens", type=int, default=8, help="soft-prompt attack tokens")
    _add_token_attack_flags(r)
    r.add_argument("--attack-space", choices=SPACES, default="output",
                   help="where the soft-prompt attack's tokens go: the text encoder's output "
                        "(default; bypasses the encoder) or its input word embeddings "
                        "(UnlearnDiffAtk's; attacks an edited text encoder through its edit)")
    _add_preset_flag(r)
    _add_train_flags(r)
    r.add_argument("--export", action="store_true",
                   help="after training, merge the erasers into the UNet's own weights "
                        "(`receler export`, into OUT/merged_unet) and measure the merged UNet; "
                        "its cost is added to the erasers'")
    r.add_argument("--export-option", action="append", metavar="KEY=VALUE",
                   help="a `receler export` setting for --export, e.g. iterations=300 "
                        "(repeatable; default: the export's defaults)")

    _add_export_parser(sub)

    b = sub.add_parser("leaderboard", help="protocol runs side by side: table, JSON, picture")
    b.add_argument("runs", nargs="+", type=Path, help="--out folders of `receler protocol` runs")
    b.add_argument("--out", required=True, type=Path, help="folder for leaderboard.json/.md/.png")
    b.add_argument("--label", action="append", help="a name per run (default: its method)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing leaderboard")
    return parser


def _add_export_parser(sub) -> None:
    from .config import MergeConfig

    x = sub.add_parser("export", help="merge erasers into the UNet's own weights (distilled): "
                       "a plain diffusers UNet folder, with no adapter left to detach")
    x.add_argument("--erasers", required=True, type=Path,
                   help="folder written by `receler erase` with an eraser method (receler, "
                        "receler-*); its base model is loaded unless --model is given")
    x.add_argument("--out", required=True, type=Path,
                   help="folder of the merged UNet (for `receler protocol --unet OUT`)")
    _add_model_flags(x)  # --model: default the erasers' base model
    types = MergeConfig.field_types()
    for f in fields(MergeConfig):
        x.add_argument("--" + f.name.replace("_", "-"), type=types[f.name][0], default=None,
                       help=f.metadata["help"] + ("" if f.default is None
                                                    else f" (default: {f.default})"))
    x.add_argument("--resume", action="store_true", help="continue an interrupted export")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    x.add_argument("--quiet", action="store_true", help="no progress bar")


def _merge_config(args):
    """The MergeConfig that ``receler export``'s flags ask for (a flag left out: the default)."""
    from .merge import MergeConfig

    return MergeConfig(**{f.name: getattr(args, f.name) for f in fields(MergeConfig)
                          if getattr(args, f.name) is not None})


def cmd_export(args, argv: list[str]) -> int:
    from .merge import check_erasers_folder, check_out

    config = _merge_config(args)
    saved = check_erasers_folder(args.erasers)
    check_out(args.out, overwrite=args.overwrite, resume=args.resume)

    from .config import default_model
    from .loop import TrainingDiverged, TrainingInterrupted  # heavy imports after the checks
    from .merge import export_merged

    pipe = _load(args, args.model or saved.base_model or default_model())
    try:
        result = export_merged(pipe, args.erasers, args.out, config, overwrite=args.overwrite,
                               resume=args.resume, show_progress=not args.quiet)
    except TrainingInterrupted as e:
        print(f"receler: interrupted after iteration {e.iteration}; checkpoint saved in {e.out_dir}."
              f"\nresume with: {_resume_command(argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingDiverged as e:
        print(f"receler: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    st, fid = result.stats, result.fidelity
    kept = f"; {fid['kept']:.1%} of the erasers' change of the concept's predictions kept " \
           f"(held-out MSE to the erased model: base {fid['concept']['mse_base']:.2e}, merged " \
           f"{fid['concept']['mse_merged']:.2e})" if fid.get("kept") is not None else ""
    print(f"merged {args.erasers} into {st['trainable_parameters']} UNet weights ({st['seconds']:.0f} "
          f"s, {st['unet_forward']} UNet forward and {st['unet_backward']} backward passes){kept}; "
          f"UNet in {args.out}")
    return 0


def cmd_leaderboard(args) -> int:
    from .leaderboard import build, to_markdown, write

    board = build(args.runs, args.label)
    written = write(board, args.out, overwrite=args.overwrite)
    print(to_markdown(board))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _train_config(args, concepts: str | list[str], method: str = "receler", *,
                  quiet: bool = False):
    """TrainConfig from the flags given. A flag left out takes, in this order: the setting
    the model recommends in its ``receler_defaults.json`` (the toy model has some), the
    method's published default (ESD: lr 1e-5, 1000 iterations), TrainConfig's default.
    With ``--preset paper`` the model's recommendations are skipped and the preset's values
    come before the method's. The model's recommendations in use are announced on stderr
    unless ``quiet``. ``concepts``: a list (``--concept`` values) keeps commas."""
    from .config import PRESETS, TrainConfig, cli_concepts, model_erase_defaults
    from .methods import get_method

    if isinstance(concepts, list):
        concepts = cli_concepts(concepts)
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if f.name != "concepts" and getattr(args, f.name) is not None}
    unread = [k for k in given if k not in get_method(method).config_fields]
    if unread:  # it would be silently ignored
        raise ValueError(f"--{unread[0].replace('_', '-')} is not a setting of --method "
                         f"{method}, which would ignore it: drop it")
    preset = getattr(args, "preset", None)
    if preset is not None:
        paper = {} if method.startswith("receler") else get_method(method).paper_defaults
        return TrainConfig(concepts=concepts, **{**PRESETS[preset], **paper, **given})
    model = args.model
    if model is None:
        from .config import default_model
        model = default_model()
    recommended = {k: v for k, v in model_erase_defaults(model, method).items() if k not in given}
    if recommended and not quiet:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(recommended.items()))
        print(f"model's recommended {method} settings: {shown} (flags override them)",
              file=sys.stderr)
    return TrainConfig(concepts=concepts,
                       **{**get_method(method).paper_defaults, **recommended, **given})


def _note_unknown_toy_words(model: str | None, concepts: list[str]) -> None:
    """On the toy model, say when a concept holds a word it has never seen: that trains, but
    it erases nothing the model knows."""
    import re

    from .config import default_model

    if model is not None and Path(model).resolve() != Path(default_model()).resolve():
        return
    from .toyworld.vocab import CLASSES, STYLES, all_words

    known = set(all_words())
    for c in concepts:
        unknown = [w for w in re.findall(r"[a-z]+", c.lower()) if w not in known]
        if unknown:
            print(f"note: the toy model has no word {unknown[0]!r} (in concept {c!r}), so this "
                  f"erases nothing it knows; its classes are {', '.join(CLASSES)} and its "
                  f"style {', '.join(STYLES)}", file=sys.stderr)


def _method_options(pairs: list[str] | None, flag: str = "--method-option") -> dict | None:
    if not pairs:
        return None
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value  # a plain string
    return options


def _resume_command(argv: list[str]) -> str:
    args = [a for a in argv if a not in ("--overwrite", "--resume")]
    return "receler " + " ".join(shlex.quote(a) for a in args) + " --resume"


def cmd_erase(args, argv: list[str]) -> int:
    from .config import model_method_options
    from .methods import erase_with, method_options
    from .serialization import check_out_dir

    config = _train_config(args, args.concept, args.method)  # validates first
    _note_unknown_toy_words(args.model, config.concepts)
    options = _method_options(args.method_option)  # None: the model's recommendation
    if options is None and args.preset is not None:
        options = {}  # a preset skips the model's recommendations, as for the settings
    method_options(args.method, options)  # validates first
    check_out_dir(args.out, overwrite=args.overwrite, resume=args.resume)

    from .config import default_model
    from .loop import TrainingDiverged, TrainingInterrupted  # heavy imports after the checks

    model = args.model or default_model()
    if options is None and (recommended := model_method_options(model, args.method)):
        print(f"model's recommended {args.method} options: {recommended} (--method-option "
              "replaces them)", file=sys.stderr)
    pipe = _load(args, model)
    try:
        result = erase_with(args.method, pipe, config, args.out, base_model=model,
                            overwrite=args.overwrite, resume=args.resume, options=options,
                            show_progress=not args.quiet)
    except TrainingInterrupted as e:
        print(f"receler: interrupted after iteration {e.iteration}; checkpoint saved in {e.out_dir}."
              f"\nresume with: {_resume_command(argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingDiverged as e:
        print(f"receler: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    st = result.stats
    print(f"erased {config.concepts} with {args.method} ({st['seconds']:.0f} s, "
          f"{st['unet_forward']} UNet forward and {st['unet_backward']} backward passes, "
          f"{st['trainable_parameters']} trainable parameters); result in {args.out}")
    return 0


def cmd_attack(args) -> int:
    from .attack import AttackConfig, target_latents
    from .config import default_model
    from .eval import get_detector
    from .methods import edit_disabled, load_edit
    from .protocol import measure_attacks
    from .sampling import SamplerSettings

    config = AttackConfig(steps=args.attack_steps, tokens=args.attack_tokens,
                          **token_attack_settings(args))
    if args.num_images <= 0:
        raise ValueError(f"--num-images must be positive, got {args.num_images}")
    _refuse_existing(args.out / "attack.json", args.overwrite)
    if not args.concept.strip():
        raise ValueError("--concept is empty: pass the erased concept the attack should restore")
    detector = get_detector(args.detector)  # before the model and the attack: can it score?
    from PIL import Image

    detector.detect([Image.new("RGB", (64, 64), "white")], [args.concept])
    model = args.model or default_model()
    pipe = _load(args, model)
    load_edit(pipe, args.erasers)
    _say_safety_checker_off()
    settings = SamplerSettings.for_model(model)
    prompt = args.prompt or f"a photo of a {args.concept}"
    base = lambda: edit_disabled(pipe)  # noqa: E731
    latents = target_latents(pipe, f"a photo of a {args.concept}", config.target_images,
                             steps=settings.steps, guidance=settings.guidance, base=base)
    results = {}
    for which in ("erased", "base"):
        with base() if which == "base" else nullcontext():
            results[which] = measure_attacks(pipe, args.concept, prompt, latents, detector, settings,
                                             config, n_images=args.num_images,
                                             grid_path=args.out / f"{which}.png",
                                             show_progress=True)
    (args.out / "attack.json").write_text(json.dumps(results, indent=2) + "\n")
    for which, r in results.items():
        print(f"{which}: concept detected {100 * r['success_plain']:.0f}% with the prompt, "
              f"{100 * r['success_soft']:.0f}% under the soft attack, "
              f"{100 * r['success_discrete']:.0f}% under the token attack "
              f"({r['discrete_prompt']!r})")
    return 0


def cmd_protocol(args) -> int:
    from .attack import AttackConfig
    from .config import TrainConfig
    from .protocol import SOURCES, Protocol, ProtocolConfig, check_export

    if len(args.concept) != 1:
        raise ValueError("protocol measures one concept: pass --concept once")
    concept = args.concept[0]
    skip = _skip_stages(args.skip)  # before the training settings are announced
    sources = [n for n in SOURCES if getattr(args, n) is not None]
    source = sources[0] if sources else None
    export = None  # checked before the training settings are announced too
    if args.export:
        from .merge import MergeConfig

        export = MergeConfig.from_options(_method_options(args.export_option, "--export-option"))
        check_export(args.method, sources)
    elif args.export_option:
        raise ValueError("--export-option sets the merged export, but without --export nothing "
                         "is exported: add --export")
    if source is None:
        train = _train_config(args, [concept], args.method or "receler")
    else:  # nothing is trained: a training flag would be silently ignored
        given = [f.name for f in fields(TrainConfig)
                 if f.name != "concepts" and getattr(args, f.name) is not None]
        if args.preset:
            given.insert(0, "preset")
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} sets training, but with "
                             f"--{source.replace('_', '-')} nothing is trained: drop it")
        train = None
    cfg = ProtocolConfig(concept=concept, out=args.out, model=args.model, method=args.method,
                         detector=args.detector, per_class=args.per_class,
                         concept_rows=args.concept_rows, attack_images=args.attack_images,
                         attack_prompts=args.attack_prompts,
                         device=args.device, dtype=args.dtype, train=train,
                         attack=AttackConfig(steps=args.attack_steps, tokens=args.attack_tokens,
                                             space=args.attack_space,
                                             **token_attack_settings(args)),
                         base_dir=args.base_dir, erasers=args.erasers, unet=args.unet,
                         text_encoder=args.text_encoder, lora=args.lora, name=args.name,
                         skip=skip, sample_steps=args.sample_steps,
                         deterministic=args.deterministic, export=export)
    protocol = Protocol(cfg)  # checks a model erased elsewhere before anything loads
    _say_safety_checker_off()
    results = protocol.run()
    if not protocol.state.is_main_process:
        return 0  # one summary: the main process's
    print(f"{concept} ({results['name']}): {_summary(results, 3 * args.attack_steps)}; base "
          f"Acc_E {results['base']['acc_e']:.3f}. {args.out / 'results.json'}, report in "
          f"{args.out / 'report' / 'report.md'}")
    return 0


def _summary(results: dict, strong_steps: int) -> str:
    def num(x):
        return "–" if x is None else f"{x:.3f}"

    parts = [f"Acc_E {num(results['acc_e'])}  Acc_R {num(results['acc_r'])}  Acc_L "
             f"{num(results['acc_l'])}  H {num(results['h'])}"]
    if results["attack_ci"] is not None:
        lo, hi = results["attack_ci"]
        parts.append(f"soft attack {num(results['attack_success_soft'])} [{lo:.2f}, {hi:.2f}] of "
                     f"{results['attack_n']} images, {num(results['attack_success_soft_3x'])} "
                     f"at {strong_steps} steps")
    if results.get("skipped"):
        parts.append(f"skipped: {', '.join(results['skipped'])}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no import-time chatter
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "threads", None) is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be at least 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        if args.command == "erase":
            return cmd_erase(args, argv)
        if args.command == "export":
            return cmd_export(args, argv)
        commands = {"generate": cmd_generate, "evaluate": cmd_evaluate, "attack": cmd_attack,
                    "protocol": cmd_protocol, "leaderboard": cmd_leaderboard}
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"receler: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a full or read-only disk, a folder that vanished, ...
        where = f" ({e.filename})" if e.filename else ""
        print(f"receler: error: cannot write or read{where}: {e.strerror or e}; free space, "
              "fix the permissions or choose another --out, then run again", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("receler: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
