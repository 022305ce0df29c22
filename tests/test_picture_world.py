"""The picture world: seeded drawings, captions that match the pixels, an exact attribute reader."""

import json
import os
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from megatron_jam.data import picture_world as pw
from megatron_jam.data.documents import IMAGE, TEXT, content_items

COUNTS = dict(num_text_docs=40, num_image_text_docs=60, num_interleaved_docs=20)
JSONL = ("text.jsonl", "imgtext.jsonl", "interleaved.jsonl", "prompts.jsonl")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("world"))
    return out, pw.write_world(out, seed=0, **COUNTS)


def _records(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _pixels(out_dir):
    names = sorted(os.listdir(os.path.join(out_dir, "images")))
    return names, [np.asarray(Image.open(os.path.join(out_dir, "images", n))) for n in names]


def _captioned_images(out_dir, name):
    """(image path, colour, shape) for every image of a written file, from the text just before it."""
    out = []
    for rec in _records(os.path.join(out_dir, name)):
        items = content_items(rec, ["text"])
        for (kind, value), (prev_kind, prev) in zip(items[1:], items[:-1]):
            if kind == IMAGE:
                assert prev_kind == TEXT
                words = prev.split()
                out.append((os.path.join(out_dir, value), words[-3], words[-2]))
    return out


def test_same_seed_same_world_other_seed_differs(world, tmp_path):
    out, _ = world
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    pw.write_world(again, seed=0, **COUNTS)
    pw.write_world(other, seed=1, **COUNTS)
    for name in JSONL + ("world.json", "spm.model"):
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), name
    names, pixels = _pixels(out)
    names_again, pixels_again = _pixels(again)
    assert names == names_again and all(np.array_equal(a, b) for a, b in zip(pixels, pixels_again))
    with open(os.path.join(out, "imgtext.jsonl"), "rb") as a, open(os.path.join(other, "imgtext.jsonl"), "rb") as b:
        assert a.read() != b.read()
    _, pixels_other = _pixels(other)
    assert any(not np.array_equal(a, b) for a, b in zip(pixels, pixels_other))


def test_written_files_and_counts(world):
    out, info = world
    assert info["counts"]["images"] == len(os.listdir(os.path.join(out, "images")))
    assert info["image_size"] == 32 and info["shapes"] == pw.SHAPES
    assert {c["name"]: tuple(c["rgb"]) for c in info["colours"]} == {c: pw.rgb(c) for c in pw.COLOURS}
    with open(os.path.join(out, "world.json")) as f:
        assert json.load(f) == info
    prompts = _records(os.path.join(out, "prompts.jsonl"))
    assert len(prompts) == len(pw.COLOURS) * len(pw.SHAPES)
    assert prompts[0] == {"name": "red_circle", "prompt": "a picture of a red circle .", "colour": "red",
                          "shape": "circle"}
    img = Image.open(os.path.join(out, "images", "00000.png"))
    assert img.mode == "RGB" and img.size == (32, 32)


@pytest.mark.parametrize("name", ["imgtext.jsonl", "interleaved.jsonl"])
def test_captions_name_what_is_drawn(world, name):
    out, _ = world
    images = _captioned_images(out, name)
    assert len(images) >= COUNTS["num_interleaved_docs"] * 2
    for path, colour, shape in images:
        assert colour in pw.COLOURS and shape in pw.SHAPES
        assert pw.read_attributes(path) == (colour, shape), path


def test_documents_parse_in_the_preprocessing_format(world):
    out, _ = world
    text = _records(os.path.join(out, "text.jsonl"))
    assert len(text) == COUNTS["num_text_docs"]
    for rec in text:
        assert [kind for kind, _ in content_items(rec, ["text"])] == [TEXT]
    for name, key in (("imgtext.jsonl", "num_image_text_docs"), ("interleaved.jsonl", "num_interleaved_docs")):
        recs = _records(os.path.join(out, name))
        assert len(recs) == COUNTS[key] and len({r["id"] for r in recs}) == len(recs)
        for rec in recs:
            kinds = [kind for kind, _ in content_items(rec, ["text"])]
            assert kinds[0] == TEXT and IMAGE in kinds
            for kind, value in content_items(rec, ["text"]):
                if kind == IMAGE:
                    assert not os.path.isabs(value) and os.path.isfile(os.path.join(out, value))
    interleaved = _records(os.path.join(out, "interleaved.jsonl"))
    assert all(2 <= sum("image" in it for it in r["content"]) <= 3 for r in interleaved)
    assert all(r["content"][-1] == {"text": "done ."} for r in interleaved)


def test_sentencepiece_knows_every_word(world):
    import sentencepiece as spm

    out, _ = world
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "spm.model"))
    assert (sp.unk_id(), sp.eos_id(), sp.bos_id(), sp.pad_id()) == (0, 1, -1, -1)
    texts = pw.vocabulary_sentences()
    for name in ("text.jsonl", "imgtext.jsonl", "interleaved.jsonl"):
        texts += pw.texts_of(os.path.join(out, name))
    for text in texts:
        assert sp.unk_id() not in sp.encode(text), text
    words = {"how", "to", "draw", "first", ",", "then", "done", *pw.COLOURS, *pw.SHAPES}
    assert all(sp.piece_to_id("\u2581" + w) != sp.unk_id() for w in words)


def _degrade(img, rng):
    """Roughly what a tiny VQ-VAE does: blur, a small colour shift, noise."""
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64)
    a = a + rng.uniform(-20, 20, 3) + rng.normal(0, 8, a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def test_reader_is_robust_to_blur_and_noise():
    rng, nrng = random.Random(5), np.random.default_rng(5)
    things = [(c, s) for c in pw.COLOURS for s in pw.SHAPES]
    expected = [things[i % len(things)] for i in range(360)]
    drawings = [pw.draw(c, s, rng) for c, s in expected]
    assert pw.score(drawings, expected)["joint_accuracy"] == 1.0
    result = pw.score([_degrade(img, nrng) for img in drawings], expected)
    assert result["n"] == 360 and result["joint_accuracy"] >= 0.95, result
    assert result["colour_accuracy"] >= result["joint_accuracy"] and result["no_foreground"] == 0


def test_reader_says_none_without_a_clear_figure():
    blank = Image.new("RGB", (32, 32), "white")
    assert pw.read_attributes(blank) == (None, None)
    assert pw.read_attributes(Image.new("RGB", (32, 32), (128, 128, 128))) == (None, None)
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert pw.read_attributes(noise).colour is None
    two = np.full((32, 32, 3), 255, np.uint8)
    two[2:12, 2:12], two[20:30, 20:30] = pw.rgb("red"), pw.rgb("blue")
    assert pw.read_attributes(two) == (None, None)
    result = pw.score([blank, pw.draw("red", "circle", random.Random(0))], [("red", "circle"), ("red", "circle")])
    assert result == {"n": 2, "colour_accuracy": 0.5, "shape_accuracy": 0.5, "joint_accuracy": 0.5,
                      "no_foreground": 1}


def test_draw_rejects_unknown_attributes_and_other_sizes_work():
    with pytest.raises(ValueError):
        pw.draw("orange", "circle", random.Random(0))
    rng = random.Random(0)
    for size in (16, 64):
        for colour in pw.COLOURS:
            for shape in pw.SHAPES:
                img = pw.draw(colour, shape, rng, size)
                assert img.size == (size, size) and pw.read_attributes(img) == (colour, shape)


def test_cli_writes_a_world(tmp_path, caplog):
    out = str(tmp_path / "cli")
    summary = pw.main([out, "--seed", "3", "--num-text-docs", "5", "--num-image-text-docs", "6",
                       "--num-interleaved-docs", "2", "--image-size", "24"])
    assert summary["text_docs"] == 5 and summary["image_text_docs"] == 6 and summary["interleaved_docs"] == 2
    assert len(os.listdir(os.path.join(out, "images"))) == summary["images"] >= 6 + 4
    assert Image.open(os.path.join(out, "images", "00000.png")).size == (24, 24)
    assert all(os.path.isfile(os.path.join(out, f)) for f in JSONL + ("spm.model", "world.json"))
