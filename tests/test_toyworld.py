"""Fast unit tests of the toy world (renderer, vocabulary, tokenizer, pipeline format, detector)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from receler.toyworld import model as tw_model
from receler.toyworld.detector import DetectorConfig, ToyDetector, load_detector, save_detector
from receler.toyworld.prompts import (
    paraphrase_prompts,
    simple_prompts,
    style_prompts,
    two_object_prompts,
    write_prompt_sets,
)
from receler.toyworld.quality import read_rows
from receler.toyworld.render import SceneConfig, render_scene, sample_scene, scene_from_seed
from receler.toyworld.tokenizer import build_tokenizer
from receler.toyworld.vocab import CLASSES, COLOURS, STYLES, SYNONYMS, all_words, make_caption


def test_vocab_sizes():
    assert len(CLASSES) >= 10 and len(COLOURS) >= 6 and len(STYLES) >= 1
    for c in CLASSES:
        assert len(SYNONYMS[c]) >= 2
        assert not set(SYNONYMS[c]) & set(CLASSES), "a synonym must not be a class word"


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_render_deterministic_per_seed(seed):
    a, spec_a, cap_a = scene_from_seed(seed)
    b, spec_b, cap_b = scene_from_seed(seed)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert spec_a == spec_b and cap_a == cap_b
    c, _, _ = scene_from_seed(seed + 1)
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_boxes_inside_image_and_disjoint():
    for seed in range(300):
        img, spec, _ = scene_from_seed(seed)
        assert img.size == (spec.size, spec.size)
        for x0, y0, x1, y1 in spec.boxes:
            assert 0 <= x0 < x1 <= spec.size and 0 <= y0 < y1 <= spec.size
            assert x1 - x0 >= 12, "objects must be large enough to survive a 16x16 latent"
        if len(spec.boxes) == 2:
            (a0, b0, a1, b1), (c0, d0, c1, d1) = spec.boxes
            assert a1 <= c0 or c1 <= a0 or b1 <= d0 or d1 <= b0
        assert len(spec.classes) == len(set(spec.classes)) == len(spec.colours) == len(spec.boxes)


def test_forced_scene_and_style_changes_pixels():
    rng = random.Random(0)
    plain = sample_scene(rng, SceneConfig(), classes=["star"], colours=["red"], style=None)
    striped = sample_scene(
        random.Random(0), SceneConfig(), classes=["star"], colours=["red"], style="striped"
    )
    assert plain.classes == ["star"] and striped.style == "striped"
    assert not np.array_equal(np.asarray(render_scene(plain)), np.asarray(render_scene(striped)))


def test_caption_names_style_and_objects():
    rng = random.Random(0)
    for _ in range(50):
        cap = make_caption(rng, [("star", "red")], "striped")
        assert "striped" in cap.split()
        assert {"star", *SYNONYMS["star"]} & set(cap.split())


def test_tokenizer_one_token_per_word(tmp_path):
    tok = build_tokenizer(tmp_path / "tok")
    from transformers import CLIPTokenizer

    tok2 = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert tok.model_max_length >= 32
    for w in all_words():
        ids = tok2(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, ids)
        assert tok2.decode(ids) == w
    text = "a photo of a striped red pentagram and a blue donut"
    ids = tok2(text).input_ids
    assert len(ids) == len(text.split()) + 2  # BOS + one per word + EOS
    assert tok2.decode(ids, skip_special_tokens=True) == text


def test_pipeline_format_loads_from_pretrained(tmp_path):
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    tok = build_tokenizer(tmp_path / "tok")
    vae = tw_model.build_vae()
    unet = tw_model.build_unet(
        tw_model.UNetConfig(block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32)
    )
    text = tw_model.build_text_encoder(
        tok, tw_model.TextConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    )
    pipe = tw_model.assemble_pipeline(vae, unet, text, tok)
    tw_model.save_pipeline(pipe, tmp_path / "pipe")
    loaded = StableDiffusionPipeline.from_pretrained(
        tmp_path / "pipe", safety_checker=None, dtype=torch.float32
    )
    settings = tw_model.default_sampler_settings(tmp_path / "pipe")
    assert settings["height"] == settings["width"] == 32
    assert loaded.tokenizer.model_max_length >= 32
    out = loaded(
        ["a red star", "a blue ring"], num_inference_steps=2, guidance_scale=3.0, output_type="np"
    )
    assert out.images.shape == (2, 32, 32, 3)


def test_default_model_path_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(tw_model, "PIPELINE_DIR", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="not shipped"):
        tw_model.default_model_path()


def test_detector_shapes_and_roundtrip(tmp_path):
    from PIL import Image

    det = ToyDetector(DetectorConfig()).eval()
    x = torch.rand(3, 3, 32, 32)
    out = det.predict(x)
    assert out["class_probs"].shape == (3, len(CLASSES)) and out["style_probs"].shape == (
        3,
        len(STYLES),
    )
    assert det.classes == CLASSES and det.styles == STYLES
    pil = [Image.new("RGB", (64, 64), (255, 0, 0))] * 2  # other sizes are resized
    assert det.predict(pil)["class_probs"].shape == (2, len(CLASSES))
    save_detector(det, tmp_path / "det")
    det2 = load_detector(tmp_path / "det")
    assert torch.equal(det2.predict(x)["class_probs"], out["class_probs"])
    with pytest.raises(TypeError):
        det.predict("not images")


def test_prompt_sets(tmp_path):
    paths = write_prompt_sets(tmp_path)
    simple = read_rows(paths["simple"])
    assert list(simple[0]) == ["case_number", "prompt", "class", "evaluation_seed"]
    for c in CLASSES:
        assert sum(r["class"] == c for r in simple) >= 50
    for r in read_rows(paths["paraphrase"]):
        assert not set(r["prompt"].split()) & set(CLASSES), r
    for r in read_rows(paths["two_object"]):
        assert (
            r["class"] != r["class2"] and r["class"] in r["prompt"] and r["class2"] in r["prompt"]
        )
    style = read_rows(paths["style"])
    assert {r["style"] for r in style} == {"", *STYLES}
    for r in style:
        assert (r["style"] in r["prompt"].split()) == bool(r["style"])
    # The shipped CSVs are what the generators write.
    assert len(simple) == len(simple_prompts()) and len(read_rows(paths["paraphrase"])) == len(
        paraphrase_prompts()
    )
    assert len(read_rows(paths["two_object"])) == len(two_object_prompts())
    assert len(style) == len(style_prompts())


def test_shipped_prompt_files_match_generators(tmp_path):
    from receler.toyworld.prompts import PROMPT_FILES, prompt_file

    fresh = write_prompt_sets(tmp_path)
    for name in PROMPT_FILES:
        assert prompt_file(name).read_text() == fresh[name].read_text(), (
            f"re-run scripts/toyworld/make_prompts.py ({name})"
        )


def test_shipped_model_records_the_recommended_settings():
    """The shipped receler_defaults.json is what save_pipeline would write today: the
    sampler defaults and the erase recommendations in toyworld/model.py."""
    import json
    from dataclasses import asdict

    try:
        path = tw_model.default_model_path() / "receler_defaults.json"
    except FileNotFoundError:
        pytest.skip("toy weights not shipped in this checkout")
    shipped = json.loads(path.read_text())
    assert shipped == {**asdict(tw_model.SamplerDefaults()), "erase": tw_model.ERASE_DEFAULTS}
