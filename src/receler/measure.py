"""The protocol's two measurements that need the live pipeline: the attacks from one prompt,
and the latency of the erased model against the base model."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from .attack import (
    AttackConfig,
    discrete_token_attack,
    generate_from_embedding,
    soft_prompt_attack,
)
from .eval.detectors import evaluate_images
from .eval.metrics import detection_rate
from .eval.prompts import PromptRow
from .sampling import SamplerSettings, generate
from .viz import image_grid


def measure_latency(pipe, prompt: str, settings: SamplerSettings, *, repeats: int = 6,
                    n: int = 4, base: Callable | None = None) -> dict:
    """Median seconds to generate ``n`` images of ``prompt`` with the pipeline's edit on and
    off, interleaved in the same process so that machine load affects both alike, in ABBA
    order so that neither always runs first, after one warm-up. ``base()`` is a context
    manager giving the base model (default: the pipeline's edit disabled)."""
    from .methods import edit_disabled

    base = base or (lambda: edit_disabled(pipe))
    prompts, seeds = [prompt] * n, list(range(n))
    times: dict[str, list[float]] = {"base": [], "erased": []}
    generate(pipe, prompts, seeds, settings=settings, batch_size=n)  # warm-up
    for r in range(repeats):
        for which in (("base", "erased") if r % 2 == 0 else ("erased", "base")):
            with base() if which == "base" else nullcontext():
                start = time.perf_counter()
                generate(pipe, prompts, seeds, settings=settings, batch_size=n)
                times[which].append(time.perf_counter() - start)
    base, erased = statistics.median(times["base"]), statistics.median(times["erased"])
    return {"latency_base_s": base, "latency_s": erased, "overhead_ratio": erased / base - 1}


def measure_attacks(pipe, concept: str, prompt: str, latents, detector, settings: SamplerSettings,
                    config: AttackConfig, *, n_images: int, grid_path: Path | None = None,
                    show_progress: bool = False, soft: bool = True) -> dict:
    """Run both attacks from ``prompt`` and measure how often ``concept`` is detected in the
    images of the plain prompt, the soft-prompt attack (unless ``soft`` is false: the
    protocol measures it with :func:`receler.attack_suite.soft_attack_suite`) and the token
    attack."""
    from .methods.sld import through_guidance

    seeds = list(range(1000, 1000 + n_images))
    sets = {"plain": generate(pipe, [prompt] * n_images, seeds, settings=settings)}
    soft_losses = [None]
    if soft:
        with through_guidance(pipe, settings):
            hidden, soft_losses = soft_prompt_attack(pipe, prompt, latents, config,
                                                     show_progress=show_progress)
        sets["soft"] = generate_from_embedding(pipe, hidden, seeds, settings)
    with through_guidance(pipe, settings):
        text, token_losses = discrete_token_attack(pipe, prompt, latents, config,
                                                   show_progress=show_progress)
    sets["discrete"] = generate(pipe, [text] * n_images, seeds, settings=settings)
    row = PromptRow(case_number=0, prompt=prompt, evaluation_seed=0)
    rates = {}
    for name, images in sets.items():
        recs = evaluate_images([(row, i, im) for i, im in enumerate(images)], detector,
                               labels_for=lambda _: [concept])
        rates[name] = detection_rate(recs, concept).rate
    if grid_path is not None:
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        n = min(6, n_images)
        image_grid([im for images in sets.values() for im in images[:n]], cols=n,
                   scale=max(1, 96 // sets["plain"][0].size[0]),
                   row_labels=[{"discrete": "tokens"}.get(k, k) for k in sets]).save(grid_path)
    return {"prompt": prompt, "discrete_prompt": text, "success_plain": rates["plain"],
            "success_soft": rates.get("soft"), "success_discrete": rates["discrete"],
            "soft_loss": [soft_losses[0], soft_losses[-1]],
            "discrete_loss": [token_losses[0], token_losses[-1]]}
