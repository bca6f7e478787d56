"""benchmarks/compare.py's table rows and its latency re-measurement, on a tiny protocol run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from receler.attack import AttackConfig
from receler.config import TrainConfig
from receler.protocol import Protocol, ProtocolConfig

COMPARE = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare", COMPARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latency_is_measured_again_alone_and_used_in_the_row(compare, tiny_model_dir,
                                                             prompt_sets, colour_detector,
                                                             tmp_path):
    out = tmp_path / "run"
    cfg = ProtocolConfig(
        concept="car", out=out, model=str(tiny_model_dir), detector=colour_detector, per_class=1,
        concept_rows=1, attack_images=1, prompts=prompt_sets,
        train=TrainConfig(concepts="car", iterations=2, ddim_steps=3, adv_steps=0, rank=4,
                          mask_image_every=0),
        attack=AttackConfig(tokens=1, steps=1, sweeps=1, candidates=2, target_images=1,
                            noise_draws=1))
    res = Protocol(cfg, show_progress=False).run()

    threads = torch.get_num_threads()
    compare.measure_alone([out], repeats=2)
    assert torch.get_num_threads() == threads  # restored for the caller
    lat = json.loads((out / compare.LATENCY_FILE).read_text())
    assert lat["repeats"] == 2 and lat["latency_base_s"] > 0 and lat["latency_s"] > 0
    assert lat["overhead_ratio"] == pytest.approx(lat["latency_s"] / lat["latency_base_s"] - 1)

    row = compare.row("receler", "car", res, 100.0, alone=lat)
    assert row["overhead_ratio"] == lat["overhead_ratio"] and row["overhead_measured_alone"]
    assert row["overhead_ratio_protocol"] == res["overhead_ratio"]
    assert compare.row("receler", "car", res, None)["overhead_ratio"] == res["overhead_ratio"]

    # Already measured with these repeats: not measured again.
    before = (out / compare.LATENCY_FILE).stat().st_mtime_ns
    compare.measure_alone([out], repeats=2)
    assert (out / compare.LATENCY_FILE).stat().st_mtime_ns == before


def test_published_recipe_and_variants_are_flags_the_protocol_accepts(compare):
    from receler.cli import build_parser

    def parsed(flags):
        return build_parser().parse_args(["protocol", "--concept", "star", "--out", "x", *flags])

    pub = parsed(compare.PUBLISHED["flags"])
    assert (pub.iterations, pub.adv_steps, pub.ddim_steps, pub.adv_start) == (500, 50, 50, 0)
    assert (pub.anchor_weight, pub.reg_weight) == (0.0, 5.0)  # the settings of its stored run

    v = compare.variant("--reg-weight 5 --seed 1")
    assert v["label"] == "receler (--reg-weight 5 --seed 1)" and v["method"] == "receler"
    ns = parsed(v["flags"])
    assert (ns.reg_weight, ns.seed) == (5.0, 1)
