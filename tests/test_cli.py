"""The CLI, run as a real subprocess on a tiny pipeline saved to disk."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from receler.serialization import CHECKPOINT_FILE, ERASERS_FILE

FAST = ["--ddim-steps", "4", "--adv-steps", "1", "--adv-tokens", "4", "--rank", "4",
        "--checkpoint-every", "1", "--mask-image-every", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def receler(*args, check_code: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "receler", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    if check_code is not None:
        assert proc.returncode == check_code, proc.stderr[-2000:]
    return proc


def error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("receler:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def erased(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "erasers"
    proc = receler("erase", "--model", tiny_model_dir, "--concept", "car", "--out", out,
                   "--iterations", "2", *FAST)
    assert "erased ['car'] with receler" in proc.stdout
    return out


def test_erase_writes_erasers_pictures_and_log(erased):
    for name in (ERASERS_FILE, "eraser_config.json", CHECKPOINT_FILE, "train_log.jsonl",
                 "loss_curves.png"):
        assert (erased / name).is_file(), name
    masks = sorted((erased / "masks").glob("*.png"))
    assert len(masks) == 2 and Image.open(masks[0]).size[0] > 100


def test_generate_compare_writes_a_grid(tiny_model_dir, erased, tmp_path):
    receler("generate", "--model", tiny_model_dir, "--erasers", erased, "--prompt", "car",
            "--prompt", "dog", "--num-images", "2", "--compare", "--out", tmp_path)
    grid = Image.open(tmp_path / "compare.png")
    assert grid.size[0] > grid.size[1]  # 4 columns, 2 rows
    assert len(list(tmp_path.glob("base_*.png"))) == 4 and (tmp_path / "001_01.png").is_file()


def test_other_methods_take_their_published_defaults_unless_flags_say_otherwise(
        tiny_model_dir, tmp_path):
    import json

    out = tmp_path / "esd"
    receler("erase", "--model", tiny_model_dir, "--concept", "car", "--out", out,
            "--method", "esd-x", "--iterations", "2", "--ddim-steps", "4")
    cfg = json.loads((out / "eraser_config.json").read_text())
    assert cfg["method"] == "esd-x" and cfg["train"]["iterations"] == 2
    assert cfg["train"]["lr"] == 1e-5  # ESD's own learning rate, not Receler's 3e-4
    imgs = tmp_path / "imgs"
    receler("generate", "--model", tiny_model_dir, "--erasers", out, "--prompt", "car",
            "--num-images", "1", "--out", imgs)
    assert (imgs / "000_00.png").is_file()
    proc = receler("erase", "--model", tiny_model_dir, "--concept", "car", "--out", tmp_path / "u",
                   "--method", "uce", "--method-option", "nonsense=1", check_code=2)
    assert "no option 'nonsense'" in error_line(proc)


def test_settings_the_model_recommends_apply_unless_flags_say_otherwise(tiny_model_dir, tmp_path):
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "receler_defaults.json").write_text(json.dumps(
        {"erase": {"receler": {"lr": 0.002, "mask_source": "guidance"}, "esd": {"lr": 0.0005}}}))
    out = tmp_path / "abl"
    proc = receler("erase", "--model", model, "--concept", "car", "--out", out,
                   "--method", "receler-eraser-reg", "--iterations", "1", "--lr", "0.001", *FAST)
    assert "mask_source=guidance" in proc.stderr
    train = json.loads((out / "eraser_config.json").read_text())["train"]
    assert train["mask_source"] == "guidance"  # the family's recommendation reaches the ablation
    assert train["lr"] == 0.001  # the flag wins over the recommended 0.002
    out = tmp_path / "esd"
    receler("erase", "--model", model, "--concept", "car", "--out", out, "--method", "esd-u",
            "--iterations", "1", "--ddim-steps", "2")
    assert json.loads((out / "eraser_config.json").read_text())["train"]["lr"] == 0.0005
    (model / "receler_defaults.json").write_text(json.dumps({"erase": {"receler": {"lr_x": 1}}}))
    proc = receler("erase", "--model", model, "--concept", "car", "--out", tmp_path / "bad",
                   *FAST, check_code=2)
    assert "unknown training setting 'lr_x'" in error_line(proc)


def test_existing_erasers_are_refused_without_overwrite(tiny_model_dir, erased):
    before = (erased / ERASERS_FILE).read_bytes()
    proc = receler("erase", "--model", tiny_model_dir, "--concept", "car", "--out", erased,
                   *FAST, check_code=2)
    assert "--overwrite" in error_line(proc)
    assert (erased / ERASERS_FILE).read_bytes() == before


@pytest.mark.parametrize(("args", "message"), [
    (["--concept", " , "], "empty concept"),
    (["--concept", "car", "--iterations", "0"], "iterations must be positive"),
    (["--concept", "car", "--mask-source", "nope"], "mask_source must be one of"),
    # a setting the method does not read would be silently ignored
    (["--concept", "car", "--method", "esd-x", "--reg-weight", "5"],
     "--reg-weight is not a setting of --method esd-x"),
    (["--concept", "car", "--method", "uce", "--seed", "1"], "--seed is not a setting"),
])
def test_bad_settings_exit_with_one_line(tiny_model_dir, tmp_path, args, message):
    proc = receler("erase", "--model", tiny_model_dir, "--out", tmp_path / "o", *args,
                   check_code=2)
    assert message in error_line(proc)
    assert not (tmp_path / "o").exists()


def test_help_and_flag_errors_do_not_import_diffusers():
    """The parser and the training settings' checks answer before diffusers is imported (it
    takes seconds): `receler --help` and a bad flag come back at once."""
    code = ("import sys\n"
            "from receler.cli import _train_config, build_parser\n"
            "for argv in (['erase', '--concept', 'car', '--out', 'o', '--iterations', '0'],\n"
            "             ['erase', '--concept', 'car', '--out', 'o', '--method', 'esd-x',\n"
            "              '--reg-weight', '5']):\n"
            "    args = build_parser().parse_args(argv)\n"
            "    try:\n"
            "        _train_config(args, ['car'], args.method or 'receler', quiet=True)\n"
            "    except (ValueError, SystemExit):\n"
            "        pass\n"
            "    else:\n"
            "        raise SystemExit('the bad setting was accepted')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'diffusers'))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_a_folder_that_is_not_a_pipeline_is_refused(tmp_path):
    (tmp_path / "junk.txt").write_text("hello")
    proc = receler("erase", "--model", tmp_path, "--concept", "car", "--out", tmp_path / "o",
                   check_code=2)
    assert "not a diffusers pipeline" in error_line(proc)


def test_a_corrupted_eraser_file_is_refused(tiny_model_dir, erased, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (erased / ERASERS_FILE).read_bytes()
    (bad / ERASERS_FILE).write_bytes(data[: len(data) // 3])
    (bad / "eraser_config.json").write_text((erased / "eraser_config.json").read_text())
    proc = receler("generate", "--model", tiny_model_dir, "--erasers", bad, "--prompt", "car",
                   "--out", tmp_path / "imgs", check_code=2)
    assert "truncated or corrupted" in error_line(proc)


def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "receler", "erase", "--model", str(tiny_model_dir),
           "--concept", "car", "--out", str(out), "--iterations", "100000", *FAST]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert (out / CHECKPOINT_FILE).is_file() and not (out / ERASERS_FILE).exists()
    resume = [ln for ln in stderr.splitlines() if ln.startswith("resume with:")]
    assert len(resume) == 1 and resume[0].endswith("--resume")
    # The printed command continues the run; here with a short total to finish quickly.
    args = shlex.split(resume[0].removeprefix("resume with: "))[1:]
    args[args.index("--iterations") + 1] = str(log.read_text().count("\n") + 1)
    receler(*args)
    assert (out / ERASERS_FILE).is_file()


def test_every_setting_flag_converts_to_its_field_type():
    """Each `receler erase` / `receler export` flag parses its value as the setting's type
    (``int | None`` an int, a string a string), read from the annotation, not its text."""
    from typing import get_type_hints

    from receler.cli import build_parser
    from receler.config import TrainConfig, scalar_type

    assert scalar_type(get_type_hints(TrainConfig)["mask_resolution"]) == (int, True)
    assert scalar_type(str) == (str, False) and scalar_type(float | None) == (float, True)
    with pytest.raises(TypeError, match="has no flag"):
        scalar_type(list[str])
    args = build_parser().parse_args(["erase", "--concept", "x", "--out", "o",
                                      "--mask-resolution", "8", "--anchors", "7", "--lr", "1"])
    assert (args.mask_resolution, args.anchors, args.lr) == (8, "7", 1.0)
    assert isinstance(args.lr, float)
    export = build_parser().parse_args(["export", "--erasers", "e", "--out", "o", "--ddim-steps",
                                        "4", "--retain", "5"])
    assert (export.ddim_steps, export.retain) == (4, "5")
