"""Inference overhead of the erasers on real-sized UNets, measured side by side.

The UNets are built from their published configs with random weights (the cost of a
forward pass does not depend on the weights), so SD 1.4 and SD 2.1 are measured here
without downloading them. The base is a copy of the UNet with no erasers or hooks. Base
and erased forward passes alternate in ABBA order in one process, so machine load hits both
alike; each pair gives a ratio, and their median is reported with a bootstrap 95% interval.

    python benchmarks/overhead.py [--models sd14,sd21,toy] [--repeats 7] [--min-seconds 30]
    python benchmarks/overhead.py --pipeline [--erasers RUN/erasers] [--min-seconds 120]
    python benchmarks/overhead.py --flops [--rank 32,128]

Writes benchmarks/results/overhead.json and overhead.md (``--pipeline``: overhead_pipeline.*,
``--flops``: overhead_flops.*).

``--pipeline`` times what a user waits for: whole generations of the shipped toy pipeline
(text encoder, every DDIM step with classifier-free guidance, VAE decode) at its recommended
settings. The base is a second copy of the pipeline with *no* erasers or hooks at all, not
the erased one with its erasers switched off. Generations alternate in ABBA order; each
pair gives a ratio, and the table reports their median with a bootstrap 95% interval. The
UNet rows are an upper bound for a whole pipeline: the text encoder and the VAE add time to
the base and the erased pipeline alike.

``--flops`` counts the arithmetic instead of timing it, so it says the same on any device:
the matrix-multiply and convolution FLOPs of one UNet forward (batch 2, one guided step) with
and without erasers, counted by ``torch.utils.flop_counter`` on UNets built on the meta
device (no weights are allocated, so SDXL's config is counted too). Element-wise ops (the
GELU, the residual add) are not counted; on a small model they are much of the wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from receler import attach_erasers, erasers_disabled
from receler.erasers import count_parameters, get_erasers

HERE = Path(__file__).resolve().parent
SD_BLOCKS = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
CONFIGS = {  # name -> (UNet config, text tokens)
    "sd14": (dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, **SD_BLOCKS), 77),
    "sd21": (dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                  use_linear_projection=True, **SD_BLOCKS), 77),
    "sdxl": (dict(sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
                  down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                  up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                  use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                  layers_per_block=2), 77),
}


def model_config(name: str) -> tuple[dict, int]:
    if name == "toy":
        return toy_config()
    if name not in CONFIGS:
        raise SystemExit(f"error: unknown model {name!r}: choose from toy, {', '.join(CONFIGS)}")
    return CONFIGS[name]


def unet_inputs(unet: UNet2DConditionModel, tokens: int, batch: int) -> tuple[tuple, dict]:
    """Latents, timestep and text states of one forward pass; SDXL's pooled text and size ids
    too. Sizes from the UNet's config."""
    c, size = unet.config, unet.config.sample_size
    kwargs = {"encoder_hidden_states": torch.randn(batch, tokens, c.cross_attention_dim)}
    if c.addition_embed_type == "text_time":
        n_ids = 6  # original size, crop corner, target size
        pooled = c.projection_class_embeddings_input_dim - n_ids * c.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled),
                                       "time_ids": torch.randn(batch, n_ids)}
    return (torch.randn(batch, c.in_channels, size, size), torch.tensor([500])), kwargs


@torch.no_grad()
def count_flops(name: str, config: dict, tokens: int, rank: int, batch: int) -> dict:
    """FLOPs of one UNet forward with and without erasers, on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config).eval()
        erasers = attach_erasers(unet, rank)
        args, kwargs = unet_inputs(unet, tokens, batch)
        flops = {}
        for which in ("base", "erased"):
            off = erasers_disabled(unet) if which == "base" else contextlib.nullcontext()
            with FlopCounterMode(display=False) as counter, off:
                unet(*args, **kwargs)
            flops[which] = counter.get_total_flops()
    return {"model": name, "rank": rank, **sizes(unet, erasers), "batch": batch,
            "latent": config["sample_size"], "base_flops": flops["base"],
            "erased_flops": flops["erased"], "flop_ratio": flops["erased"] / flops["base"] - 1}


def sizes(unet: torch.nn.Module, erasers: dict) -> dict:
    """The erasers' count and parameters against the UNet's own (erasers not counted)."""
    unet_params = sum(p.numel() for n, p in unet.named_parameters() if ".eraser." not in n)
    eraser_params = count_parameters(erasers)
    return {"erasers": len(erasers), "eraser_params": eraser_params, "unet_params": unet_params,
            "param_ratio": eraser_params / unet_params}


def toy_config() -> tuple[dict, int]:
    from receler.toyworld.model import TextConfig, UNetConfig

    return UNetConfig().kwargs(), TextConfig().max_position_embeddings


@torch.no_grad()
def measure(name: str, config: dict, tokens: int, rank: int, repeats: int, batch: int,
            min_seconds: float) -> dict:
    """UNet forwards: a copy without erasers or hooks against the erased UNet, ABBA pairs."""
    import copy

    torch.manual_seed(0)
    base = UNet2DConditionModel(**config).eval()
    erased = copy.deepcopy(base)
    erasers = attach_erasers(erased, rank)
    inputs, kwargs = unet_inputs(base, tokens, batch)
    unets = {"base": base, "erased": erased}

    def one(which: str) -> float:
        start = time.perf_counter()
        unets[which](*inputs, **kwargs)
        return time.perf_counter() - start

    timing = abba(one, repeats, min_seconds)
    return {"model": name, "rank": rank, **sizes(erased, erasers), "batch": batch,
            "latent": config["sample_size"], **timing}


def abba(one, repeats: int, min_seconds: float) -> dict:
    """Time ``one("base")`` against ``one("erased")`` in ABBA order, after one warm-up each,
    for at least ``repeats`` pairs and ``min_seconds``: the median times, and the median of
    the per-pair ratios with its bootstrap 95% interval."""
    one("base"), one("erased")  # warm-up
    times, ratios = {"base": [], "erased": []}, []
    start_all = time.perf_counter()
    while len(ratios) < repeats or time.perf_counter() - start_all < min_seconds:
        order = ("base", "erased") if len(ratios) % 2 == 0 else ("erased", "base")
        t = {which: one(which) for which in order}
        for which in t:
            times[which].append(t[which])
        ratios.append(t["erased"] / t["base"] - 1)
    low, high = bootstrap_median(ratios)
    return {"base_s": statistics.median(times["base"]),
            "erased_s": statistics.median(times["erased"]),
            "overhead_ratio": statistics.median(ratios), "overhead_low": low,
            "overhead_high": high, "repeats": len(ratios), "device": "cpu",
            "threads": torch.get_num_threads()}


def bootstrap_median(values: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median."""
    import random

    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return meds[int(0.025 * draws)], meds[int(0.975 * draws) - 1]


@torch.no_grad()
def measure_pipeline(rank: int, erasers: Path | None, images: int, repeats: int,
                     min_seconds: float) -> dict:
    """Whole generations of the toy pipeline, base (no hooks) against erased, ABBA pairs."""
    from receler.methods import load_edit
    from receler.pipeline import default_model, load_pipeline
    from receler.sampling import SamplerSettings, generate

    model = default_model()
    settings = SamplerSettings.for_model(model)
    base, erased = load_pipeline(model, device="cpu"), load_pipeline(model, device="cpu")
    if erasers is not None:
        load_edit(erased, erasers)
        found = get_erasers(erased.unet)
        if not found:
            raise SystemExit(f"error: {erasers} holds no eraser edit: pass a receler run's "
                             "erasers folder, or leave --erasers out for fresh rank-R erasers")
    else:  # the cost of a dense layer does not depend on its values
        found = attach_erasers(erased.unet, rank, generator=torch.Generator().manual_seed(0))
    prompts, seeds = ["a photo of a red star"] * images, list(range(images))
    pipes = {"base": base, "erased": erased}

    def one(which: str) -> float:
        start = time.perf_counter()
        generate(pipes[which], prompts, seeds, settings=settings, batch_size=images)
        return time.perf_counter() - start

    timing = abba(one, repeats, min_seconds)
    return {"model": "toy pipeline", "rank": next(iter(found.values())).rank,
            **sizes(erased.unet, found),
            "images": images, "steps": settings.steps, "guidance": settings.guidance,
            **timing, "erasers_from": str(erasers) if erasers else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None,
                   help="comma-separated: sd14, sd21, sdxl, toy (default: sd14,sd21,toy; "
                        "with --flops all four)")
    p.add_argument("--rank", default="128",
                   help="eraser rank; a comma-separated list is measured rank by rank")
    p.add_argument("--repeats", type=int, default=7, help="at least this many pairs of runs")
    p.add_argument("--min-seconds", type=float, default=30,
                   help="and keep alternating for at least this long (small models are noisy)")
    p.add_argument("--batch", type=int, default=2, help="2 = one classifier-free guidance step")
    p.add_argument("--out", type=Path, default=None,
                   help="default: benchmarks/results/overhead.json (overhead_pipeline.json)")
    p.add_argument("--pipeline", action="store_true",
                   help="time whole generations of the toy pipeline instead of UNet forwards")
    p.add_argument("--erasers", type=Path, default=None,
                   help="with --pipeline: a trained run's erasers folder (default: fresh ones)")
    p.add_argument("--images", type=int, default=1, help="with --pipeline: images per generation")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--flops", action="store_true",
                   help="count the erasers' share of the UNet's FLOPs instead of timing (models "
                        "from --models, default there sd14,sd21,sdxl,toy; ranks from --rank)")
    args = p.parse_args()
    try:
        args.ranks = [int(r) for r in args.rank.split(",")]
    except ValueError:
        p.error(f"--rank takes a rank or comma-separated ranks, e.g. 32,128; got {args.rank!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pipeline:
        return pipeline_main(args)
    if args.flops:
        return flops_main(args)
    args.out = args.out or HERE / "results" / "overhead.json"
    models = args.models or "sd14,sd21,toy"
    rows = []
    for name, rank in ((n, r) for n in models.split(",") for r in args.ranks):
        config, tokens = model_config(name)
        rows.append(measure(name, config, tokens, rank, args.repeats, args.batch,
                            args.min_seconds))
        r = rows[-1]
        print(f"{name}: {r['erasers']} erasers of rank {rank}, {100 * r['param_ratio']:.2f}% of "
              f"the UNet's "
              f"parameters, UNet forward {r['base_s']:.3f} s → {r['erased_s']:.3f} s "
              f"({100 * r['overhead_ratio']:+.2f}% [{100 * r['overhead_low']:+.2f}%, "
              f"{100 * r['overhead_high']:+.2f}%] over {r['repeats']} ABBA pairs)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# Eraser inference overhead (UNet forward, CPU, median of alternating runs)", "",
             f"`python benchmarks/overhead.py --models {models} --rank {args.rank} --repeats "
             f"{args.repeats} --min-seconds {args.min_seconds:g}`", "",
             "Base: a copy of the UNet with no erasers or hooks. Overhead: median of the "
             "per-pair ratios of ABBA-ordered forwards, with a bootstrap 95% interval.", "",
             "| model | erasers | rank | eraser params | % of UNet | pairs | base s | erased s | "
             "overhead | 95% interval |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['erasers']} | {r['rank']} | {r['eraser_params']:,} | "
              f"{100 * r['param_ratio']:.2f}% | {r['repeats']} | {r['base_s']:.4f} | "
              f"{r['erased_s']:.4f} | {100 * r['overhead_ratio']:+.2f}% | "
              f"{100 * r['overhead_low']:+.2f}% to {100 * r['overhead_high']:+.2f}% |"
              for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


def gflops(flops: int) -> str:
    return f"{flops / 1e9:,.1f}" if flops >= 1e10 else f"{flops / 1e9:.3f}"


def flops_main(args) -> int:
    out = args.out or HERE / "results" / "overhead_flops.json"
    models = args.models or "sd14,sd21,sdxl,toy"
    rows = []
    for name in models.split(","):
        for rank in args.ranks:
            r = count_flops(name, *model_config(name), rank, args.batch)
            rows.append(r)
            print(f"{name}: {r['erasers']} erasers of rank {rank}, {100 * r['param_ratio']:.2f}% "
                  f"of the UNet's parameters, {100 * r['flop_ratio']:+.2f}% FLOPs", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    cmd = "python " + " ".join(["benchmarks/overhead.py", *sys.argv[1:]])
    lines = ["# Eraser arithmetic: share of one UNet forward's FLOPs", "", f"`{cmd}`", "",
             f"Matrix-multiply, attention and convolution FLOPs of one forward pass (batch "
             f"{args.batch}: one step with classifier-free guidance) at each model's native "
             "latent size, counted on the meta device. Element-wise ops are not counted.", "",
             "| model | latent | erasers | rank | eraser params | % of UNet params | "
             "UNet GFLOPs | with erasers | extra FLOPs |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['latent']}×{r['latent']} | {r['erasers']} | {r['rank']} | "
              f"{r['eraser_params']:,} | {100 * r['param_ratio']:.2f}% | "
              f"{gflops(r['base_flops'])} | {gflops(r['erased_flops'])} | "
              f"{100 * r['flop_ratio']:+.2f}% |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


def pipeline_main(args) -> int:
    out = args.out or HERE / "results" / "overhead_pipeline.json"
    if args.erasers is not None and len(args.ranks) > 1:
        raise SystemExit("error: --erasers fixes the rank: pass one --rank or leave --erasers out")
    rows = []
    for rank in args.ranks:
        r = measure_pipeline(rank, args.erasers, args.images, args.repeats, args.min_seconds)
        rows.append(r)
        print(f"toy pipeline: {r['erasers']} erasers of rank {r['rank']}, {r['images']} image(s), "
              f"{r['steps']} steps: {r['base_s']:.3f} s → {r['erased_s']:.3f} s, overhead "
              f"{100 * r['overhead_ratio']:+.2f}% [{100 * r['overhead_low']:+.2f}%, "
              f"{100 * r['overhead_high']:+.2f}%] over {r['repeats']} ABBA pairs", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    cmd = "python " + " ".join(["benchmarks/overhead.py", *sys.argv[1:]])
    lines = ["# Eraser inference overhead: whole generations of the toy pipeline (CPU)", "",
             f"`{cmd}`", "",
             "Base: a copy of the pipeline with no erasers or hooks. Overhead: median of the "
             "per-pair ratios of ABBA-ordered generations, with a bootstrap 95% interval.", "",
             "| erasers | rank | eraser params | % of UNet | images × steps | pairs | base s | "
             "erased s | overhead | 95% interval |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['erasers']} | {r['rank']} | {r['eraser_params']:,} | "
              f"{100 * r['param_ratio']:.2f}% | {r['images']} × {r['steps']} | {r['repeats']} | "
              f"{r['base_s']:.4f} | {r['erased_s']:.4f} | {100 * r['overhead_ratio']:+.2f}% | "
              f"{100 * r['overhead_low']:+.2f}% to {100 * r['overhead_high']:+.2f}% |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
