"""Bad input, as a careless user meets it: a one-line error that names the problem and the
fix, a non-zero exit, and nothing already written lost."""

from __future__ import annotations

import json

import pytest
import torch

from receler import TrainConfig, load_pipeline
from receler.cli import main
from receler.methods import erase_with, load_edit
from receler.serialization import CHECKPOINT_FILE, CONFIG_FILE, ERASERS_FILE
from receler.train import TrainingInterrupted, erase

FAST = dict(ddim_steps=2, adv_steps=1, adv_tokens=2, rank=2, checkpoint_every=1,
            mask_image_every=0)


def one_error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("receler:")]
    assert len(lines) == 1, lines
    return lines[0]


def eraser_bytes(folder):
    return (folder / ERASERS_FILE).read_bytes(), (folder / CONFIG_FILE).read_text()


@pytest.fixture
def finished(pipe, tmp_path):
    """A finished erasure of 'car' in ``tmp_path / 'run'``."""
    out = tmp_path / "run"
    erase(pipe, TrainConfig(concepts=["car"], iterations=2, **FAST), out, show_progress=False)
    return out


def test_overwrite_that_fails_validation_keeps_the_old_run(tiny_model_dir, finished):
    before = eraser_bytes(finished)
    fresh = load_pipeline(str(tiny_model_dir), device="cpu")
    too_long = TrainConfig(concepts=["car"], iterations=2, **{**FAST, "adv_tokens": 40})
    with pytest.raises(ValueError, match=r"pass --adv-tokens \d+ or fewer"):
        erase(fresh, too_long, finished, overwrite=True, show_progress=False)
    assert eraser_bytes(finished) == before and (finished / CHECKPOINT_FILE).is_file()


def test_interrupted_overwrite_leaves_the_old_run_whole_and_resumes(tiny_model_dir, finished):
    before = eraser_bytes(finished)

    def stop(trainer, result):
        trainer.request_stop()

    fresh = load_pipeline(str(tiny_model_dir), device="cpu")
    new = TrainConfig(concepts=["truck"], iterations=3, **FAST)
    with pytest.raises(TrainingInterrupted):
        erase(fresh, new, finished, overwrite=True, callbacks=[stop], show_progress=False)
    # The folder still holds the old run, whole: its erasers load with its own config.
    assert eraser_bytes(finished) == before
    check = load_pipeline(str(tiny_model_dir), device="cpu")
    assert load_edit(check, finished).concepts == ["car"]
    # The printed resume (--resume without --overwrite) continues the new run, then moves it in.
    again = load_pipeline(str(tiny_model_dir), device="cpu")
    erase(again, new, finished, resume=True, show_progress=False)
    assert json.loads((finished / CONFIG_FILE).read_text())["concepts"] == ["truck"]
    assert not (finished / ".overwrite").exists() and not (finished / ".replaced").exists()


def test_overwrite_with_another_method_replaces_the_whole_result(tiny_model_dir, finished):
    fresh = load_pipeline(str(tiny_model_dir), device="cpu")
    erase_with("uce", fresh, TrainConfig(concepts=["car"]), finished, overwrite=True)
    assert json.loads((finished / CONFIG_FILE).read_text())["method"] == "uce"
    assert not (finished / ERASERS_FILE).exists() and not (finished / CHECKPOINT_FILE).exists()
    assert not (finished / "train_log.jsonl").exists()  # nothing of the old run is left


def test_nan_before_any_checkpoint_says_start_again(pipe, tmp_path, monkeypatch):
    from receler import train as train_module
    from receler.train import TrainingDiverged

    monkeypatch.setattr(train_module, "erase_loss", lambda *a: torch.tensor(float("nan")))
    with pytest.raises(TrainingDiverged, match="before any checkpoint.*--overwrite"):
        erase(pipe, TrainConfig(concepts=["car"], iterations=3, **FAST), tmp_path,
              show_progress=False)


def test_out_that_is_a_file(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["erase", "--model", str(tiny_model_dir), "--concept", "car", "--out",
                 str(tmp_path / "f")]) == 2
    assert "is a file, not a folder" in one_error_line(capsys)
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("device, match", [
    ("cuda", "no CUDA device"), ("nonsense:3", "invalid device"),
])  # fmt: skip
def test_bad_devices(tiny_model_dir, tmp_path, capsys, device, match):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["erase", "--model", str(tiny_model_dir), "--concept", "car", "--out",
                 str(tmp_path / "o"), "--device", device]) == 2
    assert match in one_error_line(capsys)


def test_read_only_output_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import receler.serialization as ser

    def full_disk(path, write):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(ser, "atomic_write", full_disk)
    monkeypatch.setattr(ser, "save_tensors", lambda path, *a, **k: full_disk(path, None))
    rc = main(["erase", "--model", str(tiny_model_dir), "--concept", "car", "--out",
               str(tmp_path / "o"), "--iterations", "1", "--ddim-steps", "2", "--adv-steps",
               "0", "--rank", "2", "--quiet"])
    assert rc == 1
    line = one_error_line(capsys)
    assert "No space left on device" in line and "free space" in line


def test_negative_eta_is_refused():
    with pytest.raises(ValueError, match="negative η trains towards the concept"):
        TrainConfig(concepts=["car"], eta=-1.0)


def test_concept_longer_than_the_prompt(pipe, tmp_path):
    from receler.train import Trainer

    long = " ".join(["car"] * 40)  # the tiny tokenizer holds 24 tokens
    with pytest.raises(ValueError, match=r"more than the model's 24-token prompt.*shorten") as e:
        Trainer(pipe, TrainConfig(concepts=[long], **{**FAST, "adv_steps": 0}), tmp_path)
    assert long not in str(e.value)  # the message shows the start of the concept only


def test_rank_mismatch_between_files_is_named(tiny_model_dir, finished):
    cfg = json.loads((finished / CONFIG_FILE).read_text())
    cfg["rank"] = 64
    (finished / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="says rank 64 but .* holds rank-2 erasers.*same --out"):
        load_edit(load_pipeline(str(tiny_model_dir), device="cpu"), finished)


def test_unknown_toy_concept_is_named(capsys):
    from receler.cli import _note_unknown_toy_words

    _note_unknown_toy_words(None, ["red star", "striped"])  # the toy knows these words
    assert capsys.readouterr().err == ""
    _note_unknown_toy_words(None, ["car"])
    err = capsys.readouterr().err
    assert "the toy model has no word 'car'" in err and "star" in err


def test_erase_help_shows_the_toy_recommendation(capsys):
    with pytest.raises(SystemExit):
        main(["erase", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 128; the toy model recommends 32)" in out


@pytest.mark.parametrize("flags, match", [
    (["--guidance", "nan"], "guidance must be a finite number"),
    (["--guidance", "inf"], "guidance must be a finite number"),
    (["--guidance", "-1"], "guidance must be a finite number >= 0"),
    (["--steps", "0"], "steps must be at least 1"),
    (["--steps", "-3"], "steps must be at least 1"),
    (["--batch-size", "0"], "batch size must be a whole number of at least 1"),
    (["--batch-size", "-2"], "batch size must be a whole number of at least 1"),
])  # fmt: skip
def test_generate_refuses_bad_sampling_values(tiny_model_dir, tmp_path, capsys, flags, match):
    rc = main(["generate", "--model", str(tiny_model_dir), "--prompt", "a photo of a car",
               "--num-images", "1", "--out", str(tmp_path / "imgs"), *flags])
    assert rc == 2 and match in one_error_line(capsys)
    assert not (tmp_path / "imgs").exists()


@pytest.mark.parametrize("cells, match", [
    ("nan,16,16", "guidance must be a finite number"),
    ("3.0,-16,16", "must be a positive number of pixels"),
])  # fmt: skip
def test_prompt_file_rows_with_bad_values(tiny_model_dir, tmp_path, capsys, cells, match):
    csv = tmp_path / "p.csv"
    csv.write_text("case_number,prompt,evaluation_seed,evaluation_guidance,sd_image_height,"
                   f"sd_image_width\n0,a photo of a car,1,{cells}\n")
    rc = main(["generate", "--model", str(tiny_model_dir), "--prompts", str(csv), "--out",
               str(tmp_path / "imgs"), "--device", "cpu"])
    line = one_error_line(capsys)
    assert rc == 2 and match in line and "case_number 0" in line
    assert not list((tmp_path / "imgs").glob("*.png"))  # nothing written


def test_binary_prompt_file(tmp_path):
    from receler.eval.prompts import read_prompts

    (tmp_path / "b.csv").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="not UTF-8 text.*UTF-8"):
        read_prompts(tmp_path / "b.csv")


@pytest.mark.parametrize("content, match", [
    ('{"erase": {"receler": {"rank": "32"}}}', "rank='32'.*not an int"),
    ('{"erase": {"receler": {"rank": 32.5}}}', "rank=32.5.*not an int"),
    ('[1, 2]', "must hold a JSON object, not a list"),
    ('{"erase": {"receler": {"start_guidance": "high"}}}', "not a float"),
    ('{"erase": ', "cannot read"),
    ('{"guidance_scale": "x"}', "guidance must be a finite number"),
])  # fmt: skip
def test_bad_model_defaults_name_the_file(tmp_path, content, match):
    from receler.config import model_erase_defaults
    from receler.sampling import SamplerSettings

    (tmp_path / "receler_defaults.json").write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        model_erase_defaults(tmp_path, "receler")
        SamplerSettings.for_model(tmp_path)
    assert "receler_defaults.json" in str(e.value)


def test_malformed_model_index_names_the_file(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read .*model_index.json"):
        load_pipeline(str(tmp_path), device="cpu")


def test_threads_flag(tiny_model_dir, tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "a photo of a car",
                     "--num-images", "1", "--out", str(tmp_path / "i"), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--out",
                     str(tmp_path / "j"), "--threads", "0"]) == 2
        assert "--threads must be at least 1" in one_error_line(capsys)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("concept, match", [
    ("dog", "cannot score \\['dog'\\]"), (" ", "--concept is empty"),
])  # fmt: skip
def test_attack_checks_the_detector_before_attacking(finished, tmp_path, capsys, monkeypatch,
                                                     concept, match):
    import re

    import receler.pipeline

    monkeypatch.setattr(receler.pipeline, "load_pipeline",
                        lambda *a, **k: pytest.fail("loaded a model before checking"))
    rc = main(["attack", "--erasers", str(finished), "--concept", concept, "--out",
               str(tmp_path / "a")])
    assert rc == 2 and re.search(match, one_error_line(capsys))
