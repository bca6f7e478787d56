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
    size = (left + cols * (w + pad) + pad, top + rows * (h + pad) + pad)
    grid = Image.new("RGB", size, (235, 235, 235))
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


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], xs: list[int],
           ys: list[float], color: tuple[int, int, int], title: str, window: int) -> None:
    """One curve (thin) and its running mean over ``window`` points (thick), own y scale."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline="black")
    hi = max(ys) if max(ys) > 0 else 1.0
    span = max(xs[-1] - xs[0], 1)

    def pt(x, y):
        return x0 + (x1 - x0) * (x - xs[0]) / span, y1 - (y1 - y0) * y / hi

    faint = tuple(int(c + (255 - c) * 0.6) for c in color)
    if len(xs) > 1:
        draw.line([pt(x, y) for x, y in zip(xs, ys, strict=True)], fill=faint, width=1)
        smooth = np.convolve(ys, np.ones(window) / window, mode="valid") if len(ys) >= window else ys
        draw.line([pt(x, y) for x, y in zip(xs[len(xs) - len(smooth):], smooth, strict=True)],
                  fill=color, width=2)
    draw.text((x0 + 4, y0 + 2), f"{title} (running mean of {window})", fill=color)
    draw.text((x0 - 46, y0), f"{hi:.3g}", fill="black")
    draw.text((x0 - 12, y1 - 10), "0", fill="black")


def loss_curves(log_path: Path, out_path: Path, *, width: int = 640, panel_height: int = 140
                ) -> Path:
    """Plot the losses of ``train_log.jsonl`` (erase, mask, anchor, attack), one panel each."""
    rows = [json.loads(ln) for ln in Path(log_path).read_text().splitlines() if ln.strip()]
    if not rows:
        raise ValueError(f"{log_path} has no rows to plot")
    series = {"loss_erase": (200, 40, 40), "loss_mask": (40, 110, 200),
              "loss_anchor": (150, 60, 160), "loss_attack_last": (30, 150, 60)}
    present = {k: c for k, c in series.items() if any(r.get(k) is not None for r in rows)}
    img = Image.new("RGB", (width, 30 + len(present) * (panel_height + 20)), "white")
    draw = ImageDraw.Draw(img)
    window = max(1, len(rows) // 20)
    for i, (key, color) in enumerate(present.items()):
        pts = [(r["iteration"], r[key]) for r in rows if r.get(key) is not None]
        top = 10 + i * (panel_height + 20)
        _panel(draw, (50, top, width - 10, top + panel_height), [p[0] for p in pts],
               [p[1] for p in pts], color, key, window)
    bottom = img.height - 16
    draw.text((50, bottom), f"iteration {rows[0]['iteration']}", fill="black")
    draw.text((width - 110, bottom), f"iteration {rows[-1]['iteration']}", fill="black")
    img.save(out_path)
    return Path(out_path)
