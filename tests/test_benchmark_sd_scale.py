"""benchmarks/sd_scale.py on a reduced topology of SD 1.4's structure (the real size runs
for minutes): the worker runs the library's training loop, and the estimate adds up."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def sd_scale():
    return load_benchmark("sd_scale")


def test_sd_scale_writes_measured_and_estimated(sd_scale, tmp_path):
    out = tmp_path / "sd_scale.json"
    assert sd_scale.main(["--topology", "tiny", "--dtypes", "fp32", "--device", "cpu",
                          "--threads", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    m = row["measured"]
    assert row["dtype"] == "fp32" and row["topology"] == "tiny"
    # ddim_steps 2, adv_steps 1: sampler 2 per step taken, 2 frozen, 1 attack, 2 eraser
    assert m["unet_passes"]["forward"] == 2 * m["sampler_steps_taken"] + 2 + 1 + 2
    assert m["unet_passes"]["backward"] == 1 + 2
    assert m["peak_rss_mb"] > 0 and m["generation_s"] > 0
    e = row["estimated"]
    expected = (24.5 * m["sampler_step_s"] + 2 * m["frozen_pass_s"] + 10 * m["attack_step_s"]
                + m["eraser_step_s"])
    assert e["iteration_s_adv10"] == pytest.approx(expected)
    assert "| fp32 |" in out.with_suffix(".md").read_text()


def test_sd_scale_refuses_unknown_dtype(sd_scale, tmp_path):
    with pytest.raises(SystemExit, match="unknown dtype 'fp8'"):
        sd_scale.main(["--topology", "tiny", "--dtypes", "fp8", "--out", str(tmp_path / "x.json")])
