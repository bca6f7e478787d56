"""The retrain oracle: the class exclusion of train_unet.py, the leg planner, the export and
the distance table of benchmarks/oracle.py, on tiny in-process inputs."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from receler.serialization import save_tensors
from receler.toyworld.render import sample_scene
from receler.toyworld.vocab import CLASSES, COLOURS, STYLES, nouns

ROOT = Path(__file__).resolve().parents[1]
TRAIN_UNET = ROOT / "scripts" / "toyworld" / "train_unet.py"
COLOUR_NAMES = list(COLOURS)


@pytest.fixture(scope="module")
def train_unet():
    spec = importlib.util.spec_from_file_location("toyworld_train_unet", TRAIN_UNET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def oracle():
    # registered in sys.modules: its dataclasses look their module up while being made
    spec = importlib.util.spec_from_file_location("benchmark_oracle", ROOT / "benchmarks" /
                                                  "oracle.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def ground_truth(n: int) -> dict[str, np.ndarray]:
    """The training split's first ``n`` scenes as load_dataset lays them out (no images)."""
    rows = [sample_scene(random.Random(seed)) for seed in range(n)]  # = scene_from_seed(seed)
    pad = lambda xs: xs + [-1] * (2 - len(xs))  # noqa: E731
    return {
        "classes": np.array([pad([CLASSES.index(c) for c in s.classes]) for s in rows]),
        "colours": np.array([pad([COLOUR_NAMES.index(c) for c in s.colours]) for s in rows]),
        "style": np.array([STYLES.index(s.style) if s.style else -1 for s in rows]),
    }


class RecordingTokenizer:
    """Stands in for the CLIP tokenizer: records each caption, returns fixed-length ids."""

    model_max_length = 4

    def __init__(self):
        self.texts: list[str] = []

    def __call__(self, text, **_):
        self.texts.append(text)
        return SimpleNamespace(input_ids=[0] * self.model_max_length)


@pytest.mark.parametrize("excluded", [["star"], ["ring"], ["heart", "moon"]])
def test_exclusion_drops_exactly_the_scenes_with_the_class(train_unet, excluded):
    data = ground_truth(400)
    keep = train_unet.kept_scenes(data["classes"], excluded)
    for i, classes in enumerate(data["classes"]):
        names = {CLASSES[c] for c in classes if c >= 0}
        assert (i in set(keep)) == names.isdisjoint(excluded), (i, names)
    two = (data["classes"][:, 1] >= 0)
    assert two[keep].any() and (~two[keep]).any()  # one- and two-object scenes both stay
    assert len(keep) < 400
    kept = {k: v[keep] for k, v in data.items()}  # as train_unet.main filters them
    tok = RecordingTokenizer()
    sampler = train_unet.CaptionSampler(tok, kept, seed=0, cfg_drop=0.0)
    for _ in range(20):  # every kept scene, many fresh captions each
        sampler(list(range(len(keep))))
    forbidden = {w for c in excluded for w in nouns(c)}
    words = {w for text in sampler.cache for w in text.split()}
    assert words and words.isdisjoint(forbidden)  # word-level: "drawing" is not "ring"
    assert {"circle", "disc"} <= words  # the other classes are still named


def test_parse_exclusion(train_unet):
    assert train_unet.parse_exclusion(None) == []
    assert train_unet.parse_exclusion(["star", "moon,heart", "star"]) == ["heart", "moon", "star"]
    with pytest.raises(ValueError, match="unknown class 'striped'"):
        train_unet.parse_exclusion(["star,striped"])


@pytest.mark.parametrize("saved,now,refused", [
    ({"exclude_classes": ["star"]}, ["star"], False),
    ({"exclude_classes": ["heart"]}, ["star"], True),
    ({}, ["star"], True),  # a checkpoint from before the option excluded nothing
    ({}, [], False),
    ({"exclude_classes": ["star"]}, [], True),
])
def test_exclusion_mismatch(train_unet, saved, now, refused):
    why = train_unet.exclusion_mismatch(saved, now)
    assert (why is not None) == refused


def one_line_error(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_train_unet_refuses_a_checkpoint_of_another_exclusion(tmp_path):
    save_tensors(tmp_path / "unet_ckpt.safetensors", {"x": torch.zeros(1)},
                 {"step": 250, "exclude_classes": ["heart"]})
    line = one_line_error([sys.executable, str(TRAIN_UNET), "--out", str(tmp_path),
                           "--exclude-class", "star"])
    assert "--exclude-class heart" in line and "--exclude-class star" in line


def test_train_unet_unknown_class_is_one_line(tmp_path):
    line = one_line_error([sys.executable, str(TRAIN_UNET), "--out", str(tmp_path),
                           "--exclude-class", "blob"])
    assert "unknown class 'blob'" in line


def test_oracle_unknown_class_is_one_line(oracle, tmp_path, capsys):
    assert oracle.main(["--concept", "striped", "--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown class 'striped'" in err[0]
    assert oracle.main(["--leg-ends", "5,3,8", "--work", str(tmp_path)]) == 2
    assert "increasing" in capsys.readouterr().err


def test_legs_are_the_shipped_recipe(oracle):
    shipped = ROOT / "src" / "receler" / "assets" / "toyworld" / "pipeline"
    final = (shipped / "training_state.txt").read_text().split()[1]
    assert oracle.LEGS[-1].end == int(final) == 6511
    assert [leg.end for leg in oracle.LEGS] == [2500, 4618, 6511]
    cmd = oracle.leg_command(oracle.LEGS[2], out=Path("o"), concept="star", vae=Path("v"),
                             n_images=120000)
    flags = dict(zip(cmd[2::2], cmd[3::2], strict=False))
    assert flags["--lr"] == "2.5e-4" and flags["--anneal-at"] == "4618"
    assert flags["--steps"] == "6511" and flags["--threads"] == "1"
    assert flags["--exclude-class"] == "star" and flags["--vae"] == "v"


@pytest.mark.parametrize("step,expected", [
    (0, [("leg 1", False), ("leg 2", False), ("leg 3", False)]),
    (1200, [("leg 1", True), ("leg 2", False), ("leg 3", False)]),
    (2500, [("leg 2", False), ("leg 3", False)]),
    (3000, [("leg 2", True), ("leg 3", False)]),
    (6511, []),
])
def test_pending_legs(oracle, step, expected):
    assert [(leg.name, r) for leg, r in oracle.pending_legs(step)] == expected


def write_ckpt(folder: Path, step: int, excluded=("star",)) -> None:
    save_tensors(folder / "unet_ckpt.safetensors", {"x": torch.zeros(1)},
                 {"step": step, "trained_s": 1.0, "exclude_classes": list(excluded)})


def test_train_skips_finished_legs_and_resumes(oracle, tmp_path):
    write_ckpt(tmp_path, 3000)  # killed in the middle of leg 2
    ran = []

    def fake(cmd):  # a leg that runs to its end step
        end = int(cmd[cmd.index("--steps") + 1])
        ran.append(end)
        write_ckpt(tmp_path, end)
        return 0

    kw = dict(legs=oracle.LEGS, vae=Path("v"), n_images=10)
    assert oracle.train(tmp_path, "star", run=fake, **kw) == 6511
    assert ran == [4618, 6511]
    assert oracle.train(tmp_path, "star", run=fake, **kw) == 6511 and ran == [4618, 6511]


def test_train_refuses_other_exclusion_and_short_legs(oracle, tmp_path):
    kw = dict(legs=oracle.LEGS, vae=Path("v"), n_images=10)
    write_ckpt(tmp_path, 100, excluded=("heart",))
    with pytest.raises(ValueError, match="exclusion"):
        oracle.train(tmp_path, "star", run=lambda cmd: 0, **kw)
    write_ckpt(tmp_path, 100)
    with pytest.raises(RuntimeError, match="stopped at step 100"):
        oracle.train(tmp_path, "star", run=lambda cmd: 0, **kw)  # a leg that did nothing


def test_recipe_is_recorded_and_checked(oracle, tmp_path):
    oracle.check_recipe(tmp_path, {"n_images": 10, "leg_ends": [1, 2, 3]})
    oracle.check_recipe(tmp_path, {"n_images": 10, "leg_ends": [1, 2, 3]})
    with pytest.raises(ValueError, match="n_images=10, not 120000"):
        oracle.check_recipe(tmp_path, {"n_images": 120000, "leg_ends": [1, 2, 3]})


def test_export_copies_the_shipped_pipeline_with_the_ema_weights(oracle, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from receler.toyworld.model import default_model_path

    shipped = default_model_path()
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(shipped / "unet"))
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(shipped / "text_encoder"))
    tensors = {f"ema_unet.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"ema_text.{k}": v for k, v in text.state_dict().items()})
    save_tensors(tmp_path / "unet_ckpt.safetensors", tensors,
                 {"step": 12, "trained_s": 3.0, "exclude_classes": ["star"]})
    dest = oracle.export(tmp_path, tmp_path / "pipeline", shipped, step=12)
    for f in ("receler_defaults.json", "vae/diffusion_pytorch_model.safetensors",
              "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"):
        assert (dest / f).read_bytes() == (shipped / f).read_bytes(), f
    assert "exclude_classes star" in (dest / "training_state.txt").read_text()
    pipe = StableDiffusionPipeline.from_pretrained(dest, safety_checker=None)
    for k, v in unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[k], v), k
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight,
                       text.get_input_embeddings().weight)
    with pytest.raises(ValueError, match="not 13"):
        oracle.export(tmp_path, tmp_path / "other", shipped, step=13)


# ------------------------------------------------------------------------ the distances
def test_class_distribution_and_total_variation(oracle):
    classes = ["a", "b", "c"]
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.6], [0.1, 0.2, 0.3], [0.8, 0.0, 0.0]])
    dist = oracle.class_distribution(probs, classes)
    assert dist == {"a": 0.5, "b": 0.25, "none": 0.25}
    assert oracle.total_variation(dist, dist) == 0.0
    assert oracle.total_variation({"a": 1.0}, {"b": 1.0}) == 1.0
    assert oracle.total_variation(dist, {"a": 1.0}) == pytest.approx(0.5)


def results(rates: dict[str, float], soft: float | None = 0.5) -> dict:
    return {"metrics": {"per_class": [{"class_name": c, "rate": {"rate": r}}
                                      for c, r in rates.items()]},
            "attack_success_soft": soft, "attack_success_soft_3x": soft}


def detections(oracle, feats: np.ndarray, probs: np.ndarray):
    return oracle.Detections({f"simple/{i}_0.png": f for i, f in enumerate(feats)},
                             {f"simple/{i}_0.png": p for i, p in enumerate(probs)})


def test_distance_is_zero_to_itself_and_grows_with_a_shift(oracle):
    classes = ["star", "circle", "square"]
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(60, 4))
    probs = np.tile([0.0, 0.9, 0.1], (10, 1))  # stars become circles
    ref, res = detections(oracle, feats, probs), results({"star": 0.0, "circle": 1.0,
                                                          "square": 1.0}, 0.1)
    same = oracle.oracle_distance(ref, ref, res, res, concept="star", classes=classes)
    # sqrtm of a covariance with itself: float64 rounding only
    assert same["fd_others"] == pytest.approx(0.0, abs=1e-8)
    assert same["per_class_mae"] == 0.0 and same["concept_tv"] == 0.0
    assert same["attack_gap"] == 0.0 and same["n_others"] == 60 and same["n_concept"] == 10
    for shift in (0.5, 2.0):  # same covariance, mean moved by `shift` in every dimension
        moved = detections(oracle, feats + shift, np.tile([0.9, 0.0, 0.0], (10, 1)))
        other = results({"star": 0.9, "circle": 0.5, "square": 1.0}, 0.8)
        d = oracle.oracle_distance(moved, ref, other, res, concept="star", classes=classes)
        assert d["fd_others"] == pytest.approx(4 * shift**2, rel=1e-6)
        assert d["per_class_mae"] == pytest.approx(0.25)  # circle 0.5 off, square 0; not star
        assert d["per_class"]["star"] == [0.9, 0.0]
        assert d["concept_classes"] == {"model": {"star": 1.0}, "oracle": {"circle": 1.0}}
        assert d["concept_tv"] == 1.0 and d["attack_gap"] == pytest.approx(0.7)


def test_distance_uses_the_images_both_have_and_tolerates_no_attack(oracle):
    rng = np.random.default_rng(1)
    a = detections(oracle, rng.normal(size=(30, 3)), np.eye(3)[[0, 1, 2]])
    b = detections(oracle, rng.normal(size=(20, 3)), np.eye(3)[[0, 1]])
    d = oracle.oracle_distance(a, b, results({"x": 1.0}, None), results({"x": 1.0}),
                               concept="x", classes=["x", "y", "z"])
    assert d["n_others"] == 20 and d["n_concept"] == 2 and d["attack_gap"] is None
    assert d["per_class_mae"] is None  # no class besides the concept


def test_comparable(oracle):
    base = {"concept": "star", "attack_success_soft": 0.1, "attack_space": "output",
            "config": {"per_class": 10, "concept_rows": 30, "attack": {"steps": 100}}}
    assert oracle.comparable(base, json.loads(json.dumps(base))) is None
    other = json.loads(json.dumps(base))
    other["config"]["per_class"] = 5
    assert oracle.comparable(other, base) == "per_class=5, not 10"
    other = json.loads(json.dumps(base))
    other["config"]["attack"]["steps"] = 30
    assert "attack" in oracle.comparable(other, base)
    other["attack_success_soft"] = None  # the attack was skipped: its settings do not matter
    assert oracle.comparable(other, base) is None
    assert "concept" in oracle.comparable({**base, "concept": "heart"}, base)
    older = {k: v for k, v in base.items() if k != "attack_space"}  # runs before the field
    assert oracle.comparable(older, base) is None
    assert oracle.comparable({**base, "attack_space": "input"}, base) == \
        "attack_space=input, not output"


def test_runs_are_labelled_by_method_and_seed_and_repeated_labels_by_folder(oracle, tmp_path):
    def run(path, method, seed=None):
        folder = tmp_path / path
        (folder / "erasers").mkdir(parents=True)
        if seed is not None:
            (folder / "erasers" / "eraser_config.json").write_text(
                json.dumps({"train": {"seed": seed}}))
        return folder, {"method": method, "concept": "heart"}

    results = dict([run("w/seed1", "receler", 1), run("m/mace", "mace"),
                    run("merge/a/merged", "receler"), run("merge/b/merged", "receler")])
    labels = oracle.run_labels(results)
    assert labels[tmp_path / "m/mace"] == "mace"
    # receler runs of several settings (a trained seed, merged exports): named by folder too
    assert labels[tmp_path / "w/seed1"] == "receler s1 (w/seed1)"
    assert labels[tmp_path / "merge/a/merged"] == "receler (merge/a/merged)"
    assert len(set(labels.values())) == 4
    alone = dict([run("x/seed2", "receler", 2), run("x/esd", "esd-x", 2)])
    assert oracle.run_labels(alone) == {tmp_path / "x/seed2": "receler s2",
                                        tmp_path / "x/esd": "esd-x s2"}


def test_distance_plot_puts_each_model_by_its_distance_and_attack_success(oracle):
    def row(method, fd, attack, ci=None):
        return {"method": method, "concept": "heart", "attack_success_soft": attack,
                "attack_ci": ci, "oracle_distance": {"fd_others": fd}}

    rows = [row("oracle", 0.0, 0.3, [0.2, 0.4]), row("near", 1.0, 0.35, [0.25, 0.45]),
            row("far", 10.0, 0.9), row("star run", 3.0, 0.1), row("no images", None, 0.5)]
    rows[3]["concept"] = "star"
    img = oracle.distance_plot(rows, "heart").convert("RGB")
    assert img.size == (760, 460)
    px = np.asarray(img)
    # the points: the oracle at the left edge, "far" near the right end, at their rates
    x0, x1, y0, y1 = 60, 760 - 250, 30, 460 - 50
    top = 10.0 * 1.1

    def at(fd, rate):
        return px[round(y1 - (y1 - y0) * rate), round(x0 + (x1 - x0) * fd / top)]

    assert (at(0.0, 0.3) != 255).any() and (at(10.0, 0.9) != 255).any()
    assert (at(1.0, 0.35) != 255).any()
    assert (px[round(y1 - (y1 - y0) * 0.1), round(x0 + (x1 - x0) * 3.0 / top)] == 255).all()


def test_table_detects_each_folder_even_when_two_share_a_name(oracle, tmp_path, monkeypatch):
    import receler.protocol
    import receler.runs
    import receler.toyworld

    runs = [tmp_path / "a" / "merged", tmp_path / "b" / "merged"]
    res = {"concept": "heart", "method": "receler", "base_images": str(tmp_path / "base"),
           "base": {}, "config": {}}
    monkeypatch.setattr(receler.runs, "read_results", lambda run: dict(res))
    monkeypatch.setattr(receler.runs, "protocol_config", lambda r: None)
    monkeypatch.setattr(receler.protocol, "select_rows", lambda cfg: {})
    monkeypatch.setattr(receler.toyworld, "load_detector", lambda: None)
    monkeypatch.setattr(oracle, "image_sets", lambda rows, concept: ([], []))
    monkeypatch.setattr(oracle, "comparable", lambda a, b: None)
    monkeypatch.setattr(oracle, "detect", lambda folder, *a: str(folder))
    seen = []

    def distance(det, oracle_det, *a, **k):
        seen.append((det, oracle_det))
        return {}

    monkeypatch.setattr(oracle, "oracle_distance", distance)
    rows, folders = oracle.table({"concept": "heart", "images": str(tmp_path / "o")}, runs,
                                 classes=["heart"])
    assert [d for d, _ in seen] == [str(tmp_path / "o"), str(tmp_path / "base"),
                                    *(str(r / "images" / "erased") for r in runs)]
    assert all(o == str(tmp_path / "o") for _, o in seen)
    assert len({r["method"] for r in rows}) == 4


def test_a_finished_measurement_is_reused_whatever_the_erase_settings_say(oracle, tmp_path):
    """The oracle is never erased: an erase setting added later (a new TrainConfig field)
    must not make its measurement stale; a measurement setting must."""
    from dataclasses import asdict

    cfg = oracle.measure_config("star", tmp_path / "pipeline", tmp_path / "measure",
                                quick=True, skip="")
    config = json.loads(json.dumps(asdict(cfg), default=str))
    config["attack"] = cfg.attack.key()
    del config["train"]["seed"]  # as written before a field existed
    (tmp_path / "measure").mkdir()
    done = {"config": config, "acc_e": 0.0}
    (tmp_path / "measure" / "results.json").write_text(json.dumps(done))
    assert oracle.measure(cfg, tmp_path / "shipped") == done
    config["per_class"] += 1
    (tmp_path / "measure" / "results.json").write_text(json.dumps(done))
    with pytest.raises(ValueError, match="measured with other settings"):
        oracle.measure(cfg, tmp_path / "shipped")
