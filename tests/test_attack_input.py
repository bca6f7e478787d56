"""The soft-prompt attack in the text encoder's input space, against its output-space twin."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from receler.attack import (
    AttackConfig,
    DenoisingLoss,
    check_attack_space,
    soft_attack_trajectory,
    soft_prompt,
    target_latents,
)
from receler.attack_suite import attack_plan, soft_attack_suite, suite_key
from receler.cli import build_parser
from receler.eval.detectors import get_detector
from receler.eval.prompts import PromptRow
from receler.methods.advunlearn import apply_text_encoder_edit, text_encoder_edit_disabled
from receler.objective import insert_soft_tokens
from receler.pipeline import encode
from receler.sampling import SamplerSettings

PROMPT, K = "a photo of a car", 2
CONFIG = AttackConfig(tokens=K, steps=3, target_images=2, noise_draws=2)
ATTN_OUT = "layers.0.self_attn.out_proj.weight"  # the parameter the tests edit


def latents(pipe):
    return target_latents(pipe, PROMPT, 2, steps=2, guidance=3.0)


def perturbed_encoder(pipe) -> None:
    """An edit of the first transformer layer's attention output, as a text-encoder method
    (AdvUnlearn) leaves one: removable, with the originals remembered."""
    params = dict(pipe.text_encoder.named_parameters())
    name = next(n for n in params if ATTN_OUT in n)
    g = torch.Generator().manual_seed(0)
    apply_text_encoder_edit(pipe.text_encoder, {
        name: params[name] + 0.5 * torch.randn(params[name].shape, generator=g)})


@pytest.mark.parametrize("space, later_positions_move", [("output", False), ("input", True)])
def test_step_zero_is_the_prompt_and_only_the_input_space_runs_through_the_encoder(
        pipe, space, later_positions_move):
    sp = soft_prompt(pipe, PROMPT, K, space=space)
    plain = encode(pipe, [PROMPT]).hidden
    with torch.no_grad():
        assert torch.equal(sp.embed(sp.init), plain)  # the tokens start as what they replace
    soft = (sp.init.float() + 0.1).requires_grad_(True)
    hidden = sp.embed(soft)  # (1, T, D)
    end = sp.start + K
    assert torch.equal(hidden[:, :sp.start], plain[:, :sp.start])  # causal: earlier positions
    # The padding after the soft tokens moves only if the soft tokens went through the
    # encoder's attention; its gradient then reaches them through the encoder.
    assert (not torch.equal(hidden[:, end:], plain[:, end:])) == later_positions_move
    (grad,) = torch.autograd.grad(hidden[:, end:].square().sum(), [soft], allow_unused=True)
    assert (grad is not None and bool(grad.abs().sum() > 0)) == later_positions_move


def test_input_attack_gradient_reaches_the_soft_tokens_through_the_text_encoder(pipe):
    sp = soft_prompt(pipe, PROMPT, K, space="input")
    assert sp.init.shape == (K, pipe.text_encoder.get_input_embeddings().embedding_dim)
    soft = sp.init.float().clone().requires_grad_(True)
    loss = DenoisingLoss(pipe, latents(pipe), 2, seed=0)(sp.cond.with_hidden(sp.embed(soft)))
    loss.backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    assert all(p.grad is None for p in pipe.text_encoder.parameters())  # the encoder is frozen
    kept, losses = soft_attack_trajectory(pipe, PROMPT, latents(pipe),
                                          AttackConfig(tokens=K, noise_draws=2, space="input"),
                                          [0, 3])
    assert len(losses) == 3 and torch.equal(kept[0], encode(pipe, [PROMPT]).hidden)
    # What generation gets is the encoder's output of the attacked input: every position
    # after the prompt's own tokens moved, not only the K soft ones.
    assert not torch.equal(kept[3][:, sp.start + K:], kept[0][:, sp.start + K:])


def test_an_edited_encoder_changes_the_input_attack_but_not_the_output_attacks_tokens(pipe):
    g = torch.Generator().manual_seed(1)
    perturbed_encoder(pipe)
    out_edit, in_edit = (soft_prompt(pipe, PROMPT, K, space=s) for s in ("output", "input"))
    with text_encoder_edit_disabled(pipe):
        out_base, in_base = (soft_prompt(pipe, PROMPT, K, space=s) for s in ("output", "input"))
    with torch.no_grad():
        words = torch.randn(in_base.init.shape, generator=g)  # the same input-space tokens
        hidden_edit = in_edit.embed(words)
        with text_encoder_edit_disabled(pipe):
            hidden_base = in_base.embed(words)
        assert not torch.allclose(hidden_edit, hidden_base, atol=1e-3)  # through the edit
        # the output attack's tokens are the conditioning itself, whatever the encoder
        soft = torch.randn(out_base.init.shape, generator=g)
        window = slice(out_base.start, out_base.start + K)
        assert torch.equal(out_edit.embed(soft)[:, window], out_base.embed(soft)[:, window])
        assert torch.equal(out_edit.embed(soft)[0, window], soft.to(hidden_edit.dtype))
        # and the input attack starts from the edited encoder's own embedding of the prompt
        assert torch.equal(in_edit.embed(in_edit.init), encode(pipe, [PROMPT]).hidden)


def test_the_default_space_is_the_output_attack_unchanged(pipe):
    z = latents(pipe)
    kept, losses = soft_attack_trajectory(pipe, PROMPT, z, CONFIG, [3])
    # the loop of receler before the space existed (e739315), written out
    cond = encode(pipe, [PROMPT])
    start = len(pipe.tokenizer(PROMPT)["input_ids"]) - 1
    soft = cond.hidden[0, start:start + K].float().clone().requires_grad_(True)
    opt = torch.optim.Adam([soft], lr=CONFIG.lr)
    loss_fn = DenoisingLoss(pipe, z, CONFIG.noise_draws, CONFIG.seed)
    old = []
    for _ in range(3):
        loss = loss_fn(cond.with_hidden(insert_soft_tokens(cond.hidden, soft, start)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        old.append(loss.item())
    assert losses == old
    with torch.no_grad():
        assert torch.equal(kept[3], insert_soft_tokens(cond.hidden, soft, start))


def test_the_default_space_keeps_the_cache_keys_of_earlier_runs(pipe, colour_detector, tmp_path):
    # AttackConfig's dict before the space existed: the protocol's attack.json key
    before = {"tokens": 8, "steps": 100, "lr": 0.01, "sweeps": 2, "target_images": 4,
              "noise_draws": 4, "candidates": 64, "seed": 0}
    assert AttackConfig().key() == before
    assert AttackConfig(space="input").key() == {**before, "space": "input"}
    # and the suite's cache file name, as receler at e739315 wrote it for this attack
    rows = {"simple": [PromptRow(0, PROMPT, 0, "car")]}
    plan = attack_plan(rows, "car", 1, first=PROMPT)
    settings = SamplerSettings(steps=2, guidance=3.0)
    key = suite_key("erased", colour_detector, PROMPT, settings)
    det, z = get_detector(colour_detector), latents(pipe)
    for space in ("output", "input"):
        soft_attack_suite(pipe, "car", plan, z, det, settings,
                          AttackConfig(tokens=K, target_images=2, noise_draws=2, space=space),
                          checkpoints=[0], n_images=1, key=key, cache_dir=tmp_path / space)
    # (beside each file, the attack's images as a strip: attack_<key>_<steps>.png)
    assert [p.name for p in (tmp_path / "output").glob("*.json")] == \
        ["attack_96230be734f2cb9e.json"]
    assert [p.name for p in (tmp_path / "input").glob("*.json")] != \
        ["attack_96230be734f2cb9e.json"]


def test_a_bad_space_is_a_one_line_error(capsys):
    with pytest.raises(ValueError, match="attack space must be one of output, input, got 'mid'"):
        AttackConfig(space="mid")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["protocol", "--concept", "car", "--out", "x",
                                   "--attack-space", "mid"])
    assert "invalid choice: 'mid'" in capsys.readouterr().err
    args = build_parser().parse_args(["protocol", "--concept", "car", "--out", "x"])
    assert args.attack_space == "output"
    with pytest.raises(ValueError, match="has two .*use the output space"):
        check_attack_space(SimpleNamespace(text_encoder=object(), text_encoder_2=object()),
                           "input")


def test_the_token_attack_s_size_comes_from_its_flags():
    from receler.cli import token_attack_settings

    parse = build_parser().parse_args
    for command in ("protocol", "attack"):
        base = [command, "--concept", "car", "--out", "x"] + (
            ["--erasers", "e"] if command == "attack" else [])
        assert token_attack_settings(parse(base)) == {}  # AttackConfig's defaults
        args = parse(base + ["--token-candidates", "8", "--token-sweeps", "1"])
        assert token_attack_settings(args) == {"candidates": 8, "sweeps": 1}
        with pytest.raises(ValueError, match="--token-sweeps must be positive, got 0"):
            token_attack_settings(parse(base + ["--token-sweeps", "0"]))


@pytest.mark.parametrize("space", ["output", "input"])
def test_the_protocol_records_the_space_and_keys_the_output_space_as_before(
        space, tiny_model_dir, prompt_sets, colour_detector, tmp_path):
    from transformers import CLIPTextModel

    from receler.protocol import Protocol, ProtocolConfig

    te = CLIPTextModel.from_pretrained(tiny_model_dir / "text_encoder")
    with torch.no_grad():
        next(p for n, p in te.named_parameters() if ATTN_OUT in n).mul_(3.0)
    te.save_pretrained(tmp_path / "te")  # a text encoder edited elsewhere
    cfg = ProtocolConfig(
        concept="car", out=tmp_path / "run", model=str(tiny_model_dir), detector="colour",
        per_class=1, concept_rows=1, attack_images=1, attack_prompts=1, prompts=prompt_sets,
        text_encoder=str(tmp_path / "te"), skip=("latency", "two-object"),
        attack=AttackConfig(tokens=1, steps=2, sweeps=1, candidates=2, target_images=1,
                            noise_draws=1, space=space))
    res = Protocol(cfg, show_progress=False).run()
    assert res["attack_space"] == space and res["attack_n"] == res["base"]["attack_n"] == 1
    assert ("space" in res["config"]["attack"]) == (space != "output")
    cached = json.loads((tmp_path / "run" / "images" / "base" / "attack.json").read_text())
    assert cached["key"]["attack"] == cfg.attack.key()
    assert AttackConfig(**res["config"]["attack"]) == cfg.attack  # receler.runs reads it back
