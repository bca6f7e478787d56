"""benchmarks/overhead.py: the erasers' FLOPs counted on the meta device are exactly their two
matrix products at every position of every cross-attention output; timings alternate ABBA."""

from __future__ import annotations

import pytest
import torch
from conftest import load_benchmark
from diffusers import UNet2DConditionModel

from receler import attach_erasers

SD_STYLE = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SDXL_STYLE = dict(SD_STYLE, cross_attention_dim=20, attention_head_dim=(2, 4),
                  use_linear_projection=True, transformer_layers_per_block=(1, 2),
                  addition_embed_type="text_time", addition_time_embed_dim=4,
                  projection_class_embeddings_input_dim=4 * 6 + 10)


@pytest.fixture(scope="module")
def overhead():
    return load_benchmark("overhead")


def eraser_flops_by_hand(config: dict, tokens: int, rank: int, batch: int, overhead) -> int:
    """2 FLOPs per multiply-add: down (C×rank) and up (rank×C) at each of the B·N positions
    of each attn2 output, whose shapes a real forward pass on the CPU records."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    shapes = []
    for name, m in unet.named_modules():
        if name.endswith("attn2"):
            m.register_forward_hook(lambda mod, args, out: shapes.append(out.shape))
    args, kwargs = overhead.unet_inputs(unet, tokens, batch)
    with torch.no_grad():
        unet(*args, **kwargs)
    assert shapes, "no cross-attention ran"
    return sum(2 * b * n * (c * rank + rank * c) for b, n, c in shapes)


@pytest.mark.parametrize("config", [SD_STYLE, SDXL_STYLE], ids=["sd", "sdxl"])
def test_flop_count_is_the_erasers_matrix_products(overhead, config):
    row = overhead.count_flops("tiny", config, tokens=7, rank=3, batch=2)
    expected = eraser_flops_by_hand(config, tokens=7, rank=3, batch=2, overhead=overhead)
    assert row["erased_flops"] - row["base_flops"] == expected
    assert row["flop_ratio"] == pytest.approx(expected / row["base_flops"])
    assert row["base_flops"] > 10 * expected  # the UNet itself was counted, not only erasers
    # the parameter share comes from a UNet with erasers attached like any other
    unet = UNet2DConditionModel(**config)
    erasers = attach_erasers(unet, 3)
    assert row["erasers"] == len(erasers)
    assert row["eraser_params"] == sum(p.numel() for e in erasers.values()
                                       for p in e.parameters())


def test_unknown_model_is_refused_with_the_choices(overhead):
    with pytest.raises(SystemExit, match="unknown model 'sd15'.*toy, sd14, sd21, sdxl"):
        overhead.model_config("sd15")


def test_abba_alternates_the_order_and_reports_the_median_pair_ratio(overhead):
    calls = []

    def one(which):  # a stand-in for a timed run: erased takes 10% longer, the 3rd pair 50%
        calls.append(which)
        pair = (len(calls) - 3) // 2
        return 1.0 if which == "base" else (1.5 if pair == 2 else 1.1)

    t = overhead.abba(one, repeats=4, min_seconds=0)
    assert calls == ["base", "erased",  # warm-up
                     "base", "erased", "erased", "base", "base", "erased", "erased", "base"]
    assert t["repeats"] == 4 and t["base_s"] == 1.0
    assert t["overhead_ratio"] == pytest.approx(0.1)  # the median shrugs off the slow pair
    assert t["overhead_low"] == pytest.approx(0.1) and t["overhead_high"] <= 0.5 + 1e-9
