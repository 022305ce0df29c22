"""The Chameleon family's native vocabulary and image formats (Chameleon / Anole, Lumina-mGPT).

A tiny Chameleon-like model folder is built in-process (tests/chameleon_helpers.py: the
64 image-code tokens `IMGIMG<letters>Z` at ids 4..67 in a shuffled code order,
`<eoss>`, `<racm3:break>`, the reserved tokens the family uses, a BPE text part, and a
config.json with `vocabulary_map`). Checked:

- the layout finds every id by its token string; its code -> id map is transformers'
  `ChameleonImageVocabularyMapping` on the same vocabulary_map; config and tokenizer must
  agree; the format is told from config.json;
- both formats (property tests): image_ids / parse round trip for random grids and codes,
  the plan forces the structure and samples only code slots, image_spans finds exactly the
  images of a stream with text around them;
- CM3 never splits an image; decoding with random logits writes only well-formed images of
  the right length and never starts one it cannot finish; rendering reads the grid back;
- preprocess_interleaved.py with the native layout writes ids that parse back to the codes,
  both for given codes and for PNG files through a tiny ChameleonVQVAE.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from chameleon_helpers import CODEBOOK, code_order, make_chameleon_model_folder, token_id
from decoding_helpers import PADDED, RandomStepper, padded_config
from megatron_jam.data.chameleon_vocab import chameleon_layout
from megatron_jam.data.cm3 import CM3Config, cm3_restore, cm3_transform
from megatron_jam.data.documents import IMAGE, TEXT, build_sequences, split_segments
from megatron_jam.data.image_format import SAMPLE, ImageFormatError
from megatron_jam.data.native_vocab import detect_native_format, native_layout
from megatron_jam.data.vocab import VocabLayout, VocabLayoutError, load_layout
from megatron_jam.inference.decoding import InterleavedGenerator
from megatron_jam.inference.render import segments
from megatron_jam.inference.sampling import SamplingParams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import preprocess_interleaved  # noqa: E402

S = 4
GRIDS = {"chameleon": (2, 3), "lumina": (2, 4)}
CODE_IDS = code_order()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_chameleon_model_folder(str(tmp_path_factory.mktemp("chameleon") / "model"))


@pytest.fixture(scope="module", params=["chameleon", "lumina"])
def layout(request, folder):
    return chameleon_layout(folder, image_format=request.param, num_sentinels=S, image_grid=GRIDS[request.param])


def ids_of(folder):
    return {t: token_id(folder, t) for t in ("</s>", "<eoss>", "<racm3:break>", "<reserved08799>", "<image>")}


def structure(layout, codes, grid):
    """The ids of one image, written independently of the format classes (Lumina: item_processor.py)."""
    h, w = grid
    boi, eoi = layout.image_markers["image_start"], layout.image_markers["image_end"]
    codes = [CODE_IDS[c] for c in codes]
    if layout.image_format == "chameleon":
        return [boi] + codes + [eoi]
    rows = sum(([*codes[r * w:(r + 1) * w], layout.image_markers["end_of_line"]] for r in range(h)), [])
    return [boi, layout.image_markers[f"grid_{h // 2}"], layout.image_markers[f"grid_{w // 2}"]] + rows + [eoi]


def random_grid(rng, layout):
    if layout.image_format == "chameleon":
        return GRIDS["chameleon"]
    return 2 * int(rng.integers(1, 3)), 2 * int(rng.integers(1, 4))


def random_document(rng, layout):
    """(tokens, [(start, end) of each image]) of a random document: text runs and images."""
    tokens, images = [], []
    for _ in range(int(rng.integers(1, 6))):
        if rng.random() < 0.5:
            grid = random_grid(rng, layout)
            img = structure(layout, rng.integers(0, CODEBOOK, grid[0] * grid[1]).tolist(), grid)
            images.append((len(tokens), len(tokens) + len(img)))
            tokens += img
        else:
            tokens += rng.integers(181, 481, int(rng.integers(1, 15))).tolist()
    return np.array(tokens + [layout.eos_id], dtype=np.int64), images


# ------------------------------------------------------------------ the layout
def test_the_layout_finds_every_id_by_its_token_string(folder):
    ids = ids_of(folder)
    lay = chameleon_layout(folder, num_sentinels=S)
    assert lay.native and lay.image_format == "chameleon" and lay.image_grid == (32, 32)
    assert lay.tokens_per_image == 1024 and lay.codebook_size == CODEBOOK
    assert lay.vocab_size == lay.parent_vocab_size == 481 and lay.appended_specials == {}
    assert lay.break_id == ids["<racm3:break>"] == lay.image_markers["image_start"]
    assert lay.image_markers == {"image_start": ids["<racm3:break>"], "image_end": ids["<eoss>"]}
    assert lay.eos_id == lay.text_eos_id == ids["</s>"] == 2
    reserved = [token_id(folder, f"<reserved{8900 + k:05d}>") for k in range(S + 2)]
    assert [lay.sentinel_id(i) for i in range(S)] + [lay.eos_span_id, lay.mask_id] == reserved
    assert list(lay.image_code_ids) == CODE_IDS and CODE_IDS != sorted(CODE_IDS)  # not in code order
    assert lay.image_code_offset == -1 and sorted(CODE_IDS) == list(range(4, 4 + CODEBOOK))
    assert lay.text_ranges == ((181, 481),)  # no reserved token, no `<image>`, no code is text
    assert not lay.is_text([ids["<image>"], token_id(folder, "<reserved08706>"), 4, 0]).any()
    assert lay.is_text([181, 480]).all() and lay.is_image(CODE_IDS).all()
    assert VocabLayout.from_json(lay.to_json()) == lay


def test_the_code_map_is_transformers_chameleon_mapping(folder):
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

    with open(os.path.join(folder, "config.json")) as f:
        mapping = ChameleonImageVocabularyMapping(json.load(f)["vocabulary_map"])
    lay = chameleon_layout(folder, num_sentinels=S)
    assert {c: int(lay.image_ids([c])[0]) for c in range(CODEBOOK)} == mapping.img2bpe
    assert {i: int(lay.image_codes([i])[0]) for i in mapping.image_tokens} == mapping.bpe2img
    codes = torch.randint(0, CODEBOOK, (2, 7))
    assert mapping.convert_img2bpe(codes).tolist() == lay.image_ids(codes.numpy()).tolist()
    assert mapping.image_token_id == token_id(folder, "<image>")


def test_config_and_tokenizer_must_agree_and_either_is_enough(folder, tmp_path):
    import shutil

    shutil.copytree(folder, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    vm = config["vocabulary_map"]
    a, b = "IMGIMGAZ", "IMGIMGBZ"
    vm[a], vm[b] = vm[b], vm[a]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(VocabLayoutError, match="vocabulary_map and .* disagree on the image tokens"):
        chameleon_layout(str(tmp_path / "m"), num_sentinels=S)
    (tmp_path / "m" / "config.json").unlink()
    assert chameleon_layout(str(tmp_path / "m"), num_sentinels=S).image_code_ids == tuple(CODE_IDS)


def test_the_format_is_told_from_the_config(folder, tmp_path):
    lumina = make_chameleon_model_folder(str(tmp_path / "lumina"), lumina=True)
    assert detect_native_format(folder) == "chameleon" and detect_native_format(lumina) == "lumina"
    lay = native_layout(lumina, num_sentinels=S)
    assert lay.image_format == "lumina" and lay.image_grid == (32, 32)
    assert lay.image_markers["end_of_line"] == token_id(lumina, "<reserved08799>")
    assert lay.image_markers["grid_16"] == token_id(lumina, "<reserved08816>")
    assert lay.format.image_length((32, 32)) == 1 + 2 + 32 * 33 + 1
    (tmp_path / "lumina" / "config.json").unlink()  # no config: the tokenizer says "chameleon"
    assert detect_native_format(lumina) == "chameleon"


def test_specials_appended_and_clear_errors(folder, layout):
    app = chameleon_layout(folder, num_sentinels=S, specials="appended")
    assert app.vocab_size == 481 + S + 2 and app.sentinel_id(0) == 481
    with pytest.raises(VocabLayoutError, match="reserved08799.*already used"):
        chameleon_layout(folder, image_format="lumina", num_sentinels=S, first_reserved=8799)
    with pytest.raises(VocabLayoutError, match=r"<reserved08940>.*does not exist"):
        chameleon_layout(folder, num_sentinels=40)
    with pytest.raises(VocabLayoutError, match="even image_grid"):
        chameleon_layout(folder, image_format="lumina", num_sentinels=S, image_grid=(3, 4))
    data = json.loads(layout.to_json())
    data.pop("derived")
    data["image_markers"].pop("image_end")
    with pytest.raises(VocabLayoutError, match="needs image_markers.*image_end"):
        VocabLayout.from_dict(data)


# ------------------------------------------------------------------ the formats
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000))
def test_image_ids_and_parse_round_trip(layout, seed):
    rng = np.random.default_rng(seed)
    fmt, grid = layout.format, random_grid(rng, layout)
    codes = rng.integers(0, CODEBOOK, grid[0] * grid[1])
    ids = fmt.image_ids(codes, grid)
    assert ids.tolist() == structure(layout, codes.tolist(), grid)
    back, got = fmt.parse(ids)
    assert back.tolist() == codes.tolist() and got == grid and fmt.image_length(grid) == ids.size
    plan = fmt.plan(grid)  # forced structure, SAMPLE exactly at the code slots
    assert plan.tolist() == [t if not layout.is_image(t) else SAMPLE for t in ids[1:].tolist()]
    assert (plan == SAMPLE).sum() == codes.size
    k = int(rng.integers(1, ids.size - 1))
    for bad in (ids[:-1], np.delete(ids, k), np.insert(ids, k, ids[k])):
        with pytest.raises(ImageFormatError):
            fmt.parse(bad)


def test_grids_a_format_cannot_hold_are_refused(layout):
    bad = [(4, 4), (2, 2)] if layout.image_format == "chameleon" else [(3, 4), (2, 130)]
    for grid in bad:
        with pytest.raises(ImageFormatError):
            layout.format.image_ids(np.zeros(grid[0] * grid[1], dtype=np.int64), grid)
    assert not layout.format.uses_break and layout.format.ends_in_text


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000), cut=st.integers(0, 20), length=st.integers(4, 80))
def test_image_spans_finds_exactly_the_images(layout, seed, cut, length):
    rng = np.random.default_rng(seed)
    doc, images = random_document(rng, layout)
    bounds, complete = layout.format.image_spans(doc)
    assert bounds.tolist() == [list(b) for b in images] and complete.all()
    window = doc[cut:cut + length]  # cut anywhere: an image cut by an edge is found but incomplete
    bounds, complete = layout.format.image_spans(window)
    cut_images = [(max(a - cut, 0), min(b - cut, window.size)) for a, b in images
                  if a - cut < window.size and b - cut > 0]
    assert bounds.tolist() == [list(b) for b in cut_images]
    assert complete.tolist() == [a >= cut and b - cut <= window.size for a, b in images
                                 if a - cut < window.size and b - cut > 0]


def test_documents_store_each_image_as_one_sequence(layout):
    grid = GRIDS[layout.image_format]
    n = grid[0] * grid[1]
    img = layout.format.image_ids(np.arange(n), grid)
    sequences, modes = build_sequences([(TEXT, np.array([200, 201])), (IMAGE, img), (TEXT, np.array([202]))],
                                       layout)
    assert [s.tolist() for s in sequences] == [[200, 201], img.tolist(), [202, layout.eos_id]]
    parts = split_segments(np.concatenate(sequences), modes, [s.size for s in sequences], layout)
    assert [p[0] for p in parts] == [TEXT, IMAGE, TEXT, "eos"] and parts[1][1].tolist() == list(range(n))


# ------------------------------------------------------------------ CM3
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000), lam=st.sampled_from([1.0, 3.0]), caption=st.sampled_from([0.0, 0.5]),
       cut=st.integers(0, 30), length=st.integers(8, 120))
def test_cm3_never_splits_an_image(layout, seed, lam, caption, cut, length):
    rng = np.random.default_rng(seed)
    doc = np.concatenate([random_document(rng, layout)[0], random_document(rng, layout)[0]])
    window = doc[min(cut, doc.size - 1):][:length]
    out = cm3_transform(window, layout, rng, CM3Config(poisson_lambda=lam, caption_mask_prob=caption))
    assert out.tokens.size == window.size
    assert np.array_equal(cm3_restore(out.tokens, layout), window[:out.tokens.size - 3 * len(out.spans)])
    bounds, complete = layout.format.image_spans(window)
    for s, e in out.spans.tolist():
        for (a, b), whole in zip(bounds.tolist(), complete.tolist()):
            if s < b and a < e:  # touches an image: exactly that whole, well-formed image
                assert (s, e) == (a, b) and whole, (s, e, a, b)
                layout.format.parse(window[s:e])
        assert not (window[s:e] == layout.eos_id).any()


# ------------------------------------------------------------------ decoding
def check_document(layout, ids, starts_image, budget):
    """Every image complete and well formed on the default grid; text otherwise; `<eos>` only last."""
    assert len(ids) <= budget
    ids = ([layout.break_id] if starts_image else []) + list(ids)
    n, k = layout.format.image_length(layout.format.default_grid), 0
    while k < len(ids):
        if ids[k] == layout.break_id:
            image = ids[k:k + n]
            assert len(image) == n, ids  # never an unfinished image
            codes, grid = layout.format.parse(image)
            assert grid == layout.format.default_grid and len(codes) == grid[0] * grid[1]
            k += n
            continue
        assert layout.is_text(ids[k]) or (ids[k] == layout.eos_id and k == len(ids) - 1), (ids[k], ids)
        k += 1


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), max_new=st.integers(1, 50), lens=st.lists(st.integers(1, 8), min_size=1,
                                                                                 max_size=3),
       cfg=st.sampled_from([1.0, 3.0]), image_first=st.booleans())
def test_random_logits_give_well_formed_images(layout, seed, max_new, lens, cfg, image_first):
    bias = torch.zeros(PADDED)
    bias[layout.break_id], bias[layout.eos_id] = 6.0, -1.0
    for marker in layout.image_markers.values():  # structural tokens are forced, never sampled
        if marker != layout.break_id:
            bias[marker] = 8.0
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(181, 481, (n,), generator=g).tolist() for n in lens]
    if image_first:
        prompts[0] = prompts[0] + [layout.break_id]
        max_new = max(max_new, layout.format.image_length(layout.format.default_grid) - 1)
    gen = InterleavedGenerator(None, padded_config(layout.vocab_size), layout, stepper=RandomStepper(seed, bias))
    outs = gen.generate(prompts, SamplingParams(cfg_scale=cfg, seed=seed), max_new)
    for p, out in zip(prompts, outs):
        check_document(layout, out.ids, p[-1] == layout.break_id, min(max_new, 96 - len(p)))


def test_an_image_that_cannot_be_finished_is_never_started(layout):
    n = layout.format.image_length(layout.format.default_grid)
    bias = torch.full((PADDED,), -50.0)
    bias[layout.break_id] = 50.0
    for budget in range(1, 2 * n + 2):
        gen = InterleavedGenerator(None, padded_config(layout.vocab_size), layout, stepper=RandomStepper(0, bias))
        ids = gen.generate([[200, 201]], SamplingParams(seed=1), budget)[0].ids
        assert ids.count(layout.break_id) == budget // n
        check_document(layout, ids, False, budget)


# ------------------------------------------------------------------ rendering
def test_render_reads_images_and_their_grid(layout):
    grid = GRIDS[layout.image_format]
    img = structure(layout, list(range(grid[0] * grid[1])), grid)
    segs = segments([200] + img + [201] + img[:4], layout)  # the budget cut the second image
    assert [s["type"] for s in segs] == ["text", "image", "text", "image"]
    assert segments(img + [layout.eos_id], layout)[-1]["type"] == "eos"
    assert segs[1]["codes"] == list(range(grid[0] * grid[1])) and segs[1]["grid"] == list(grid)
    assert segs[1]["complete"] and not segs[3]["complete"]
    first = segments(img[1:] + [202], layout)  # the prompt ended with the begin-image token
    assert [s["type"] for s in first] == ["image", "text"] and first[0]["complete"]


# ------------------------------------------------------------------ mixed (JAM-Cross, different tokenizers)
def test_a_mixed_layout_takes_the_chameleon_image_part(folder, tmp_path):
    from emu3_helpers import make_emu3_tokenizer
    from megatron_jam.data.mixed_vocab import image_parent_ids, mixed_layout

    llm = make_emu3_tokenizer(str(tmp_path / "llm"))
    mixed = mixed_layout(llm, folder, num_sentinels=S, image_grid=(2, 3))
    parent = chameleon_layout(folder, num_sentinels=S, image_grid=(2, 3))
    assert mixed.image_format == "chameleon" and mixed.codebook_size == CODEBOOK
    codes = np.arange(CODEBOOK)
    assert image_parent_ids(mixed, mixed.image_ids(codes)).tolist() == parent.image_ids(codes).tolist()
    assert image_parent_ids(mixed, [mixed.break_id]).tolist() == [parent.break_id]


# ------------------------------------------------------------------ preprocessing
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A tiny random ChameleonVQVAE (8x8 codes of 64 at 32 px) and three PNG files."""
    from PIL import Image, ImageDraw
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    root = tmp_path_factory.mktemp("vq")
    torch.manual_seed(0)
    config = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=CODEBOOK, latent_channels=8, resolution=32,
                                  base_channels=32, channel_multiplier=[1, 1, 2], num_res_blocks=1, attn_resolutions=[])
    ChameleonVQVAE(config).save_pretrained(root / "vq")
    for i in range(3):
        im = Image.new("RGB", (32 + 8 * i, 32), (40 * i, 90, 200))
        ImageDraw.Draw(im).rectangle([4, 4, 20 + i, 25], fill=(255 - 60 * i, 20, 40))
        im.save(root / f"{i}.png")
    return root


@pytest.mark.parametrize("fmt", ["chameleon", "lumina"])
def test_preprocess_writes_ids_that_parse_back_to_the_codes(fmt, folder, images, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_jam.data.image_tokenizer import VQImageTokenizer, load_image

    given = np.random.default_rng(1).integers(0, CODEBOOK, 64)
    docs = [{"id": "a", "content": [{"text": "a red square"}, {"image": str(images / "0.png")},
                                    {"text": "the cat"}, {"image_tokens": given.tolist()}]},
            {"id": "b", "content": [{"image": str(images / "2.png")}, {"image": str(images / "1.png")}]},
            {"text": "hello world"}]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    prefix = str(tmp_path / "out" / fmt)
    rc = preprocess_interleaved.main(["--input", str(src), "--output-prefix", prefix, "--tokenizer-model", folder,
                                      "--vocab-layout-kind", "native", "--native-format", fmt,
                                      "--image-tokenizer", str(images / "vq"), "--num-sentinels", str(S),
                                      "--no-progress-bar"])
    assert rc == 0
    layout = load_layout(prefix)
    assert layout.image_format == fmt and layout.image_grid == (8, 8)
    vq = VQImageTokenizer(str(images / "vq"))
    expected = [vq.encode_grids([load_image(str(images / f"{i}.png"))])[0].reshape(-1) for i in (0, 2, 1)]
    expected.insert(1, given)
    ds = IndexedDataset(prefix, multimodal=True)
    got = [layout.format.parse(ds[i][0]) for i in range(len(ds)) if ds.index.sequence_modes[i] == 1]
    assert [g[1] for g in got] == [(8, 8)] * 4
    assert [g[0].tolist() for g in got] == [e.tolist() for e in expected]
    assert ds[len(ds) - 1][0].tolist()[-1] == layout.eos_id
    again = preprocess_interleaved.main(["--input", str(src), "--output-prefix", prefix + "_again", "--tokenizer-model",
                                         folder, "--vocab-layout", prefix + ".vocab.json", "--image-tokenizer",
                                         str(images / "vq"), "--num-sentinels", str(S), "--no-progress-bar"])
    assert again == 0 and load_layout(prefix + "_again") == layout  # a native --vocab-layout is followed as is
