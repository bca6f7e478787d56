"""MACE on the tiny pipeline: the row alignment, the two closed forms, the LoRA stage,
what the whole edit changes, round trips through files, several concepts, bad options."""

from __future__ import annotations

import pytest
import torch

from receler import TrainConfig, load_pipeline
from receler.methods import (
    EDIT_FILE,
    erase_with,
    load_edit,
    method_options,
    remove_edit,
    trainable_parameters,
    uce_parameter_names,
)
from receler.methods.mace import (
    MaceOptions,
    aligned_positions,
    cfr_rows,
    concept_rows,
    fuse,
    preserved_rows,
    refine,
)
from receler.methods.mace_lora import (
    attention_loss,
    concept_images,
    concept_positions,
    lora_attached,
    train_concept_loras,
)
from receler.methods.uce import original_weights
from receler.pipeline import Conditioning, encode, unet_eps
from receler.serialization import read_tensors

KEPT = ["dog", "cat"]
# In the tiny vocabulary (the code's 30 object templates spell out as characters and
# exceed its 24 tokens); small image and step counts keep each erase under a second. The
# LoRA's lr is small: its loss suppresses attention, which moves the concept's prediction
# anywhere, not toward the anchor (tested on its own below, at a larger lr).
FAST = {"templates": "a photo of a {}|a picture of the {}|the red {}|a {}", "images": 2,
        "image_steps": 3, "steps": 8, "lr": 1e-4, "lamb": 1.0}


def unet_state(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pipe.unet.named_parameters()}


def row_error(rows: torch.Tensor, weights: dict, target: dict) -> float:
    """``Σ_n ‖rows · weights[n]ᵀ − rows · target[n]ᵀ‖`` in float64."""
    return sum(float((rows @ weights[n].double().T - rows @ target[n].double().T).norm())
               for n in target)


def eps(pipe, prompt: str) -> torch.Tensor:
    """The UNet's noise prediction for ``prompt`` on fixed latents at t = 500."""
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return unet_eps(pipe.unet, z, 500, encode(pipe, [prompt] * 2))


# (old ids, new ids, length, expected old positions, expected new positions), B/E = 0/9
ALIGN = [
    ([0, 1, 2, 3, 5, 9], [0, 1, 2, 3, 6, 9], 8, [0, 1, 2, 3, 5, 6, 7], [0, 1, 2, 3, 5, 6, 7]),
    ([0, 1, 5, 9], [0, 1, 9], 8, [0, 1, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6]),  # anchor ""
    ([0, 1, 5, 5, 9], [0, 1, 6, 9], 8, [0, 1, 4, 5, 6, 7], [0, 1, 3, 4, 5, 6]),  # 2 tokens
    ([0, 1, 5, 9], [0, 1, 6, 6, 9], 8, [0, 1, 3, 4, 5, 6], [0, 1, 4, 5, 6, 7]),  # anchor: 2
    ([0, 5, 2, 3, 9], [0, 6, 2, 3, 9], 6, [0, 2, 3, 4, 5], [0, 2, 3, 4, 5]),  # words after
]


@pytest.mark.parametrize("old, new, length, want_old, want_new", ALIGN)
def test_rows_are_aligned_as_the_codes_find_matching_indices(old, new, length, want_old,
                                                             want_new):
    """Common leading and trailing tokens, then the padding; never the concept's tokens."""
    assert aligned_positions(old, new, length) == (want_old, want_new)


def test_refinement_is_the_minimiser_and_moves_the_rows_around_the_concept(pipe):
    opts = MaceOptions(**{**FAST, "preserve": KEPT, "lamb": 0.5, "preserve_scale": 2.0})
    c, a = cfr_rows(pipe, ["car"], opts)
    keep = preserved_rows(pipe, ["car"], opts)
    assert c.shape == a.shape and keep.shape[0] == 2 * 24
    w0 = original_weights(pipe.unet)
    w1 = refine(w0, c, a, keep, opts)
    for n, w in w1.items():
        # ∇ of Σ‖W c − W₀ a‖² + s_p Σ‖W p − W₀ p‖² + λ‖W − W₀‖² vanishes at W₁
        grad = ((c @ w.T - a @ w0[n].T).T @ c + 2.0 * (keep @ (w - w0[n]).T).T @ keep
                + 0.5 * (w - w0[n]))
        assert grad.abs().max() < 1e-9 * max(1.0, float((c @ w0[n].T).abs().max())), n
        assert (c @ w.T - a @ w0[n].T).norm() < 0.8 * (c @ w0[n].T - a @ w0[n].T).norm(), n


def test_fusion_reproduces_each_concepts_lora_on_its_own_prompts(pipe):
    opts = MaceOptions(**{**FAST, "lamb": 0.0})
    w0 = original_weights(pipe.unet)
    gen = torch.Generator().manual_seed(1)
    rank1 = lambda w: (0.3 * torch.randn((w.shape[0], 1), generator=gen, dtype=torch.float64)  # noqa: E731
                       @ torch.randn((1, w.shape[1]), generator=gen, dtype=torch.float64))
    deltas = [{n: rank1(w) for n, w in w0.items()} for _ in range(2)]  # rank 1, as the LoRAs
    rows = [concept_rows(pipe, c, opts) for c in ("car", "truck")]
    empty = preserved_rows(pipe, ["car"], opts)
    one = fuse(w0, w0, deltas[:1], rows[:1], empty, opts)  # λ = 0, nothing preserved:
    for n in w0:  # W₁ + ΔW on the concept's rows (their span is all the solve sees)
        want = rows[0] @ (w0[n] + deltas[0][n]).T
        assert (rows[0] @ one[n].T - want).norm() < 1e-6 * want.norm(), n

    # Two LoRAs: their prompts share rows ("a photo of a", padding), so no weight gives
    # both exactly; the fusion comes closer to each on its own prompts than the plain sum
    # of the LoRAs (the interference the paper's fusion avoids), the other concept's LoRA
    # or none.
    both = fuse(w0, w0, deltas, rows, empty, MaceOptions(**{**FAST, "lamb": 1.0}))
    summed = {n: w0[n] + deltas[0][n] + deltas[1][n] for n in w0}
    for i, j in ((0, 1), (1, 0)):
        own = {n: w0[n] + deltas[i][n] for n in w0}
        other = {n: w0[n] + deltas[j][n] for n in w0}
        fused = row_error(rows[i], both, own)
        assert fused < 0.75 * min(row_error(rows[i], w, own) for w in (w0, summed, other)), i


def test_a_fresh_lora_is_an_exact_identity_and_is_removed_afterwards(pipe):
    w0 = original_weights(pipe.unet)
    layers = {n: type(a.to_k) for n, a in pipe.unet.named_modules()
              if n.endswith("attn2")}
    before = eps(pipe, "a photo of a car")
    with lora_attached(pipe.unet, {n: w.float() for n, w in w0.items()}, 2,
                       torch.Generator().manual_seed(0)) as loras:
        assert len(loras) == len(w0) and all(lo.down.weight.abs().sum() > 0
                                             for lo in loras.values())
        assert torch.equal(eps(pipe, "a photo of a car"), before)  # up starts at zero
    assert {n: type(a.to_k) for n, a in pipe.unet.named_modules()
            if n.endswith("attn2")} == layers
    assert torch.equal(eps(pipe, "a photo of a car"), before)


def test_the_lora_stage_lowers_the_attention_loss_and_never_writes_the_unet(pipe):
    opts = MaceOptions(**{**FAST, "steps": 30, "lr": 1e-2, "mask_source": "guidance",
                          "mask_threshold": 0.3})
    before = unet_state(pipe)
    w0 = {n: w.float() for n, w in original_weights(pipe.unet).items()}
    deltas, info, passes = train_concept_loras(pipe, ["car"], w0, opts)
    assert all(torch.equal(before[k], v) for k, v in unet_state(pipe).items())
    assert passes == {"unet_forward": 2 * 2 * 3 + 30, "unet_backward": 30}
    assert 0 < info["car"]["mask_area"] < 1

    # The same noised image, t and prompt, scored with the refined weights and with the
    # LoRA fused in (a fresh wrapper adds exactly zero, so it runs the given weights).
    latents, masks = concept_images(pipe, "car", opts, torch.Generator().manual_seed(3))
    prompt = "a photo of a car"
    pos = concept_positions(pipe.tokenizer, prompt, "car", use_pooler=True, length=24)
    assert pos[0] == 5 and pos[1:] == list(range(6, 24))  # "car", then end token and padding
    cond = Conditioning(encode(pipe, [prompt]).hidden)
    z = latents[:1] + 0.3 * torch.randn(latents[:1].shape, generator=torch.Generator())

    def loss(weights):
        from receler.attention import capture_cross_attention

        with lora_attached(pipe.unet, weights, 1, torch.Generator()):
            with torch.no_grad(), capture_cross_attention(pipe.unet) as maps:
                unet_eps(pipe.unet, z, torch.tensor([300]), cond)
            return float(attention_loss(maps, masks[0], pos, (8, 8)))

    fused = {n: (w.double() + deltas[0][n]).float() for n, w in w0.items()}
    assert loss(fused) < 0.95 * loss(w0), (loss(fused), loss(w0))


CASES = [  # (concepts, options beyond FAST)
    (["car"], {"preserve": KEPT}),
    (["car", "truck"], {"preserve": KEPT, "anchor": ["", "the"]}),
]


@pytest.mark.parametrize("concepts, extra", CASES)
def test_erase_changes_only_attn2_kv_moves_the_concepts_keeps_the_rest_and_reloads(
        concepts, extra, pipe, tiny_model_dir, tmp_path):
    options = {**FAST, **extra}
    before = unet_state(pipe)
    base = {p: eps(pipe, p) for p in ("a photo of a car", "a photo of a", *KEPT)}
    result = erase_with("mace", pipe, TrainConfig(concepts=concepts), tmp_path, options=options)
    after = unet_state(pipe)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = set(uce_parameter_names(pipe.unet))
    assert changed == expected and all(".attn2.to_" in n for n in changed)
    assert set(read_tensors(tmp_path / EDIT_FILE)[0]) == expected
    assert result.stats["trainable_parameters"] == trainable_parameters("mace", pipe)
    assert result.stats["unet_backward"] == FAST["steps"] * len(concepts)
    assert set(result.stats["lora"]) == set(concepts)

    # Layer level: the end token of each concept's prompt reads (nearly) as the anchor's.
    w0 = original_weights(pipe.unet)
    anchors = MaceOptions(**options).anchors(concepts)
    for concept, anchor in zip(concepts, anchors, strict=True):
        c = encode(pipe, [f"a photo of a {concept}"]).hidden[0, 6:7].double()  # end token
        a = encode(pipe, [f"a photo of a {anchor}".strip()]).hidden[0, 6 - (anchor == "")]
        # a weight that takes c to W₀ a: the row's target
        anchored = {n: w0[n] @ torch.outer(a.double(), c[0]) / c[0].dot(c[0]) for n in expected}
        assert row_error(c, after, anchored) < 0.8 * row_error(c, before, anchored), concept
    # UNet level: the concept's prediction moves toward the anchor prompt's (0.46 for car
    # alone, 0.61 with truck erased as well, the rows they share pulled two ways) ...
    moved = ((eps(pipe, "a photo of a car") - base["a photo of a"]).norm()
             / (base["a photo of a car"] - base["a photo of a"]).norm())
    assert moved < 0.7, moved
    # ... and the preserved prompts' stay close: closer than without preserving them.
    drift = {p: ((eps(pipe, p) - base[p]).norm() / base[p].norm()).item() for p in KEPT}
    fresh = load_pipeline(str(tiny_model_dir), device="cpu")
    assert load_edit(fresh, tmp_path).method == "mace"
    loaded = unet_state(fresh)
    assert all(torch.equal(loaded[k], after[k]) for k in after)  # the same weights, exactly

    remove_edit(pipe)
    assert all(torch.equal(before[k], v) for k, v in unet_state(pipe).items())
    erase_with("mace", pipe, TrainConfig(concepts=concepts), tmp_path / "b",
               options={**options, "preserve": []})
    for p in KEPT:
        unpreserved = ((eps(pipe, p) - base[p]).norm() / base[p].norm()).item()
        assert drift[p] < 0.05 and drift[p] < unpreserved, (p, drift[p], unpreserved)


@pytest.mark.parametrize("options, message", [
    ({"mask_source": "sam"}, "MACE mask_source must be one of attention, guidance, none"),
    ({"templates": "a photo of"}, "MACE templates must be object, style or templates with"),
    ({"rank": 0}, "MACE rank must be > 0"),
    ({"steps": 1.5}, "MACE steps must be a whole number >= 0"),
    ({"lr": 0}, "MACE lr must be > 0"),
    ({"lamb": -1}, "MACE lamb must be a number >= 0"),
    ({"use_pooler": "yes"}, "MACE use_pooler must be true or false"),
    ({"image_prompt": "a photo"}, "MACE image_prompt must hold {} for the concept"),
    ({"mask_threshold": 2}, "MACE mask_threshold must lie in [0, 1]"),
    ({**FAST, "anchor": ["a", "b"]}, "2 MACE anchors for 1 concepts"),
    ({**FAST, "templates": "a photo of a picture of the red blue dog cat " * 2 + "{}"},
     "more than the model's 24: shorten the template or the concept"),
    ({"mace": 1}, "mace has no option 'mace'"),
])
def test_bad_options_are_one_line_errors(options, message, pipe, tmp_path):
    with pytest.raises((ValueError, TypeError)) as info:
        opts = method_options("mace", options)
        erase_with("mace", pipe, TrainConfig(concepts=["car"]), tmp_path, options=opts)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / EDIT_FILE).exists()


def test_the_toy_model_recommends_options_that_validate():
    from receler.config import model_method_options
    from receler.pipeline import default_model
    from receler.toyworld.vocab import CLASSES

    recommended = model_method_options(default_model(), "mace")
    assert recommended["preserve"] == CLASSES
    assert MaceOptions(**recommended).kept_prompts(["star"]) == [c for c in CLASSES
                                                                 if c != "star"]


def test_cli_erases_with_mace_and_generates_from_the_folder(tiny_model_dir, tmp_path, capsys):
    """``receler erase --method mace`` and ``receler generate --erasers`` (in-process)."""
    import json

    from receler.cli import main

    out = tmp_path / "mace"
    flags = [f"--method-option={k}={json.dumps(v)}" for k, v in FAST.items()]
    assert main(["erase", "--model", str(tiny_model_dir), "--concept", "car", "--out", str(out),
                 "--method", "mace", *flags, "--quiet"]) == 0
    assert "erased ['car'] with mace" in capsys.readouterr().out
    cfg = json.loads((out / "eraser_config.json").read_text())
    assert cfg["options"]["steps"] == FAST["steps"] and cfg["stats"]["cfr_rows"] > 0
    assert main(["generate", "--model", str(tiny_model_dir), "--erasers", str(out), "--prompt",
                 "car", "--num-images", "1", "--out", str(tmp_path / "imgs")]) == 0
    assert (tmp_path / "imgs" / "000_00.png").is_file()
    assert main(["erase", "--model", str(tiny_model_dir), "--concept", "car", "--out",
                 str(tmp_path / "bad"), "--method", "mace", "--method-option", "rank=0"]) == 2
    assert "receler: error: MACE rank must be > 0" in capsys.readouterr().err
