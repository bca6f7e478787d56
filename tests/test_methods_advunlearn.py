"""AdvUnlearn on the tiny pipeline: which text-encoder parameters it trains (the UNet never),
the file round trip, exact removal, bad options, resume and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from receler import TrainConfig, load_pipeline
from receler.loop import TrainingInterrupted
from receler.methods import edit_disabled, erase_with, load_edit, remove_edit, trainable_parameters
from receler.methods.advunlearn import (
    TEXT_EDIT_FILE,
    AdvUnlearnOptions,
    AdvUnlearnTrainer,
    advunlearn_parameter_names,
)
from receler.pipeline import encode, unet_eps
from receler.serialization import CHECKPOINT_FILE, read_tensors

CONCEPT = "car"
RETAIN = ["a photo of a dog", "a cat", "a red truck", "a blue car"]  # the last names the concept
PROMPTS = ["a photo of a car", "a dog", ""]


def config(**kw) -> TrainConfig:
    """Tiny and quick: 3 DDIM steps, the attack from iteration 1 on, lr large enough to move."""
    return TrainConfig(concepts=CONCEPT, **{"iterations": 3, "lr": 1e-3, "ddim_steps": 3,
                                            "adv_steps": 2, "adv_tokens": 2, "adv_lr": 1e-2,
                                            "adv_start": 1, "checkpoint_every": 2, **kw})


OPTIONS = {"retain": RETAIN, "retain_batch": 2}


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' embedding and the UNet's noise prediction under it, on fixed latents."""
    cond = encode(pipe, PROMPTS)
    z = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return cond.hidden, unet_eps(pipe.unet, z, 500, cond)


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def changed(before, after) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


# (options, what trains): CLIP's transformer layers by type; embeddings never
SELECTIONS = [
    ({}, lambda n: not n.startswith("embeddings.")),  # text_encoder_full, component all
    ({"component": "attn"}, lambda n: ".self_attn." in n),
    ({"component": "ffn", "final_layer_norm": True},
     lambda n: ".mlp." in n or n.startswith("final_layer_norm.")),
    ({"layers": 1}, lambda n: n.startswith("encoder.layers.0.")),
]


@pytest.mark.parametrize("selection, trains", SELECTIONS)
def test_training_changes_only_the_chosen_text_encoder_parameters(selection, trains, pipe,
                                                                  tmp_path):
    te_before, unet_before, vae_before = state(pipe.text_encoder), state(pipe.unet), state(pipe.vae)
    expected = [n for n in te_before if trains(n)]
    assert advunlearn_parameter_names(pipe.text_encoder, AdvUnlearnOptions(**selection)) == expected

    result = erase_with("advunlearn", pipe, config(), tmp_path, options={**OPTIONS, **selection},
                        show_progress=False)
    moved = changed(te_before, state(pipe.text_encoder))
    # Softmax ignores a bias added to every key: k_proj.bias's gradient is rounding error
    # only, which Adam's normalisation may or may not turn into a step.
    assert moved <= set(expected) and all(n.endswith("k_proj.bias") for n in set(expected) - moved)
    assert not changed(unet_before, state(pipe.unet)) and not changed(vae_before, state(pipe.vae))
    assert sorted(read_tensors(tmp_path / TEXT_EDIT_FILE)[0]) == sorted(expected)
    n = sum(te_before[k].numel() for k in expected)
    assert result.stats["trainable_parameters"] == n == trainable_parameters(
        "advunlearn", pipe, options={**OPTIONS, **selection})
    # Every iteration: 1 + retain_batch backward samples; every attacked one: adv_steps more.
    assert result.stats["unet_backward"] == 3 * (1 + 2) + 2 * 2
    assert result.stats["retain_prompts"] == 3  # "a blue car" names the concept: dropped
    assert result.method == "advunlearn" and result.options["retain_batch"] == 2


def test_edited_encoding_is_the_pipelines_and_soft_tokens_enter_the_word_embeddings(pipe,
                                                                                    tmp_path):
    trainer = AdvUnlearnTrainer(pipe, config(), tmp_path, options=AdvUnlearnOptions(**OPTIONS),
                                show_progress=False)
    with torch.no_grad():
        ids = trainer._ids(PROMPTS)
        assert torch.equal(trainer.edited_hidden(ids), encode(pipe, PROMPTS).hidden)
        prefixed = trainer.prefixed_ids(CONCEPT)  # [start, k placeholders, car, end, pads]
        plain = trainer.ids[CONCEPT]
        assert prefixed.shape == plain.shape and prefixed[0, 3] == plain[0, 1]
        # soft tokens equal to the word embeddings they replace change nothing ...
        words = pipe.text_encoder.get_input_embeddings()(prefixed)[0, 1:3]
        assert torch.equal(trainer.edited_hidden(prefixed, words),
                           trainer.edited_hidden(prefixed))
        # ... and others change the embedding of every later position
        moved = trainer.edited_hidden(prefixed, words + 1)
    assert not torch.equal(moved[:, 3:], trainer.edited_hidden(prefixed)[:, 3:])


@pytest.mark.parametrize("retain_loss", ["unet", "embedding"])
def test_round_trip_and_remove_and_disable_restore_the_base_exactly(retain_loss, pipe,
                                                                    tiny_model_dir, tmp_path):
    base, te_base = outputs(pipe), state(pipe.text_encoder)
    erase_with("advunlearn", pipe, config(), tmp_path,
               options={**OPTIONS, "retain_loss": retain_loss}, show_progress=False)
    edited, te_edited = outputs(pipe), state(pipe.text_encoder)
    assert not torch.equal(edited[0], base[0]) and not torch.equal(edited[1], base[1])

    fresh = load_pipeline(str(tiny_model_dir), device="cpu")
    assert load_edit(fresh, tmp_path).method == "advunlearn"
    assert not changed(te_edited, state(fresh.text_encoder))
    assert same(outputs(fresh), edited)
    with pytest.raises(ValueError, match="already holds an edit"):
        load_edit(fresh, tmp_path)
    with edit_disabled(fresh):
        assert same(outputs(fresh), base)
    assert same(outputs(fresh), edited)
    for p in (fresh, pipe):
        assert remove_edit(p) == ["advunlearn"]
        assert not changed(te_base, state(p.text_encoder)) and same(outputs(p), base)
        assert remove_edit(p) == []


def test_resumed_run_equals_uninterrupted_run(tiny_model_dir, tmp_path):
    cfg, opts = config(iterations=4), {**OPTIONS, "attack_init": "latest"}
    full = load_pipeline(str(tiny_model_dir), device="cpu")
    erase_with("advunlearn", full, cfg, tmp_path / "full", options=opts, show_progress=False)

    part = load_pipeline(str(tiny_model_dir), device="cpu")
    stop = lambda tr, r: tr.request_stop() if r.iteration == 2 else None  # noqa: E731
    with pytest.raises(TrainingInterrupted):
        erase_with("advunlearn", part, cfg, tmp_path / "part", options=opts, callbacks=[stop],
                   show_progress=False)
    assert "adv.0" in read_tensors(tmp_path / "part" / CHECKPOINT_FILE)[0]
    resumed = load_pipeline(str(tiny_model_dir), device="cpu")
    result = erase_with("advunlearn", resumed, cfg, tmp_path / "part", options=opts, resume=True,
                        show_progress=False)
    assert not changed(state(full.text_encoder), state(resumed.text_encoder))
    log = lambda d: (tmp_path / d / "train_log.jsonl").read_text()  # noqa: E731
    assert log("full") == log("part")
    assert result.stats["unet_forward"] == json.loads(log("full").splitlines()[-1])["unet_forward"]


@pytest.mark.parametrize("options, train, message", [
    ({"component": "mlp"}, {}, "AdvUnlearn component must be one of all, attn, ffn"),
    ({"retain_batch": 0}, {}, "AdvUnlearn retain_batch must be a whole number > 0"),
    ({"retain_weight": -1}, {}, "AdvUnlearn retain_weight must be a number >= 0"),
    ({"attack_init": "prompt"}, {}, "AdvUnlearn attack_init must be one of random, latest"),
    ({"layers": 9}, {}, "AdvUnlearn layers=9, but the text encoder has 2 transformer layers"),
    ({"retain": "missing.csv"}, {}, "AdvUnlearn retain file missing.csv does not exist"),
    ({"retain": 3}, {}, "AdvUnlearn retain must be a list of prompts"),
    ({"epochs": 3}, {}, "advunlearn has no option 'epochs'"),
    ({}, {"adv_tokens": 22}, "with 22 adversarial tokens it exceeds the 24-token prompt"),
])
def test_bad_options_are_one_line_errors(options, train, message, pipe, tmp_path):
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as info:
        erase_with("advunlearn", pipe, config(**train), tmp_path / "out", options=options,
                   show_progress=False)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_retain_prompts_from_a_csv_file_or_a_string_drop_the_erased_concept(tmp_path):
    csv = tmp_path / "retain.csv"
    csv.write_text("case_num,source,prompt\n1,coco_object,a photo of chair\n"
                   "2,coco_object,a photo of star\n")
    assert AdvUnlearnOptions(retain=str(csv)).retain_prompts(["star"]) == ["a photo of chair"]
    assert AdvUnlearnOptions(retain="a circle|a star|an arrow").retain_prompts(["star"]) == [
        "a circle", "an arrow"]


def test_cli_erases_with_advunlearn_and_generates_from_the_folder(tiny_model_dir, tmp_path,
                                                                  capsys):
    """``receler erase --method advunlearn`` and ``receler generate --erasers`` (in-process)."""
    from receler.cli import main

    out = tmp_path / "adv"
    assert main(["erase", "--model", str(tiny_model_dir), "--concept", CONCEPT, "--out", str(out),
                 "--method", "advunlearn", "--iterations", "2", "--ddim-steps", "2",
                 "--adv-steps", "1", "--adv-start", "1", "--method-option", "retain=a dog|a cat",
                 "--quiet"]) == 0
    assert "erased ['car'] with advunlearn" in capsys.readouterr().out
    cfg = json.loads((out / "eraser_config.json").read_text())
    assert cfg["method"] == "advunlearn" and cfg["options"]["retain"] == "a dog|a cat"
    assert cfg["train"]["lr"] == 1e-5 and cfg["train"]["adv_tokens"] == 1  # the code's defaults
    assert main(["generate", "--model", str(tiny_model_dir), "--erasers", str(out), "--prompt",
                 "a car", "--num-images", "1", "--out", str(tmp_path / "imgs")]) == 0
    assert (tmp_path / "imgs" / "000_00.png").is_file()
