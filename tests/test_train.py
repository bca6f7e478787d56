from __future__ import annotations

import json

import pytest
import torch

from receler import (
    TrainConfig,
    Trainer,
    TrainingDiverged,
    TrainingInterrupted,
    erase,
    get_erasers,
    remove_erasers,
)
from receler.serialization import CHECKPOINT_FILE, ERASERS_FILE, read_tensors
from receler.train import check_out_dir


def config(**kw) -> TrainConfig:
    base = dict(concepts="car", iterations=4, ddim_steps=4, adv_steps=2, adv_tokens=4, rank=4,
                lr=1e-2, checkpoint_every=2, seed=7)
    return TrainConfig(**{**base, **kw})


def eraser_weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.clone() for n, e in get_erasers(pipe.unet).items()
            for k, v in e.state_dict().items()}


def train_recording_prompts(pipe, trainer, seen: list) -> None:
    """Train, appending the prompt embedding of every UNet pass to ``seen``."""
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"].detach().clone()),
        with_kwargs=True)
    try:
        trainer.train()
    finally:
        hook.remove()


def log_rows(out):
    return [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]


def test_training_runs_and_writes_erasers(pipe, tmp_path):
    erase(pipe, config(), tmp_path, base_model="tiny")
    assert (tmp_path / ERASERS_FILE).is_file() and (tmp_path / CHECKPOINT_FILE).is_file()
    rows = log_rows(tmp_path)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss_attack_first"] is not None for r in rows)
    assert all(r["loss_anchor"] is None for r in rows)  # the term is off by default
    # per iteration: 2·steps (z_t) + 2 (frozen) + adv_steps + 2 (eraser: plain and attacked)
    expected = sum(2 * r["ddim_step"] + 2 + 2 + 2 for r in rows)
    assert rows[-1]["unet_forward"] == expected


def test_erasers_learn_on_the_plain_prompt_and_under_the_attack(pipe, tmp_path):
    trainer = Trainer(pipe, config(iterations=1), tmp_path)
    seen = []
    train_recording_prompts(pipe, trainer, seen)
    last = seen[-1]  # the eraser update's pass
    plain = trainer.cond["car"].hidden
    start = trainer.tokens["car"][-1] + 1
    assert last.shape[0] == 2 and torch.equal(last[0], plain[0])
    assert torch.equal(last[1, :start], plain[0, :start])  # the prompt up to the concept
    assert not torch.equal(last[1, start:], plain[0, start:])  # then the attack's soft tokens
    assert torch.equal(last[1, start:start + 2], trainer.adv["car"][0].detach()[:2])


@pytest.mark.parametrize("zt_reuse", [1, 3])  # 3: stopped while a cached trajectory is in use
def test_resumed_run_equals_uninterrupted_run(tiny_model_dir, tmp_path, zt_reuse):
    from receler import load_pipeline

    full = load_pipeline(str(tiny_model_dir), device="cpu")
    t_full = Trainer(full, config(zt_reuse=zt_reuse), tmp_path / "full")
    t_full.train()

    part = load_pipeline(str(tiny_model_dir), device="cpu")
    stop_at_3 = lambda tr, r: tr.request_stop() if r.iteration == 3 else None  # noqa: E731
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(part, config(zt_reuse=zt_reuse), tmp_path / "part", callbacks=[stop_at_3]).train()
    assert info.value.iteration == 3

    resumed = load_pipeline(str(tiny_model_dir), device="cpu")
    t_res = Trainer(resumed, config(zt_reuse=zt_reuse), tmp_path / "part")
    t_res.train(resume=True)
    a, b = eraser_weights(full), eraser_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a, b) for a, b in zip(t_full.adv["car"], t_res.adv["car"], strict=True))
    assert log_rows(tmp_path / "full") == log_rows(tmp_path / "part")
    assert not any(torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "up.weight" in k)


def test_multi_concept_uses_one_eraser_set_and_one_prompt_per_concept(pipe, tmp_path):
    trainer = Trainer(pipe, config(concepts="car, dog", iterations=6), tmp_path)
    initial = {c: p[0].detach().clone() for c, p in trainer.adv.items()}
    trainer.train()
    seen = {r["concept"] for r in log_rows(tmp_path)}
    assert seen == {"car", "dog"}
    assert set(trainer.adv) == {"car", "dog"}
    for c in seen:
        assert not torch.equal(trainer.adv[c][0], initial[c])  # each concept's prompt was attacked
    assert len(get_erasers(pipe.unet)) == 7


def test_zero_adversarial_steps_still_trains_the_erasers(pipe, tmp_path):
    trainer = Trainer(pipe, config(adv_steps=0), tmp_path)
    trainer.train()
    assert all(r["loss_attack_first"] is None for r in log_rows(tmp_path))
    assert any(e.up.weight.abs().sum() > 0 for e in get_erasers(pipe.unet).values())


def test_adversarial_start_takes_effect(pipe, tmp_path):
    Trainer(pipe, config(adv_start=2), tmp_path).train()
    attacked = [r["loss_attack_first"] is not None for r in log_rows(tmp_path)]
    assert attacked == [False, False, True, True]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(pipe, tmp_path):
    def poison(trainer, result):
        if result.iteration == 3:
            for e in get_erasers(trainer.unet).values():
                with torch.no_grad():
                    e.up.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="iteration 4"):
        Trainer(pipe, config(iterations=6), tmp_path, callbacks=[poison]).train()
    tensors, meta = read_tensors(tmp_path / CHECKPOINT_FILE)
    assert meta["iteration"] == 2
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("erasers."))
    assert not (tmp_path / ERASERS_FILE).exists()


def test_existing_output_is_refused_without_overwrite(pipe, tmp_path):
    erase(pipe, config(iterations=2), tmp_path)
    before = (tmp_path / ERASERS_FILE).read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_out_dir(tmp_path, overwrite=False, resume=False)
    assert (tmp_path / ERASERS_FILE).read_bytes() == before
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        check_out_dir(tmp_path / "new", overwrite=False, resume=True)


@pytest.mark.parametrize(("kw", "match"), [
    ({"concepts": " , car"}, "empty concept"),
    ({"concepts": ""}, "empty concept"),
    ({"iterations": 0}, "iterations must be positive"),
    ({"lr": float("nan")}, "lr must be a finite"),
    ({"mask_threshold": 1.5}, "mask_threshold"),
    ({"adv_steps": -1}, "adv_steps must be >= 0"),
    ({"zt_base": 1.5}, "zt_base must lie in"),
    ({"zt_base": float("nan")}, "zt_base must lie in"),
    ({"base_images": 0}, "base_images must be positive"),
    ({"concept_balance": -1.0}, "concept_balance must be >= 0"),
    ({"concept_balance": float("nan")}, "concept_balance must be a finite"),
])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        config(**kw)


def test_too_many_adversarial_tokens_are_refused(pipe, tmp_path):
    with pytest.raises(ValueError, match=r"pass --adv-tokens \d+ or fewer"):
        Trainer(pipe, config(adv_tokens=40), tmp_path)


def test_reused_trajectory_gives_the_same_z_t_for_fewer_passes(pipe, tmp_path):
    from receler.pipeline import ddim_scheduler, ddim_until, encode

    sched = ddim_scheduler(pipe, 5)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    uncond, cond = encode(pipe, [""]), encode(pipe, ["car"])
    path = ddim_until(pipe, sched, noise, uncond, cond, 3.0, 4, keep=True)
    assert path.shape == (5, 4, 8, 8)
    for k in range(5):  # row k is exactly the latent after k steps
        assert torch.equal(path[k:k + 1], ddim_until(pipe, sched, noise, uncond, cond, 3.0, k))

    trainer = Trainer(pipe, config(zt_reuse=4, adv_steps=0, ddim_steps=5), tmp_path)
    trainer.train()
    rows = log_rows(tmp_path)
    # one whole trajectory (4 steps × 2) for the 4 iterations, plus 2 frozen + 1 erased each
    assert rows[-1]["unet_forward"] == 2 * 4 + 4 * 3


@pytest.mark.parametrize("anchors", ["", "a photo|a red truck", "|a photo"])
def test_anchor_term_is_logged_and_the_empty_anchor_costs_no_pass(pipe, tmp_path, anchors):
    erase(pipe, config(adv_steps=0, anchor_weight=1.0, anchors=anchors), tmp_path)
    rows = log_rows(tmp_path)
    # the first iteration's erasers are fresh (`up` = 0): nothing to penalise yet
    assert rows[0]["loss_anchor"] == 0.0 and all(r["loss_anchor"] > 0 for r in rows[1:])
    # every non-empty anchor needs its own frozen pass, one of them per iteration; the empty
    # prompt rides on the ε(∅) pass
    extra = 0 if anchors == "" else 1
    expected = sum(2 * r["ddim_step"] + 2 + extra + 1 for r in rows)
    assert rows[-1]["unet_forward"] == expected
    assert rows[-1]["unet_backward"] == len(rows)  # the anchor adds no UNet backward


def test_empty_anchor_joins_every_iteration_beside_the_turn_of_the_others(pipe, tmp_path,
                                                                          monkeypatch):
    import receler.train as train

    sizes = []  # how many anchor passes each iteration's loss averages

    def counting(outputs):
        sizes.append(len(outputs))
        return real(outputs)

    real = train.anchor_loss
    monkeypatch.setattr(train, "anchor_loss", counting)
    erase(pipe, config(adv_steps=0, anchor_weight=1.0, anchors="|a photo|a red truck"), tmp_path)
    rows = log_rows(tmp_path)
    # two shadowed passes per iteration, each recording every eraser: ε(∅) and one other
    assert len(sizes) == 2 * len(rows) and len(set(sizes)) == 1 and sizes[0] > 0


def test_anchor_term_pulls_eraser_output_on_the_anchor_down(tiny_model_dir, tmp_path):
    """Same seed, with and without the anchor term: the erasers trained with it add less
    on the anchor prompt."""
    from receler import load_pipeline
    from receler.erasers import shadow_eraser_outputs
    from receler.objective import anchor_loss
    from receler.pipeline import encode, latent_shape, unet_eps

    added = {}
    for weight in (0.0, 50.0):
        p = load_pipeline(str(tiny_model_dir), device="cpu")
        erase(p, config(iterations=8, adv_steps=0, anchor_weight=weight, anchors="a photo"),
              tmp_path / str(weight))
        z = torch.randn(1, *latent_shape(p), generator=torch.Generator().manual_seed(3))
        with torch.no_grad(), shadow_eraser_outputs(p.unet) as outs:
            unet_eps(p.unet, z, 500, encode(p, ["a photo"]))
        added[weight] = anchor_loss(outs).item()
    assert added[50.0] < 0.5 * added[0.0], added


def test_adversary_pool_takes_turns_and_restarts_out_of_phase(pipe, tmp_path):
    trainer = Trainer(pipe, config(iterations=1, adv_pool=2, adv_reset=2), tmp_path)
    start = [p.detach().clone() for p in trainer.adv["car"]]
    picked = []
    for _ in range(6):
        soft, _ = trainer.next_adversary("car")
        picked.append(next(k for k, p in enumerate(trainer.adv["car"]) if p is soft))
        with torch.no_grad():
            soft.add_(1.0)  # stands for an attack step
    assert picked == [0, 1, 0, 1, 0, 1]
    # member 0 restarts before its 3rd use (uses 0, 1 | restart, 2), member 1 one use
    # earlier (out of phase): after six turns each holds the steps since its last restart
    now = [p.detach() - s for p, s in zip(trainer.adv["car"], start, strict=True)]
    assert torch.allclose(now[0], torch.ones_like(now[0]))
    assert torch.allclose(now[1], 2 * torch.ones_like(now[1]))


def train_and_resume(model_dir, out, **cfg) -> tuple[Trainer, Trainer]:
    """One run straight through, one stopped after iteration 3 and resumed; both trainers,
    after asserting that they end with the same erasers."""
    from receler import load_pipeline

    full = load_pipeline(str(model_dir), device="cpu")
    t_full = Trainer(full, config(**cfg), out / "full")
    t_full.train()
    part = load_pipeline(str(model_dir), device="cpu")
    stop_at_3 = lambda tr, r: tr.request_stop() if r.iteration == 3 else None  # noqa: E731
    with pytest.raises(TrainingInterrupted):
        Trainer(part, config(**cfg), out / "part", callbacks=[stop_at_3]).train()
    resumed = load_pipeline(str(model_dir), device="cpu")
    t_res = Trainer(resumed, config(**cfg), out / "part")
    t_res.train(resume=True)
    a, b = eraser_weights(full), eraser_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    return t_full, t_res


def test_adversary_pool_resumes_exactly(tiny_model_dir, tmp_path):
    t_full, t_res = train_and_resume(tiny_model_dir, tmp_path, adv_pool=2, adv_reset=2)
    assert all(torch.equal(x, y) for x, y in zip(t_full.adv["car"], t_res.adv["car"], strict=True))
    assert t_full.adv_uses == t_res.adv_uses


def test_concept_balance_weighs_a_concept_by_its_guidance_energy(pipe, tmp_path):
    """(mean energy / own energy)^B over the concepts seen so far, each energy a running
    mean of ‖ε(c) − ε(∅)‖²; 1 with B = 0 or one concept."""
    zero = torch.zeros(1, 4, 8, 8)

    def weight(trainer, concept, energy):
        return trainer.balance_weight(concept, zero, torch.full_like(zero, energy ** 0.5))

    t = Trainer(pipe, config(concepts="car, dog", concept_balance=1.0), tmp_path / "a")
    assert weight(t, "car", 4.0) == pytest.approx(1.0)  # the only concept seen
    assert weight(t, "dog", 1.0) == pytest.approx(2.5)  # mean(4, 1) / 1
    assert weight(t, "car", 4.0) == pytest.approx(0.625)  # 2.5 / 4
    # dog's running mean 0.9·1 + 0.1·11 = 2: mean(4, 2) / 2
    assert weight(t, "dog", 11.0) == pytest.approx(1.5)
    for b, name, expected in ((0.5, "b", 2.5 ** 0.5), (0.0, "c", 1.0)):
        remove_erasers(pipe.unet)
        other = Trainer(pipe, config(concepts="car, dog", concept_balance=b), tmp_path / name)
        weight(other, "car", 4.0)
        assert weight(other, "dog", 1.0) == pytest.approx(expected)
    remove_erasers(pipe.unet)
    one = Trainer(pipe, config(concept_balance=1.0), tmp_path / "d")
    assert weight(one, "car", 4.0) == weight(one, "car", 1.0) == 1.0


def test_concept_balance_resumes_exactly(tiny_model_dir, tmp_path):
    t_full, t_res = train_and_resume(tiny_model_dir, tmp_path, concepts="car, dog",
                                     concept_balance=1.0)
    assert t_full.guidance_energy == t_res.guidance_energy
    assert all(v > 0 for v in t_full.guidance_energy.values())


def test_a_one_concept_checkpoint_resumes_under_another_balance(pipe, tmp_path):
    """The balance changes nothing with one concept, so a checkpoint made before a model
    recommended it resumes; with two it is a different run."""
    stop = lambda tr, r: tr.request_stop() if r.iteration == 1 else None  # noqa: E731
    for concepts in ("car", "car, dog"):
        out = tmp_path / concepts.replace(", ", "_")
        with pytest.raises(TrainingInterrupted):
            Trainer(pipe, config(concepts=concepts, concept_balance=0.0), out,
                    callbacks=[stop]).train()
        remove_erasers(pipe.unet)
        resumed = Trainer(pipe, config(concepts=concepts, concept_balance=1.0), out)
        if concepts == "car":
            resumed.train(resume=True)
        else:
            with pytest.raises(ValueError, match="concept_balance=0.0, not 1.0"):
                resumed.train(resume=True)
        remove_erasers(pipe.unet)


def test_anchors_naming_an_erased_concept_are_dropped(pipe, tmp_path):
    from receler.train import mentions_concept

    assert mentions_concept("a red car", ["car"]) and mentions_concept("Car!", ["car"])
    assert not mentions_concept("a cartoon", ["car"]) and not mentions_concept("a dog", ["car"])
    trainer = Trainer(pipe, config(anchor_weight=1.0, anchors="|a car|a dog|a red cat",
                                   concepts="car, cat"), tmp_path)
    assert trainer.anchor_texts == ["a dog"] and len(trainer.anchors) == 1
    assert trainer.anchor_empty


def test_base_image_share_draws_z_t_from_the_frozen_models_images(pipe, tmp_path):
    trainer = Trainer(pipe, config(zt_base=1.0, base_images=2, adv_steps=0), tmp_path)
    images = trainer.base_latents["car"]
    assert images.shape[0] == 2 and not torch.equal(images[0], images[1])
    first_pass = trainer.passes.forward
    assert first_pass == 2 * 2 * 4  # 2 images × 4 DDIM steps × (∅, c)
    state = trainer.generator.get_state()
    concept, steps, z, t = trainer.sample_zt()
    assert trainer.passes.forward == first_pass  # noising a stored image costs no pass
    # replayed: the share's draw, the step, the image, the noise; z_t = √ᾱ·x0 + √(1−ᾱ)·ε
    g = torch.Generator().set_state(state)
    torch.rand((), generator=g)
    assert steps == int(torch.randint(4, (1,), generator=g))
    x0 = images[int(torch.randint(2, (1,), generator=g))]
    noise = torch.randn((1, *trainer.latent_shape), generator=g)
    alpha = trainer.sched.alphas_cumprod[int(t)]
    assert torch.allclose(z, alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise, atol=1e-5)
    trainer.train()
    rows = log_rows(tmp_path)
    # after the images: 2 frozen + 1 erased pass per iteration, no trajectory passes
    assert rows[-1]["unet_forward"] == first_pass + 4 * 3


def test_base_image_share_resumes_exactly(tiny_model_dir, tmp_path):
    from receler import load_pipeline

    cfg = dict(zt_base=0.5, base_images=2)
    full = load_pipeline(str(tiny_model_dir), device="cpu")
    Trainer(full, config(**cfg), tmp_path / "full").train()
    part = load_pipeline(str(tiny_model_dir), device="cpu")
    stop_at_3 = lambda tr, r: tr.request_stop() if r.iteration == 3 else None  # noqa: E731
    with pytest.raises(TrainingInterrupted):
        Trainer(part, config(**cfg), tmp_path / "part", callbacks=[stop_at_3]).train()
    resumed = load_pipeline(str(tiny_model_dir), device="cpu")
    Trainer(resumed, config(**cfg), tmp_path / "part").train(resume=True)
    a, b = eraser_weights(full), eraser_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_rows(tmp_path / "full") == log_rows(tmp_path / "part")


def test_prompt_templates_take_turns_and_the_soft_tokens_follow_the_concept(pipe, tmp_path):
    from receler.pipeline import encode

    cfg = config(iterations=2, prompt_templates="{}|a photo of a {}")
    seen, ends = [], []  # every UNet pass's prompt; the pass count at each iteration's end
    trainer = Trainer(pipe, cfg, tmp_path, callbacks=[lambda tr, r: ends.append(len(seen))])
    train_recording_prompts(pipe, trainer, seen)
    plain, templated = encode(pipe, ["car"]).hidden, encode(pipe, ["a photo of a car"]).hidden
    assert trainer.prompt_tokens["car"][1] == [i + 4 for i in trainer.prompt_tokens["car"][0]]
    first, second = seen[:ends[0]], seen[ends[0]:]  # the eraser step's pass comes last
    start = trainer.prompt_tokens["car"][1][-1] + 1
    assert torch.equal(first[-1][0], plain[0])  # iteration 1: the concept alone
    assert torch.equal(second[-1][0], templated[0])  # iteration 2: the template
    # its attacked prompt: the template up to the concept, then the soft tokens
    assert torch.equal(second[-1][1, :start], templated[0, :start])
    assert torch.equal(second[-1][1, start:start + 4], trainer.adv["car"][0].detach())


@pytest.mark.parametrize("templates", ["a photo of {} today", "{} and {}", "a {x} {}"])
def test_templates_that_do_not_end_with_the_concept_are_refused(templates):
    with pytest.raises(ValueError, match="must end with"):
        config(prompt_templates=templates)


def test_anchors_on_their_own_latents(pipe, tmp_path, monkeypatch):
    """anchor_latents='own': each anchor's own frozen-model images are drawn once (their
    passes counted) and the anchor pass runs on one of them noised to t, not on z_t."""
    import receler.train as train

    with pytest.raises(ValueError, match="anchor_latents must be one of concept, own"):
        config(anchor_latents="mine")
    seen = []  # (latent, prompt) of every frozen pass on an anchor prompt
    real = train.unet_eps

    def spy(unet, z, t, cond):
        seen.append((z.detach().clone(), cond))
        return real(unet, z, t, cond)

    monkeypatch.setattr(train, "unet_eps", spy)
    cfg = config(adv_steps=0, anchor_weight=1.0, anchors="a photo|a red truck",
                 anchor_latents="own", base_images=2, ddim_steps=4)
    trainer = Trainer(pipe, cfg, tmp_path)
    assert [x.shape[0] for x in trainer.anchor_x0] == [2, 2]
    trainer.train()
    rows = log_rows(tmp_path)
    # 2 anchors × 2 images × 4 DDIM steps × 2 (guidance), once, then as with 'concept'
    expected = 2 * 2 * 4 * 2 + sum(2 * r["ddim_step"] + 2 + 1 + 1 for r in rows)
    assert rows[-1]["unet_forward"] == expected
    anchors = {id(a) for a in trainer.anchors}
    anchored = [z for z, cond in seen if id(cond) in anchors]
    assert len(anchored) == len(rows)
    # not the iteration's z_t: the concept's passes (ε(c)) ran on other latents
    concept = [z for z, cond in seen if cond is trainer.cond["car"]]
    assert len(concept) >= len(rows)
    assert all(not any(torch.equal(a, c) for c in concept) for a in anchored)


def test_anchors_on_their_own_latents_resume_exactly(tiny_model_dir, tmp_path):
    t_full, t_res = train_and_resume(tiny_model_dir, tmp_path, adv_steps=0, anchor_weight=1.0,
                                     anchors="a photo|a red truck", anchor_latents="own",
                                     base_images=2)
    assert all(torch.equal(a, b) for a, b in zip(t_full.anchor_x0, t_res.anchor_x0, strict=True))
