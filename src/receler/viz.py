"""Pictures: image grids, concept-mask pictures and loss curves, with PIL only."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def image_grid(images: Sequence[Image.Image], cols: int, *, row_labels: Sequence[str] = (),
               col_labels: Sequence[str] = (), pad: int = 2, scale: int = 1) -> Image.Image:
    """Lay images out in a grid, with optional text labels left of rows and above columns."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    w, h = w * scale, h * scale
    rows = (len(images) + cols - 1) // cols
    left = 8 + 6 * max((len(s) for s in row_labels), default=0) if row_labels else 0
    top = 14 if col_labels else 0
    grid = Image.new("RGB", (left + cols * (w + pad) + pad, top + rows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        img = img.convert("RGB").resize((w, h), Image.NEAREST) if scale != 1 else img.convert("RGB")
        grid.paste(img, (left + pad + c * (w + pad), top + pad + r * (h + pad)))
    for r, label in enumerate(row_labels):
        draw.text((2, top + pad + r * (h + pad) + h // 2 - 5), label, fill="black")
    for c, label in enumerate(col_labels):
        draw.text((left + pad + c * (w + pad), 1), label, fill="black")
    return grid


def heatmap(x: torch.Tensor, size: int) -> Image.Image:
    """A ``(h, w)`` map as a blue→yellow picture, min-max normalised."""
    x = x.detach().float().cpu()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    v = x.numpy()
    rgb = np.stack([v, 0.2 + 0.6 * v, 1.0 - v], axis=-1)  # (h, w, 3)
    img = Image.fromarray((rgb * 255).astype(np.uint8))
    return img.resize((size, size * x.shape[0] // x.shape[1]), Image.NEAREST)


def mask_picture(attention: torch.Tensor, mask: torch.Tensor, size: int = 128,
                 title: str = "") -> Image.Image:
    """Side by side: the concept's average attention and the binary mask made from it."""
    m = Image.fromarray((mask.float().cpu().numpy() * 255).astype(np.uint8)).convert("RGB")
    m = m.resize((size, size * mask.shape[0] // mask.shape[1]), Image.NEAREST)
    return image_grid([heatmap(attention, size), m], cols=2,
                      col_labels=[f"attention {title}".strip(), "mask"])


class MaskPictures:
    """Training callback: every ``every`` iterations, save the mask the regulariser used."""

    def __init__(self, out_dir: Path, every: int):
        self.dir, self.every = Path(out_dir) / "masks", every

    def __call__(self, trainer, result) -> None:
        if not self.every or result.iteration % self.every or result.mask is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"iter{result.iteration:06d}_{result.concept.replace(' ', '_')}.png"
        mask_picture(result.attention, result.mask, title=result.concept).save(self.dir / name)


def loss_curves(log_path: Path, out_path: Path, *, size: tuple[int, int] = (640, 360)) -> Path:
    """Plot the losses of ``train_log.jsonl`` (erase, mask, last attack) as a PNG."""
    rows = [json.loads(ln) for ln in Path(log_path).read_text().splitlines() if ln.strip()]
    if not rows:
        raise ValueError(f"{log_path} has no rows to plot")
    series = {"loss_erase": (200, 40, 40), "loss_mask": (40, 120, 200),
              "loss_attack_last": (40, 160, 60)}
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    box = (50, 20, w - 10, h - 30)
    draw.rectangle(box, outline="black")
    values = [r[k] for r in rows for k in series if r.get(k) is not None]
    hi = max(values) if values else 1.0
    hi = hi if hi > 0 else 1.0
    n = max(len(rows) - 1, 1)
    for i, (key, color) in enumerate(series.items()):
        pts = [(box[0] + (box[2] - box[0]) * j / n, box[3] - (box[3] - box[1]) * r[key] / hi)
               for j, r in enumerate(rows) if r.get(key) is not None]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=1)
        draw.text((box[0] + 5 + 130 * i, 4), key, fill=color)
    draw.text((4, box[1]), f"{hi:.3g}", fill="black")
    draw.text((4, box[3] - 10), "0", fill="black")
    draw.text((box[0], box[3] + 8), "iteration 1", fill="black")
    draw.text((box[2] - 80, box[3] + 8), f"iteration {rows[-1]['iteration']}", fill="black")
    img.save(out_path)
    return Path(out_path)
