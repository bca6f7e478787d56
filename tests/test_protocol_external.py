"""Measuring a model erased elsewhere: an erasers folder, a fine-tuned UNet or text encoder, a
LoRA. The candidates on a tiny in-process pipeline first, then what a user does on the toy
model through the CLI: two methods erased by the protocol, a third folder erased before, an
external UNet, all four in one leaderboard, and the one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_unet

from receler.cli import main
from receler.external import module_source, resolve_candidate


def unet_out(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g)
    h = torch.randn(1, 5, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(z, 10, encoder_hidden_states=h).sample


def edited_copy(unet, folder):
    """``unet`` saved with its output layer halved: a stand-in for a fine-tuned UNet."""
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.5)
    unet.save_pretrained(folder)
    with torch.no_grad():
        unet.conv_out.weight.mul_(2.0)
    return folder


def test_swapped_unet_is_measured_and_the_base_keeps_its_weights(pipe, tiny_model_dir, tmp_path):
    original = pipe.unet
    before = unet_out(pipe)
    folder = edited_copy(tiny_unet(), tmp_path / "ft-unet")
    candidate = resolve_candidate("car", str(tiny_model_dir), unet=str(folder))
    assert candidate.kind == "unet" and candidate.name == "unet:ft-unet"
    candidate.apply(pipe)
    assert pipe.unet is not original and not torch.equal(unet_out(pipe), before)
    with candidate.base(pipe):  # the very module, not a reloaded copy
        assert pipe.unet is original and torch.equal(unet_out(pipe), before)
    assert pipe.unet is not original
    # a whole pipeline folder: its unet/ subfolder is taken
    assert module_source(str(tiny_model_dir), "unet") == (str(tiny_model_dir), "unet")


@pytest.mark.parametrize("part, build, key", [
    ("unet", lambda: tiny_unet(cross_dim=8), "cross_attention_dim is 8, the base unet's is 16"),
    ("unet", lambda: tiny_unet(sample_size=4), "sample_size is 4, the base unet's is 8"),
])  # fmt: skip
def test_a_module_that_does_not_fit_is_refused(tiny_model_dir, tmp_path, part, build, key):
    build().save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=key):
        resolve_candidate("car", str(tiny_model_dir), **{part: str(tmp_path / "m")})


def test_text_encoder_swaps_like_the_unet(pipe, tiny_model_dir, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    base = CLIPTextConfig.from_pretrained(tiny_model_dir / "text_encoder")
    CLIPTextModel(CLIPTextConfig(**{**base.to_dict(), "hidden_size": 8, "intermediate_size": 16})
                  ).save_pretrained(tmp_path / "te")
    with pytest.raises(ValueError, match="hidden_size is 8, the base text encoder's is 16"):
        resolve_candidate("car", str(tiny_model_dir), text_encoder=str(tmp_path / "te"))
    swap = resolve_candidate("car", str(tiny_model_dir), text_encoder=str(tiny_model_dir))
    assert swap.kind == "text-encoder" and swap.identity["text_encoder"]["subfolder"] == \
        "text_encoder"
    original = pipe.text_encoder
    swap.apply(pipe)
    assert pipe.text_encoder is not original and "unet" not in swap.originals
    with swap.base(pipe):
        assert pipe.text_encoder is original


def test_hub_ids_find_their_subfolder(monkeypatch):
    import huggingface_hub

    asked = []

    def exists(repo, filename, **_):
        asked.append(filename)
        return filename == "unet/config.json"

    monkeypatch.setattr(huggingface_hub, "file_exists", exists)
    assert module_source("someone/erased-sd", "unet") == ("someone/erased-sd", "unet")
    assert asked == ["config.json", "unet/config.json"]
    monkeypatch.setattr(huggingface_hub, "file_exists", lambda *a, **k: False)
    with pytest.raises(ValueError, match="neither config.json nor unet/config.json"):
        module_source("someone/empty", "unet")
    for missing in ("/no/such/folder", "tests/no-such-unet"):  # paths, not hub ids
        with pytest.raises(FileNotFoundError, match="does not exist"):
            module_source(missing, "unet")


def save_lora(unet, folder, cross_dim=16):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"],
                                init_lora_weights=False))
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state,
                                              safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def test_lora_is_on_for_the_erased_model_and_off_for_the_base(pipe, tiny_model_dir, tmp_path):
    before = unet_out(pipe)
    file = save_lora(tiny_unet(), tmp_path / "lora")
    candidate = resolve_candidate("car", str(tiny_model_dir), lora=file)
    assert candidate.name == "lora:pytorch_lora_weights"
    candidate.apply(pipe)
    assert not torch.equal(unet_out(pipe), before)
    with candidate.base(pipe):  # disabled LoRA layers return their base layer's output
        assert torch.equal(unet_out(pipe), before)
    assert not torch.equal(unet_out(pipe), before)

    other = save_lora(tiny_unet(cross_dim=8), tmp_path / "other")  # to_k reads 8 features
    fresh = resolve_candidate("car", str(tiny_model_dir), lora=other)
    from receler import load_pipeline

    with pytest.raises(ValueError, match="does not fit the base model"):
        fresh.apply(load_pipeline(str(tiny_model_dir), device="cpu"))
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        resolve_candidate("car", str(tiny_model_dir), lora=tmp_path / "w.bin")
    with pytest.raises(ValueError, match="two candidates"):
        from receler.protocol import ProtocolConfig

        ProtocolConfig(concept="car", out=tmp_path, lora=file, unet="x")


# ------------------------------------------------------------------ the CLI, end to end
TINY = ["--per-class", "1", "--concept-rows", "2", "--sample-steps", "2",
        "--skip", "latency,attack,two-object", "--threads", "1"]


def protocol(capsys, out, *args) -> tuple[int, str]:
    capsys.readouterr()
    concept = [] if "--concept" in args else ["--concept", "star"]
    code = main(["protocol", *concept, *TINY, "--out", str(out), *args])
    return code, capsys.readouterr().err


def test_models_erased_here_and_elsewhere_share_one_leaderboard(tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from receler.pipeline import default_model

    base = ["--base-dir", str(tmp_path / "base")]
    # erased elsewhere: an ESD-x folder, and a fine-tuned UNet saved with save_pretrained
    assert main(["erase", "--concept", "star", "--method", "esd-x", "--iterations", "1",
                 "--ddim-steps", "2", "--out", str(tmp_path / "esd"), "--quiet",
                 "--threads", "1"]) == 0
    toy_unet = UNet2DConditionModel.from_pretrained(default_model(), subfolder="unet")
    edited_copy(toy_unet, tmp_path / "ft-unet")

    runs = tmp_path / "runs"
    assert protocol(capsys, runs / "uce", "--method", "uce", *base)[0] == 0
    assert protocol(capsys, runs / "receler", "--iterations", "2", "--ddim-steps", "2",
                    "--rank", "4", *base)[0] == 0
    assert protocol(capsys, runs / "esd", "--erasers", str(tmp_path / "esd"), *base)[0] == 0
    assert protocol(capsys, runs / "unet", "--unet", str(tmp_path / "ft-unet"), *base)[0] == 0

    results = {n: json.loads((runs / n / "results.json").read_text())
               for n in ("uce", "receler", "esd", "unet")}
    assert {n: r["method"] for n, r in results.items()} == {
        "uce": "uce", "receler": "receler", "esd": "esd-x", "unet": "unet"}
    assert results["esd"]["candidate"]["kind"] == "erasers"
    assert results["esd"]["train"]["unet_backward"] == 1  # the folder's own compute
    assert results["unet"]["train"] is None
    for r in results.values():  # one base measurement, reused by every candidate
        assert r["schema_version"] == 1 and r["skipped"] == ["latency", "attack", "two-object"]
        assert r["base"]["metrics"] == results["uce"]["base"]["metrics"]
        assert r["base_key"] == results["uce"]["base_key"]
        assert r["attack_success_soft"] is None and r["latency_s"] is None
    assert results["uce"]["base_key"]["sampler"]["steps"] == 2
    report = (runs / "unet" / "report" / "report.md").read_text()
    assert "Skipped stages (their numbers are null): latency, attack, two-object." in report

    assert main(["leaderboard", *(str(runs / n) for n in results), "--out",
                 str(tmp_path / "lb")]) == 0
    board = json.loads((tmp_path / "lb" / "leaderboard.json").read_text())
    assert sorted(r["label"] for r in board["rows"]) == ["esd-x", "receler", "uce",
                                                         "unet:ft-unet"]

    # one-line errors, before any model loads
    cases = [
        (["--erasers", str(tmp_path / "nowhere")], "does not exist"),
        (["--erasers", str(tmp_path / "esd"), "--concept", "circle"],
         "erased ['star'], not 'circle'"),
        (["--erasers", str(tmp_path / "esd"), "--iterations", "3"], "nothing is trained"),
        (["--skip", "latency,nap"], "unknown stage 'nap' to skip: choose from latency, attack"),
    ]
    narrow = UNet2DConditionModel.from_config({**toy_unet.config, "cross_attention_dim": 64})
    narrow.save_pretrained(tmp_path / "narrow")
    cases.append((["--unet", str(tmp_path / "narrow")], "cross_attention_dim is 64"))
    for args, message in cases:
        code, err = protocol(capsys, runs / "bad", *args)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    # a shared base folder made with other settings is refused, naming the difference
    code, err = protocol(capsys, runs / "steps3", "--method", "uce", *base, "--sample-steps",
                         "3")
    errors = [line for line in err.splitlines() if line.startswith("receler: error")]
    assert code == 2 and len(errors) == 1 and "sampler.steps: 2 against 3" in errors[0], err


def test_one_concept_of_a_multi_concept_folder_is_measured_without_the_others(tmp_path, capsys):
    """Erasers of star and heart, measured on heart: star's prompts are not locality rows."""
    folder = tmp_path / "uce2"
    assert main(["erase", "--concept", "star", "--concept", "heart", "--method", "uce",
                 "--out", str(folder), "--quiet", "--threads", "1"]) == 0
    code, err = protocol(capsys, tmp_path / "run", "--concept", "heart", "--erasers",
                         str(folder), "--base-dir", str(tmp_path / "base"))
    assert code == 0, err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["erased"] == ["star", "heart"]
    left = set(res["metrics"]["detail"]["locality_classes"])
    assert "star" not in left and "heart" not in left and len(left) == 8
    assert res["metrics"]["detail"]["acc_l"]["total"] == 8  # --per-class 1
    code, err = protocol(capsys, tmp_path / "bad", "--concept", "moon", "--erasers",
                         str(folder))
    assert code == 2 and "erased ['star', 'heart'], not 'moon'" in err
