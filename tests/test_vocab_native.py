"""Native vocabulary layouts (`VocabLayout(kind="native")`, `megatron_jam.data.native_vocab`).

A tiny "Emu3-like" tokenizer is trained in-process (tests/emu3_helpers.py: byte-level
BPE with Qwen's one-digit-per-token rule, then Emu3's special tokens in Emu3's order and
one `<|visual token NNNNNN|>` per code). The Emu3 layout built from it must find every
id by its token string, map our specials onto reserved `<|extra_N|>` tokens (or append
them, as declared), round-trip through JSON, and refuse a different tokenizer. The
appended (toy) layout's JSON is exactly the version-1 file. Preprocessing with
`--vocab-layout-kind native` writes exactly Emu3's token stream, read back through
Megatron-Core's IndexedDataset.
"""

import json
import os
import sys

import numpy as np
import pytest

from emu3_helpers import CODE0, CODEBOOK, EOF, EOL, EOS, IMAGE_END, IMAGE_START, IMAGE_TOKEN, extra, \
    make_emu3_tokenizer
from megatron_jam.data.native_vocab import emu3_layout
from megatron_jam.data.text_tokenizer import TextTokenizerError, check_layout, load_text_tokenizer
from megatron_jam.data.vocab import NATIVE_FIELDS, VocabLayout, VocabLayoutError, load_layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import preprocess_interleaved  # noqa: E402

S = 4  # sentinels


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_emu3_tokenizer(str(tmp_path_factory.mktemp("emu3") / "tokenizer"))


@pytest.fixture(scope="module")
def layout(tok):
    return emu3_layout(tok, num_sentinels=S, image_grid=(3, 4))


# ------------------------------------------------------------------ the toy layout is unchanged
def test_appended_layout_json_is_the_version_1_file(tmp_path):
    toy = VocabLayout(text_vocab_size=100, codebook_size=16, tokens_per_image=4, num_sentinels=2, text_eos_id=2)
    data = json.loads(toy.to_json())
    assert data["version"] == 1 and not set(NATIVE_FIELDS) & set(data)
    assert set(data) == {"text_vocab_size", "codebook_size", "tokens_per_image", "num_sentinels", "text_eos_id",
                         "text_tokenizer", "image_tokenizer", "version", "derived"}
    v1 = {"codebook_size": 16, "image_tokenizer": "", "num_sentinels": 2, "text_eos_id": 2, "text_tokenizer": "",
          "text_vocab_size": 100, "tokens_per_image": 4, "version": 1}  # written before native layouts existed
    (tmp_path / "old.vocab.json").write_text(json.dumps(v1))
    old = VocabLayout.from_json(str(tmp_path / "old.vocab.json"))
    assert old == toy and old == VocabLayout.from_json(old.to_json()) and hash(old) == hash(toy)
    old.check_compatible(old)
    assert (old.break_id, old.eos_id, old.mask_id, old.image_offset, old.vocab_size) == (100, 2, 101, 105, 121)
    assert old.text_rows == 100 and old.format.name == "ours" and old.is_sentinel([103, 104, 105]).tolist() == [
        True, True, False]
    with pytest.raises(VocabLayoutError, match="kind='native'"):
        VocabLayout(text_vocab_size=100, codebook_size=16, tokens_per_image=4, image_format="emu3")


# ------------------------------------------------------------------ the Emu3 layout
def test_emu3_layout_finds_every_id_by_its_token_string(layout):
    assert layout.native and layout.image_format == "emu3" and layout.version == 2
    assert layout.vocab_size == layout.parent_vocab_size == CODE0 + CODEBOOK  # nothing appended
    assert layout.image_offset == layout.text_rows == CODE0 and layout.codebook_size == CODEBOOK
    assert layout.break_id == IMAGE_START and layout.eos_id == EOS == layout.text_eos_id
    assert [layout.sentinel_id(i) for i in range(S)] == [extra(i) for i in range(S)]
    assert (layout.eos_span_id, layout.mask_id) == (extra(S), extra(S + 1))
    assert layout.image_markers == {"image_start": IMAGE_START, "size_end": IMAGE_TOKEN, "end_of_line": EOL,
                                    "end_of_frame": EOF, "image_end": IMAGE_END}
    assert layout.text_ranges == ((0, 300),) and layout.tokens_per_image == 12 and layout.image_grid == (3, 4)
    assert layout.appended_specials == {} and layout.dtype == np.uint16
    ids = np.array([5, EOS, IMAGE_START, EOL, extra(0), CODE0 + 7, extra(100), layout.vocab_size])
    assert layout.is_text(ids).tolist() == [True] + [False] * 7
    assert layout.is_image(ids).tolist() == [False] * 5 + [True, False, False]
    assert layout.is_special(ids).tolist() == [False, False, True, True, True, False, False, False]
    assert layout.is_sentinel(ids).tolist() == [False] * 4 + [True, False, False, False]
    assert layout.image_codes(layout.image_ids([0, 7, 63])).tolist() == [0, 7, 63]
    assert layout.token_name(CODE0 + 7) == "<img:7>" and layout.token_name(EOL) == "<end_of_line>"
    assert layout.token_name(extra(1)) == "<sentinel:1>"


def test_emu3_layout_round_trips_through_json(layout, tmp_path):
    path = tmp_path / "emu3.vocab.json"
    layout.to_json(path)
    again = VocabLayout.from_json(str(path))
    assert again == layout and again.to_json() == layout.to_json() and hash(again) == hash(layout)
    again.check_compatible(layout)
    data = json.loads(path.read_text())
    assert data["kind"] == "native" and data["special_ids"]["<break>"] == IMAGE_START
    assert data["derived"]["appended_specials"] == []
    data["derived"]["vocab_size"] += 1
    with pytest.raises(VocabLayoutError, match="derived ids"):
        VocabLayout.from_dict(data)


def test_appended_specials_are_rows_after_the_parent(tok):
    lay = emu3_layout(tok, num_sentinels=S, image_grid=(3, 4), specials="appended")
    parent = CODE0 + CODEBOOK
    assert lay.parent_vocab_size == parent and lay.vocab_size == parent + S + 2
    assert lay.appended_specials == {**{f"<sentinel:{i}>": parent + i for i in range(S)},
                                     "<eos_span>": parent + S, "<mask>": parent + S + 1}
    assert lay.eos_id == EOS and lay.break_id == IMAGE_START  # existing tokens stay where they are
    assert VocabLayout.from_json(lay.to_json()) == lay
    assert json.loads(lay.to_json())["derived"]["appended_specials"] == sorted(lay.appended_specials)
    with pytest.raises(VocabLayoutError, match="incompatible.*special_ids"):
        lay.check_compatible(emu3_layout(tok, num_sentinels=S, image_grid=(3, 4)))


def test_a_different_tokenizer_is_refused(layout, tok, tmp_path):
    other = emu3_layout(make_emu3_tokenizer(str(tmp_path / "other"), codebook=CODEBOOK + 1), num_sentinels=S,
                        image_grid=(3, 4))
    with pytest.raises(VocabLayoutError, match="text_tokenizer"):
        layout.check_compatible(other)
    check_layout(load_text_tokenizer(tok), layout)
    with pytest.raises(TextTokenizerError, match="text ids but the vocabulary layout"):
        check_layout(load_text_tokenizer(str(tmp_path / "other")), layout)
    layout.to_json(tmp_path / "d.vocab.json")
    with pytest.raises(VocabLayoutError, match="codebook_size"):
        load_layout(str(tmp_path / "d"), expected=other)


def test_too_few_reserved_tokens_or_a_broken_layout_is_a_clear_error(tok, layout):
    with pytest.raises(VocabLayoutError, match=r"<\|extra_200\|>.*already used"):
        emu3_layout(tok, num_sentinels=199, image_grid=(3, 4))
    data = json.loads(layout.to_json())
    data.pop("derived")
    for change, message in ((lambda d: d["special_ids"].update({"<mask>": CODE0}), "is an image code"),
                            (lambda d: d["special_ids"].pop("<sentinel:0>"), "special_ids must name"),
                            (lambda d: d.update(image_grid=[2, 2]), "image_grid"),
                            (lambda d: d["special_ids"].update({"<break>": extra(150)}), "<break> is the image_start"),
                            (lambda d: d.update(text_ranges=[[0, 400]]), "both text")):
        bad = json.loads(json.dumps(data))
        change(bad)
        with pytest.raises(VocabLayoutError, match=message):
            VocabLayout.from_dict(bad)


def test_an_explicit_code_map_chameleon_style():
    """Codes that are BPE tokens in no code order (Chameleon: ids 4..8195 through `vocabulary_map`)."""
    rng = np.random.default_rng(0)
    code_ids = (4 + rng.permutation(16)).tolist()
    specials = {"<break>": 40, "<eos>": 2, "<mask>": 41, "<eos_span>": 42, "<sentinel:0>": 43}
    lay = VocabLayout(text_vocab_size=50, codebook_size=16, tokens_per_image=16, num_sentinels=1, text_eos_id=2,
                      version=2, kind="native", parent_vocab_size=50, text_ranges=((20, 40), (44, 50)),
                      image_code_ids=tuple(code_ids), special_ids=specials)
    assert lay.image_ids([0, 1, 15]).tolist() == [code_ids[0], code_ids[1], code_ids[15]]
    assert lay.image_codes(code_ids[::-1]).tolist() == list(range(15, -1, -1))
    assert lay.is_image(np.arange(50)).sum() == 16 and not lay.is_image([2, 40, 50, 60]).any()
    assert lay.text_rows == 4 and lay.format.name == "ours" and lay.vocab_size == 50
    assert VocabLayout.from_json(lay.to_json()) == lay
    with pytest.raises(VocabLayoutError, match="codes must be integers"):
        lay.image_ids([16])


# ------------------------------------------------------------------ preprocessing, read back
def test_preprocess_native_writes_the_emu3_stream(tok, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    text = load_text_tokenizer(tok)
    grid = [[1, 2, 3], [4, 5, 6]]  # a 2x3 image, given as rows
    flat = list(range(10, 22))     # the default 3x4 grid
    doc = {"id": "d0", "content": [{"text": "a red square"}, {"image_tokens": grid}, {"text": "the cat"},
                                   {"image_tokens": flat}]}
    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps(doc) + "\n" + json.dumps({"text": "hello world"}) + "\n")
    prefix = str(tmp_path / "out" / "emu3")
    rc = preprocess_interleaved.main(["--input", str(src), "--output-prefix", prefix, "--tokenizer-model", tok,
                                      "--vocab-layout-kind", "native", "--image-grid", "3", "4",
                                      "--num-sentinels", str(S), "--no-progress-bar"])
    assert rc == 0
    layout = load_layout(prefix)
    assert layout == emu3_layout(tok, num_sentinels=S, image_grid=(3, 4))

    def image(rows, h, w):
        body = [t for row in rows for t in [CODE0 + c for c in row] + [EOL]]
        return [IMAGE_START] + text.encode(f"{h}*{w}") + [IMAGE_TOKEN] + body + [EOF, IMAGE_END]

    img_a = image(grid, 2, 3)
    img_b = image([flat[k:k + 4] for k in range(0, 12, 4)], 3, 4)
    # exactly the string Emu3's processor builds, tokenized by the parent's own tokenizer
    emu3 = "<|image start|>2*3<|image token|>" + "".join(
        "".join(f"<|visual token {c:06d}|>" for c in row) + "<|extra_200|>" for row in grid) + \
        "<|extra_201|><|image end|>"
    assert img_a == text.encode(emu3)
    ds = IndexedDataset(prefix, multimodal=True)
    assert ds.index.sequence_modes.tolist() == [0, 1, 0, 1, 0, 0]
    got = [ds[i][0].tolist() for i in range(len(ds))]  # multimodal: (tokens, mode)
    assert got == [text.encode("a red square"), img_a, text.encode("the cat"), img_b, [EOS],
                   text.encode("hello world") + [EOS]]
    import inspect_dataset

    assert inspect_dataset.main([prefix, "--document", "0", "--tokenizer-model", tok]) == 0
    assert inspect_dataset.main([prefix, "--json"]) == 0
    rc = preprocess_interleaved.main(["--input", str(src), "--output-prefix", str(tmp_path / "bad"),
                                      "--tokenizer-model", tok, "--vocab-layout-kind", "native",
                                      "--tokens-per-image", "16", "--image-grid", "3", "4"])
    assert rc == 2


def test_a_native_vocab_layout_is_followed_without_the_kind_flag(tok, layout, tmp_path):
    """A second corpus preprocessed against the first one's native layout (`--vocab-layout`, as the
    instruction tool does) gets the same layout; a different grid is refused."""
    src = tmp_path / "t.jsonl"
    src.write_text(json.dumps({"text": "the cat"}) + "\n")
    layout.to_json(tmp_path / "ref.vocab.json")
    args = ["--input", str(src), "--tokenizer-model", tok, "--vocab-layout", str(tmp_path / "ref.vocab.json"),
            "--num-sentinels", str(S), "--no-progress-bar"]
    assert preprocess_interleaved.main(args + ["--output-prefix", str(tmp_path / "a")]) == 0
    assert load_layout(str(tmp_path / "a")) == layout
    assert preprocess_interleaved.main(args + ["--output-prefix", str(tmp_path / "b"), "--image-grid", "4", "4"]) == 2


def test_the_parent_config_gives_its_row_count(tmp_path):
    """A model folder (tokenizer + config.json) whose embedding has more rows than the tokenizer has ids."""
    folder = make_emu3_tokenizer(str(tmp_path / "model"))
    (tmp_path / "model" / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 640}}))
    lay = emu3_layout(folder, num_sentinels=S, image_grid=(3, 4), specials="appended")
    assert lay.parent_vocab_size == 640 and lay.sentinel_id(0) == 640 and lay.vocab_size == 640 + S + 2
    with pytest.raises(VocabLayoutError, match="smaller than"):
        emu3_layout(folder, num_sentinels=S, image_grid=(3, 4), parent_vocab_size=100)
