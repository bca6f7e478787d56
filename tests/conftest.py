"""Tiny real Stable Diffusion pipelines built in-process from configs: nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from receler.protocol import PromptSets
from receler.toyworld.tokenizer import build_tokenizer

# Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads that
# spin against each other make the suite 10-20× slower.
torch.set_num_threads(1)

WORDS = ["a", "photo", "of", "car", "truck", "dog", "cat", "red", "blue", "picture", "the"]
MAX_LEN = 24


def load_benchmark(name: str):
    """A script of ``benchmarks/`` (not a package) imported as a module, for its functions."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


class ColourDetector:
    """Scores a label by how far the image's mean colour is from grey: a real, if crude,
    image statistic, so rates vary between images and models."""

    name, threshold = "colour", 0.5

    def detect(self, images, labels):
        out = []
        for im in images:
            a = np.asarray(im, dtype=np.float32) / 255.0
            score = float(np.abs(a.mean((0, 1)) - a.mean()).sum() * 8)
            out.append({label: score + 0.1 * (len(label) % 3) for label in labels})
        return out


@pytest.fixture
def colour_detector() -> str:
    """The name of :class:`ColourDetector`, registered."""
    from receler.eval.detectors import register_detector

    register_detector(ColourDetector.name, ColourDetector)
    return ColourDetector.name


@pytest.fixture
def prompt_sets(tmp_path):
    """Six simple prompts over car, dog and truck, two car paraphrases, one two-object row."""
    simple = "case_number,prompt,class,evaluation_seed\n" + "".join(
        f"{i},a photo of a {c},{c},{i}\n" for i, c in enumerate(["car", "car", "dog", "dog",
                                                                  "truck", "truck"]))
    para = "case_number,prompt,class,evaluation_seed\n0,a red picture,car,5\n1,the blue,car,6\n"
    two = "case_number,prompt,class,class2,evaluation_seed\n0,a car dog,car,dog,3\n"
    for name, text in (("s", simple), ("p", para), ("t", two)):
        (tmp_path / f"{name}.csv").write_text(text)
    return PromptSets(tmp_path / "s.csv", tmp_path / "p.csv", tmp_path / "t.csv")
