"""How a soft-prompt attack gets past an eraser: what the erasers add under the attack.

For finished protocol runs (Receler erasers), one soft-prompt attack of the protocol's kind
is run from the concept's simple prompt, and then, on the base model's images of the
concept noised at several timesteps, the script compares the plain prompt with the
attacked one:

* ``eraser_norm``: the mean ‖eraser output‖ per position, over every eraser layer, inside
  and outside the concept's guidance mask |ε(c) − ε(∅)| (top ``MASK_SHARE`` of positions):
  does the attack switch the erasers off, or do they still fire?
* ``denoise_loss``: the attack's own objective, ‖ε_erased − ε‖², for the base model, the
  erased model on the plain prompt and the erased model under the attack;
* ``soft_attention``: the share of the cross-attention mass that the image positions put
  on the soft tokens' positions, plain prompt (end and padding tokens there) against the
  attack (frozen model).

    python benchmarks/attack_anatomy.py RUN [RUN ...] --out benchmarks/results/robustness

writes ``attack_anatomy.json`` and ``attack_anatomy.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

TIMESTEPS = [200, 500, 800]
MASK_SHARE = 0.25  # the mask: this share of positions where |ε(c) − ε(∅)| is largest


def _norms(outputs: dict[str, torch.Tensor], mask: torch.Tensor, latent_hw) -> tuple[float, float]:
    """Mean eraser-output norm per position inside and outside ``mask`` (B, h, w)."""
    from receler.attention import layer_hw, resize_mask

    inside, outside = [], []
    for out in outputs.values():
        if out.ndim == 4:
            out = out.flatten(2).transpose(1, 2)
        b, n, _ = out.shape
        m = resize_mask(mask.float(), layer_hw(n, latent_hw)).reshape(b, n) > 0.5
        norm = out.float().norm(dim=-1)  # (B, HW)
        inside.append(norm[m].mean().item() if m.any() else 0.0)
        outside.append(norm[~m].mean().item() if (~m).any() else 0.0)
    return sum(inside) / len(inside), sum(outside) / len(outside)


@torch.no_grad()
def anatomy(run: Path, steps: int) -> dict:
    from receler import load_pipeline
    from receler.attack import AttackConfig, soft_prompt_attack, target_latents
    from receler.attention import capture_cross_attention
    from receler.erasers import erasers_disabled, record_eraser_outputs
    from receler.methods import load_edit
    from receler.pipeline import Conditioning, encode, latent_shape, unet_eps
    from receler.protocol import Protocol
    from receler.runs import protocol_config, read_results
    from receler.sampling import SamplerSettings

    res = read_results(run)
    c = res["config"]
    proto = Protocol(protocol_config(res, run), show_progress=False)
    settings = SamplerSettings.for_model(proto.model)
    pipe = load_pipeline(proto.model, device=c.get("device"), dtype=c.get("dtype"))
    load_edit(pipe, run / "erasers")
    unet = pipe.unet
    prompt = proto.concept_prompt()
    attack = AttackConfig(**{**c["attack"], "steps": steps})
    latents = target_latents(pipe, prompt, attack.target_images, steps=settings.steps,
                             guidance=settings.guidance, seed=attack.seed,
                             base=lambda: erasers_disabled(unet))
    with torch.enable_grad():
        hidden, _ = soft_prompt_attack(pipe, prompt, latents, attack)
    plain, attacked, empty = encode(pipe, [prompt]), Conditioning(hidden), encode(pipe, [""])
    start = len(pipe.tokenizer(prompt)["input_ids"]) - 1
    soft_idx = list(range(start, start + attack.tokens))
    latent_hw = latent_shape(pipe)[1:]
    g = torch.Generator("cpu").manual_seed(0)
    rows = []
    for t_ in TIMESTEPS:
        n = len(latents)
        t = torch.full((n,), t_, dtype=torch.long)
        eps = torch.randn(latents.shape, generator=g).to(latents.dtype)
        z = pipe.scheduler.add_noise(latents, eps, t)

        def batch(cond, n=n):
            return cond.with_hidden(cond.hidden.expand(n, -1, -1))

        with erasers_disabled(unet):
            e_c = unet_eps(unet, z, t, batch(plain))
            e_0 = unet_eps(unet, z, t, batch(empty))
            with capture_cross_attention(unet, detach=True) as maps:
                unet_eps(unet, z, t, batch(attacked))
            with capture_cross_attention(unet, detach=True) as maps_plain:
                unet_eps(unet, z, t, batch(plain))
        guide = (e_c - e_0).float().abs().mean(1)  # (n, H, W)
        cut = guide.flatten(1).quantile(1 - MASK_SHARE, dim=1).view(n, 1, 1)
        mask = guide >= cut
        row = {"timestep": t_, "denoise_loss": {}, "eraser_norm": {}}
        with erasers_disabled(unet):
            row["denoise_loss"]["base, plain prompt"] = (e_c.float() - eps).pow(2).mean().item()
        for name, cond in (("plain prompt", plain), ("attacked prompt", attacked)):
            with record_eraser_outputs(unet) as outs:
                e = unet_eps(unet, z, t, batch(cond))
            row["denoise_loss"][f"erased, {name}"] = (e.float() - eps).pow(2).mean().item()
            inside, outside = _norms(outs, mask, latent_hw)
            row["eraser_norm"][name] = {"inside_mask": inside, "outside_mask": outside}
        def share(store):  # (B, heads, HW, T) per layer: mass on the soft tokens' positions
            vals = [probs[..., soft_idx].sum(-1).mean().item() for probs in store.values()]
            return sum(vals) / len(vals)

        row["soft_attention"] = {"plain prompt": share(maps_plain),
                                 "attacked prompt": share(maps)}
        rows.append(row)
    return {"run": str(run), "method": run.name, "concept": res["concept"], "prompt": prompt,
            "attack_steps": steps, "attack_tokens": attack.tokens,
            "attack_success_soft": res.get("attack_success_soft"), "timesteps": rows}


def to_markdown(items: list[dict]) -> str:
    lines = ["# What the erasers add under a soft-prompt attack", "",
             "Mean ‖eraser output‖ per position inside / outside the concept's guidance mask, "
             "plain prompt against attacked prompt, on the base model's images of the concept "
             "noised at t; the attack's denoising loss; the soft tokens' share of the "
             "attention.", "",
             "| run | t | eraser norm in mask, plain → attacked | outside mask, plain → "
             "attacked | loss base | loss erased plain | loss erased attacked | soft "
             "attention |", "|---|---|---|---|---|---|---|---|"]
    for it in items:
        for r in it["timesteps"]:
            p, a, d = r["eraser_norm"]["plain prompt"], r["eraser_norm"]["attacked prompt"], \
                r["denoise_loss"]
            lines.append(
                f"| {it['method']} | {r['timestep']} | {p['inside_mask']:.3f} → "
                f"{a['inside_mask']:.3f} | {p['outside_mask']:.3f} → {a['outside_mask']:.3f} | "
                f"{d['base, plain prompt']:.4f} | {d['erased, plain prompt']:.4f} | "
                f"{d['erased, attacked prompt']:.4f} | "
                f"{r['soft_attention']['plain prompt']:.3f} → "
                f"{r['soft_attention']['attacked prompt']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--steps", type=int, default=100, help="attack steps")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "robustness")
    args = ap.parse_args(argv)
    from receler.config import EraserConfig

    for run in args.runs:
        if not (run / "results.json").is_file() or not (run / "erasers").is_dir():
            print(f"error: {run} is not a finished `receler protocol` run (no results.json or "
                  "erasers/): pass the run folders of Receler runs", file=sys.stderr)
            return 2
        cfg = run / "erasers" / "eraser_config.json"
        if cfg.is_file() and EraserConfig.load(cfg).site != "output":
            print(f"error: {run}'s erasers act on text tokens (--eraser-site input); this "
                  "measures erasers on the attention output: pass output-site runs",
                  file=sys.stderr)
            return 2
    from receler.serialization import atomic_write

    items = [anatomy(run, args.steps) for run in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(items, indent=2) + "\n"
    atomic_write(args.out / "attack_anatomy.json", lambda tmp: tmp.write_text(text))
    md = to_markdown(items)
    atomic_write(args.out / "attack_anatomy.md", lambda tmp: tmp.write_text(md))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
