"""The Stable Diffusion path, checked on tiny pipelines of SD's topology built in-process:
the safety checker is off on every load path, trainable weights train in fp32 whatever
the pipeline's dtype, UCE's defaults are the reference script's, and a concept may hold
commas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_pipeline
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor

from receler import TrainConfig, load_pipeline
from receler.methods import erase_with
from receler.methods.uce import UceOptions, uce_parameter_names, uce_weights

# ------------------------------------------------------------------ safety checker


@pytest.fixture(scope="module")
def hub_like_folder(tmp_path_factory) -> Path:
    """A tiny SD pipeline saved *with* a safety checker, as CompVis/stable-diffusion-v1-4 is;
    the checker is SD's own class, tiny and random, set to flag every image."""
    folder = tmp_path_factory.mktemp("hub") / "snapshot"
    pipe = tiny_pipeline(folder.parent)
    config = CLIPConfig(
        text_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=1),
        vision_config=dict(image_size=32, patch_size=16, hidden_size=8, intermediate_size=16,
                           num_hidden_layers=1, num_attention_heads=1),
        projection_dim=8,
    )  # fmt: skip
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():  # every concept score cos - weight > 0: every image is flagged
        checker.concept_embeds_weights.fill_(-10.0)
    with_checker = StableDiffusionPipeline(
        **{k: v for k, v in pipe.components.items() if k not in ("safety_checker",
                                                                 "feature_extractor")},
        safety_checker=checker,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32},
                                             crop_size={"height": 32, "width": 32}),
        requires_safety_checker=True,
    )
    with_checker.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["safety_checker"][0] is not None  # the saved pipeline names its checker
    return folder


@pytest.fixture
def mocked_hub(hub_like_folder, monkeypatch):
    """Resolve the hub id ``CompVis/stable-diffusion-v1-4`` to ``hub_like_folder`` without a
    network: the snapshot download and the single-file config download are mocked."""
    import receler.pipeline as pipeline_module

    hub_id = "CompVis/stable-diffusion-v1-4"
    calls = []

    def download(name, **kwargs):
        assert name == hub_id
        calls.append(kwargs)
        return str(hub_like_folder)

    def hf_hub_download(repo_id, filename, **kwargs):
        assert repo_id == hub_id
        return str(hub_like_folder / filename)

    monkeypatch.setattr(DiffusionPipeline, "download", classmethod(lambda cls, n, **k: download(n, **k)))
    monkeypatch.setattr(pipeline_module, "hf_hub_download", hf_hub_download)
    return hub_id, calls


def test_safety_checker_is_off_by_hub_id(mocked_hub):
    hub_id, calls = mocked_hub
    loaded = load_pipeline(hub_id, device="cpu")
    assert calls and calls[0].get("safety_checker", "unset") is None  # its weights not fetched
    assert loaded.safety_checker is None
    out = loaded(["a photo of a car"], num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0))
    assert out.images.std() > 0  # not blacked out
    assert not any(out.nsfw_content_detected or [])


def test_safety_checker_is_off_by_folder(hub_like_folder):
    loaded = load_pipeline(str(hub_like_folder), device="cpu")
    assert loaded.safety_checker is None
    # The same folder loaded by diffusers alone keeps the checker, which blacks images out:
    # the check above is not vacuous.
    plain = StableDiffusionPipeline.from_pretrained(hub_like_folder)
    out = plain(["a photo of a car"], num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0))
    assert plain.safety_checker is not None and out.images.max() == 0


def test_generate_says_the_safety_checker_is_off(tiny_model_dir, tmp_path, capsys):
    from receler.cli import main

    rc = main(["generate", "--model", str(tiny_model_dir), "--prompt", "a photo of a car",
               "--num-images", "1", "--out", str(tmp_path / "imgs"), "--device", "cpu"])
    assert rc == 0
    assert "safety checker off" in capsys.readouterr().err


# ------------------------------------------------------------------ UCE, as the reference


def reference_uce(pipe, concepts, retain, *, lamb=0.5, erase_scale=1.0, preserve_scale=None):
    """UCE's reference ``edit_model`` (technique 'replace', guided towards ' '), transcribed
    independently in float64: erased rows from the concept's last word token to the end,
    aligned with the guide's; the retained prompts ('' first) on every position."""
    retain = [""] + list(retain)
    s_p = max(0.1, 1 / len(retain)) if preserve_scale is None else preserve_scale
    tok = pipe.tokenizer

    def embed(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")
        with torch.no_grad():
            hidden = pipe.text_encoder(ids.input_ids)[0].double()
        return hidden, ids.attention_mask.sum(1) - 2  # index of the last word token

    params = dict(pipe.unet.named_parameters())
    out = {}
    for name in uce_parameter_names(pipe.unet):
        w = params[name].detach().double()
        mat1 = lamb * w
        mat2 = lamb * torch.eye(w.shape[1], dtype=torch.float64)
        for concept in concepts:
            (old, new), (i, j) = embed([concept, " "])
            far = max(int(i), int(j))
            old = old[int(i):len(old) - max(0, far - int(i))]
            new = new[int(j):len(new) - max(0, far - int(j))]
            mat1 = mat1 + erase_scale * (new @ w.T).T @ old
            mat2 = mat2 + erase_scale * old.T @ old
        for text in retain:
            (keep, _), _ = embed([text, text])
            mat1 = mat1 + s_p * (keep @ w.T).T @ keep
            mat2 = mat2 + s_p * keep.T @ keep
        out[name] = mat1 @ torch.inverse(mat2)
    return out


@pytest.mark.parametrize("preserve", [[], ["dog"], ["dog", "a photo of cat", "truck"]])
def test_uce_defaults_are_the_reference_scripts(pipe, preserve):
    ours = uce_weights(pipe, ["car"], UceOptions(preserve=preserve))
    ref = reference_uce(pipe, ["car"], preserve)
    for name, w in ref.items():
        torch.testing.assert_close(ours[name].double(), w, rtol=1e-4, atol=1e-5)  # fp32 storage


def test_uce_old_settings_stay_available(pipe):
    old = UceOptions(preserve_empty=False, lamb=0.1, preserve_scale=0.1)
    assert old.preserved_prompts == [] and old.scale_preserved == 0.1
    a = uce_weights(pipe, ["car"], old)
    b = uce_weights(pipe, ["car"], UceOptions())
    assert any(not torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("bad, match", [
    ({"lamb": "x"}, "lamb must be a number"), ({"preserve_scale": -1}, "preserve_scale"),
    ({"preserve_empty": "yes"}, "preserve_empty must be true or false"),
])  # fmt: skip
def test_uce_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        UceOptions(**bad)


def test_uce_erase_records_reference_defaults(pipe, tmp_path):
    result = erase_with("uce", pipe, TrainConfig(concepts=["car"]), tmp_path / "uce")
    saved = json.loads((tmp_path / "uce" / "eraser_config.json").read_text())
    assert result.options["lamb"] == 0.5 and result.options["preserve_empty"] is True
    assert saved["options"]["preserve_scale"] is None  # the reference's max(0.1, 1/len)


# ------------------------------------------------------------------ dtype: fp32 masters


def _esd_delta(tiny_model_dir, tmp_path, dtype):
    from receler.methods import EDIT_FILE
    from receler.serialization import read_tensors

    pipe = load_pipeline(str(tiny_model_dir), device="cpu", dtype=dtype)
    before = {k: v.detach().float().clone() for k, v in pipe.unet.named_parameters()}
    cfg = TrainConfig(concepts=["car"], iterations=2, ddim_steps=4, lr=1e-5, seed=1,
                      checkpoint_every=10)
    erase_with("esd-x", pipe, cfg, tmp_path / str(dtype), show_progress=False)
    edit, _ = read_tensors(tmp_path / str(dtype) / EDIT_FILE)
    assert all(t.dtype == torch.float32 for t in edit.values())  # the masters are saved
    return {n: edit[n] - before[n] for n in edit}, pipe


def test_bf16_esd_step_changes_weights_as_fp32_does(tiny_model_dir, tmp_path):
    fp32, _ = _esd_delta(tiny_model_dir, tmp_path, torch.float32)
    bf16, pipe = _esd_delta(tiny_model_dir, tmp_path, "bf16")
    assert pipe.unet.dtype == torch.bfloat16
    a = torch.cat([fp32[n].flatten() for n in fp32])
    b = torch.cat([bf16[n].flatten() for n in fp32])
    assert a.abs().max() > 0
    # Two Adam steps of lr 1e-5 move each weight by up to 2e-5, far below bf16's resolution
    # at these magnitudes (~5e-4 at 0.1): without fp32 masters the change would be exactly 0.
    # With them it follows the fp32 run; the bf16 forward changes the gradients slightly,
    # so the tolerance is on the direction and size of the whole update.
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0)
    assert cosine > 0.9, cosine
    assert 0.8 < b.norm() / a.norm() < 1.25


def test_dtype_flag_names_the_choices():
    from receler.pipeline import parse_dtype

    assert parse_dtype("fp16") == torch.float16 and parse_dtype(None) is None
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        parse_dtype("float8")


@pytest.mark.parametrize("command", ["erase", "generate", "attack", "protocol"])
def test_every_loading_command_has_dtype(command):
    from receler.cli import build_parser

    sub = next(a for a in build_parser()._subparsers._group_actions).choices[command]  # noqa: SLF001
    assert any("--dtype" in a.option_strings for a in sub._actions)  # noqa: SLF001


# ------------------------------------------------------------------ concepts with commas


def test_concept_with_commas_is_one_concept(tiny_model_dir, tmp_path):
    from receler.cli import main

    out = tmp_path / "run"
    rc = main(["erase", "--model", str(tiny_model_dir), "--concept", "red, cat", "--out",
               str(out), "--iterations", "1", "--ddim-steps", "2", "--adv-steps", "0",
               "--rank", "2", "--device", "cpu", "--quiet"])
    assert rc == 0
    assert json.loads((out / "eraser_config.json").read_text())["concepts"] == ["red, cat"]


def test_several_concepts_by_repeating_the_flag(tiny_model_dir, tmp_path):
    from receler.cli import main

    out = tmp_path / "run"
    rc = main(["erase", "--model", str(tiny_model_dir), "--concept", "car", "--concept", "truck",
               "--out", str(out), "--iterations", "2", "--ddim-steps", "2", "--adv-steps", "0",
               "--rank", "2", "--device", "cpu", "--quiet"])
    assert rc == 0
    assert json.loads((out / "eraser_config.json").read_text())["concepts"] == ["car", "truck"]


@pytest.mark.parametrize("concepts, match", [
    (["car, truck", "dog"], "one concept or two"),
    (["star", "star"], "listed twice"),
    (["car", " "], "empty concept"),
])  # fmt: skip
def test_ambiguous_or_repeated_concepts_are_refused(tiny_model_dir, tmp_path, capsys, concepts,
                                                     match):
    from receler.cli import main

    argv = ["erase", "--model", str(tiny_model_dir), "--out", str(tmp_path / "run")]
    for c in concepts:
        argv += ["--concept", c]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ------------------------------------------------------------------ the paper preset


def test_paper_preset_trains_the_papers_inner_loop(tiny_model_dir, tmp_path, capsys):
    from receler.cli import build_parser, main

    erase_help = next(a for a in build_parser()._subparsers._group_actions).choices["erase"]  # noqa: SLF001
    assert "--preset" in erase_help.format_help() and "paper" in erase_help.format_help()
    out = tmp_path / "run"
    rc = main(["erase", "--model", str(tiny_model_dir), "--concept", "car", "--preset", "paper",
               "--out", str(out), "--iterations", "1", "--ddim-steps", "2", "--adv-steps", "2",
               "--rank", "2", "--device", "cpu", "--quiet"])
    assert rc == 0
    train = json.loads((out / "eraser_config.json").read_text())["train"]
    assert train["adv_lr"] == 0.1 and train["adv_weight_decay"] == 0.1
    assert train["adv_init"] == "uniform" and train["erase_on"] == "attacked"
    assert train["adv_tokens"] == 16 and train["reg_weight"] == 0.1
    assert train["adv_steps"] == 2 and train["iterations"] == 1  # flags still win
    assert "recommended" not in capsys.readouterr().err  # the model's own are not applied


def test_uniform_soft_tokens_and_attacked_only_step(pipe, tmp_path):
    from receler.train import Trainer

    cfg = TrainConfig(concepts=["car"], iterations=1, ddim_steps=2, adv_steps=1, adv_tokens=3,
                      rank=2, adv_init="uniform", erase_on="attacked", adv_weight_decay=0.1)
    trainer = Trainer(pipe, cfg, tmp_path, show_progress=False)
    soft = trainer.adv["car"][0].detach()
    assert soft.shape[0] == 3 and 0 <= soft.min() and soft.max() < 1
    assert trainer.adv_opts["car"][0].param_groups[0]["weight_decay"] == 0.1
    seen = []
    unet_forward = pipe.unet.forward

    def spy(z, t, **kw):
        seen.append(kw["encoder_hidden_states"].shape[0])
        return unet_forward(z, t, **kw)

    pipe.unet.forward = spy
    try:
        trainer.train()
    finally:
        del pipe.unet.forward
    assert seen[-1] == 1  # the eraser step ran on the attacked prompt alone
    with pytest.raises(ValueError, match="erase_on must be one of both, attacked"):
        TrainConfig(concepts=["car"], erase_on="plain")


def test_resume_refuses_changed_settings(pipe, tiny_model_dir, tmp_path):
    from receler.train import TrainingInterrupted, erase

    cfg = dict(concepts=["car"], iterations=4, ddim_steps=2, adv_steps=1, adv_tokens=2, rank=2,
               checkpoint_every=1)

    def stop(trainer, result):
        if trainer.iteration == 2:
            trainer.request_stop()

    with pytest.raises(TrainingInterrupted):
        erase(pipe, TrainConfig(**cfg), tmp_path, callbacks=[stop], show_progress=False)
    fresh = load_pipeline(str(tiny_model_dir), device="cpu")
    with pytest.raises(ValueError, match=r"lr=0.0003, not 0.01: resume with the same --lr"):
        erase(fresh, TrainConfig(**cfg, lr=1e-2), tmp_path, resume=True, show_progress=False)
