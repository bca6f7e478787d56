"""An SDXL-style pipeline (two text encoders, pooled and time-id conditions) trains and
generates like SD 1.x: sizes come from the configs, nothing from SD 1.4."""

from __future__ import annotations

import torch
from conftest import make_tokenizer
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from receler import TrainConfig, Trainer, get_erasers
from receler.sampling import SamplerSettings, compare


def tiny_sdxl(folder) -> StableDiffusionXLPipeline:
    torch.manual_seed(0)
    tok = make_tokenizer(folder / "tok")
    tok2 = make_tokenizer(folder / "tok2")

    def text_config(hidden, proj=None):
        return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=2, num_attention_heads=2,
                              max_position_embeddings=tok.model_max_length,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, projection_dim=proj or hidden)

    enc1 = CLIPTextModel(text_config(8))
    enc2 = CLIPTextModelWithProjection(text_config(12, proj=10))
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=8 + 12, attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 * 6 + 10,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=enc1, text_encoder_2=enc2,
                                     tokenizer=tok, tokenizer_2=tok2, unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


def test_sdxl_style_pipeline_trains_and_generates(tmp_path):
    pipe = tiny_sdxl(tmp_path)
    config = TrainConfig(concepts="car", iterations=2, ddim_steps=4, adv_steps=1, adv_tokens=4,
                         rank=4, lr=1e-2, mask_image_every=0)
    Trainer(pipe, config, tmp_path / "out", show_progress=False).train()
    erasers = get_erasers(pipe.unet)
    # transformer_layers_per_block=(1, 2): 1 + 2 down, 2 mid, 2·2 + 2·1 up
    assert len(erasers) == 11 == sum(n.endswith("attn2") for n, _ in pipe.unet.named_modules())
    assert any(e.up.weight.abs().sum() > 0 for e in erasers.values())
    base, erased, grid = compare(pipe, ["a photo of car"], [0], settings=SamplerSettings(steps=2))
    assert base[0].size == erased[0].size == (16, 16)
    assert base[0].tobytes() != erased[0].tobytes()
