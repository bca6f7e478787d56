"""Erasing and generating at Stable Diffusion 1.4's size, with random weights.

A whole SD 1.4 pipeline is built from its published configs (UNet, VAE, CLIP ViT-L/14 text
encoder; the tokenizer is the toy world's, since only its ids' range matters), so nothing
is downloaded. The cost of a pass does not depend on the weights. For each dtype, in a
process of its own (so that peak memory is that dtype's alone), it runs:

* one real Receler training iteration (``Trainer``, the library's loop, rank 128) with
  ``--ddim-steps`` and ``--adv-steps`` as given, timed, with its UNet passes counted;
* the parts an iteration is made of, timed alone: a guided no-grad UNet step (batch 2,
  the z_t sampler's), an attack step (forward and backward, batch 1) and the eraser step
  (forward and backward, batch 2: plain and attacked prompt);
* one 512-px generation with ``--gen-steps`` guided steps and the VAE decode.

From the parts it estimates an iteration and a concept at the paper's settings (50 DDIM
steps, so on average 24.5 sampler steps, 10 or 50 attack steps, 500 iterations) and a
50-step generation. What is measured and what is estimated are kept apart in the JSON.

    python benchmarks/sd_scale.py [--dtypes fp32,bf16] [--device cpu] [--ddim-steps 2]
        [--adv-steps 1] [--gen-steps 2] [--gradient-checkpointing]

Writes benchmarks/results/sd_scale.json and sd_scale.md. On the CPU this takes minutes
per dtype; on a GPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # overhead.py beside this script holds SD 1.4's UNet config
from overhead import CONFIGS  # noqa: E402

# SD 1.4's published configs (built with random weights, nothing downloaded); every size
# used afterwards is read from the built models.
SD14_UNET = CONFIGS["sd14"][0]
SD14_VAE = dict(block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3,
                latent_channels=4, layers_per_block=2, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
SD14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 projection_dim=768)
# A reduced topology with the same structure, for the test of this script.
TINY_UNET = dict(SD14_UNET, sample_size=8, block_out_channels=(8, 8, 16, 16), norm_num_groups=4,
                 cross_attention_dim=16, attention_head_dim=2, layers_per_block=1)
TINY_VAE = dict(SD14_VAE, block_out_channels=(4, 4, 4, 4), norm_num_groups=2, sample_size=64,
                layers_per_block=1)
TINY_TEXT = dict(SD14_TEXT, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, projection_dim=16)
TOPOLOGIES = {"sd14": (SD14_UNET, SD14_VAE, SD14_TEXT), "tiny": (TINY_UNET, TINY_VAE, TINY_TEXT)}
PAPER = {"ddim_steps": 50, "adv_steps": (10, 50), "iterations": 500, "gen_steps": 50}


def build_pipeline(topology: str, device: str, dtype: torch.dtype, folder: Path):
    """An SD-1.x pipeline of ``topology`` with random weights, on ``device`` in ``dtype``."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from receler.toyworld.tokenizer import build_tokenizer

    unet_cfg, vae_cfg, text_cfg = TOPOLOGIES[topology]
    torch.manual_seed(0)
    tokenizer = build_tokenizer(folder / "tokenizer", model_max_length=text_cfg[
        "max_position_embeddings"], words=["a", "photo", "of", "car", "dog"])
    text = CLIPTextModel(CLIPTextConfig(**text_cfg, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_cfg), text_encoder=text, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**unet_cfg),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device, dtype)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False).eval()
    return pipe


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn, *args, **kwargs) -> float:
    sync(device)
    start = time.perf_counter()
    fn(*args, **kwargs)
    sync(device)
    return time.perf_counter() - start


def peak_memory_mb(device: str) -> dict:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kilobytes
    out = {"peak_rss_mb": rss_kb / 1024}
    if device.startswith("cuda"):
        out["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def worker(args) -> dict:
    """Everything for one dtype, in this process."""
    from receler import TrainConfig
    from receler.erasers import erasers_disabled, record_eraser_outputs
    from receler.objective import erase_loss, insert_soft_tokens
    from receler.pipeline import DTYPES, encode, unet_eps
    from receler.train import Trainer

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device, dtype = args.device, DTYPES[args.worker]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        pipe = build_pipeline(args.topology, device, dtype, tmp)
        build_s = time.perf_counter() - start
        if args.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        unet = pipe.unet
        unet_params = sum(p.numel() for p in unet.parameters())

        # 1. one real training iteration of the library's loop
        cfg = TrainConfig(concepts=["car"], iterations=1, rank=128, ddim_steps=args.ddim_steps,
                          adv_steps=args.adv_steps, checkpoint_every=1000, mask_image_every=0,
                          seed=0)
        trainer = Trainer(pipe, cfg, tmp / "run", show_progress=False)
        iteration_s = timed(device, trainer.train)
        passes = {"forward": trainer.passes.forward, "backward": trainer.passes.backward}
        log = json.loads((tmp / "run" / "train_log.jsonl").read_text().splitlines()[-1])
        eraser_params = sum(p.numel() for p in trainer.optimizer.param_groups[0]["params"])

        # 2. the parts, alone (erasers attached, as in training)
        c, h, w = unet.config.in_channels, unet.config.sample_size, unet.config.sample_size
        z = torch.randn(1, c, h, w, device=device, dtype=dtype)
        t = torch.tensor([500], device=device)
        both = encode(pipe, ["", "car"])
        cond = encode(pipe, ["car"])
        parts = {}
        with torch.no_grad():
            parts["sampler_step_s"] = timed(device, unet_eps, unet, z.expand(2, -1, -1, -1), t,
                                            both)
            with erasers_disabled(unet):
                parts["frozen_pass_s"] = timed(device, unet_eps, unet, z, t, cond)
        soft = cond.hidden[0, 2:2 + cfg.adv_tokens].float().clone().requires_grad_(True)

        def attack_step():
            e = unet_eps(unet, z, t, cond.with_hidden(insert_soft_tokens(cond.hidden, soft, 2)))
            e.float().pow(2).mean().backward()

        def eraser_step():
            with record_eraser_outputs(unet):
                e = unet_eps(unet, z.expand(2, -1, -1, -1), t, cond.cat(cond))
            erase_loss(e, torch.zeros_like(e)).backward()

        parts["attack_step_s"] = timed(device, attack_step)
        parts["eraser_step_s"] = timed(device, eraser_step)

        # 3. one generation, 512 px, with the VAE decode
        gen_s = timed(device, pipe, ["a photo of a car"], num_inference_steps=args.gen_steps,
                      guidance_scale=7.5, output_type="pil",
                      generator=torch.Generator("cpu").manual_seed(0))
    return {"dtype": args.worker, "device": device, "topology": args.topology,
            "device_name": device_name(device), "threads": torch.get_num_threads(),
            "gradient_checkpointing": args.gradient_checkpointing,
            "unet_params": unet_params, "eraser_params": eraser_params,
            "eraser_share": eraser_params / unet_params, "build_s": build_s,
            "measured": {"iteration_s": iteration_s, "ddim_steps": args.ddim_steps,
                         "sampler_steps_taken": log["ddim_step"], "adv_steps": args.adv_steps,
                         "unet_passes": passes, **parts, "generation_s": gen_s,
                         "gen_steps": args.gen_steps, **peak_memory_mb(device)}}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def estimate(m: dict) -> dict:
    """An iteration, a concept and a generation at the paper's settings, from the parts."""
    out = {}
    mean_steps = (PAPER["ddim_steps"] - 1) / 2  # steps_done ~ U{0..49}
    for adv in PAPER["adv_steps"]:
        it = (mean_steps * m["sampler_step_s"] + 2 * m["frozen_pass_s"]
              + adv * m["attack_step_s"] + m["eraser_step_s"])
        out[f"iteration_s_adv{adv}"] = it
        out[f"concept_h_adv{adv}"] = it * PAPER["iterations"] / 3600
    per_step = m["sampler_step_s"]  # a guided generation step is the sampler's step
    out["generation_50_steps_s"] = m["generation_s"] + (PAPER["gen_steps"] - m["gen_steps"]) * per_step
    return out


def to_markdown(rows: list[dict]) -> str:
    lines = ["# Receler at Stable Diffusion 1.4 size (random weights)", "",
             f"Device: {rows[0]['device_name']} ({rows[0]['device']}, {rows[0]['threads']} "
             f"threads). Erasers: {rows[0]['eraser_params']:,} parameters, "
             f"{100 * rows[0]['eraser_share']:.2f}% of the UNet's {rows[0]['unet_params']:,}.", "",
             "Measured (one run each):", "",
             "| dtype | iteration s (ddim, adv steps) | UNet passes fwd/bwd | sampler step s | "
             "attack step s | eraser step s | generation s (steps) | peak RSS MB | peak CUDA MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["measured"]
        lines.append(
            f"| {r['dtype']} | {m['iteration_s']:.1f} ({m['ddim_steps']}, {m['adv_steps']}) | "
            f"{m['unet_passes']['forward']}/{m['unet_passes']['backward']} | "
            f"{m['sampler_step_s']:.2f} | {m['attack_step_s']:.2f} | {m['eraser_step_s']:.2f} | "
            f"{m['generation_s']:.1f} ({m['gen_steps']}) | {m['peak_rss_mb']:.0f} | "
            f"{m.get('peak_cuda_allocated_mb', float('nan')):.0f} |")
    lines += ["", "Estimated from the measured parts at the paper's settings (50 DDIM steps, "
              "500 iterations; attack 10 steps as receler's default, 50 as `--preset paper`):",
              "", "| dtype | iteration s, adv 10 | concept h, adv 10 | iteration s, adv 50 | "
              "concept h, adv 50 | 50-step generation s |", "|---|---|---|---|---|---|"]
    for r in rows:
        e = r["estimated"]
        lines.append(f"| {r['dtype']} | {e['iteration_s_adv10']:.1f} | {e['concept_h_adv10']:.2f} "
                     f"| {e['iteration_s_adv50']:.1f} | {e['concept_h_adv50']:.2f} | "
                     f"{e['generation_50_steps_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--topology", default="sd14", choices=sorted(TOPOLOGIES))
    p.add_argument("--ddim-steps", type=int, default=2, help="z_t sampler steps of the real "
                   "iteration (t is drawn among them); 50 in the paper")
    p.add_argument("--adv-steps", type=int, default=1, help="attack steps of the real iteration")
    p.add_argument("--gen-steps", type=int, default=2, help="guided steps of the generation")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=HERE / "results" / "sd_scale.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    rows = []
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        if dtype not in ("fp32", "bf16", "fp16"):
            raise SystemExit(f"error: unknown dtype {dtype!r}: choose from fp32, bf16, fp16")
        cmd = [sys.executable, __file__, "--worker", dtype, "--device", args.device,
               "--topology", args.topology, "--ddim-steps", str(args.ddim_steps),
               "--adv-steps", str(args.adv_steps), "--gen-steps", str(args.gen_steps)]
        cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        print(f"[sd_scale] {dtype} on {args.device} ...", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: the {dtype} worker failed:\n{done.stderr[-2000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["estimated"] = estimate(row["measured"])
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(rows, indent=2) + "\n")
        tmp.replace(args.out)
        args.out.with_suffix(".md").write_text(to_markdown(rows))
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
