from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from conftest import tiny_unet
from diffusers import UNet2DConditionModel

from receler import EraserConfig, attach_erasers, get_erasers, load_erasers, save_erasers
from receler.sampling import SamplerSettings, generate
from receler.serialization import CONFIG_FILE, ERASERS_FILE, save_tensors


def images(pipe):
    imgs = generate(pipe, ["a photo of car", "dog"], [3, 4], settings=SamplerSettings(steps=3))
    return torch.stack([torch.tensor(list(i.tobytes())) for i in imgs])


def trained_erasers(pipe):
    erasers = attach_erasers(pipe.unet, rank=4)
    g = torch.Generator().manual_seed(0)
    for e in erasers.values():
        with torch.no_grad():
            for p in e.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return erasers


def test_round_trip_gives_identical_outputs(pipe, tiny_model_dir, tmp_path):
    from receler import load_pipeline

    trained_erasers(pipe)
    expected = images(pipe)
    save_erasers(pipe.unet, tmp_path, EraserConfig(concepts=["car"], base_model="tiny"))
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert cfg["rank"] == 4 and cfg["concepts"] == ["car"] and cfg["receler_version"]
    assert len(cfg["layers"]) == len(get_erasers(pipe.unet))

    fresh = load_pipeline(str(tiny_model_dir), device="cpu")
    assert not torch.equal(images(fresh), expected)  # the erasers do change the images
    loaded = load_erasers(fresh, tmp_path)
    assert loaded.concepts == ["car"]
    assert torch.equal(images(fresh), expected)


def test_mismatched_unet_is_refused_with_layer_and_shapes(pipe, tmp_path):
    trained_erasers(pipe)
    save_erasers(pipe.unet, tmp_path, EraserConfig())
    other = UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=16, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2)
    with pytest.raises(ValueError, match=r"down_blocks\.0\..*attn2\.down\.weight.*\(4, 8\).*\(4, 16\)"):
        load_erasers(other, tmp_path)
    assert not get_erasers(other)  # refused before touching any module


def test_missing_layer_is_refused(pipe, tmp_path):
    trained_erasers(pipe)
    save_erasers(pipe.unet, tmp_path, EraserConfig())
    bigger = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=4,
        cross_attention_dim=16, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2)
    with pytest.raises(ValueError, match="has no weights for layer"):
        load_erasers(bigger, tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_file_is_refused(tmp_path, damage):
    unet = tiny_unet()
    trained_erasers(type("P", (), {"unet": unet})())
    save_erasers(unet, tmp_path, EraserConfig())
    path = tmp_path / ERASERS_FILE
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x80\x04K" + data[3:],
                      "empty": b""}[damage])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_erasers(tiny_unet(), tmp_path)


def test_no_temporary_files_are_left(tmp_path):
    unet = tiny_unet()
    attach_erasers(unet, rank=4)
    save_erasers(unet, tmp_path, EraserConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, ERASERS_FILE]


def test_saved_files_get_the_umask_mode_not_a_private_one(tmp_path):
    """Files are written through a temporary file; mkstemp creates it 0600, which would
    leave eraser files unreadable to the rest of a team sharing them."""
    old = os.umask(0o022)
    try:
        save_tensors(tmp_path / "t.safetensors", {"x": torch.zeros(2)})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "t.safetensors").stat().st_mode) == 0o644
