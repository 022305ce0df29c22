"""Emu3 end to end through the user's tools: import, preprocessing with the parent's native layout and
its own VQ (images at their own size), evaluation, merges, training, generation with decoded images.

Two tiny random `Emu3ForConditionalGeneration` parents (Chat and Gen: same config, same in-process tokenizer
from tests/emu3_helpers.py, different weights) are saved with `save_pretrained` next to the tokenizer and
an Emu3 `preprocessor_config.json`, as the `-hf` repositories hold them. Images are PNG files drawn with
Pillow and tokenized by the VQ the import extracts (`image_tokenizer/`). Checked: pixels equal
Emu3ImageProcessor's; each stored image has its own grid; perplexity of the imported Gen parent
(tools/evaluate.py) equals transformers' on the same stored tokens at TP=1 and TP=2 (1e-4 relative);
uniform, width and cross merges (tools/convert_checkpoint.py) train on those shards and cross's streams
equal the parents at step 0; generation (tools/generate_interleaved.py) writes an HTML page whose image
is decoded by the Emu3 VQ on the grid written in its tokens; bad inputs are one-line errors that leave
nothing behind. (In-process converter tests of Emu3: tests/test_convert_emu3.py.)
"""

import json
import math
import os

import numpy as np
import pytest
import torch

from emu3_helpers import BPE_SIZE, CODE0, CODEBOOK, EOS, extra, make_emu3_tokenizer
from eval_helpers import expected_perplexity
from parent_helpers import make_llama, perturb
from tool_loader import load_tool

V = CODE0 + CODEBOOK
"""The tiny tokenizer's size: text, Emu3's specials and one visual token per code (575)."""
SEQ, GRID = 32, (2, 3)
TEXT = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, pad_token_id=BPE_SIZE,
            bos_token_id=extra(203), eos_token_id=EOS)
VQ = dict(codebook_size=CODEBOOK, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1],
          num_res_blocks=1, attn_resolutions=[], hidden_size=32, num_attention_heads=1)
FACTOR = 2
"""Pixels per latent cell of the tiny VQ: 2 ** (len(channel_multiplier) - 1)."""
PROCESSOR = {"image_processor_type": "Emu3ImageProcessor", "min_pixels": 8 * 8, "max_pixels": 16 * 16,
             "spatial_factor": FACTOR, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
             "rescale_factor": 1 / 255, "resample": 3}
SIZES = {"wide.png": (12, 8), "square.png": (10, 10), "tall.png": (6, 14)}
"""Image files (width, height) in pixels; within [min_pixels, max_pixels] each keeps its size."""


def _tool(name):
    return load_tool(name)


def make_parent(folder, seed, vq=True, codebook=CODEBOOK):
    """A random Emu3 parent: tokenizer, save_pretrained weights and preprocessor_config.json in one folder."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    make_emu3_tokenizer(str(folder), codebook=codebook)
    torch.manual_seed(seed)
    cfg = Emu3Config(text_config=TEXT | {"vocab_size": CODE0 + codebook}, vq_config=VQ | {"codebook_size": codebook},
                     vocabulary_map={"<image>": CODE0 - 1})
    model = perturb(Emu3ForConditionalGeneration(cfg))
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSOR))
    if not vq:
        from parent_helpers import rewrite_safetensors

        rewrite_safetensors(folder, lambda sd: {k: v for k, v in sd.items() if not k.startswith("vqmodel.")})
    return model


def draw_images(folder):
    """PNG files of SIZES: a coloured rectangle on a background, different per file."""
    from PIL import Image, ImageDraw

    for k, (name, (w, h)) in enumerate(SIZES.items()):
        im = Image.new("RGB", (w, h), (20 + 80 * k, 200, 255 - 60 * k))
        ImageDraw.Draw(im).rectangle([1, 1, w // 2, h // 2], fill=(255, 40 * k, 0))
        im.save(folder / name)


def write_corpus(path):
    """Interleaved documents: text, PNG images and one grid of codes given as rows."""
    rng = np.random.default_rng(0)
    rows = rng.integers(0, CODEBOOK, (2, 3)).tolist()
    docs = [[{"text": "a red square on a blue field"}, {"image": "wide.png"}, {"text": "three small green circles"}],
            [{"image": "square.png"}, {"text": "the cat sat on the mat 12 times"}, {"image": "tall.png"}],
            [{"text": "hello world, this is a tiny corpus"}, {"image_tokens": rows}],
            [{"text": "images of 90*90 codes"}]]
    path.write_text("".join(json.dumps({"id": i, "content": d}) + "\n" for i, d in enumerate(docs * 3)))


def preprocess(out_prefix, tokenizer, corpus, *extra):
    """tools/preprocess_interleaved.py, in-process: its exit code."""
    return _tool("preprocess_interleaved").main(
        ["--input", str(corpus), "--output-prefix", str(out_prefix), "--tokenizer-model", str(tokenizer),
         "--vocab-layout-kind", "native", "--image-grid", *map(str, GRID), "--num-sentinels", "4",
         "--workers", "1", "--no-progress-bar", *map(str, extra)])


def convert(*argv):
    return _tool("convert_checkpoint").main([str(a) for a in argv])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Parents, their imports, the images, the shards (Gen's VQ) and the uniform / width / cross merges."""
    import megatron_jam  # noqa: F401
    from megatron_jam.convert.checkpoint import ensure_single_rank

    ensure_single_rank()
    root = tmp_path_factory.mktemp("emu3e2e")
    chat, gen = make_parent(root / "chat", seed=1), make_parent(root / "gen", seed=2)
    assert convert("--method", "import", "--load", root / "gen", "--save", root / "mg_gen", "--seq-length", SEQ) == 0
    draw_images(root)
    write_corpus(root / "docs.jsonl")
    assert preprocess(root / "data" / "emu3", root / "gen", root / "docs.jsonl",
                      "--image-tokenizer", root / "mg_gen" / "image_tokenizer") == 0
    for method in ("uniform", "width"):
        assert convert("--method", method, "--llm", root / "chat", "--img", root / "gen", "--seq-length", SEQ,
                       "--save", root / method) == 0
    assert convert("--method", "cross", "--llm", root / "chat", "--img", root / "gen", "--cross-every", 1,
                   "--vocab-layout", root / "data" / "emu3.vocab.json", "--seq-length", SEQ,
                   "--save", root / "cross") == 0
    return {"root": root, "chat": chat, "gen": gen, "prefix": str(root / "data" / "emu3")}


def _stored(prefix):
    """The shards' documents as [(mode, ids)] lists (what the evaluator reads)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, multimodal=True)
    docs = []
    for d in range(len(ds.index.document_indices) - 1):
        lo, hi = ds.index.document_indices[d], ds.index.document_indices[d + 1]
        docs.append([(int(ds.index.sequence_modes[i]), ds[i][0].astype(np.int64).tolist()) for i in range(lo, hi)])
    return docs


# ------------------------------------------------------------------ preprocessing with Emu3's own VQ


def test_each_image_is_stored_with_its_own_grid(world):
    from megatron_jam.data.image_tokenizer import VQImageTokenizer, load_image
    from megatron_jam.data.vocab import VocabLayout

    root = world["root"]
    layout = VocabLayout.from_json(world["prefix"] + ".vocab.json")
    vq = VQImageTokenizer(str(root / "mg_gen" / "image_tokenizer"))
    assert vq.own_size and layout.image_tokenizer == vq.identity and layout.vocab_size == V
    assert VQImageTokenizer(str(root / "mg_gen")).identity == vq.identity  # the checkpoint stands for its VQ
    grids = [layout.format.parse(np.asarray(ids))[1] for doc in _stored(world["prefix"])[:3]
             for mode, ids in doc if mode == 1]
    want = [(h // FACTOR, w // FACTOR) for w, h in SIZES.values()]
    assert grids == [want[0], want[1], want[2], (2, 3)], grids
    stored = next(ids for mode, ids in _stored(world["prefix"])[0] if mode == 1)
    codes, grid = layout.format.parse(np.asarray(stored))
    direct = vq.encode_grids([load_image(str(root / "wide.png"))])[0]
    assert grid == direct.shape and np.array_equal(codes.reshape(grid), direct)
    assert len(np.unique(direct)) > 1, "a constant encode proves nothing"


def test_own_size_pixels_are_emu3s_image_processor(world):
    """Images above max_pixels, within the limits and below min_pixels: the same sizes and pixels as
    transformers' Emu3ImageProcessor with the folder's settings; a given resolution gives a fixed grid."""
    from PIL import Image
    from transformers import Emu3ImageProcessor

    from megatron_jam.data.image_tokenizer import ImageError, VQImageTokenizer

    folder = str(world["root"] / "mg_gen" / "image_tokenizer")
    vq = VQImageTokenizer(folder)
    processor = Emu3ImageProcessor(**{k: v for k, v in PROCESSOR.items() if k != "image_processor_type"})
    rng = np.random.default_rng(1)
    for w, h in ((40, 30), (12, 8), (4, 6)):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours, ref = vq.preprocess_own_size(im), processor(im, return_tensors="np").pixel_values[0]
        assert ours.shape == ref.shape and np.abs(ours - ref).max() < 1e-5, (w, h)
        assert 8 * 8 <= ours.shape[1] * ours.shape[2] <= 16 * 16
    with pytest.raises(ImageError, match="image_size: 402x2 pixels: absolute aspect ratio must be smaller than 200"):
        vq.preprocess_own_size(Image.new("RGB", (402, 2)))
    fixed = VQImageTokenizer(folder, resolution=8)
    assert not fixed.own_size and fixed.grid == (4, 4)
    assert [g.shape for g in fixed.encode_grids([Image.new("RGB", (12, 8)), Image.new("RGB", (6, 14))])] == [(4, 4)] * 2
    with pytest.raises(ValueError, match="resolution 7 is not a positive multiple of the VQ's spatial factor 2"):
        VQImageTokenizer(folder, resolution=7)


# ------------------------------------------------------------------ peer parity: tools/evaluate.py vs transformers


def _evaluate(load, prefix):
    tool = _tool("evaluate")
    return tool.evaluate(tool.build_parser().parse_args(["--load", load, "--data-path", prefix, "--seq-length",
                                                         str(SEQ), "--micro-batch-size", "2"]))


def _evaluate_tp2(load, prefix):
    tool = _tool("evaluate")
    return tool.evaluate(tool.build_parser().parse_args(["--load", load, "--data-path", prefix, "--seq-length",
                                                         str(SEQ), "--tensor-model-parallel-size", "2"]))["ppl"]


def _rel_errors(got, want):
    return {k: abs(got[k] - want[k]) / want[k] for k in ("all", "text", "image")}


def test_perplexity_equals_transformers_at_tp1_and_tp2(single_rank, pool2, world):
    docs = _stored(world["prefix"])
    want = expected_perplexity(world["gen"], docs, seq=SEQ)
    got = _evaluate(str(world["root"] / "mg_gen"), world["prefix"])
    assert got["tokens"]["image"] > 100 and got["tokens"]["text"] > 100
    errors = {"tp1": _rel_errors(got["ppl"], want)}
    for rank, ppl in enumerate(pool2.run(_evaluate_tp2, str(world["root"] / "mg_gen"), world["prefix"])):
        errors[f"tp2 rank {rank}"] = _rel_errors(ppl, want)
    print("relative perplexity errors:", json.dumps(errors))
    assert all(e < 1e-4 for per in errors.values() for e in per.values()), errors


# ------------------------------------------------------------------ merges of Chat + Gen train on the shards


def _train(argv):
    from megatron_jam.training.loop import main

    return [r["lm_loss"] for r in main(argv)]


def test_cross_streams_equal_the_parents_at_step0(single_rank, world):
    """The tool's JAM-Cross of Chat + Gen on the native layout: text rows (before the codes) from Chat, code
    rows from Gen; each stream computes its parent's hidden states (cross blocks start at zero)."""
    from megatron_jam.convert.checkpoint import build_single, load_checkpoint
    from megatron_jam.data.vocab import VocabLayout
    from megatron_jam.models.kinds import load_model_config

    root, t = world["root"], VocabLayout.from_json(world["prefix"] + ".vocab.json").text_rows
    assert json.loads((root / "cross" / "conversion.json").read_text())["vocab"]["text_rows"] == t == CODE0
    model = build_single(load_model_config(str(root / "cross")))
    load_checkpoint([model], str(root / "cross"))
    gen = torch.Generator().manual_seed(0)
    text, image = torch.randint(0, t, (2, 12), generator=gen), torch.randint(t, V, (2, 12), generator=gen)
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        for ids, k, parent in ((text, 0, world["chat"]), (image, 1, world["gen"])):
            got = model.eval().forward_streams(ids, pos)[k].transpose(0, 1)
            want = parent.model.text_model(ids).last_hidden_state
            assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


@pytest.mark.parametrize("method", ["uniform", "width", "cross"])
def test_merged_emu3_parents_train_on_the_shards(pool2, world, method, tmp_path):
    root = world["root"]
    assert os.path.exists(root / method / "image_tokenizer" / "preprocessor_config.json")
    argv = ["--load", str(root / method), "--data-path", world["prefix"], "--split", "100,0,0", "--seq-length",
            str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4", "--lr", "1e-2",
            "--lr-warmup-iters", "0", "--lr-decay-style", "constant", "--tensor-model-parallel-size", "2",
            "--sequence-parallel", "--data-cache-path", str(tmp_path / "cache")]
    curve = next(c for c in pool2.run(_train, argv) if not math.isnan(c[0]))
    print(f"{method} loss curve:", [round(x, 4) for x in curve])
    assert len(curve) == 4 and all(math.isfinite(x) for x in curve) and curve[-1] < curve[0], curve


# ------------------------------------------------------------------ generation: decoded on the image's own grid


@pytest.mark.parametrize("method", ["uniform", "cross"])
def test_generated_image_is_decoded_on_its_grid(single_rank, world, tmp_path, capsys, method):
    from PIL import Image

    root = world["root"]
    argv = ["--load", str(root / method), "--vocab-layout", world["prefix"] + ".vocab.json",
            "--tokenizer-model", str(root / "gen"), "--image-tokenizer", str(root / method / "image_tokenizer"),
            "--prompt", "a red square", "--start-with-image", "--cfg-scale", "2", "--max-new-tokens", "24",
            "--seed", "1", "--output", str(tmp_path / "out"), "--no-progress-bar"]
    assert _tool("generate_interleaved").main(argv) == 0, capsys.readouterr().err
    rec = json.loads((tmp_path / "out" / "prompt_0000.json").read_text())
    images = [s for s in rec["segments"] if s["type"] == "image"]
    assert images and all(s["complete"] and s["rendering"] == "decoded" for s in images)
    for seg in images:
        h, w = seg["grid"]
        assert (h, w) == GRID and len(seg["codes"]) == h * w
        size = Image.open(tmp_path / "out" / seg["file"]).size
        assert size == (w * FACTOR, h * FACTOR) == tuple(seg["size"]), size
        print(f"generated image: grid {h}x{w} -> {size[0]}x{size[1]} px")
    page = (tmp_path / "out" / "index.html").read_text()
    assert page.count("<img ") == len(images) and "decoded with the VQ decoder" in page


def test_stored_images_decode_to_their_own_size(world):
    """render.decode_images on the shards' images: each PNG is (w * factor, h * factor) of its grid."""
    from megatron_jam.data.image_tokenizer import VQImageTokenizer
    from megatron_jam.data.vocab import VocabLayout
    from megatron_jam.inference.render import decode_images, segments

    layout = VocabLayout.from_json(world["prefix"] + ".vocab.json")
    vq = VQImageTokenizer(str(world["root"] / "mg_gen" / "image_tokenizer"))
    ids = [t for doc in _stored(world["prefix"])[:2] for _, seq in doc for t in seq]
    images = [s for s in segments(ids, layout) if s["type"] == "image"]
    decoded = decode_images(vq, [s["codes"] for s in images], [s["grid"] for s in images])
    assert [im.size for im in decoded] == [(w, h) for w, h in SIZES.values()]


# ------------------------------------------------------------------ bad input: one line, nothing written


def _fails(capsys, rc, message, *absent):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    for path in absent:
        assert not os.path.exists(path) or not os.listdir(path), path


def test_a_tokenizer_that_is_not_the_checkpoints_is_refused(single_rank, world, tmp_path, capsys):
    root = world["root"]
    make_emu3_tokenizer(str(tmp_path / "other"), codebook=32)  # another parent's tokenizer: 543 ids
    assert preprocess(tmp_path / "other_data", tmp_path / "other", root / "docs.jsonl",
                      "--codebook-size", "32", "--max-reject-fraction", "1") == 0
    capsys.readouterr()
    out = tmp_path / "out"
    gen = ["--load", str(root / "uniform"), "--prompt", "a", "--output", str(out), "--no-progress-bar"]
    rc = _tool("generate_interleaved").main(gen + ["--vocab-layout", str(tmp_path / "other_data.vocab.json")])
    _fails(capsys, rc, f"the vocabulary layout has 543 ids but the checkpoint {root / 'uniform'} has vocab_size=575",
           out)
    rc = _tool("generate_interleaved").main(gen + ["--vocab-layout", world["prefix"] + ".vocab.json",
                                                   "--tokenizer-model", str(tmp_path / "other")])
    _fails(capsys, rc, str(tmp_path / "other"), out)
    rc = preprocess(tmp_path / "mixed", tmp_path / "other", root / "docs.jsonl",
                    "--vocab-layout", world["prefix"] + ".vocab.json")
    _fails(capsys, rc, world["prefix"] + ".vocab.json")
    assert not list(tmp_path.glob("mixed*"))


def test_an_emu3_import_without_vq_weights_cannot_tokenize_images(single_rank, world, tmp_path, capsys):
    root = world["root"]
    make_parent(tmp_path / "novq", seed=3, vq=False)
    assert convert("--method", "import", "--load", tmp_path / "novq", "--save", tmp_path / "mg") == 0
    capsys.readouterr()
    folder = tmp_path / "mg" / "image_tokenizer"
    rc = preprocess(tmp_path / "d", root / "gen", root / "docs.jsonl", "--image-tokenizer", folder)
    _fails(capsys, rc, f"--image-tokenizer {folder}: the checkpoint {tmp_path / 'mg'} has no image_tokenizer/")
    assert not list(tmp_path.glob("d.*"))
    rc = preprocess(tmp_path / "d", root / "gen", root / "docs.jsonl", "--image-tokenizer", tmp_path / "mg")
    _fails(capsys, rc, f"--image-tokenizer {tmp_path / 'mg'}: a checkpoint without image_tokenizer/")
    out = tmp_path / "out"
    rc = _tool("generate_interleaved").main(
        ["--load", str(root / "uniform"), "--vocab-layout", world["prefix"] + ".vocab.json", "--prompt", "a",
         "--image-tokenizer", str(folder), "--output", str(out), "--no-progress-bar"])
    _fails(capsys, rc, "has no image_tokenizer/", out)
    # images without any image tokenizer: those documents are rejected by file and line, the run fails
    assert preprocess(tmp_path / "d", root / "gen", root / "docs.jsonl", "--codebook-size", str(CODEBOOK)) == 1
    rejects = [json.loads(x) for x in open(tmp_path / "d.rejects.jsonl")]
    assert {r["reason"] for r in rejects} == {"no_image_tokenizer"} and len(rejects) == 6
    assert rejects[0]["file"] == str(root / "docs.jsonl") and rejects[0]["line"] == 1


def test_codes_beyond_the_codebook_are_refused(single_rank, world, tmp_path, capsys):
    root = world["root"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": [{"text": "a"}, {"image_tokens": [[1, 64]]}]}) + "\n")
    assert preprocess(tmp_path / "d", root / "gen", tmp_path / "bad.jsonl", "--codebook-size", str(CODEBOOK)) == 1
    (reject,) = [json.loads(x) for x in open(tmp_path / "d.rejects.jsonl")]
    assert reject["reason"] == "token_out_of_range" and "code 64 is outside the codebook [0, 64)" in reject["detail"]
    make_parent(tmp_path / "big", seed=4, codebook=128)  # a VQ with more codes than the tokenizer has tokens
    assert convert("--method", "import", "--load", tmp_path / "big", "--save", tmp_path / "mg_big") == 0
    capsys.readouterr()
    rc = preprocess(tmp_path / "e", root / "gen", root / "docs.jsonl",
                    "--image-tokenizer", tmp_path / "mg_big" / "image_tokenizer")
    _fails(capsys, rc, f"has 128 codes but the tokenizer {root / 'gen'} has 64 image code tokens")
    assert not list(tmp_path.glob("e.*"))
    out = tmp_path / "out"
    rc = _tool("generate_interleaved").main(
        ["--load", str(root / "uniform"), "--vocab-layout", world["prefix"] + ".vocab.json", "--prompt", "a",
         "--image-tokenizer", str(tmp_path / "mg_big" / "image_tokenizer"), "--output", str(out)])
    _fails(capsys, rc, "codebook size 128 but the model's vocabulary layout has 64", out)


def test_parents_of_different_families_are_refused_by_the_tool(single_rank, world, tmp_path, capsys):
    root = world["root"]
    make_llama(tmp_path / "llama", vocab=V)
    rc = convert("--method", "uniform", "--llm", root / "chat", "--img", tmp_path / "llama", "--save", tmp_path / "u")
    _fails(capsys, rc, f"{root / 'chat'}/config.json is 'emu3', {tmp_path}/llama/config.json is 'llama'",
           tmp_path / "u")
