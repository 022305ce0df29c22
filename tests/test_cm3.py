"""Properties of the CM3 transform on random documents (hypothesis) and its span-count distribution.

Invariants: the raw prefix is recovered exactly from the transformed sample; no
span contains `<break>`, `<eos>` (a document boundary) or a special id; a span
that touches an image is exactly one whole image; inserted ids are sentinels
(in the reserved range, numbered in position order) and `<eos_span>`; the
output has the input's length; the span count follows Poisson(lambda).
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jam_data_helpers import LAYOUT
from megatron_jam.data.cm3 import CM3Config, cm3_restore, cm3_transform, draw_num_spans
from megatron_jam.data.cm3_dataset import make_sample
from megatron_jam.data.documents import IMAGE, TEXT, build_sequences

L = LAYOUT
text_item = st.lists(st.integers(0, L.text_vocab_size - 1), min_size=1, max_size=30).map(
    lambda ids: (TEXT, np.array(ids, dtype=np.int64)))
image_item = st.lists(st.integers(0, L.codebook_size - 1), min_size=L.tokens_per_image,
                      max_size=L.tokens_per_image).map(lambda c: (IMAGE, np.array(c, dtype=np.int64) + L.image_offset))
document = st.lists(st.one_of(text_item, image_item), min_size=1, max_size=5)


def stream(docs):
    return np.concatenate([np.concatenate(build_sequences(d, L)[0]) for d in docs])


def check_spans(x, spans):
    sep = L.is_special(x) | (x == L.eos_id)
    img = L.is_image(x)
    assert np.all(spans[:-1, 1] <= spans[1:, 0]) if len(spans) > 1 else True
    for s, e in spans.tolist():
        assert 0 <= s < e <= x.size
        assert not sep[s:e].any(), "span crosses <break>, <eos> or a special id"
        if img[s:e].any():
            assert img[s:e].all() and e - s == L.tokens_per_image, "span splits an image"
            assert (s == 0 or not img[s - 1]) and (e == x.size or not img[e])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(document, min_size=1, max_size=4), start=st.integers(0, 40), length=st.integers(2, 200),
       lam=st.sampled_from([0.5, 1.0, 3.0]), seed=st.integers(0, 2**31))
def test_transform_properties(docs, start, length, lam, seed):
    full = stream(docs)
    x = full[min(start, full.size - 1):][:length]
    out = cm3_transform(x, L, np.random.default_rng(seed), CM3Config(poisson_lambda=lam))
    n = out.spans.shape[0]
    assert out.tokens.size == x.size and n <= out.num_drawn
    check_spans(x, out.spans)
    restored = cm3_restore(out.tokens, L)
    assert restored.size == x.size - 3 * n
    np.testing.assert_array_equal(restored, x[:restored.size])
    inserted = out.tokens[out.source < 0]
    sentinels = [L.sentinel_id(i) for i in range(n)]
    assert sorted(inserted.tolist()) == sorted(sentinels * 2 + [L.eos_span_id] * n)
    assert all(L.sentinel_id(0) <= t <= L.sentinel_id(L.num_sentinels - 1) for t in sentinels)
    in_place = out.tokens[:out.tokens.size - sum(e - s + 2 for s, e in out.spans.tolist())]
    assert [t for t in in_place.tolist() if t in sentinels] == sentinels  # numbered in position order
    copied = out.source >= 0
    np.testing.assert_array_equal(out.tokens[copied], x[out.source[copied]])


def test_images_are_masked_whole_only_when_complete():
    img = L.image_offset + np.arange(L.tokens_per_image)
    x = np.concatenate([img[4:], [L.break_id], img, [L.break_id], [1, 2, 3, L.eos_id]])
    seen_full = False
    for seed in range(300):
        out = cm3_transform(x, L, np.random.default_rng(seed), CM3Config(poisson_lambda=2))
        check_spans(x, out.spans)
        assert not any(s < L.tokens_per_image - 4 for s, _ in out.spans.tolist()), "partial image was masked"
        seen_full |= any(e - s == L.tokens_per_image for s, e in out.spans.tolist())
    assert seen_full


@pytest.mark.parametrize("lam", [1.0, 2.0])
def test_span_count_follows_poisson(lam):
    """4,000 samples of plain text: chi-square over {0, 1, 2, 3, 4, 5+} below the 0.1% critical value."""
    from math import exp, factorial

    rng = np.random.default_rng(1234)
    x = rng.integers(0, L.text_vocab_size, 512)
    x[::97] = L.eos_id  # a few document boundaries
    counts = np.array([cm3_transform(x, L, rng, CM3Config(poisson_lambda=lam)).spans.shape[0] for _ in range(4000)])
    pmf = [exp(-lam) * lam ** k / factorial(k) for k in range(5)]
    expected = 4000 * np.array(pmf + [1 - sum(pmf)])
    observed = np.array([np.sum(counts == k) for k in range(5)] + [np.sum(counts >= 5)])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, (observed, expected)  # df = 5, p = 0.001
    assert abs(counts.mean() - lam) < 0.08


def test_clamp_and_off():
    rng = np.random.default_rng(0)
    assert max(draw_num_spans(rng, CM3Config(poisson_lambda=5, max_spans=2), L) for _ in range(200)) == 2
    assert max(draw_num_spans(rng, CM3Config(poisson_lambda=50), L) for _ in range(50)) == L.num_sentinels
    x = np.arange(50)
    out = cm3_transform(x, L, rng, CM3Config(enabled=False))
    np.testing.assert_array_equal(out.tokens, x)
    with pytest.raises(ValueError):
        CM3Config(poisson_lambda=-1)


def test_sample_weights_and_modality():
    rng = np.random.default_rng(3)
    img = L.image_offset + np.arange(L.tokens_per_image)
    raw = np.concatenate([np.arange(1, 30), [L.break_id], img, [L.eos_id]])
    cfg = CM3Config(poisson_lambda=3, sentinel_loss_weight=0.25)
    for seed in range(20):
        s = make_sample(raw, np.ones(raw.size, np.float32), raw.size - 1, L, cfg, np.random.default_rng(seed))
        labels = s["labels"].numpy()
        is_sentinel = (labels > L.eos_span_id) & (labels < L.image_offset)
        np.testing.assert_array_equal(s["loss_mask"].numpy(), np.where(is_sentinel, 0.25, 1.0))
        np.testing.assert_array_equal(s["modality"].numpy(), L.is_image(labels))
        np.testing.assert_array_equal(s["tokens"].numpy()[1:], labels[:-1])
    short = make_sample(raw[:10], np.ones(10, np.float32), 20, L, None, rng)
    assert short["loss_mask"].numpy().tolist() == [1.0] * 9 + [0.0] * 11  # padding carries no loss


def _caption_doc():
    img = L.image_offset + np.arange(L.tokens_per_image)
    caption, after = np.array([5, 6, 7, 8]), np.array([9, 10])
    x = np.concatenate([caption, [L.break_id], img, [L.break_id], after, [L.eos_id]])
    return x, (0, caption.size)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(document, min_size=1, max_size=4), prob=st.sampled_from([0.3, 1.0]), seed=st.integers(0, 2**31))
def test_caption_masking_keeps_every_invariant(docs, prob, seed):
    x = stream(docs)
    out = cm3_transform(x, L, np.random.default_rng(seed), CM3Config(caption_mask_prob=prob))
    check_spans(x, out.spans)
    restored = cm3_restore(out.tokens, L)
    np.testing.assert_array_equal(restored, x[:restored.size])
    assert out.tokens.size == x.size and out.spans.shape[0] <= L.num_sentinels


def test_caption_mask_prob_one_masks_the_caption_whole():
    """With probability 1 the caption before an image is always one whole span: the sample holds
    `<sentinel:i> <break> image` (the unconditional context of guidance); the text after the image is no caption."""
    x, caption = _caption_doc()
    for seed in range(50):
        out = cm3_transform(x, L, np.random.default_rng(seed), CM3Config(poisson_lambda=0.0, caption_mask_prob=1.0))
        assert out.spans.tolist() == [list(caption)]
        assert out.tokens[:2].tolist() == [L.sentinel_id(0), L.break_id]
        np.testing.assert_array_equal(cm3_restore(out.tokens, L), x[:x.size - 3])


def test_caption_mask_rate_and_zero_prob_is_unchanged():
    x, caption = _caption_doc()
    rng = np.random.default_rng(7)
    hits = [list(caption) in cm3_transform(x, L, rng, CM3Config(poisson_lambda=0.0, caption_mask_prob=0.25))
            .spans.tolist() for _ in range(2000)]
    assert abs(np.mean(hits) - 0.25) < 0.04
    for seed in range(30):  # prob 0 draws nothing extra: the same samples as before the option existed
        a = cm3_transform(x, L, np.random.default_rng(seed), CM3Config())
        b = cm3_transform(x, L, np.random.default_rng(seed), CM3Config(caption_mask_prob=0.0))
        np.testing.assert_array_equal(a.tokens, b.tokens)
    with pytest.raises(ValueError):
        CM3Config(caption_mask_prob=1.5)
