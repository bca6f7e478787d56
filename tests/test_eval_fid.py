"""Fréchet distance: closed forms, identities, and the two feature extractors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from receler.eval.fid import (
    InceptionFeatures,
    ToyFeatures,
    compute_fid,
    extract_features,
    feature_statistics,
    fid_from_features,
    frechet_distance,
)

# m1, s1, m2, s2 (standard deviations): d = (m1 - m2)^2 + s1^2 + s2^2 - 2 s1 s2
GAUSS_1D = [
    (0.0, 1.0, 0.0, 1.0),
    (0.0, 1.0, 3.0, 1.0),
    (1.0, 2.0, -1.0, 0.5),
    (-2.5, 0.1, 4.0, 3.0),
    (0.0, 0.0, 0.0, 2.0),  # a point mass against a Gaussian
]


@pytest.mark.parametrize("m1,s1,m2,s2", GAUSS_1D)
def test_1d_closed_form(m1, s1, m2, s2):
    d = frechet_distance(np.array([m1]), np.array([[s1**2]]), np.array([m2]), np.array([[s2**2]]))
    assert d == pytest.approx((m1 - m2) ** 2 + s1**2 + s2**2 - 2 * s1 * s2, rel=1e-9, abs=1e-12)


def test_diagonal_closed_form_sums_over_dimensions():
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 2.0, 1.0])
    d = frechet_distance(m1, np.diag(s1**2), m2, np.diag(s2**2))
    assert d == pytest.approx(np.sum((m1 - m2) ** 2 + (s1 - s2) ** 2), rel=1e-9)


def _random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d


def test_symmetry_and_self_distance():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    c1, c2 = _random_cov(rng, 6), _random_cov(rng, 6)
    # Tolerance: sqrtm of a non-symmetric product, float64 rounding.
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(
        frechet_distance(mu2, c2, mu1, c1), rel=1e-8
    )
    assert frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-9)
    feats = rng.normal(size=(200, 8))
    assert fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-9)
    assert fid_from_features(feats, feats + 1.0) == pytest.approx(8.0, rel=1e-9)  # |shift|^2


def _frechet_by_eigh(mu1, s1, mu2, s2):
    """Independent reference: tr sqrt(S1 S2) = tr sqrt(S1^½ S2 S1^½), a symmetric PSD matrix,
    so its eigenvalues are real and >= 0 up to rounding (no sqrtm, no eps retry)."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()


@pytest.mark.parametrize("n, d", [(2, 5), (3, 8), (4, 4)])
def test_singular_covariances_stay_finite_and_correct(n, d):
    # Rank-deficient covariances (no more samples than dimensions), as with too few images:
    # sigma1 @ sigma2 is singular. Whether or not the square root needs the eps retry (that
    # depends on the scipy version and on rounding), the distance must be finite and equal
    # the eigendecomposition reference within O(sqrt(eps)) of the retry.
    rng = np.random.default_rng(n * 10 + d)
    a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 0.5
    sa, sb = feature_statistics(a), feature_statistics(b)
    expected = _frechet_by_eigh(sa.mu, sa.sigma, sb.mu, sb.sigma)
    got = fid_from_features(a, b)
    assert np.isfinite(got)
    assert got == pytest.approx(expected, abs=1e-2)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-4)  # identical sets


def test_singular_covariances_known_value():
    # Diagonal, each of rank 1: sqrt(S1 S2) = diag(2, 0), so the distance is 1 + 4 - 4 = 1
    # plus |mu1 - mu2|^2 = 1.
    d = frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.array([1.0, 0.0]),
                         np.diag([4.0, 0.0]))
    assert d == pytest.approx(2.0, abs=1e-5)


def test_feature_statistics_exact():
    stats = feature_statistics(torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]]))
    assert stats.n == 3
    np.testing.assert_array_equal(stats.mu, [2.0, 2.0])
    np.testing.assert_array_equal(stats.sigma, [[4.0, 3.0], [3.0, 3.0]])  # unbiased (N - 1)


@pytest.mark.parametrize("bad", [np.zeros((1, 4)), np.zeros(4), np.zeros((2, 2, 2))])
def test_feature_statistics_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(bad)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


class StandInToyDetector:
    """Toy detector stand-in: features are the RGB values of the top-left pixel."""

    def features(self, images):
        return torch.tensor([[float(c) for c in im.getpixel((0, 0))] for im in images])


def test_toy_features_and_compute_fid_on_folders(tmp_path):
    colours_a = [(10, 20, 30), (20, 20, 30), (30, 40, 30), (40, 20, 50)]
    colours_b = [(c[0] + 5, c[1], c[2]) for c in colours_a]  # shifted by 5 in red
    for name, colours in (("a", colours_a), ("b", colours_b)):
        (tmp_path / name).mkdir()
        for i, c in enumerate(colours):
            Image.new("RGB", (4, 4), c).save(tmp_path / name / f"{i}_0.png")
    extractor = ToyFeatures(StandInToyDetector())
    assert compute_fid(tmp_path / "a", tmp_path / "a", extractor, batch_size=3) == pytest.approx(
        0.0, abs=1e-9
    )
    assert compute_fid(tmp_path / "a", tmp_path / "b", extractor, batch_size=3) == pytest.approx(
        25.0, rel=1e-9
    )
    images = [Image.new("RGB", (4, 4), c) for c in colours_a]
    np.testing.assert_array_equal(
        extract_features(images, extractor, batch_size=2), np.array(colours_a, float)
    )


class ModuleDetector(torch.nn.Module):
    """Stand-in shaped like the toy world's detector: ``features`` is a trunk, not a method."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Flatten()
        self.head = torch.nn.Sequential(
            torch.nn.Linear(12, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)
        )

    def predict(self, images):
        x = torch.stack(
            [torch.tensor(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in images]
        )
        return {
            "class_probs": self.head(self.features(x)).sigmoid(),
            "style_probs": torch.zeros(len(x), 0),
        }


def test_toy_features_fall_back_to_last_linear_input(monkeypatch):
    torch.manual_seed(0)
    det = ModuleDetector()
    removed = []  # the hook's handle is removed after the call (public API only)
    register = det.head[-1].register_forward_hook

    def register_and_watch(hook):
        handle = register(hook)
        remove = handle.remove
        monkeypatch.setattr(handle, "remove", lambda: (removed.append(True), remove()))
        return handle

    monkeypatch.setattr(det.head[-1], "register_forward_hook", register_and_watch)
    images = [Image.new("RGB", (2, 2), (i * 40, 100, 200 - i * 30)) for i in range(3)]
    feats = ToyFeatures(det)(images)
    assert feats.shape == (3, 5)
    # The captured features are what the output layer saw: it reproduces the logits.
    probs = det.predict(images)["class_probs"]
    assert det.head[-1](torch.from_numpy(feats)).sigmoid().equal(probs)
    assert removed == [True]  # the hook is removed


def test_toy_features_of_the_toy_world_detector():
    toyworld = pytest.importorskip("receler.toyworld", reason="toy world not written yet")
    torch.manual_seed(0)
    det = toyworld.ToyDetector().eval()
    images = [Image.new("RGB", (32, 32), c) for c in ["red", "white", "blue"]]
    feats = ToyFeatures(det)(images)
    assert feats.ndim == 2 and feats.shape[0] == 3
    assert np.isfinite(fid_from_features(feats, feats[::-1]))


def test_toy_features_need_features_or_linear():
    with pytest.raises(TypeError, match="features\\(images\\)"):
        ToyFeatures(object())


class MeanInception(torch.nn.Module):
    """Stand-in with the call signature of ``inception-2015-12-05.pt``: per-channel means."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 299, 299)
        return x.float().mean(dim=(2, 3))


def test_inception_from_torchscript(tmp_path):
    path = tmp_path / "inception.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in torch 2.13
        torch.jit.save(torch.jit.script(MeanInception()), str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        extractor = InceptionFeatures.from_torchscript(path)
    assert not [w for w in caught if "torch.jit" in str(w.message)]  # silenced for users
    images = [Image.new("RGB", (32, 24), (10, 200, 30)), Image.new("L", (50, 50), 7)]
    np.testing.assert_array_equal(extractor(images), [[10.0, 200.0, 30.0], [7.0, 7.0, 7.0]])


def test_inception_rejects_pickles_and_missing_files(tmp_path):
    pickled = tmp_path / "pt_inception.pth"
    torch.save({"w": torch.zeros(1)}, pickled)
    with pytest.raises(ValueError, match="not a TorchScript archive"):
        InceptionFeatures.from_torchscript(pickled)
    with pytest.raises(ValueError, match="does not exist"):
        InceptionFeatures.from_torchscript(tmp_path / "missing.pt")
