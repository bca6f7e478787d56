"""Tiny real Stable Diffusion pipelines built in-process from configs: nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from receler.toyworld.tokenizer import build_tokenizer

# Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads that
# spin against each other make the suite 10-20× slower.
torch.set_num_threads(1)

WORDS = ["a", "photo", "of", "car", "truck", "dog", "cat", "red", "blue", "picture", "the"]
MAX_LEN = 24


def make_tokenizer(folder: Path, words=WORDS, max_len: int = MAX_LEN):
    """A CLIPTokenizer whose vocabulary makes each word of ``words`` one token."""
    return build_tokenizer(folder, model_max_length=max_len, words=words)


def tiny_unet(cross_dim: int = 16, sample_size: int = 8) -> UNet2DConditionModel:
    """Cross-attention at two resolutions (8×8 and 4×4) plus the mid block."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=cross_dim,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def tiny_pipeline(folder: Path) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    tokenizer = make_tokenizer(folder / "_tok")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_LEN, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                        sample_size=16)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet(),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny pipeline saved with save_pretrained (safetensors), like a hub folder."""
    folder = tmp_path_factory.mktemp("tiny-sd") / "model"
    tiny_pipeline(folder.parent).save_pretrained(folder, safe_serialization=True)
    (folder / "receler_defaults.json").write_text(json.dumps({"num_inference_steps": 4,
                                                                  "guidance_scale": 3.0}))
    return folder


@pytest.fixture
def pipe(tiny_model_dir):
    from receler import load_pipeline

    return load_pipeline(str(tiny_model_dir), device="cpu")
