"""Sequential erasure: a run that starts from an earlier run's erasers (``init_erasers``)."""

from __future__ import annotations

import logging

import pytest
import torch

from receler import TrainConfig, Trainer, erase, get_erasers, remove_erasers
from receler.serialization import read_eraser_weights


def config(**kw) -> TrainConfig:
    base = dict(concepts="car", iterations=2, rank=4, ddim_steps=3, adv_steps=1, adv_tokens=2,
                checkpoint_every=1, mask_image_every=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def first(pipe, tmp_path):
    """A finished run erasing car; the pipeline left without erasers."""
    erase(pipe, config(), tmp_path / "car", show_progress=False)
    remove_erasers(pipe.unet)
    return tmp_path / "car"


def test_a_run_starts_from_the_given_erasers_and_trains_them_further(pipe, first, tmp_path):
    saved, _ = read_eraser_weights(pipe.unet, first)
    trainer = Trainer(pipe, config(concepts="car,dog", init_erasers=str(first)),
                      tmp_path / "seq", show_progress=False)
    start = {f"{n}.{k}": v.clone() for n, e in get_erasers(pipe.unet).items()
             for k, v in e.state_dict().items()}
    assert start.keys() == saved.keys()
    assert all(torch.equal(start[k], saved[k]) for k in saved)  # not fresh erasers
    assert any(saved[k].abs().sum() > 0 for k in saved if ".up." in k)  # car's were trained
    remove_erasers(pipe.unet)
    del trainer

    result = erase(pipe, config(concepts="car,dog", init_erasers=str(first)), tmp_path / "seq2",
                   show_progress=False)
    after = {f"{n}.{k}": v for n, e in get_erasers(pipe.unet).items()
             for k, v in e.state_dict().items()}
    assert any(not torch.equal(after[k], saved[k]) for k in saved)  # trained further
    assert result.concepts == ["car", "dog"] and result.train["init_erasers"] == str(first)


def test_a_set_of_another_shape_is_refused_before_the_unet_changes(pipe, first, tmp_path):
    with pytest.raises(ValueError, match=r"rank-4 erasers .* pass --rank 4") as err:
        Trainer(pipe, config(rank=8, init_erasers=str(first)), tmp_path / "x",
                show_progress=False)
    assert "\n" not in str(err.value)
    assert not get_erasers(pipe.unet)
    with pytest.raises(FileNotFoundError, match="pass the --out folder"):
        Trainer(pipe, config(init_erasers=str(tmp_path / "nothing")), tmp_path / "y",
                show_progress=False)
    assert not get_erasers(pipe.unet)


def test_a_concept_the_start_erases_but_the_run_does_not_list_is_named(pipe, first, tmp_path,
                                                                       caplog):
    with caplog.at_level(logging.WARNING, logger="receler.train"):
        Trainer(pipe, config(concepts="dog", init_erasers=str(first)), tmp_path / "z",
                show_progress=False)
    remove_erasers(pipe.unet)
    assert any("also erases car" in r.getMessage() for r in caplog.records)
