"""tools/generate_interleaved.py end to end: a tiny converted JAM-Cross checkpoint, a sentencepiece model
and a tiny Janus VQ (which has a decoder) give HTML / Markdown / JSON documents with one image element per
image segment; without a decoder the images are labelled token grids; mismatched inputs fail before
anything is generated. The checkpoint, tokenizer and VQs are the `gentool` fixture of tests/conftest.py."""

import json
import os

import pytest

from tool_loader import load_tool


def _tool():
    return load_tool("generate_interleaved")


def _args(root, out, *extra):
    return ["--load", str(root / "ckpt"), "--vocab-layout", str(root / "layout.json"),
            "--tokenizer-model", str(root / "spm.model"), "--output", str(out), "--max-new-tokens", "40",
            "--no-progress-bar", *extra]


def test_generates_html_with_text_and_one_image_element_per_image_segment(single_rank, gentool, tmp_path, capsys):
    root, layout = gentool
    rc = _tool().main(_args(root, tmp_path, "--prompts-file", str(root / "prompts.jsonl"),
                            "--image-tokenizer", str(root / "janus"), "--cfg-scale", "3.5", "--seed", "3"))
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in summary["documents"]] == ["picture", "prompt_0001"]
    index = (tmp_path / "index.html").read_text()
    assert summary["index"] == str(tmp_path / "index.html") and index.count("<section>") == 2
    for name in ("picture", "prompt_0001"):
        rec = json.loads((tmp_path / f"{name}.json").read_text())
        page = (tmp_path / f"{name}.html").read_text()
        md = (tmp_path / f"{name}.md").read_text()
        images = [s for s in rec["segments"] if s["type"] == "image"]
        assert page.count("<img ") == len(images) == md.count("![")
        for seg in images:
            assert seg["complete"] and len(seg["codes"]) == layout.tokens_per_image
            assert seg["rendering"] == "decoded" and (tmp_path / seg["file"]).exists()
        assert rec["prompt"] in page and rec["ids"] and len(rec["ids"]) <= 40
        for seg in rec["segments"]:
            if seg["type"] == "text" and seg["text"].strip():
                assert seg["text"].strip().split()[0] in page
        assert [t for s in rec["segments"] for t in range(s["start"], s["end"])] == list(range(len(rec["ids"])))
    assert len([s for s in json.loads((tmp_path / "picture.json").read_text())["segments"]
                if s["type"] == "image"]) >= 1


def test_without_a_decoder_images_are_labelled_token_grids(single_rank, gentool, tmp_path):
    from PIL import Image

    from megatron_jam.inference.render import GRID_LABEL

    root, _ = gentool
    assert _tool().main(_args(root, tmp_path, "--prompt", "ka lo", "--start-with-image", "--greedy")) == 0
    rec = json.loads((tmp_path / "prompt_0000.json").read_text())
    seg = next(s for s in rec["segments"] if s["type"] == "image")
    assert seg["rendering"] == "token_grid"
    assert GRID_LABEL in (tmp_path / "prompt_0000.html").read_text()
    assert Image.open(tmp_path / seg["file"]).size[0] >= 64
    static = tmp_path / "static"  # fixed-shape decode steps (what --decode-step cuda-graph replays): same ids
    assert _tool().main(_args(root, static, "--prompt", "ka lo", "--start-with-image", "--greedy",
                              "--decode-step", "static")) == 0
    assert json.loads((static / "prompt_0000.json").read_text())["ids"] == rec["ids"]


def _fails(capsys, argv, message, out):
    assert _tool().main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not os.listdir(out)


def test_bad_inputs_fail_before_generation(single_rank, gentool, tmp_path, capsys):
    from megatron_jam.data.vocab import VocabLayout

    root, layout = gentool
    out = tmp_path / "out"
    other = VocabLayout(text_vocab_size=layout.text_vocab_size, codebook_size=17, tokens_per_image=16,
                        num_sentinels=2)
    other.to_json(tmp_path / "other.json")
    argv = _args(root, out, "--prompt", "ka")
    argv[argv.index("--vocab-layout") + 1] = str(tmp_path / "other.json")
    _fails(capsys, argv, "differs from the one the model was", out)
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt_ids": [1] * 64}) + "\n")
    _fails(capsys, _args(root, out, "--prompts-file", str(tmp_path / "long.jsonl")), "context holds 64", out)
    _fails(capsys, _args(root, out, "--prompt", "ka", "--image-tokenizer", str(root / "chameleon")),
           "codebook size 64", out)
    _fails(capsys, _args(root, out, "--prompt", "ka", "--pipeline-model-parallel-size", "2"),
           "whole model on one stage", out)
    _fails(capsys, _args(root, out, "--prompt", "ka", "--decode-step", "cuda-graph"),
           "cuda-graph needs the model on a CUDA device", out)


def test_small_decoded_images_are_shown_scaled_up_without_smoothing(single_rank, gentool, tmp_path):
    from PIL import Image

    root, _ = gentool
    assert _tool().main(_args(root, tmp_path, "--prompt", "ka lo", "--start-with-image", "--greedy",
                              "--image-tokenizer", str(root / "janus"))) == 0
    rec = json.loads((tmp_path / "prompt_0000.json").read_text())
    seg = next(s for s in rec["segments"] if s["type"] == "image")
    w, h = Image.open(tmp_path / seg["file"]).size
    assert seg["rendering"] == "decoded" and seg["size"] == [w, h] == [16, 16]  # the tokenizer's resolution
    page = (tmp_path / "prompt_0000.html").read_text()
    assert "class='pixels' width='256' height='256'" in page and "image-rendering:pixelated" in page


def _eval_tool():
    return load_tool("evaluate_generation")


def test_evaluate_generation_scores_every_image_at_every_scale(single_rank, gentool, tmp_path, capsys):
    from megatron_jam.data import picture_world

    root, layout = gentool
    items = [{"name": "a", "prompt": "ka lo", "colour": "red", "shape": "circle"},
             {"name": "b", "prompt": "mi ter san", "colour": "blue", "shape": "square"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    argv = ["--load", str(root / "ckpt"), "--vocab-layout", str(root / "layout.json"), "--tokenizer-model",
            str(root / "spm.model"), "--image-tokenizer", str(root / "janus"), "--prompts-file",
            str(tmp_path / "p.jsonl"), "--cfg-scale", "1", "3.5", "1", "--samples-per-prompt", "3",
            "--batch-size", "4", "--output", str(tmp_path / "r.json"), "--save-images", str(tmp_path / "img"),
            "--no-progress-bar"]
    assert _eval_tool().main(argv) == 0
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["scorer"] == "attributes" and len(rec["rows"]) == 3 * 2 * 3
    joint_chance = 1 / (len(picture_world.COLOURS) * len(picture_world.SHAPES))
    assert rec["chance"]["joint_accuracy"] == pytest.approx(joint_chance)
    assert set(rec["results"]) == {"1.0", "3.5"} and rec["results"]["1.0"]["n"] == 12
    for row in rec["rows"]:
        assert len(row["codes"]) == layout.tokens_per_image and os.path.exists(row["file"])
        got = picture_world.read_attributes(row["file"])
        assert row["joint_ok"] == (got.colour == dict(a="red", b="blue")[row["name"]]
                                   and got.shape == dict(a="circle", b="square")[row["name"]])
    first = [r["codes"] for r in rec["rows"][:6]]
    assert first == [r["codes"] for r in rec["rows"][12:]]  # the same seeds at every scale: scale 1 twice agrees
    assert first != [r["codes"] for r in rec["rows"][6:12]]  # guidance changes the images
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "ka"}) + "\n")
    argv[argv.index("--prompts-file") + 1] = str(tmp_path / "bad.jsonl")
    assert _eval_tool().main(argv) == 2
    assert "needs 'colour' and 'shape'" in capsys.readouterr().err


def test_prompt_files_name_the_bad_line(tmp_path):
    from megatron_jam.inference.prompt_following import read_prompt_set

    (tmp_path / "p.jsonl").write_text('{"prompt": "ka"}\n\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"p.jsonl:3: invalid JSON"):
        read_prompt_set(str(tmp_path / "p.jsonl"))
    (tmp_path / "q.jsonl").write_text('{"prompt": "ka"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2: expected"):
        read_prompt_set(str(tmp_path / "q.jsonl"))
    (tmp_path / "r.jsonl").write_text('{"name": "x"}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:1: expected"):
        read_prompt_set(str(tmp_path / "r.jsonl"))
