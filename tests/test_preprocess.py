"""tools/preprocess_interleaved.py and tools/inspect_dataset.py on a corpus made here.

The corpus: a sentencepiece model trained on a few hundred generated sentences,
PNG images drawn with Pillow, a tiny random ChameleonVQVAE saved with
save_pretrained, interleaved and text-only JSONL documents plus one line of
each bad-input kind. Decoding the shards must give back every good document
(text ids, image codes, `<break>`/`<eos>` where promised), every bad line must
be in the rejects file, and too many rejects must fail the run.
"""

import dataclasses
import filecmp
import io
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from megatron_jam.data.documents import IMAGE, TEXT, split_segments
from megatron_jam.data.image_tokenizer import VQImageTokenizer
from megatron_jam.data.vocab import VocabLayout, load_layout
from text_helpers import sentence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import inspect_dataset  # noqa: E402
import preprocess_interleaved  # noqa: E402

BAD_REASONS = {"malformed_json", "missing_image", "corrupt_image", "empty_document", "unknown_content_type",
               "token_out_of_range"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import sentencepiece as spm
    from PIL import Image, ImageDraw
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([sentence(rng) for _ in range(400)]), model_writer=model,
                                   vocab_size=256, model_type="unigram", hard_vocab_limit=False, character_coverage=1.0,
                                   normalization_rule_name="identity")
    (root / "spm.model").write_bytes(model.getvalue())
    config = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=64, latent_channels=8, resolution=32, base_channels=32,
                                  channel_multiplier=[1, 1, 2], num_res_blocks=1, attn_resolutions=[])
    ChameleonVQVAE(config).save_pretrained(root / "vq")
    (root / "img").mkdir()
    for i in range(6):
        im = Image.new("RGB", (40 + 8 * i, 32), (rng.randrange(256), 90, 200))
        ImageDraw.Draw(im).rectangle([4, 4, 20 + i, 25], fill=(255 - 30 * i, 20, 40))
        im.save(root / "img" / f"{i}.png")
    (root / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    good, lines = [], []
    for d in range(30):
        doc = make_document(rng, d, root)
        good.append(doc)
        lines.append(json.dumps(doc))
    bad = {
        "malformed_json": '{"id": "bad-json", "content": [{"text": "unterminated',
        "missing_image": json.dumps({"id": "m", "content": [{"text": "a cat"}, {"image": "img/none.png"}]}),
        "corrupt_image": json.dumps({"id": "c", "content": [{"image": "img/corrupt.png"}]}),
        "empty_document": json.dumps({"id": "e", "content": []}),
        "unknown_content_type": json.dumps({"id": "u", "content": [{"video": "a.mp4"}]}),
        "token_out_of_range": json.dumps({"id": "t", "content": [{"image_tokens": [64] * 64}]}),
    }
    for k, line in enumerate(bad.values()):
        lines.insert(3 + 5 * k, line)
    bad_lines = {reason: lines.index(line) + 1 for reason, line in bad.items()}
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    text_only = [{"text": sentence(rng)} for _ in range(10)]
    (root / "text.jsonl").write_text("".join(json.dumps(d) + "\n" for d in text_only))
    return {"root": root, "good": good, "text_only": text_only, "bad_lines": bad_lines}


def make_document(rng, d, root):
    content = []
    for _ in range(rng.randint(1, 5)):
        kind = rng.choice(["text", "text", "image", "image_tokens"])
        if kind == "text":
            content.append({"text": sentence(rng)})
        elif kind == "image":
            i = rng.randrange(6)
            content.append({"image": f"img/{i}.png" if d % 2 else str(root / "img" / f"{i}.png")})
        else:
            content.append({"image_tokens": [rng.randrange(64) for _ in range(64)]})
    return {"id": f"doc-{d}", "content": content}


@pytest.fixture(scope="module")
def tokenizers(corpus):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(corpus["root"] / "spm.model"))
    return sp, VQImageTokenizer(str(corpus["root"] / "vq"))


def run_tool(corpus, prefix, *extra, inputs=("docs.jsonl", "text.jsonl")):
    root = corpus["root"]
    return preprocess_interleaved.main([
        "--input", *[str(root / i) for i in inputs], "--output-prefix", str(prefix), "--tokenizer-model",
        str(root / "spm.model"), "--image-tokenizer", str(root / "vq"), "--no-progress-bar", *extra])


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("out") / "single"
    assert run_tool(corpus, prefix, "--workers", "2", "--chunk-size", "7", "--max-reject-fraction", "0.5") == 0
    return prefix


def expected_segments(doc, sp, vq, layout):
    """What the promised layout says document `doc` decodes to."""
    segments = []
    for item in doc.get("content", [{"text": doc.get("text")}]):
        (kind, value), = item.items()
        if kind == "text":
            ids = np.array(sp.encode(value), dtype=np.int64)
            if segments and segments[-1][0] == TEXT:
                ids = np.concatenate([segments.pop()[1], ids])
            segments.append((TEXT, ids))
            continue
        codes = np.array(value) if kind == "image_tokens" else vq.encode_files([str(value)])[0]
        segments.append((IMAGE, codes))
    out = []
    for i, seg in enumerate(segments):
        if i and (seg[0] == IMAGE or segments[i - 1][0] == IMAGE):
            out.append(("break",))
        out.append(seg)
    return out + [("eos",)]


def absolute(doc, root):
    content = [{"image": str(root / v)} if k == "image" and not os.path.isabs(v) else {k: v}
               for item in doc.get("content", []) for k, v in item.items()]
    return {"content": content} if "content" in doc else doc


def stored_documents(prefix, layout):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix), multimodal=True)
    docs = ds.index.document_indices
    for d in range(len(docs) - 1):
        seqs = [ds[int(i)] for i in range(docs[d], docs[d + 1])]
        tokens = np.concatenate([s[0] for s in seqs])
        yield split_segments(tokens, [int(s[1]) for s in seqs], [len(s[0]) for s in seqs], layout)


def assert_same(got, want):
    assert [s[0] for s in got] == [s[0] for s in want]
    for g, w in zip(got, want):
        if len(g) > 1:
            np.testing.assert_array_equal(g[1], w[1])


def test_round_trip(corpus, tokenizers, single):
    sp, vq = tokenizers
    layout = load_layout(str(single))
    assert layout.text_vocab_size == sp.get_piece_size() and layout.eos_id == sp.eos_id()
    assert layout.codebook_size == 64 and layout.tokens_per_image == vq.tokens_per_image == 64
    docs = list(stored_documents(single, layout))
    good = corpus["good"] + corpus["text_only"]
    assert len(docs) == len(good)
    for got, doc in zip(docs, good):
        assert_same(got, expected_segments(absolute(doc, corpus["root"]), sp, vq, layout))
    for got, doc in zip(docs[len(corpus["good"]):], corpus["text_only"]):
        assert sp.decode(got[0][1].tolist()) == doc["text"]
    stats = json.loads(open(f"{single}.stats.json").read())
    assert stats["documents"] == len(good) and stats["skipped"] == len(BAD_REASONS)
    assert stats["images"] == sum(1 for d in corpus["good"] for i in d["content"] if "text" not in i)


def test_modes_mark_images(single):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    layout = load_layout(str(single))
    ds = IndexedDataset(str(single), multimodal=True)
    for i in range(len(ds)):
        tokens, mode = ds[i]
        assert bool(mode) == bool(layout.is_image(tokens).all()) and (mode or not layout.is_image(tokens).any())


def test_rejects_file(corpus, single):
    rejects = [json.loads(line) for line in open(f"{single}.rejects.jsonl")]
    assert {r["reason"] for r in rejects} == BAD_REASONS
    for r in rejects:
        assert r["file"].endswith("docs.jsonl") and r["line"] == corpus["bad_lines"][r["reason"]] and r["detail"]


def test_shards_merge_to_single(corpus, single, tmp_path):
    assert run_tool(corpus, tmp_path / "sh", "--shard-size", "7", "--max-reject-fraction", "0.5") == 0
    shards = sorted(p.name for p in tmp_path.glob("sh_*.idx"))
    assert shards == [f"sh_{i:05d}.idx" for i in range(6)]  # 40 documents / 7
    assert run_tool(corpus, tmp_path / "mg", "--shard-size", "300", "--shard-unit", "tokens", "--merge",
                    "--max-reject-fraction", "0.5") == 0
    assert not list(tmp_path.glob("mg_*"))
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(f"{single}{ext}", tmp_path / f"mg{ext}", shallow=False)


def test_reject_fraction_fails_in_subprocess(corpus, tmp_path):
    root = corpus["root"]
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_interleaved.py"), "--input",
           str(root / "docs.jsonl"), "--output-prefix", str(tmp_path / "f"), "--tokenizer-model",
           str(root / "spm.model"), "--codebook-size", "64", "--tokens-per-image", "64", "--workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "--max-reject-fraction 0.01" in proc.stderr and "rejected" in proc.stderr
    assert "documents" in proc.stdout
    reasons = {json.loads(line)["reason"] for line in open(tmp_path / "f.rejects.jsonl")}
    assert "no_image_tokenizer" in reasons  # image files without --image-tokenizer
    assert os.path.exists(tmp_path / "f.idx")  # good documents are kept


def test_inspect(corpus, single, capsys):
    assert inspect_dataset.main([str(single), "--document", "0", "--tokenizer-model",
                                 str(corpus["root"] / "spm.model")]) == 0
    out = capsys.readouterr().out
    first = corpus["good"][0]["content"]
    assert "documents        40" in out and "<eos>" in out
    for item in first:
        if "text" in item:
            assert item["text"] in out
    assert ("<image: 64 codes" in out) == any("text" not in i for i in first)


def test_layout_json_round_trip(single):
    layout = load_layout(str(single))
    again = VocabLayout.from_json(layout.to_json())
    assert again == layout
    layout.check_compatible(again)
    with pytest.raises(ValueError, match="codebook_size: 64"):
        layout.check_compatible(dataclasses.replace(layout, codebook_size=65))
    ids = np.arange(layout.vocab_size)
    assert layout.is_image(ids).sum() == layout.codebook_size and ids[layout.is_image(ids)][0] == layout.image_offset
    assert layout.sentinel_id(layout.num_sentinels - 1) == layout.image_offset - 1


def test_an_image_the_vq_refuses_rejects_only_its_document(tmp_path):
    """Images of several documents share one VQ call; when the VQ refuses one image (Emu3's size limits),
    only its document gets the error, and the other documents keep their own grids in order."""
    from PIL import Image

    from megatron_jam.data.image_tokenizer import ImageError

    class FakeVQ:
        def encode_grids(self, images):
            if any(im.size == (1, 1) for im in images):
                raise ImageError("image_size", "1x1 is below the minimum")
            return [np.full((2, 2), im.size[0]) for im in images]

    for name, size in (("a", 3), ("b", 1), ("c", 5), ("d", 7)):
        Image.new("RGB", (size, size), "red").save(tmp_path / f"{name}.png")
    enc = preprocess_interleaved.Encoder.__new__(preprocess_interleaved.Encoder)
    enc.vq = FakeVQ()
    docs = [(1, {}, [(IMAGE, "a.png"), (TEXT, "x")]), (2, {}, [(IMAGE, "b.png"), (IMAGE, "c.png")]),
            (3, {}, [(TEXT, "y")]), (4, {}, [(IMAGE, "c.png"), (IMAGE, "d.png")])]
    out = enc._encode_images(docs, str(tmp_path))
    assert isinstance(out[2], ImageError) and 3 not in out
    assert [int(g[0, 0]) for g in out[1]] == [3] and [int(g[0, 0]) for g in out[4]] == [5, 7]
