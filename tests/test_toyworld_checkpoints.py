"""Resumable checkpoints of the toy-world training scripts (scripts/toyworld/common.py)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "toyworld"


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("toyworld_common", SCRIPTS / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make(seed: int):
    """A tiny model, AdamW, a LambdaLR with a closure (as in train_unet.py) and a caption RNG."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    warmup = 5
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    return model, opt, sched, random.Random(seed)


def train(model, opt, sched, steps: int = 3) -> None:
    for _ in range(steps):
        loss = model(torch.randn(8, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def draws(rng: random.Random) -> tuple:
    return torch.rand(3), np.random.rand(3), np.random.randn(), random.random(), rng.random()


def test_resume_round_trip(common, tmp_path):
    model, opt, sched, rng = make(0)
    train(model, opt, sched)
    common.seed_all(7)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    rng.random()
    path = tmp_path / "ckpt.safetensors"
    tensors, meta = common.training_state(
        {"model": model}, opt, sched, caption_rng=common.python_rng_json(rng.getstate()), step=3
    )
    common.save_checkpoint(path, tensors, meta)
    expected = draws(rng)  # what the saved RNG streams give next

    model2, opt2, sched2, rng2 = make(1)
    common.seed_all(123)
    assert common.has_checkpoint(path)
    tensors, meta = common.load_checkpoint(path)
    common.restore_training_state(tensors, meta, {"model": model2}, opt2, sched2)
    rng2.setstate(common.python_rng_state(meta["caption_rng"]))

    assert meta["step"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["state"].keys() == s2["state"].keys()
    for i, state in s1["state"].items():
        for k, v in state.items():
            assert torch.equal(v, s2["state"][i][k]) and v.dtype == s2["state"][i][k].dtype
    assert [g["lr"] for g in s1["param_groups"]] == [g["lr"] for g in s2["param_groups"]]
    assert sched.state_dict() == sched2.state_dict()
    assert sched2.lr_lambdas[0] is not None  # the closure survives load_state_dict
    got = draws(rng2)
    for a, b in zip(expected, got, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    # training on from both (same batches) gives the same weights
    for m, o, s in [(model, opt, sched), (model2, opt2, sched2)]:
        torch.manual_seed(5)
        train(m, o, s)
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k


def test_convert_legacy(common, tmp_path):
    model, opt, sched, rng = make(0)
    train(model, opt, sched)
    legacy = {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "sched": sched.state_dict(),
        "rng": common.rng_state(),
        "caption_rng": rng.getstate(),
        "step": 3,
        "args": {"out": tmp_path, "lr": 1e-2},
    }
    torch.save(legacy, tmp_path / "x_ckpt.pt")
    with pytest.raises(SystemExit, match="convert_checkpoints.py"):
        common.has_checkpoint(tmp_path / "x_ckpt.safetensors")
    dest = common.convert_legacy(tmp_path / "x_ckpt.pt")
    assert dest == tmp_path / "x_ckpt.safetensors" and (tmp_path / "x_ckpt.pt").is_file()
    model2, opt2, sched2, _ = make(1)
    tensors, meta = common.load_checkpoint(dest)
    common.restore_training_state(tensors, meta, {"model": model2}, opt2, sched2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    assert sched.state_dict() == sched2.state_dict()
    assert meta["args"] == {"out": str(tmp_path), "lr": 1e-2}
    assert common.python_rng_state(meta["caption_rng"]) == rng.getstate()
    assert torch.equal(torch.get_rng_state(), legacy["rng"]["torch"])
    assert random.getstate() == legacy["rng"]["python"]
    assert np.array_equal(np.random.get_state()[1], legacy["rng"]["numpy"][1])


def test_cached_tensor(common, tmp_path):
    x = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    torch.save(x, tmp_path / "lat.pt")  # a cache left by older scripts
    path = tmp_path / "lat.safetensors"
    assert torch.equal(common.cached_tensor(path, lambda: None), x) and path.is_file()
    assert torch.equal(common.cached_tensor(path, lambda: None), x)
    assert torch.equal(common.cached_tensor(tmp_path / "new.safetensors", lambda: x + 1), x + 1)
