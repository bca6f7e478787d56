"""RECE, SPEED and SLD's presets on the tiny pipeline: what each edit changes, where the
concept and the preserved prompts go, round trips through files, and bad options."""

from __future__ import annotations

import pytest
import torch

from receler import TrainConfig, load_pipeline
from receler.config import model_erase_defaults, model_method_options
from receler.methods import (
    EDIT_FILE,
    erase_with,
    load_edit,
    method_options,
    remove_edit,
    trainable_parameters,
    uce_parameter_names,
    uce_weights,
)
from receler.methods.edits import EditConfig
from receler.methods.rece import ReceOptions, derive_embedding, rece_weights, regeneration_gap
from receler.methods.registry import settings_mismatch
from receler.methods.sld import SldOptions, get_sld
from receler.methods.speed import SpeedOptions, speed_parameter_names, speed_weights
from receler.methods.uce import UceOptions, original_weights
from receler.pipeline import encode, unet_eps
from receler.serialization import CONFIG_FILE, read_tensors

CONCEPT, ANCHOR, KEPT = "car", "", ["dog", "cat"]


def unet_state(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pipe.unet.named_parameters()}


def eps(pipe, prompt: str) -> torch.Tensor:
    """The UNet's noise prediction for ``prompt`` on fixed latents at t = 500."""
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return unet_eps(pipe.unet, z, 500, encode(pipe, [prompt] * 2))


# (method, options, edited projections, bound on the concept's move toward the anchor)
# The bound is on ‖ε'(concept) − ε(anchor)‖ / ‖ε(concept) − ε(anchor)‖. SPEED edits only
# the concept word's row, and the tiny random text encoder's later rows (end and padding)
# do not carry the word as CLIP's do, so its prediction moves little; the layer-level check
# below is the exact one.
EDITS = [
    ("rece", {"preserve": KEPT}, ("to_k", "to_v"), 0.4),
    ("rece", {"preserve": KEPT, "rounds": 3, "reg": 0.1}, ("to_k", "to_v"), 0.4),
    ("speed", {"preserve": KEPT}, ("to_v",), 0.99),
    ("speed", {"preserve": KEPT, "params": "KV"}, ("to_k", "to_v"), 0.95),
]


@pytest.mark.parametrize("name, options, projections, bound", EDITS)
def test_edit_changes_only_attn2_kv_moves_the_concept_keeps_the_rest_and_reloads(
        name, options, projections, bound, pipe, tiny_model_dir, tmp_path):
    before = unet_state(pipe)
    base = {p: eps(pipe, p) for p in (CONCEPT, ANCHOR, *KEPT)}
    result = erase_with(name, pipe, TrainConfig(concepts=CONCEPT), tmp_path, options=options)
    after = unet_state(pipe)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {n for n in uce_parameter_names(pipe.unet) if n.split(".")[-2] in projections}
    assert changed == expected and all(".attn2.to_" in n for n in changed)
    assert set(read_tensors(tmp_path / EDIT_FILE)[0]) == expected
    assert result.stats["trainable_parameters"] == trainable_parameters(name, pipe,
                                                                        options=options)
    assert result.stats["unet_forward"] == 0 and result.options["preserve"] == KEPT

    # Layer level: the concept word's row now reads (nearly) as the anchor's row.
    c, a = encode(pipe, [CONCEPT]).hidden[0, 1], encode(pipe, [ANCHOR]).hidden[0, 0]
    gap = lambda w: sum((c @ w[n].T - a @ before[n].T).norm() for n in expected)  # noqa: E731
    assert gap(after) < 0.8 * gap(before)
    # UNet level: the concept's prediction moves toward the anchor's ...
    moved = (eps(pipe, CONCEPT) - base[ANCHOR]).norm() / (base[CONCEPT] - base[ANCHOR]).norm()
    assert moved < bound, moved
    # ... and the preserved prompts' stay close: closer than without preserving them.
    drift = {p: ((eps(pipe, p) - base[p]).norm() / base[p].norm()).item() for p in KEPT}
    fresh = load_pipeline(str(tiny_model_dir), device="cpu")
    assert load_edit(fresh, tmp_path).method == name
    loaded = unet_state(fresh)
    assert all(torch.equal(loaded[k], after[k]) for k in after)  # the same weights, exactly

    remove_edit(pipe)
    erase_with(name, pipe, TrainConfig(concepts=CONCEPT), tmp_path / "b",
               options={**options, "preserve": []})
    for p in KEPT:
        unpreserved = ((eps(pipe, p) - base[p]).norm() / base[p].norm()).item()
        assert drift[p] < 0.03 and drift[p] < unpreserved, (p, drift[p], unpreserved)


def test_rece_without_rounds_is_uce_and_each_round_erases_its_derived_embedding(pipe):
    opts = ReceOptions(preserve=KEPT, rounds=0)
    uce = uce_weights(pipe, [CONCEPT], UceOptions(preserve=KEPT))
    weights, rounds = rece_weights(pipe, [CONCEPT], opts)
    assert rounds == [] and all(torch.equal(weights[n], uce[n]) for n in uce)

    w0 = original_weights(pipe.unet)
    w1 = {n: w.double() for n, w in uce.items()}
    c = encode(pipe, [CONCEPT]).hidden[0].double()  # (T, d), every position
    derived = derive_embedding(w1, w0, c, 1e-3)
    # c' minimises Σ‖W₁ c' − W₀ c‖² + ρ‖c'‖²: the gradient vanishes there
    grad = sum((derived @ w.T - c @ w0[n].T) @ w for n, w in w1.items()) + 1e-3 * derived
    assert grad.abs().max() < 1e-8 * max(1.0, float(c.abs().max()))
    gap_c, gap_d = regeneration_gap(w1, w0, c, c), regeneration_gap(w1, w0, derived, c)
    assert gap_d < gap_c  # under UCE's edit, c' brings the concept back better than c

    weights, rounds = rece_weights(pipe, [CONCEPT], ReceOptions(preserve=KEPT, rounds=1))
    assert rounds[0]["gap_concept"] == pytest.approx(gap_c)
    assert rounds[0]["gap_derived"] == pytest.approx(gap_d)
    w2 = {n: w.double() for n, w in weights.items()}
    assert regeneration_gap(w2, w0, derived, c) > gap_d + 0.05  # the round erased c'
    assert regeneration_gap(w2, w0, c, c) > gap_c  # and the concept stays erased


def test_a_preserved_prompt_naming_an_erased_concept_is_left_out(pipe):
    """So one preserve list of every class serves whichever class is erased."""
    every = [*KEPT, "car", "a red car"]
    assert UceOptions(preserve=every).kept_prompts(["car"]) == ["", *KEPT]
    for weights in (lambda o: uce_weights(pipe, [CONCEPT], UceOptions(**o)),
                    lambda o: rece_weights(pipe, [CONCEPT], ReceOptions(**o))[0]):
        a, b = weights({"preserve": every}), weights({"preserve": KEPT})
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_speed_keeps_retained_and_prior_rows_exactly_and_erases_several_concepts(pipe):
    opts = SpeedOptions(preserve=[*KEPT, "a red car"], aug_num=0, params="KV")
    weights, info = speed_weights(pipe, ["car", "truck"], opts)
    assert info["retain_prompts"] == 2  # "a red car" names an erased concept: dropped
    w0 = original_weights(pipe.unet)
    null = encode(pipe, [""]).hidden[0].double()
    retained = torch.stack([encode(pipe, [p]).hidden[0, 1].double() for p in KEPT])  # last word
    for n, w in weights.items():
        delta = w.double() - w0[n]
        # retained rows lie outside the null space: ΔW r = 0 up to float32 storage
        assert (retained @ delta.T).norm() < 1e-5 * (retained @ w0[n].T).norm(), n
        assert (null[:1] @ delta.T).norm() < 1e-5 * (null[:1] @ w0[n].T).norm(), n  # prior row
    for concept in ("car", "truck"):
        c, a = encode(pipe, [concept]).hidden[0, 1].double(), null[1]
        before = sum((c @ w0[n].T - a @ w0[n].T).norm() for n in weights)
        after = sum((c @ w.double().T - a @ w0[n].T).norm() for n, w in weights.items())
        assert after < 0.9 * before, concept
    assert set(weights) == set(speed_parameter_names(pipe.unet, "KV"))


@pytest.mark.parametrize("name, options, message", [
    ("rece", {"rounds": -1}, "RECE rounds must be a whole number >= 0"),
    ("rece", {"reg": 0}, "RECE reg must be > 0"),
    ("rece", {"round_lamb": "x"}, "RECE round_lamb must be a number >= 0"),
    ("speed", {"params": "Q"}, "SPEED params must be one of V, K, KV"),
    ("speed", {"aug_num": 1.5}, "SPEED aug_num must be a whole number"),
    ("speed", {"tokens": "first"}, "SPEED tokens must be auto, last or all"),
    ("speed", {"retain_scale": 0}, "SPEED retain_scale must be > 0"),
    ("speed", {"anchor": ["a", "b"], "_concepts": ["car"]}, "2 SPEED anchors for 1 concepts"),
    ("rece", {"speed": 1}, "rece has no option 'speed'"),
    ("sld", {"preset": "ultra"}, "unknown SLD preset 'ultra': choose one of weak, medium"),
    ("sld", {"warmup": 2.5}, "SLD warmup must be a whole number"),
])
def test_bad_options_are_one_line_errors(name, options, message, pipe, tmp_path):
    concepts = options.pop("_concepts", ["car"])
    with pytest.raises((ValueError, TypeError)) as info:
        opts = method_options(name, options)
        erase_with(name, pipe, TrainConfig(concepts=concepts), tmp_path, options=opts)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / EDIT_FILE).exists()


@pytest.mark.parametrize("preset", ["weak", "medium", "strong", "max"])
def test_sld_presets_are_diffusers_safety_configs_and_settings_override_them(preset):
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

    published = getattr(SafetyConfig, preset.upper())
    names = {"guidance": "sld_guidance_scale", "warmup": "sld_warmup_steps",
             "threshold": "sld_threshold", "momentum": "sld_momentum_scale",
             "beta": "sld_mom_beta"}
    opts = SldOptions(preset=preset)
    assert {k: getattr(opts, k) for k in names} == {k: published[v] for k, v in names.items()}
    mixed = SldOptions(preset=preset, warmup=3)
    assert mixed.warmup == 3 and mixed.guidance == published["sld_guidance_scale"]
    assert SldOptions().preset == "medium"


def test_sld_preset_round_trips_and_the_model_can_recommend_options(pipe, tiny_model_dir,
                                                                    tmp_path):
    import json
    import shutil

    result = erase_with("sld", pipe, TrainConfig(concepts=CONCEPT), tmp_path / "a",
                        options={"preset": "max"})
    assert result.options["preset"] == "max" and result.options["warmup"] == 0
    fresh = load_pipeline(str(tiny_model_dir), device="cpu")
    load_edit(fresh, tmp_path / "a")
    assert get_sld(fresh.unet).options == SldOptions(preset="max")

    model = tmp_path / "model"  # a model folder that recommends SLD-Strong
    shutil.copytree(tiny_model_dir, model)
    defaults = json.loads((model / "receler_defaults.json").read_text())
    defaults["erase"] = {"sld": {"options": {"preset": "strong", "warmup": 2}}}
    (model / "receler_defaults.json").write_text(json.dumps(defaults))
    assert model_erase_defaults(model, "sld") == {}  # options are not training settings
    assert model_method_options(model, "sld") == {"preset": "strong", "warmup": 2}
    remove_edit(pipe)
    result = erase_with("sld", pipe, TrainConfig(concepts=CONCEPT), tmp_path / "b",
                        base_model=str(model))
    assert result.options["preset"] == "strong" and result.options["warmup"] == 2
    remove_edit(pipe)
    result = erase_with("sld", pipe, TrainConfig(concepts=CONCEPT), tmp_path / "c",
                        base_model=str(model), options={"preset": "weak"})
    assert result.options["warmup"] == 15  # given options replace the recommendation

    # A finished run is stale once the model recommends other options.
    saved = EditConfig.load(tmp_path / "b" / CONFIG_FILE)
    assert settings_mismatch("sld", TrainConfig(concepts=CONCEPT), saved) is None
    defaults["erase"] = {"sld": {"options": {"preset": "max"}}}
    (model / "receler_defaults.json").write_text(json.dumps(defaults))
    assert settings_mismatch("sld", TrainConfig(concepts=CONCEPT), saved) == \
        "option preset='strong', not 'max'"

    defaults["erase"] = {"sld": {"options": ["max"]}}
    (model / "receler_defaults.json").write_text(json.dumps(defaults))
    with pytest.raises(ValueError, match="\"options\" must be an object"):
        model_erase_defaults(model, "sld")


def test_cli_erases_with_rece_and_generates_from_the_folder(tiny_model_dir, tmp_path, capsys):
    """``receler erase --method rece`` and ``receler generate --erasers`` (in-process: a
    subprocess costs more than the whole edit)."""
    import json

    from receler.cli import main

    out = tmp_path / "rece"
    assert main(["erase", "--model", str(tiny_model_dir), "--concept", "car", "--out", str(out),
                 "--method", "rece", "--method-option", "rounds=2", "--method-option",
                 "preserve=dog,cat", "--quiet"]) == 0
    assert "erased ['car'] with rece" in capsys.readouterr().out
    cfg = json.loads((out / "eraser_config.json").read_text())
    assert cfg["options"]["rounds"] == 2 and cfg["options"]["preserve"] == KEPT
    assert len(cfg["stats"]["rounds"]) == 2
    assert main(["generate", "--model", str(tiny_model_dir), "--erasers", str(out), "--prompt",
                 "car", "--num-images", "1", "--out", str(tmp_path / "imgs")]) == 0
    assert (tmp_path / "imgs" / "000_00.png").is_file()
    assert main(["erase", "--model", str(tiny_model_dir), "--concept", "car", "--out",
                 str(tmp_path / "bad"), "--method", "speed", "--method-option", "params=Q"]) == 2
    assert "receler: error: SPEED params must be one of" in capsys.readouterr().err
