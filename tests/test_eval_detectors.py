"""Detectors: registry, toy wrapper (with a stand-in), evaluation over a folder, NudeNet,
and GroundingDINO / CLIP score on tiny random models built in-process."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from receler.eval.detectors import (
    Detector,
    available_detectors,
    evaluate_folder,
    evaluate_images,
    get_detector,
    prompt_label,
)
from receler.eval.metrics import erasure_metrics, two_object_locality
from receler.eval.prompts import PromptRow

torch.set_num_threads(1)  # tiny models; threads only contend on a shared CPU

CLASSES = ["circle", "square", "star"]
STYLES = ["striped"]


class StandInToyDetector:
    """Same interface as ``receler.toyworld.load_detector()``: the class is coded in the red
    channel of the top-left pixel (index * 50), the style in green (255 = striped)."""

    classes = CLASSES
    styles = STYLES

    def predict(self, images):
        cls = torch.full((len(images), len(CLASSES)), 0.1)
        sty = torch.full((len(images), len(STYLES)), 0.2)
        for i, im in enumerate(images):
            r, g, _ = im.getpixel((0, 0))
            if r // 50 < len(CLASSES):
                cls[i, r // 50] = 0.9
            if g == 255:
                sty[i, 0] = 0.7
        return {"class_probs": cls, "style_probs": sty}

    def features(self, images):
        return torch.tensor([[float(c) for c in im.getpixel((0, 0))] for im in images])


def toy_image(cls: str | None, striped: bool = False) -> Image.Image:
    r = 50 * CLASSES.index(cls) if cls else 250
    return Image.new("RGB", (8, 8), (r, 255 if striped else 0, 0))


def test_registry():
    assert {"toy", "grounding-dino", "nudenet", "clip-score", "q16"} <= set(available_detectors())
    with pytest.raises(ValueError, match="choose one of"):
        get_detector("yolo")


@pytest.mark.parametrize(
    "cls,striped,labels,expected",
    [
        ("circle", False, ["circle", "star"], {"circle": 0.9, "star": 0.1}),
        ("star", True, ["striped", "star"], {"striped": 0.7, "star": 0.9}),
        (None, False, ["square", "striped"], {"square": 0.1, "striped": 0.2}),
    ],
)
def test_toy_detector_scores(cls, striped, labels, expected):
    det = get_detector("toy", detector=StandInToyDetector(), batch_size=2)
    assert isinstance(det, Detector)
    out = det.detect([toy_image(cls, striped)] * 3, labels)
    assert out == [pytest.approx(expected)] * 3
    assert list(out[0]) == labels


def test_toy_detector_rejects_unknown_labels():
    det = get_detector("toy", detector=StandInToyDetector())
    with pytest.raises(ValueError, match="cannot score \\['dog'\\]"):
        det.detect([toy_image("circle")], ["dog"])


def test_toy_world_detector_class():
    """The toy world's real detector class (random weights: no training needed)."""
    toyworld = pytest.importorskip("receler.toyworld", reason="toy world not written yet")
    torch.manual_seed(0)
    inner = toyworld.ToyDetector().eval()
    images = [
        toy_image("circle"),
        toy_image("star", striped=True),
        Image.new("RGB", (32, 32), "white"),  # another size: batched apart
    ]
    labels = [inner.classes[3], inner.styles[0], inner.classes[0]]
    out = get_detector("toy", detector=inner, batch_size=2).detect(images, labels)
    for image, scores in zip(images, out, strict=True):
        probs = inner.predict([image])
        expected = [
            probs["class_probs"][0, 3],
            probs["style_probs"][0, 0],
            probs["class_probs"][0, 0],
        ]
        # Tolerance: conv kernels may sum in another order for another batch size.
        assert [scores[lb] for lb in labels] == pytest.approx(
            [float(e) for e in expected], abs=1e-6
        )


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_evaluate_folder_end_to_end(tmp_path):
    # Erased "circle": 1 of its 2 images still shows it; square shows on 2/2, star on 1/2.
    shown = {0: ["circle", "square"], 1: ["square", "square"], 2: ["star", None]}
    rows = [[case, f"a photo of a {c}", c, case] for case, c in enumerate(CLASSES)]
    prompts = _write_csv(
        tmp_path / "simple.csv", ["case_number", "prompt", "class", "evaluation_seed"], rows
    )
    folder = tmp_path / "images"
    folder.mkdir()
    for case, drawn in shown.items():
        for index, cls in enumerate(drawn):
            toy_image(cls).save(folder / f"{case}_{index}.png")
    (folder / "0_0.detect_circle.png").write_bytes(b"not an image we read")
    det = get_detector("toy", detector=StandInToyDetector())
    records = evaluate_folder(folder, prompts, det, extra_labels=["circle"], batch_size=2)
    assert [(r.row.case_number, r.index) for r in records] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
    ]
    assert all("circle" in r.scores for r in records)
    assert Path(records[0].path).name == "0_0.png"
    res = erasure_metrics(records, "circle")
    assert (res.acc_e.successes, res.acc_e.total) == (1, 2)
    assert (res.acc_l.successes, res.acc_l.total) == (3, 4)


def test_evaluate_folder_rejects_foreign_images(tmp_path):
    prompts = _write_csv(
        tmp_path / "p.csv",
        ["case_number", "prompt", "class", "evaluation_seed"],
        [[0, "p", "star", 1]],
    )
    folder = tmp_path / "images"
    folder.mkdir()
    toy_image("star").save(folder / "7_0.png")
    with pytest.raises(ValueError, match="not in the prompt file"):
        evaluate_folder(folder, prompts, get_detector("toy", detector=StandInToyDetector()))


def test_evaluate_images_two_objects_and_order():
    det = get_detector("toy", detector=StandInToyDetector())
    pair = PromptRow(0, "a circle and a star", 0, "circle", extra={"class2": "star"})
    single = PromptRow(1, "a square", 1, "square")
    items = [
        (pair, 0, toy_image("star")),
        (single, 0, toy_image("square")),
        (pair, 1, toy_image("circle")),
    ]
    records = evaluate_images(items, det)
    assert [sorted(r.scores) for r in records] == [
        ["circle", "star"],
        ["square"],
        ["circle", "star"],
    ]
    res = two_object_locality([records[0], records[2]], "circle")
    assert (res.other_survives.successes, res.erased_detected.successes) == (1, 1)
    with pytest.raises(ValueError, match="asks for no label"):
        evaluate_images([(PromptRow(2, "x", 2), 0, toy_image(None))], det)


# ------------------------------------------------------------------ NudeNet


@pytest.fixture(scope="module")
def nudenet():
    pytest.importorskip("nudenet", reason="pip install nudenet to test the NudeNet detector")
    return get_detector("nudenet", threshold=0.6)


def test_nudenet_flat_image_has_no_exposure(nudenet):
    from receler.eval.metrics import NUDITY_CLASSES

    flat = Image.new("RGB", (64, 48), (205, 180, 150))
    out = nudenet.detect([flat, flat.convert("L")], list(NUDITY_CLASSES))
    assert out == [dict.fromkeys(NUDITY_CLASSES, 0.0)] * 2
    assert nudenet.boxes(flat) == []
    assert nudenet.threshold == 0.6
    with pytest.raises(ValueError, match="cannot score"):
        nudenet.detect([flat], ["NUDITY"])


def test_nudenet_threshold_must_be_positive():
    pytest.importorskip("nudenet")
    with pytest.raises(ValueError, match="\\(0, 1\\]"):
        get_detector("nudenet", threshold=0.0)


# ------------------------------------------------------------------ GroundingDINO

GD_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "cat", "dog", "red", "car"]


@pytest.fixture(scope="module")
def tiny_grounding_dino(tmp_path_factory):
    """A random GroundingDINO (Swin backbone, 1-layer BERT) saved as a local checkpoint."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SwinConfig,
    )
    # transformers 5 names the PIL-backed processor ...Pil (the default one needs
    # torchvision); earlier releases have only the PIL one, under the plain name.
    GroundingDinoImageProcessorPil = getattr(  # noqa: N806
        transformers, "GroundingDinoImageProcessorPil", transformers.GroundingDinoImageProcessor
    )

    folder = tmp_path_factory.mktemp("gdino")
    (folder / "vocab.txt").write_text("\n".join(GD_WORDS) + "\n")
    backbone = SwinConfig(
        image_size=32, patch_size=2, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
        window_size=2, out_features=["stage2", "stage3", "stage4"],
    )  # fmt: skip
    text = BertConfig(
        vocab_size=len(GD_WORDS), hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
        intermediate_size=16, max_position_embeddings=32,
    )  # fmt: skip
    config = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32,  # GroupNorm(32, d_model)
        encoder_layers=1, decoder_layers=2,  # bbox_embed weight tying needs 2 decoder layers
        encoder_ffn_dim=16, decoder_ffn_dim=16, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=10, max_text_len=32, encoder_n_points=1, decoder_n_points=1,
        disable_custom_kernels=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(config).eval()
    with (
        torch.no_grad()
    ):  # shrink the class logits so that scores spread instead of saturating at 1
        model.model.decoder.layer_norm.weight.mul_(0.02)
        model.model.decoder.layer_norm.bias.mul_(0.02)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(
            size={"shortest_edge": 64, "longest_edge": 96}
        ),
        tokenizer=BertTokenizer(str(folder / "vocab.txt")),
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_grounding_dino_end_to_end(tiny_grounding_dino):
    det = get_detector(
        "grounding-dino", model=str(tiny_grounding_dino), batch_size=2, local_files_only=True
    )
    assert det.threshold == 0.5 and det.text_threshold == 0.5
    images = [Image.new("RGB", (40, 30), (200, 20, 20)), Image.new("RGB", (40, 30), (20, 20, 200))]
    images.append(Image.new("L", (30, 30), 128))  # another size: batched on its own
    out = det.detect(images, ["Cat", "red car"])
    assert len(out) == 3 and all(list(s) == ["Cat", "red car"] for s in out)
    # Score = best token probability over all queries, computed here straight from the model.
    inputs = det.processor(images=images[:2], text=["cat."] * 2, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = det.model(**inputs).logits
    assert [s["Cat"] for s in out[:2]] == logits.sigmoid().amax(dim=(1, 2)).tolist()
    # An image alone scores as in a batch of same-size images (up to float32 rounding).
    alone = det.detect(images[1:2], ["Cat"])[0]["Cat"]
    assert alone == pytest.approx(out[1]["Cat"], abs=1e-6)
    # Presence agrees with transformers' post-processing. Put the box threshold between
    # two images' scores to see both outcomes.
    scores = [s["Cat"] for s in out]
    lo, hi = sorted(scores[:2])
    assert hi - lo > 1e-3
    det.threshold = (lo + hi) / 2
    for image, score in zip(images, scores, strict=True):
        boxes = det.boxes(image, "cat")
        assert (len(boxes["scores"]) > 0) == (score > det.threshold)
        assert boxes["boxes"].shape == (len(boxes["scores"]), 4)
    assert sorted(score > det.threshold for score in scores[:2]) == [False, True]


@pytest.mark.parametrize("kw", [{"box_threshold": 0.0}, {"text_threshold": 1.0}])
def test_grounding_dino_threshold_checks(kw):
    with pytest.raises(ValueError, match="must be in \\(0, 1\\)"):
        get_detector("grounding-dino", model="unused", **kw)


# ------------------------------------------------------------------ CLIP score


def _clip_byte_tokens() -> list[str]:
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    return chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP with a character-level BPE tokenizer (no merges), saved locally."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    CLIPImageProcessorPil = getattr(  # noqa: N806 (see tiny_grounding_dino)
        transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor
    )

    folder = tmp_path_factory.mktemp("clip")
    tokens = _clip_byte_tokens()
    (folder / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8"
    )
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    eos = len(tokens) - 1
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokens), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=eos - 1,
            eos_token_id=eos, pad_token_id=eos,
        ),
        vision_config=dict(
            image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2,
        ),
        projection_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_end_to_end(tiny_clip):
    det = get_detector("clip-score", model=str(tiny_clip), batch_size=2, local_files_only=True)
    images = [Image.new("RGB", (40, 30), (200, 20, 20)), Image.new("RGB", (32, 32), (0, 90, 200))]
    images.append(Image.new("RGB", (20, 50), (250, 250, 250)))
    texts = ["a red car", "a blue dog", "a cat " * 40]  # the last one is truncated to 77 tokens
    out = det.detect(images, texts)
    assert all(list(s) == texts and all(v >= 0.0 for v in s.values()) for s in out)
    # Reference: projected pooled features, cosine * 100, clipped at 0.
    m, p = det.model, det.processor
    with torch.no_grad():
        pix = p(images=images, return_tensors="pt")["pixel_values"]
        tok = p.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = m.visual_projection(m.vision_model(pixel_values=pix).pooler_output)
        txt = m.text_projection(m.text_model(**tok).pooler_output)
    cos = torch.nn.functional.cosine_similarity(img[:, None], txt[None], dim=-1)
    expected = (100 * cos).clamp(min=0)
    got = torch.tensor([[s[t] for t in texts] for s in out])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)  # float32 sums in another order
    pairs = det.score_pairs(images, texts)
    assert pairs == pytest.approx([out[i][texts[i]] for i in range(3)], abs=1e-4)
    records = evaluate_images(
        [(PromptRow(i, t, i), 0, im) for i, (t, im) in enumerate(zip(texts, images, strict=True))],
        det,
        labels_for=prompt_label,
    )
    assert [r.scores[r.row.prompt] for r in records] == pytest.approx(pairs, abs=1e-4)


# ------------------------------------------------------------------ Q16


@pytest.fixture(scope="module")
def q16_prompts(tiny_clip, tmp_path_factory):
    """Two prompt embeddings in the tiny CLIP's space, as .npy and .safetensors files: the
    mean image embedding of reddish and of bluish images, so both labels occur."""
    from safetensors.torch import save_file
    from transformers import CLIPModel

    folder = tmp_path_factory.mktemp("q16")
    det = get_detector("clip-score", model=str(tiny_clip), local_files_only=True)
    m = CLIPModel.from_pretrained(str(tiny_clip))
    pix = det.processor(images=q16_images(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        emb = m.visual_projection(m.vision_model(pixel_values=pix).pooler_output)
    prompts = torch.stack([emb[2:].mean(0), emb[:2].mean(0)])  # (2, D): appropriate, inapp.
    np.save(folder / "prompts.npy", prompts.numpy())
    save_file({"prompts": prompts.contiguous()}, str(folder / "prompts.safetensors"))
    return folder


def q16_images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), (220, 30, 20)), Image.new("RGB", (32, 32), (180, 60, 40)),
            Image.new("RGB", (32, 32), (10, 40, 220)), Image.new("RGB", (20, 50), (30, 90, 200))]


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_q16_matches_the_reference_classifier(tiny_clip, q16_prompts, suffix):
    """Receler's evaluation/src/q16.py: CLIPVisionModelWithProjection image_embeds,
    100 * cosine with the two prompts, softmax, label = argmax (1 = inappropriate)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from receler.eval.detectors.q16 import load_q16_prompts

    det = get_detector("q16", prompts=q16_prompts / f"prompts{suffix}", clip=str(tiny_clip),
                       batch_size=3, local_files_only=True)
    images = q16_images()
    out = det.detect(images, ["inappropriate"])
    config = CLIPVisionConfig.from_pretrained(str(tiny_clip))
    config.projection_dim = 8  # a CLIPModel folder's vision config keeps the default 512
    ref_model = CLIPVisionModelWithProjection.from_pretrained(str(tiny_clip), config=config)
    prompts = load_q16_prompts(q16_prompts / f"prompts{suffix}")
    with torch.no_grad():
        pix = det.processor(images=images, return_tensors="pt").pixel_values
        emb = ref_model(pix).image_embeds
    sim = 100.0 * (emb / emb.norm(dim=-1, keepdim=True)) @ (
        prompts / prompts.norm(dim=-1, keepdim=True)).T
    probs = sim.softmax(dim=-1)
    got = torch.tensor([s["inappropriate"] for s in out])
    torch.testing.assert_close(got, probs[:, 1], atol=1e-5, rtol=0)  # batches of 3 vs 4
    labels = probs.argmax(dim=-1).bool().tolist()
    assert [s["inappropriate"] >= det.threshold for s in out] == labels == [True, True, False,
                                                                            False]
    with pytest.raises(ValueError, match="cannot score"):
        det.detect(images, ["nudity"])


def test_q16_refuses_pickles_and_names_missing_files(tiny_clip, q16_prompts, tmp_path):
    import pickle

    from receler.eval.detectors.q16 import load_q16_prompts

    (tmp_path / "prompts.p").write_bytes(pickle.dumps([[0.0] * 8] * 2))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "three.npy", np.zeros((3, 8), np.float32))
    cases = [(tmp_path / "prompts.p", "never unpickles"),
             (tmp_path / "objects.npy", "pickled objects"),
             (tmp_path / "missing.npy", "missing.npy does not exist: pass --q16-prompts"),
             (tmp_path / "three.npy", "expected \\(2, D\\)")]
    for path, match in cases:
        with pytest.raises(ValueError, match=match):
            load_q16_prompts(path)
    with pytest.raises(ValueError, match="needs its prompt embeddings"):
        get_detector("q16", clip=str(tiny_clip))
    with pytest.raises(ValueError, match="CLIP folder .*nope does not exist"):
        get_detector("q16", prompts=q16_prompts / "prompts.npy", clip=str(tmp_path / "nope"))
    np.save(tmp_path / "wide.npy", np.zeros((2, 16), np.float32))
    with pytest.raises(ValueError, match="embeds images in 8 dimensions"):
        get_detector("q16", prompts=tmp_path / "wide.npy", clip=str(tiny_clip))


def test_evaluate_q16_per_category(tiny_clip, q16_prompts, tmp_path, capsys):
    from receler.cli import main

    prompts = _write_csv(tmp_path / "i2p.csv", ["case_number", "prompt", "evaluation_seed",
                                                "categories"],
                         [[0, "a", 1, "sexual"], [1, "b", 2, "violence, sexual"],
                          [2, "c", 3, "hate"], [3, "d", 4, "hate, violence"]])
    folder = tmp_path / "images"
    folder.mkdir()
    for case, image in enumerate(q16_images()):
        image.save(folder / f"{case}_0.png")
    out = tmp_path / "q16.json"
    args = ["evaluate", "--images", str(folder), "--prompts", str(prompts), "--erased", "nudity",
            "--detector", "q16", "--q16-clip", str(tiny_clip), "--out", str(out)]
    assert main([*args, "--q16-prompts", str(q16_prompts / "prompts.npy")]) == 0
    rates = json.loads(out.read_text())["q16"]
    assert list(rates) == ["all", "hate", "sexual", "violence"]
    assert rates["all"] == {"inappropriate": 2, "images": 4, "rate": 0.5}
    assert rates["sexual"]["rate"] == 1.0 and rates["hate"]["rate"] == 0.0
    assert rates["violence"] == {"inappropriate": 1, "images": 2, "rate": 0.5}
    capsys.readouterr()
    assert main([*args[:-1], str(tmp_path / "again.json")]) == 2  # no --q16-prompts
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["receler: error: --detector q16 needs --q16-prompts FILE: Q16's prompt "
                   "embeddings as .npy or .safetensors (see receler.eval.detectors.q16)"]
