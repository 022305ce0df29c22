"""Image formats (`megatron_jam.data.image_format`) on Emu3's format, with a tiny Emu3-like tokenizer.

- documents: build_sequences writes each image as one image-mode sequence holding the
  whole Emu3 structure, no `<break>`; split_segments reads codes back;
- CM3 (property test, random documents with images of random grids and random windows):
  a span touching an image covers exactly that whole structure, never part of one; a
  partial image at the window's edge is never masked; `cm3_restore` inverts; captions
  masked whole give `<sentinel:0> <|image start|>`;
- decoding (property test, random logits, any budget, with and without guidance): every
  image is `<|image start|> h*w <|image token|>`, h rows of exactly w codes each then
  end-of-line, then end-of-frame and `<|image end|>`; no image is started that cannot be
  finished; structural tokens are forced whatever the logits say;
- rendering: an Emu3-format generation splits into text, images (grid from the tokens)
  and `<eos>`, also when the prompt opened the image.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from decoding_helpers import PADDED, FullForwardStepper, RandomStepper, padded_config
from emu3_helpers import CODE0, CODEBOOK, EOF, EOL, EOS, IMAGE_END, IMAGE_START, IMAGE_TOKEN, make_emu3_tokenizer
from megatron_jam.data.cm3 import CM3Config, cm3_restore, cm3_transform, segment_table
from megatron_jam.data.documents import IMAGE, TEXT, build_sequences, split_segments
from megatron_jam.data.image_format import SAMPLE, ImageFormatError
from megatron_jam.data.indexed_builder import MODE_IMAGE, MODE_TEXT
from megatron_jam.data.native_vocab import emu3_layout
from megatron_jam.inference.decoding import InterleavedGenerator
from megatron_jam.inference.render import segments
from megatron_jam.inference.sampling import SamplingParams

S = 4


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return emu3_layout(make_emu3_tokenizer(str(tmp_path_factory.mktemp("emu3") / "tok")), num_sentinels=S,
                       image_grid=(2, 3))


def size_ids(layout, h, w):
    return [layout.size_digit_ids[c] for c in f"{h}*{w}"]


def structure(layout, codes, h, w):
    rows = [[CODE0 + c for c in codes[r * w:(r + 1) * w]] + [EOL] for r in range(h)]
    return [IMAGE_START] + size_ids(layout, h, w) + [IMAGE_TOKEN] + sum(rows, []) + [EOF, IMAGE_END]


def random_document(rng, layout):
    """(tokens, [(start, end) of each image]) of a random document: text runs and images of random grids."""
    tokens, images = [], []
    for _ in range(int(rng.integers(1, 6))):
        if rng.random() < 0.5:
            h, w = int(rng.integers(1, 4)), int(rng.integers(1, 12))
            images.append((len(tokens), len(tokens) + len(structure(layout, [0] * h * w, h, w))))
            tokens += structure(layout, rng.integers(0, CODEBOOK, h * w).tolist(), h, w)
        else:
            tokens += rng.integers(0, 300, int(rng.integers(1, 15))).tolist()
    return np.array(tokens + [EOS], dtype=np.int64), images


# ------------------------------------------------------------------ the format itself
def test_structure_plan_and_parse(layout):
    fmt = layout.format
    ids = fmt.image_ids(np.arange(6), (2, 3))
    assert ids.tolist() == structure(layout, list(range(6)), 2, 3)
    assert fmt.image_length((2, 3)) == ids.size and fmt.image_length((90, 90)) == 1 + 5 + 1 + 90 * 91 + 2
    plan = fmt.plan((2, 3))
    assert plan.tolist() == [t if not layout.is_image(t) else SAMPLE for t in ids[1:].tolist()]
    codes, grid = fmt.parse(ids)
    assert codes.tolist() == list(range(6)) and grid == (2, 3)
    for bad in (ids[:-1], np.concatenate([ids[:8], [EOL], ids[8:]]), np.where(ids == EOL, CODE0, ids)):
        with pytest.raises(ImageFormatError):
            fmt.parse(bad)
    assert not fmt.uses_break and fmt.default_grid == (2, 3)


def test_documents_store_the_structure_as_one_image_sequence(layout):
    img = layout.format.image_ids(np.arange(6), (2, 3))
    sequences, modes = build_sequences([(TEXT, np.array([5, 6])), (IMAGE, img), (IMAGE, img),
                                        (TEXT, np.array([7]))], layout)
    assert [s.tolist() for s in sequences] == [[5, 6], img.tolist(), img.tolist(), [7, EOS]]
    assert modes == [MODE_TEXT, MODE_IMAGE, MODE_IMAGE, MODE_TEXT]
    tokens = np.concatenate(sequences)
    parts = split_segments(tokens, modes, [s.size for s in sequences], layout)
    assert [p[0] for p in parts] == [TEXT, IMAGE, IMAGE, TEXT, "eos"]
    assert parts[1][1].tolist() == list(range(6))


# ------------------------------------------------------------------ CM3
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 100_000), lam=st.sampled_from([1.0, 3.0]), caption=st.sampled_from([0.0, 0.5]),
       cut=st.integers(0, 30), length=st.integers(8, 120))
def test_cm3_never_splits_an_emu3_image(layout, seed, lam, caption, cut, length):
    rng = np.random.default_rng(seed)
    doc, images = random_document(rng, layout)
    doc = np.concatenate([doc, random_document(rng, layout)[0]])
    window = doc[min(cut, doc.size - 1):][:length]  # windows open and close anywhere, mid-image too
    out = cm3_transform(window, layout, rng, CM3Config(poisson_lambda=lam, caption_mask_prob=caption))
    assert out.tokens.size == window.size
    assert np.array_equal(cm3_restore(out.tokens, layout), window[:out.tokens.size - 3 * len(out.spans)])
    bounds, complete = layout.format.image_spans(window)
    for s, e in out.spans.tolist():
        for (a, b), whole in zip(bounds.tolist(), complete.tolist()):
            if s < b and a < e:  # touches an image: exactly that whole, well-formed image
                assert (s, e) == (a, b) and whole, (s, e, a, b)
                layout.format.parse(window[s:e])
        assert not (window[s:e] == EOS).any()


def test_segment_table_on_a_known_window(layout):
    img = structure(layout, list(range(6)), 2, 3)
    tokens = np.array([5, 6] + img + [7] + img[:9])  # a complete image, text, then a cut image
    _, seg_of, bounds, kind = segment_table(tokens, layout)
    assert bounds.tolist() == [[0, 2], [2, 2 + len(img)], [2 + len(img), 3 + len(img)], [3 + len(img), tokens.size]]
    assert kind.tolist() == [0, 1, 0, -1]
    assert (seg_of[2:2 + len(img)] == 1).all()


def test_a_window_opening_in_the_size_text_cut_before_the_codes_is_not_text(layout):
    """Found by the property test: the window opens inside an image's size text ("3*7") and the length
    rule cuts it before `<|image token|>`; alone, the cut looks like text. Images are found in the whole
    window, so the cut part stays a partial image and is never masked."""
    img = structure(layout, list(range(6)), 2, 3)
    window = np.array(img[1:] + [5, 6, EOS])
    _, _, bounds, kind = segment_table(window[:2], layout, context=window)
    assert bounds.tolist() == [[0, 2]] and kind.tolist() == [-1]
    _, _, _, kind = segment_table(window[:2], layout)  # without the context it would be text
    assert kind.tolist() == [0]
    for seed in range(50):
        out = cm3_transform(window, layout, np.random.default_rng(seed), CM3Config(poisson_lambda=3.0))
        assert (out.spans[:, 0] >= len(img) - 1).all()


def test_a_masked_caption_is_followed_by_the_image_start(layout):
    img = structure(layout, list(range(6)), 2, 3)
    tokens = np.array([5, 6, 7] + img + [EOS])
    out = cm3_transform(tokens, layout, np.random.default_rng(0), CM3Config(poisson_lambda=0.0, caption_mask_prob=1.0))
    assert out.spans.tolist() == [[0, 3]]
    assert out.tokens[:2].tolist() == [layout.sentinel_id(0), IMAGE_START]


# ------------------------------------------------------------------ decoding
def check_emu3_document(layout, ids, starts_image, budget):
    """Every image well formed and complete; text otherwise; `<eos>` only last."""
    assert len(ids) <= budget
    ids = ([IMAGE_START] if starts_image else []) + list(ids)
    k = 0
    while k < len(ids):
        t = ids[k]
        if t == IMAGE_START:
            n = layout.format.image_length((2, 3))
            image = ids[k:k + n]
            assert len(image) == n, ids  # never an unfinished image
            codes, grid = layout.format.parse(image)  # rows of exactly w codes then end-of-line, eof, end
            assert grid == (2, 3) and len(codes) == 6
            k += n
            continue
        assert layout.is_text(t) or (t == EOS and k == len(ids) - 1), (t, ids)
        k += 1


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), max_new=st.integers(1, 60), lens=st.lists(st.integers(1, 8), min_size=1,
                                                                                 max_size=3),
       cfg=st.sampled_from([1.0, 3.0]), image_first=st.booleans())
def test_random_logits_give_well_formed_emu3_images(layout, seed, max_new, lens, cfg, image_first):
    bias = torch.zeros(PADDED)
    bias[IMAGE_START], bias[EOS] = 6.0, -1.0
    bias[EOL] = bias[EOF] = bias[IMAGE_END] = 8.0  # structural tokens are forced, never sampled
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in lens]
    need = layout.format.image_length((2, 3)) - 1
    if image_first:
        prompts[0] = prompts[0] + [IMAGE_START]
        max_new = max(max_new, need)
    gen = InterleavedGenerator(None, padded_config(layout.vocab_size), layout, stepper=RandomStepper(seed, bias))
    outs = gen.generate(prompts, SamplingParams(cfg_scale=cfg, seed=seed), max_new)
    for p, out in zip(prompts, outs):
        check_emu3_document(layout, out.ids, p[-1] == IMAGE_START, min(max_new, 96 - len(p)))
        assert out.finish_reason in ("eos", "length")


def test_an_image_that_cannot_be_finished_is_never_started(layout):
    n = layout.format.image_length((2, 3))
    bias = torch.full((PADDED,), -50.0)
    bias[IMAGE_START] = 50.0  # the model wants nothing but images
    for budget in range(1, 2 * n + 2):
        gen = InterleavedGenerator(None, padded_config(layout.vocab_size), layout, stepper=RandomStepper(0, bias))
        ids = gen.generate([[1, 2]], SamplingParams(seed=1), budget)[0].ids
        assert ids.count(IMAGE_START) == budget // n
        check_emu3_document(layout, ids, False, budget)
    with pytest.raises(ValueError, match="starts an image"):
        gen.generate([[1, IMAGE_START]], SamplingParams(), n - 2)


# ------------------------------------------------------------------ rendering
def test_render_splits_an_emu3_generation(layout):
    img = structure(layout, list(range(6)), 2, 3)
    ids = [5, 6] + img + [7] + img + [EOS]
    segs = segments(ids, layout)
    assert [s["type"] for s in segs] == ["text", "image", "text", "image", "eos"]
    assert segs[1]["codes"] == list(range(6)) and segs[1]["grid"] == [2, 3] and segs[1]["complete"]
    assert (segs[1]["start"], segs[1]["end"]) == (2, 2 + len(img)) and segs[2]["ids"] == [7]
    first = segments(img[1:] + [8], layout)  # the prompt ended with <|image start|>
    assert [s["type"] for s in first] == ["image", "text"] and first[0]["grid"] == [2, 3] and first[0]["complete"]
    wide = structure(layout, list(range(8)), 1, 8)
    cut = segments([5] + wide + img[:9], layout)
    assert cut[1]["grid"] == [1, 8] and cut[1]["complete"] and not cut[2]["complete"] and cut[2]["codes"] == [0, 1, 2]



def test_document_writer_draws_emu3_images_on_their_grid(layout, tmp_path):
    from PIL import Image

    from megatron_jam.inference.decoding import Generation
    from megatron_jam.inference.render import DocumentWriter

    wide = structure(layout, list(range(8)), 1, 8)
    rec = DocumentWriter(str(tmp_path), layout).write("doc", "a prompt", Generation([1], [5] + wide + [EOS], "eos"))
    image = rec["segments"][1]
    assert image["rendering"] == "token_grid" and image["grid"] == [1, 8]
    with Image.open(tmp_path / image["file"]) as im:
        cell = 256 // 8
        assert im.size[1] == cell + 14  # one row of cells under the banner


# ------------------------------------------------------------------ a converted Emu3 parent, end to end
def test_a_converted_emu3_parent_generates_emu3_images_with_its_native_layout(single_rank, layout, tmp_path):
    """A tiny random Emu3ForConditionalGeneration whose vocabulary is the tiny tokenizer's (575 ids) is
    imported; the native layout describes its rows exactly, and decoding (cache or the model's own full
    forward, with guidance) writes well-formed Emu3 images."""
    from emu3_helpers import make_emu3
    from megatron_jam.inference.loading import check_checkpoint_layout, load_model
    from parent_helpers import convert

    make_emu3(tmp_path / "emu3", seed=4, vocab_size=layout.vocab_size, max_position_embeddings=96,
              initializer_range=0.3)
    convert("import", tmp_path / "jam", tmp_path / "emu3", seq_length=96)
    model, cfg = load_model(str(tmp_path / "jam"))
    check_checkpoint_layout(str(tmp_path / "jam"), cfg, layout)
    prompts = [[5, 6, 7, IMAGE_START], [8, 9], [10, 11, 12, 13]]
    n = layout.format.image_length((2, 3))
    outs = {}
    for name, stepper in (("cache", None), ("full", FullForwardStepper(model))):
        gen = InterleavedGenerator(model, cfg, layout, stepper=stepper)
        outs[name] = gen.generate(prompts, SamplingParams.greedy(cfg_scale=3.0), 2 * n)
    assert [o.ids for o in outs["cache"]] == [o.ids for o in outs["full"]]
    for p, out in zip(prompts, outs["cache"]):
        check_emu3_document(layout, out.ids, p[-1] == IMAGE_START, 2 * n)
    first = segments(outs["cache"][0].ids, layout)[0]
    assert first["type"] == "image" and first["complete"] and first["grid"] == [2, 3]
