"""Detector of the toy world: a small CNN that tells which classes and styles an image shows.

It stands in for the classifiers of the real benchmarks (ResNet on CIFAR-10 classes,
NudeNet for nudity). Outputs are independent sigmoids: one per object class
(multi-label, since a scene may hold two objects) and one per style. Weights are shipped
as safetensors with a JSON config next to them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from receler.toyworld.model import ASSET_DIR
from receler.toyworld.vocab import CLASSES, STYLES

DETECTOR_DIR = ASSET_DIR / "detector"


@dataclass
class DetectorConfig:
    """Architecture of the detector."""

    channels: tuple[int, ...] = (16, 32, 64)  # conv widths; each level halves the resolution
    hidden: int = 128  # width of the hidden linear layer
    image_size: int = 32  # input side in pixels (other sizes are resized to it)
    classes: list[str] = field(default_factory=lambda: list(CLASSES))  # class output order
    styles: list[str] = field(default_factory=lambda: list(STYLES))  # style output order

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError("DetectorConfig.classes must not be empty")
        self.channels = tuple(self.channels)


class ToyDetector(nn.Module):
    """CNN with sigmoid outputs for classes and styles."""

    def __init__(self, cfg: DetectorConfig | None = None):
        super().__init__()
        self.cfg = cfg or DetectorConfig()
        layers: list[nn.Module] = []
        c_in = 3
        for c in self.cfg.channels:
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Linear(2 * c_in, self.cfg.hidden),
            nn.ReLU(inplace=True),
            nn.Linear(self.cfg.hidden, len(self.cfg.classes) + len(self.cfg.styles)),
        )

    @property
    def classes(self) -> list[str]:
        return self.cfg.classes

    @property
    def styles(self) -> list[str]:
        return self.cfg.styles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, n_classes + n_styles) of images (N, 3, H, W) in [0, 1]."""
        if x.shape[-2:] != (self.cfg.image_size,) * 2:
            x = F.interpolate(
                x, size=self.cfg.image_size, mode="bilinear", antialias=True, align_corners=False
            )
        h = self.features(x * 2 - 1)  # (N, C, s, s)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (N, 2C)
        return self.head(h)

    @torch.no_grad()
    def predict(self, images, *, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Class and style probabilities.

        Args:
            images: list of PIL images, or a float tensor (N, 3, H, W) in [0, 1].
            batch_size: images per forward pass.

        Returns:
            ``class_probs`` (N, n_classes) and ``style_probs`` (N, n_styles), float32 on CPU.
        """
        x = to_tensor(images)
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        out = torch.cat(
            [
                torch.sigmoid(self(x[i : i + batch_size].to(dev))).float().cpu()
                for i in range(0, len(x), batch_size)
            ]
        )
        self.train(was_training)
        n = len(self.cfg.classes)
        return {"class_probs": out[:, :n], "style_probs": out[:, n:]}


def to_tensor(images) -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1] from PIL images or a tensor."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        return images.float()
    if not isinstance(images, (list, tuple)):
        raise TypeError(
            f"images must be a list of PIL images or a tensor, got {type(images).__name__}"
        )
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)  # (N, 3, H, W)


def save_detector(det: ToyDetector, folder: str | Path = DETECTOR_DIR) -> Path:
    """Write detector.safetensors and detector.json into ``folder``."""
    from safetensors.torch import save_file

    import receler

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in det.state_dict().items()},
        str(folder / "detector.safetensors"),
    )
    cfg = asdict(det.cfg)
    cfg["receler_version"] = getattr(receler, "__version__", "unknown")
    (folder / "detector.json").write_text(
        json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8"
    )
    return folder


def load_detector(
    folder: str | Path | None = None, *, device: str | torch.device = "cpu"
) -> ToyDetector:
    """Load the shipped detector (or one saved with ``save_detector``) in eval mode.

    Raises:
        FileNotFoundError: no detector weights in ``folder``.
    """
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else DETECTOR_DIR
    weights = folder / "detector.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"No toy detector at {folder}: train it with scripts/toyworld/train_detector.py (see docs/toyworld.md)."
        )
    cfg = json.loads((folder / "detector.json").read_text(encoding="utf-8"))
    cfg.pop("receler_version", None)
    det = ToyDetector(DetectorConfig(**cfg))
    det.load_state_dict(load_file(str(weights)))
    return det.to(device).eval()
