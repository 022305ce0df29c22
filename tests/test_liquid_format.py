"""Liquid (Gemma-7B continued on Chameleon's VQGAN codes): its native layout, its image format, and a JAM-Cross
of a Gemma LLM and a Liquid image parent with different tokenizers (mixed layout).

A tiny Liquid folder is built in-process: a byte-level BPE "Gemma" tokenizer with `<eos>` and `<unusedN>`
reserved tokens, Liquid's added `<boi>`, `<eoi>`, `<unconditional>`, `<image>`, and a `GemmaForCausalLM`
whose vocabulary holds the 8,192 codes after the tokenizer's ids (Liquid's `expand_vocabulary.py`).
"""

import json
import os
import random

import numpy as np
import pytest
import torch

from parent_helpers import S, convert, make_gemma, token_ids
from text_helpers import sentence

CODEBOOK = 8192
LIQUID_ADDED = ["<boi>", "<eoi>", "<unconditional>", "<image>"]
GRID = (2, 3)


def _tokenizer(folder, added=()):
    """A byte-level BPE with Gemma-like specials (`<pad>`, `<eos>`, `<bos>`, `<unused0..39>`) and `added`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<bos>"] + [f"<unused{i}>" for i in range(40)]
    rng = random.Random(0)
    tok.train_from_iterator([sentence(rng) for _ in range(200)],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(list(added))
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<eos>", "bos_token": "<bos>", "pad_token": "<pad>"}, f)
    return tok.get_vocab_size(with_added_tokens=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(gemma folder, gemma model, liquid folder, liquid model, len(liquid tokenizer))."""
    import megatron_jam  # noqa: F401
    from megatron_jam.convert.checkpoint import ensure_single_rank

    ensure_single_rank()
    root = tmp_path_factory.mktemp("liquid")
    base = _tokenizer(str(root / "gemma"))
    gemma = make_gemma(root / "gemma", seed=1, vocab=base)
    offset = _tokenizer(str(root / "liquid"), LIQUID_ADDED)
    liquid = make_gemma(root / "liquid", seed=2, vocab=offset + CODEBOOK)
    return root / "gemma", gemma, root / "liquid", liquid, offset


def test_the_native_layout_finds_every_id_by_its_token_string(folders, tmp_path):
    from tokenizers import Tokenizer

    from megatron_jam.data.native_vocab import detect_native_format, native_layout
    from megatron_jam.data.vocab import VocabLayoutError

    _, _, folder, _, offset = folders
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)
    assert detect_native_format(str(folder)) == "liquid"
    lay = native_layout(str(folder), num_sentinels=4, image_grid=GRID)
    assert (lay.image_format, lay.codebook_size, lay.vocab_size) == ("liquid", CODEBOOK, offset + CODEBOOK)
    assert lay.image_ids(np.array([0, CODEBOOK - 1])).tolist() == [offset, offset + CODEBOOK - 1]
    assert lay.break_id == vocab["<boi>"] and lay.image_markers["image_end"] == vocab["<eoi>"]
    assert lay.eos_id == vocab["<eos>"]
    assert [lay.sentinel_id(i) for i in range(4)] == [vocab[f"<unused{i}>"] for i in range(4)]
    text = {i for a, b in lay.text_ranges for i in range(a, b)}
    never = [vocab[t] for t in LIQUID_ADDED + ["<pad>", "<eos>", "<bos>", "<unused39>"]]
    assert not text & set(never) and len(text) > 200 and max(text) < offset
    (tmp_path / "small").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "small" / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "small" / "config.json").write_text(json.dumps({"model_type": "gemma", "vocab_size": offset + 10}))
    with pytest.raises(VocabLayoutError, match="cannot hold Liquid's 8192 codes"):
        native_layout(str(tmp_path / "small"), image_format="liquid")


def test_an_image_is_boi_codes_eoi_and_parses_back(folders):
    from megatron_jam.data.image_format import SAMPLE, ImageFormatError
    from megatron_jam.data.native_vocab import native_layout

    lay = native_layout(str(folders[2]), num_sentinels=4, image_grid=GRID)
    fmt, offset = lay.format, folders[4]
    codes = np.random.default_rng(0).integers(0, CODEBOOK, GRID[0] * GRID[1])
    ids = fmt.image_ids(codes, GRID)
    assert ids.tolist() == [lay.break_id, *(offset + codes).tolist(), lay.image_markers["image_end"]]
    back, grid = fmt.parse(ids)
    assert back.tolist() == codes.tolist() and grid == GRID and fmt.image_length(GRID) == ids.size
    assert fmt.plan(GRID).tolist() == [SAMPLE] * codes.size + [lay.image_markers["image_end"]]
    with pytest.raises(ImageFormatError, match="liquid format holds only"):
        fmt.image_ids(np.zeros(4, dtype=np.int64), (2, 2))


def test_gemma_llm_and_liquid_image_parent_fuse_with_a_mixed_layout(single_rank, folders, tmp_path):
    """JAM-Cross of a Gemma LLM and a Liquid image parent (different tokenizers: Liquid's adds its markers):
    the LLM stream is Gemma on the text ids, the image stream is Liquid on the image part at step 0."""
    from megatron_jam.convert.checkpoint import build_single, load_checkpoint
    from megatron_jam.data.mixed_vocab import image_parent_ids, mixed_layout
    from megatron_jam.models.kinds import load_model_config

    gemma_dir, gemma, liquid_dir, liquid, offset = folders
    lay = mixed_layout(str(gemma_dir), str(liquid_dir), num_sentinels=4, image_grid=GRID)
    assert lay.image_format == "liquid" and lay.codebook_size == CODEBOOK
    lay.to_json(tmp_path / "mixed.json")
    convert("cross", tmp_path / "x", gemma_dir, liquid_dir, cross_every=1, vocab_layout=str(tmp_path / "mixed.json"))
    model = build_single(load_model_config(str(tmp_path / "x")))
    load_checkpoint([model], str(tmp_path / "x"))
    model.eval()
    pos = torch.arange(S).expand(2, S)
    text = token_ids(3, 200, seed=5)  # BPE ids: text in both layouts
    codes = torch.randint(0, CODEBOOK, (2, S), generator=torch.Generator().manual_seed(6))
    image = torch.as_tensor(lay.image_ids(codes.numpy()))
    image[:, 0] = lay.break_id
    in_parent = torch.as_tensor(image_parent_ids(lay, image.numpy()))
    assert in_parent[0, 1:].tolist() == (offset + codes[0, 1:]).tolist()
    with torch.no_grad():
        h_llm = model.forward_streams(text, pos)[0].transpose(0, 1)
        h_img = model.forward_streams(image, pos)[1].transpose(0, 1)
        torch.testing.assert_close(h_llm, gemma.model(text).last_hidden_state, rtol=0, atol=1e-4)
        torch.testing.assert_close(h_img, liquid.model(in_parent).last_hidden_state, rtol=0, atol=1e-4)


def test_preprocess_writes_liquid_images_that_parse_back(folders, tmp_path):
    """tools/preprocess_interleaved.py with the native liquid layout (told from the tokenizer's `<boi>`):
    given codes come back from the shards through the format, text around them."""
    import sys

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_jam.data.vocab import load_layout

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import preprocess_interleaved

    rng = np.random.default_rng(2)
    given = [rng.integers(0, CODEBOOK, GRID[0] * GRID[1]).tolist() for _ in range(2)]
    docs = [{"content": [{"text": "a red square"}, {"image_tokens": given[0]}, {"text": "and then"},
                         {"image_tokens": given[1]}]}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    prefix = str(tmp_path / "out" / "liquid")
    assert preprocess_interleaved.main(["--input", str(tmp_path / "docs.jsonl"), "--output-prefix", prefix,
                                        "--tokenizer-model", str(folders[2]), "--vocab-layout-kind", "native",
                                        "--image-grid", *map(str, GRID), "--num-sentinels", "4",
                                        "--no-progress-bar"]) == 0
    layout = load_layout(prefix)
    assert layout.image_format == "liquid" and layout.image_code_offset == folders[4]
    ds = IndexedDataset(prefix, multimodal=True)
    got = [layout.format.parse(ds[i][0])[0].tolist() for i in range(len(ds)) if ds.index.sequence_modes[i] == 1]
    assert got == given
