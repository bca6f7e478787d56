"""Inference overhead of the erasers on real-sized UNets, measured side by side.

The UNets are built from their published configs with random weights (the cost of a
forward pass does not depend on the weights), so SD 1.4 and SD 2.1 are measured here
without downloading them. Base and erased forward passes alternate in one process, so
machine load hits both alike; the ratio of medians is reported.

    python benchmarks/overhead.py [--models sd14,sd21,toy] [--repeats 7] [--min-seconds 30]

Writes benchmarks/results/overhead.json and overhead.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from receler import attach_erasers, erasers_disabled
from receler.erasers import count_parameters

HERE = Path(__file__).resolve().parent
SD_BLOCKS = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
CONFIGS = {  # name -> (UNet config, text tokens)
    "sd14": (dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, **SD_BLOCKS), 77),
    "sd21": (dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                  use_linear_projection=True, **SD_BLOCKS), 77),
}


def toy_config() -> tuple[dict, int]:
    from receler.toyworld.model import TextConfig, UNetConfig

    return UNetConfig().kwargs(), TextConfig().max_position_embeddings


@torch.no_grad()
def measure(name: str, config: dict, tokens: int, rank: int, repeats: int, batch: int,
            min_seconds: float) -> dict:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    size = config["sample_size"]
    z = torch.randn(batch, unet.config.in_channels, size, size)
    ctx = torch.randn(batch, tokens, unet.config.cross_attention_dim)
    erasers = attach_erasers(unet, rank)
    times = {"base": [], "erased": []}
    unet(z, 500, encoder_hidden_states=ctx)  # warm-up
    start_all = time.perf_counter()
    while len(times["base"]) < repeats or time.perf_counter() - start_all < min_seconds:
        for which in ("base", "erased"):
            ctx_mgr = erasers_disabled(unet) if which == "base" else torch.no_grad()
            with ctx_mgr:
                start = time.perf_counter()
                unet(z, 500, encoder_hidden_states=ctx)
                times[which].append(time.perf_counter() - start)
    base, erased = statistics.median(times["base"]), statistics.median(times["erased"])
    unet_params = sum(p.numel() for n, p in unet.named_parameters() if ".eraser." not in n)
    return {"model": name, "rank": rank, "erasers": len(erasers),
            "eraser_params": count_parameters(erasers), "unet_params": unet_params,
            "param_ratio": count_parameters(erasers) / unet_params, "batch": batch,
            "latent": size, "base_s": base, "erased_s": erased, "overhead_ratio": erased / base - 1,
            "repeats": len(times["base"]), "device": "cpu", "threads": torch.get_num_threads()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="sd14,sd21,toy")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7, help="at least this many pairs of runs")
    p.add_argument("--min-seconds", type=float, default=30,
                   help="and keep alternating for at least this long (small models are noisy)")
    p.add_argument("--batch", type=int, default=2, help="2 = one classifier-free guidance step")
    p.add_argument("--out", type=Path, default=HERE / "results" / "overhead.json")
    args = p.parse_args()
    rows = []
    for name in args.models.split(","):
        config, tokens = toy_config() if name == "toy" else CONFIGS[name]
        rows.append(measure(name, config, tokens, args.rank, args.repeats, args.batch,
                            args.min_seconds))
        r = rows[-1]
        print(f"{name}: {r['erasers']} erasers, {100 * r['param_ratio']:.2f}% of the UNet's "
              f"parameters, UNet forward {r['base_s']:.3f} s → {r['erased_s']:.3f} s "
              f"({100 * r['overhead_ratio']:+.1f}%)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# Eraser inference overhead (UNet forward, CPU, median of alternating runs)", "",
             f"`python benchmarks/overhead.py --models {args.models} --repeats {args.repeats} "
             f"--min-seconds {args.min_seconds:g}`", "",
             "| model | erasers | eraser params | % of UNet | runs | base s | erased s | overhead |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['erasers']} | {r['eraser_params']:,} | "
              f"{100 * r['param_ratio']:.2f}% | {r['repeats']} | {r['base_s']:.4f} | "
              f"{r['erased_s']:.4f} | {100 * r['overhead_ratio']:+.1f}% |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
