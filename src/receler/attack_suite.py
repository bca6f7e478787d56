"""Many independent soft-prompt attacks, pooled: an attack success rate worth ranking on.

One attack from one prompt, then 10 images, gives a 95% interval of about ±0.3. A suite
runs K attacks, each from its own prompt (the concept's simple prompt first, then its
paraphrases or other prompts of the concept) with its own attack seed, and generates N
images for each with seeds no other attack uses; the K·N images are pooled into one rate
with its Wilson interval. One optimisation per attack measures every step budget of a
curve (:func:`receler.attack.soft_attack_trajectory`), and each attack's counts are cached
in a JSON file named by a hash of everything that decides them, so a killed measurement
resumes and a longer curve reuses the budgets measured before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from .attack import AttackConfig, generate_from_embedding, soft_attack_trajectory
from .eval.metrics import to_dict, wilson
from .eval.prompts import PromptRow
from .viz import image_grid

IMAGE_SEED0 = 1000  # attack i uses image seeds IMAGE_SEED0 + i·N … + i·N + N − 1


def attack_plan(rows: dict[str, list[PromptRow]], concept: str, k: int, *, first: str,
                seed: int = 0) -> list[tuple[str, int]]:
    """``k`` (prompt, attack seed) pairs: ``first``, then the concept's other distinct prompts
    of the protocol's sets (simple, paraphrase, style) in turn; when there are fewer than
    ``k`` distinct prompts, they repeat with other seeds. Seeds are ``seed``, ``seed + 1``, …"""
    if k <= 0:
        raise ValueError(f"the number of attacks must be positive, got {k}")
    def distinct(names: tuple[str, ...], skip: list[str]) -> list[str]:
        out: list[str] = []
        for name in names:
            for r in rows.get(name, []):
                shows = r.class_name == concept or r.extra.get("style") == concept
                if shows and r.prompt not in skip and r.prompt not in out:
                    out.append(r.prompt)
        return out

    simple = distinct(("simple",), [first])
    other = distinct(("paraphrase", "style"), [first, *simple])
    mixed = [first]  # then paraphrases (or style prompts) and simple prompts in turn
    for i in range(max(len(simple), len(other))):
        mixed += other[i:i + 1] + simple[i:i + 1]
    return [(mixed[i % len(mixed)], seed + i) for i in range(k)]


def suite_key(which: str, detector: str, targets_prompt: str, settings) -> dict:
    """What, besides each attack's own settings, decides an attack's counts."""
    return {"model": which, "detector": detector, "targets": targets_prompt,
            "sampler": json.loads(json.dumps(asdict(settings), default=str))}


def _cache_file(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"attack_{digest}.json"


def soft_attack_suite(pipe, concept: str, plan: list[tuple[str, int]], latents, detector,
                      settings, config: AttackConfig, *, checkpoints: list[int], n_images: int,
                      key: dict, cache_dir: Path | None = None, grid_path: Path | None = None,
                      show_progress: bool = False) -> dict:
    """Run the attacks of ``plan`` and count the images in which ``concept`` is detected.

    Args:
        plan: ``(prompt, attack seed)`` per attack (:func:`attack_plan`).
        latents: the base model's clean latents of the concept (the attack's targets).
        config: tokens, lr, noise draws; ``steps`` is not read, ``seed`` is each attack's.
        checkpoints: attack step budgets to measure, e.g. ``[100, 300]``.
        key: what else decides the counts (:func:`suite_key`), part of each cache key.
        cache_dir: folder of the per-attack cache files (``None``: no cache); each attack's
            images at each budget are kept beside its file as one strip (``.png``).
        grid_path: where to draw every attack's images, one row per attack and budget,
            labelled with its successes (rows of attacks cached without a strip are left out).

    Returns:
        ``{"attacks": [per attack: prompt, seed, tokens, image_seeds, steps: {budget:
        {successes, total, loss}}], "pooled": {budget: Rate as a dict}}``, budgets as strings.
    """
    from .eval.detectors import evaluate_images
    from .methods.sld import attacked_through_guidance, through_guidance
    from .serialization import atomic_write

    if n_images <= 0:
        raise ValueError(f"images per attack must be positive, got {n_images}")
    attacks = []
    bar = tqdm(total=len(plan), desc=f"soft attacks ({config.tokens} tokens)",
               disable=not show_progress)
    for i, (prompt, seed) in enumerate(plan):
        cfg = replace(config, seed=seed)
        image_seeds = list(range(IMAGE_SEED0 + i * n_images, IMAGE_SEED0 + (i + 1) * n_images))
        attack_key = {**key, "prompt": prompt, "attack": {**cfg.key(), "steps": None},
                      "image_seeds": image_seeds}
        if attacked_through_guidance(pipe):  # a key of its own: not the bare UNet's attack
            attack_key["through_guidance"] = True
        path = _cache_file(Path(cache_dir), attack_key) if cache_dir is not None else None
        entry = json.loads(path.read_text()) if path is not None and path.is_file() else \
            {"key": attack_key, "steps": {}}
        missing = sorted({s for s in checkpoints if str(s) not in entry["steps"]})
        if missing:
            with through_guidance(pipe, settings):
                hidden, losses = soft_attack_trajectory(pipe, prompt, latents, cfg, missing)
            row = PromptRow(case_number=i, prompt=prompt, evaluation_seed=image_seeds[0])
            for s in missing:
                images = generate_from_embedding(pipe, hidden[s], image_seeds, settings)
                recs = evaluate_images([(row, j, im) for j, im in enumerate(images)], detector,
                                       labels_for=lambda _: [concept])
                entry["steps"][str(s)] = {"successes": sum(r.present(concept) for r in recs),
                                          "total": len(recs),
                                          "loss": losses[s - 1] if s else None}
                if path is not None:
                    strip = path.with_name(f"{path.stem}_{s}.png")
                    atomic_write(strip, lambda tmp, ims=images: image_grid(
                        ims, cols=len(ims)).save(tmp, "PNG"))
                    entry["steps"][str(s)]["strip"] = strip.name
            if path is not None:
                text = json.dumps(entry, indent=2) + "\n"
                atomic_write(path, lambda tmp, text=text: tmp.write_text(text))
        attacks.append({"prompt": prompt, "seed": seed, "tokens": cfg.tokens,
                        "image_seeds": [image_seeds[0], image_seeds[-1]],
                        "steps": {str(s): entry["steps"][str(s)] for s in checkpoints}})
        bar.update(1)
    bar.close()
    if grid_path is not None and cache_dir is not None:
        _draw_attacks(attacks, checkpoints, Path(cache_dir), Path(grid_path))
    pooled = {}
    for s in checkpoints:
        hits = sum(a["steps"][str(s)]["successes"] for a in attacks)
        total = sum(a["steps"][str(s)]["total"] for a in attacks)
        pooled[str(s)] = to_dict(wilson(hits, total))
    return {"attacks": attacks, "pooled": pooled}


def _draw_attacks(attacks: list[dict], checkpoints: list[int], cache_dir: Path,
                  out: Path) -> None:
    """One row per attack and budget: the strip kept beside the attack's cache file."""
    from .serialization import atomic_write

    strips, labels = [], []
    for i, a in enumerate(attacks):
        for s in checkpoints:
            step = a["steps"][str(s)]
            if "strip" in step and (cache_dir / step["strip"]).is_file():
                strips.append(Image.open(cache_dir / step["strip"]).convert("RGB"))
                labels.append(f"#{i} {s} steps {step['successes']}/{step['total']}")
    if not strips:
        return
    # strips are alike: their image count is the suite's n_images, part of every cache key
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: image_grid(strips, cols=1, row_labels=labels).save(tmp, "PNG"))
