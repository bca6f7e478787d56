from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from receler.eval.prompts import read_prompts, reference_prompts
from receler.sampling import SamplerSettings, generate_prompt_file, shard

CSV = """case_number,prompt,evaluation_seed,class,evaluation_guidance
0,a photo of car,11,car,
1,dog,12,dog,
2,a red truck,13,truck,2.0
3,cat,14,cat,
4,blue car,15,car,
"""
SETTINGS = SamplerSettings(steps=3, guidance=3.0)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text(CSV)
    return path


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_shards_cover_every_item_once():
    items = list(range(11))
    parts = [shard(items, i, 3) for i in range(3)]
    assert sorted(sum(parts, [])) == items
    with pytest.raises(ValueError, match="outside"):
        shard(items, 3, 3)


def test_prompt_file_generation_is_resumable_and_deterministic(pipe, prompts, tmp_path):
    rows = read_prompts(prompts)
    full = tmp_path / "full"
    written = generate_prompt_file(pipe, rows, full, num_images=2, settings=SETTINGS, batch_size=3)
    assert sorted(p.name for p in written) == sorted(f"{r}_{i}.png" for r in range(5)
                                                     for i in range(2))
    reference = files(full)

    resumed = tmp_path / "resumed"  # a run killed after some images, then run again
    resumed.mkdir()
    for name in ("0_0.png", "3_1.png", "4_0.png"):
        shutil.copy(full / name, resumed / name)
    again = generate_prompt_file(pipe, rows, resumed, num_images=2, settings=SETTINGS,
                                 batch_size=4)
    assert len(again) == 7  # only the missing images are generated...
    assert files(resumed) == reference  # ...and they are identical, whatever the batch size
    assert generate_prompt_file(pipe, rows, resumed, num_images=2, settings=SETTINGS) == []


def test_row_guidance_is_used(pipe, prompts, tmp_path):
    rows = read_prompts(prompts)
    generate_prompt_file(pipe, rows[2:3], tmp_path / "a", settings=SETTINGS)
    rows[2].guidance = None  # the same row with the default guidance gives another image
    generate_prompt_file(pipe, rows[2:3], tmp_path / "b", settings=SETTINGS)
    assert files(tmp_path / "a") != files(tmp_path / "b")


@pytest.mark.parametrize("name", ["cifar10_simple", "cifar10_paraphrase", "sample_prompts",
                                  "i2p", "coco_30k"])
def test_reference_files_give_one_image_name_per_row(name):
    rows = read_prompts(reference_prompts(name))
    assert len({r.case_number for r in rows}) == len(rows) > 0


def test_two_processes_split_rows_without_gaps_or_duplicates(tiny_model_dir, prompts, tmp_path):
    """A real two-process run (torchrun sets the same variables as `accelerate launch`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    args = ["-m", "receler", "generate", "--model", str(tiny_model_dir), "--prompts",
            str(prompts), "--num-images", "2", "--steps", "3", "--guidance", "3",
            "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           *args, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = sorted(int(ln.split(" wrote ")[1].split()[0]) for ln in proc.stdout.splitlines()
                    if "] wrote " in ln)
    assert counts == [2, 8]  # whole batches: row 2 (its own guidance), the other 8 images
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    assert files(tmp_path / "two") == files(tmp_path / "one")  # no gaps, same images
    assert len(files(tmp_path / "one")) == 10
