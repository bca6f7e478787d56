"""Fréchet distance between two sets of image features (FID when the features are Inception's).

``frechet_distance`` follows pytorch-fid: ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))``
with scipy's ``sqrtm``; if the product is singular (scipy warns, or the root is not
finite) it retries with ``eps`` added to both diagonals, and it drops an imaginary part that numerical error left on the square root.

Two feature extractors are provided:

* ``ToyFeatures``: the toy detector's penultimate features, available offline once the
  toy detector is trained; distances from it are only comparable with each other, not
  with published FIDs.
* ``InceptionFeatures``: the standard FID network. It loads the TorchScript file
  ``inception-2015-12-05.pt`` (the TensorFlow FID Inception-v3 ported by NVIDIA, used by
  StyleGAN2-ADA and clean-fid) with ``torch.jit.load``. That is not Python unpickling:
  TorchScript archives are read by torch's own loader, which only builds tensors and
  TorchScript types; the file still contains code that runs when called, so only load a
  file you trust. ``torch.jit`` is deprecated in recent torch releases but still works;
  its deprecation warning is silenced here. No torchvision is needed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg

logger = logging.getLogger(__name__)

FeatureExtractor = Callable[[list[Image.Image]], np.ndarray]  # images -> (N, D) features


@dataclass
class FeatureStats:
    """Mean and covariance of a set of features."""

    mu: np.ndarray  # (D,) mean
    sigma: np.ndarray  # (D, D) covariance, unbiased (divides by N - 1)
    n: int  # number of feature vectors


def feature_statistics(features: np.ndarray | torch.Tensor) -> FeatureStats:
    """Mean and unbiased covariance of ``features`` of shape (N, D), in float64.

    Args:
        features: at least two feature vectors.

    Returns:
        A ``FeatureStats``.
    """
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(
            f"feature_statistics needs an (N, D) array with N >= 2, got shape {f.shape}; "
            "pass more images."
        )
    return FeatureStats(
        mu=f.mean(axis=0), sigma=np.atleast_2d(np.cov(f, rowvar=False)), n=f.shape[0]
    )


def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """Matrix square root and whether it failed (non-finite, or scipy flagged a singular matrix)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        root = linalg.sqrtm(a)
    flagged = any(issubclass(w.category, linalg.LinAlgWarning) for w in caught)
    return root, flagged or not np.isfinite(root).all()


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, eps: float = 1e-6
) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1, mu2: means, shape (D,).
        sigma1, sigma2: covariances, shape (D, D).
        eps: diagonal offset used when ``sigma1 @ sigma2`` is singular.

    Returns:
        The distance (>= 0 up to rounding).
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"Shapes do not match: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, "
            f"sigma2 {sigma2.shape}; both sets must use the same feature extractor."
        )
    diff = mu1 - mu2
    covmean, singular = _sqrtm(sigma1 @ sigma2)
    if singular:
        logger.warning("sigma1 @ sigma2 is singular; adding %g to the diagonals", eps)
        offset = np.eye(d) * eps
        covmean, _ = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise ValueError(
                f"sqrtm(sigma1 @ sigma2) has an imaginary part of {imag:.3g}; the covariances are "
                "too ill-conditioned. Use more images than feature dimensions."
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between two (N, D) feature sets."""
    sa, sb = feature_statistics(a), feature_statistics(b)
    return frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)


class ToyFeatures:
    """Penultimate features of the toy detector, shape (N, D).

    Uses ``detector.features(images) -> (N, D)`` when the detector has such a method. A
    detector that is an ``nn.Module`` without one (its ``features`` may be a conv trunk)
    gives the input of its last ``nn.Linear``, captured by a hook during ``predict``.
    """

    def __init__(self, detector=None):
        """Args:
        detector: a loaded toy detector; ``None`` loads ``receler.toyworld.load_detector()``.
        """
        if detector is None:
            from receler.toyworld import load_detector

            detector = load_detector()
        self.detector = detector
        method = getattr(detector, "features", None)
        self._method = (
            method if callable(method) and not isinstance(method, torch.nn.Module) else None
        )
        linears = (
            [m for m in detector.modules() if isinstance(m, torch.nn.Linear)]
            if isinstance(detector, torch.nn.Module)
            else []
        )
        if self._method is None and not linears:
            raise TypeError(
                f"{type(detector).__name__} has neither a features(images) method nor a final "
                "nn.Linear layer; give the toy detector a features(images) -> (N, D) method."
            )
        self._last_linear = linears[-1] if linears else None

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        images = [im.convert("RGB") for im in images]
        if self._method is not None:
            return torch.as_tensor(self._method(images)).float().cpu().numpy()
        captured: list[torch.Tensor] = []
        hook = self._last_linear.register_forward_hook(
            lambda _m, args, _out: captured.append(args[0].detach().float().cpu().clone())
        )
        try:
            self.detector.predict(images)
        finally:
            hook.remove()
        return torch.cat(captured).numpy()  # (N, D), D = in_features of the last Linear


class InceptionFeatures:
    """2048-d pool features of the FID Inception-v3 from a local TorchScript file.

    Images are resized to 299x299 with PIL bicubic resampling (clean-fid's "clean" mode)
    and passed as uint8 NCHW, as the TorchScript network expects.
    """

    SIZE = 299

    def __init__(self, model: torch.nn.Module, *, device: str | torch.device = "cpu"):
        """Args:
        model: a module called as ``model(uint8 NCHW, return_features=True) -> (N, 2048)``.
        device: where it runs.
        """
        self.model = model.to(device).eval()
        self.device = torch.device(device)

    @classmethod
    def from_torchscript(
        cls, path: str | Path, *, device: str | torch.device = "cpu"
    ) -> InceptionFeatures:
        """Load ``inception-2015-12-05.pt`` (or any TorchScript module with that call signature).

        Args:
            path: local file; download it once from NVIDIA's StyleGAN2-ADA metrics page.
            device: where it runs.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(
                f"Inception file {path} does not exist; download inception-2015-12-05.pt and pass its path."
            )
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", category=DeprecationWarning, message=r".*torch\.jit.*"
            )
            try:
                model = torch.jit.load(str(path), map_location=device)
            except RuntimeError as e:
                raise ValueError(
                    f"{path} is not a TorchScript archive ({e}); pass inception-2015-12-05.pt, "
                    "not a pickled state dict such as pytorch-fid's .pth file."
                ) from e
        return cls(model, device=device)

    def _tensor(self, images: list[Image.Image]) -> torch.Tensor:
        arrays = [
            np.asarray(im.convert("RGB").resize((self.SIZE, self.SIZE), Image.BICUBIC))
            for im in images
        ]
        return (
            torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        )  # (N, 3, H, W) uint8

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        feats = self.model(self._tensor(images).to(self.device), return_features=True)
        return feats.float().cpu().numpy()


def extract_features(
    images: Sequence[Image.Image | str | Path], extractor: FeatureExtractor, *, batch_size: int = 50
) -> np.ndarray:
    """Features of ``images`` (PIL images or file paths), loaded ``batch_size`` at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    chunks = []
    for i in range(0, len(images), batch_size):
        batch = []
        for im in images[i : i + batch_size]:
            if isinstance(im, Image.Image):
                batch.append(im.convert("RGB"))
            else:
                with Image.open(im) as f:
                    batch.append(f.convert("RGB"))
        chunks.append(np.asarray(extractor(batch), dtype=np.float64))
    if not chunks:
        raise ValueError("No images to extract features from.")
    return np.concatenate(chunks)


def folder_images(folder: str | Path) -> list[Path]:
    """Image files (png, jpg, jpeg, webp) in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Image folder {folder} does not exist.")
    suffixes = {".png", ".jpg", ".jpeg", ".webp"}
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def compute_fid(
    images_a: Sequence[Image.Image | str | Path] | str | Path,
    images_b: Sequence[Image.Image | str | Path] | str | Path,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 50,
) -> float:
    """Fréchet distance between two image sets under ``extractor``.

    Args:
        images_a, images_b: lists of images or paths, or folders of images.
        extractor: e.g. ``ToyFeatures()`` or ``InceptionFeatures.from_torchscript(path)``.
        batch_size: images per extractor call.

    Returns:
        The distance; with ``InceptionFeatures`` this is FID.
    """
    sets = []
    for images in (images_a, images_b):
        if isinstance(images, (str, Path)):
            images = folder_images(images)
        sets.append(extract_features(images, extractor, batch_size=batch_size))
    return fid_from_features(sets[0], sets[1])
