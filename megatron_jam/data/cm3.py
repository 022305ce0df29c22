"""The CM3 causally-masked objective as a pure function on numpy token arrays.

Why a module of its own: the dataset applies it per sample, the tests check
it as a property of random documents, and a user inspecting a sample wants to
undo it (`cm3_restore`). Nothing here touches torch or files.

What it does (metaseq's `CausalMaskedDocumentToSequenceDataset`, with
CM3leon's modality rule; DESIGN.md section 4, paper section 3.1):

1. draw n ~ Poisson(lambda), clamped to `max_spans` and the sentinel count;
   n = 0 leaves the sample a plain causal-LM sample;
2. place n non-overlapping spans with uniformly drawn end points (2n distinct
   cut points over the sample, sorted, paired);
3. snap them to the modality rule: a span never contains a separator
   (`<break>`, `<eos>` = document boundary, any special id), is clipped to the
   segment its start falls in, and a span that touches an image covers exactly
   that whole image (a partial image at the edge of the window is never
   masked). What an image is comes from the layout's image format
   (`megatron_jam.data.image_format`): in Emu3's format the whole structure,
   `<|image start|>` to `<|image end|>` with its size text and end-of-line
   tokens, and an image of any grid size counts as complete when well formed.
   Spans that collapse or collide are redrawn (up to `max_attempts` times;
   then fewer spans are kept);
   With `caption_mask_prob` > 0, each caption (a text segment directly
   followed by `<break>` and a complete image) is also masked whole with that
   probability, as one more span (within the same cap): this teaches
   `<sentinel:i> <break> image`, the unconditional context of classifier-free
   guidance (`docs/generation.md`);
4. replace span i (in position order) by `<sentinel:i>` in place and append
   `<sentinel:i>` + span + `<eos_span>` after the sample.

Length rule (differs from metaseq on purpose): metaseq transforms the whole
window and then cuts the result to the sample length, which drops the tail of
the last appended span (the model then learns spans that end early) and makes
the sample impossible to invert. Here the raw window is cut *before* the
transform to `max_length - 3n` tokens, so the output has exactly `max_length`
tokens (3 extra per span: two sentinels and one `<eos_span>`), every appended
span is complete, and `cm3_restore(output)` gives back the raw prefix exactly.
The cost is 3n raw tokens per sample left unused (n averages lambda = 1).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import numpy as np

from megatron_jam.data.vocab import VocabLayout


@dataclasses.dataclass(frozen=True, kw_only=True)
class CM3Config:
    """Knobs of the CM3 objective."""

    enabled: bool = True
    """False: plain causal LM (ablations, instruction tuning); the sample passes through unchanged."""
    poisson_lambda: float = 1.0
    """Mean of the Poisson distribution of the number of masked spans per sample."""
    max_spans: Optional[int] = None
    """Upper clamp of the span count; None = the layout's sentinel count."""
    sentinel_loss_weight: float = 1.0
    """Loss weight of positions whose label is a `<sentinel:i>` (in place and in the appended part)."""
    max_attempts: int = 8
    """Redraws of the span placement when spans collapse (only separators) or collide (same image)."""
    caption_mask_prob: float = 0.0
    """Probability that a text segment directly followed by `<break>` and a complete image (its caption)
    is masked whole, as one more CM3 span. The sample then holds `<sentinel:i> <break> image`: the model
    learns images without their caption, which is the unconditional context of classifier-free guidance
    (`megatron_jam.inference.decoding`). 0 = plain CM3 (a caption is masked whole only by chance)."""

    def __post_init__(self) -> None:
        if self.poisson_lambda < 0:
            raise ValueError(f"CM3Config.poisson_lambda must be >= 0, got {self.poisson_lambda}")
        if self.max_spans is not None and self.max_spans < 0:
            raise ValueError(f"CM3Config.max_spans must be >= 0, got {self.max_spans}")
        if self.max_attempts < 1:
            raise ValueError(f"CM3Config.max_attempts must be >= 1, got {self.max_attempts}")
        if not 0.0 <= self.caption_mask_prob <= 1.0:
            raise ValueError(f"CM3Config.caption_mask_prob must be in [0, 1], got {self.caption_mask_prob}")
        if self.sentinel_loss_weight < 0:
            raise ValueError(f"CM3Config.sentinel_loss_weight must be >= 0, got {self.sentinel_loss_weight}")


@dataclasses.dataclass
class CM3Sample:
    """Output of `cm3_transform`."""

    tokens: np.ndarray
    """Transformed token ids (int64), at most `max_length` of them."""
    source: np.ndarray
    """Per output token: index into the input it was copied from, or -1 for an inserted sentinel /
    `<eos_span>`. Gathers any per-token attribute (e.g. instruction loss weights) along."""
    spans: np.ndarray
    """[n, 2] int64 half-open spans (start, end) in input coordinates, in position order."""
    num_drawn: int
    """Span count drawn from the Poisson distribution (after clamping); len(spans) <= num_drawn."""


def span_cap(config: CM3Config, layout: VocabLayout) -> int:
    """Most spans a sample may hold: max_spans, clamped to the sentinel count."""
    return layout.num_sentinels if config.max_spans is None else min(config.max_spans, layout.num_sentinels)


def draw_num_spans(rng: np.random.Generator, config: CM3Config, layout: VocabLayout) -> int:
    """n ~ Poisson(lambda) clamped to max_spans and the sentinel count (0 when the objective is off)."""
    if not config.enabled or config.poisson_lambda == 0:
        return 0
    return int(min(rng.poisson(config.poisson_lambda), span_cap(config, layout)))


def caption_spans(tokens: np.ndarray, layout: VocabLayout, rng: np.random.Generator, prob: float) -> np.ndarray:
    """Captions chosen for whole masking ([k, 2], position order): each text segment directly followed by
    `<break>` and a complete image is kept with probability `prob`."""
    tokens = np.asarray(tokens)
    _, _, bounds, seg_image = segment_table(tokens, layout)
    if bounds.shape[0] < 2:
        return np.zeros((0, 2), dtype=np.int64)
    text, image = seg_image[:-1] == 0, seg_image[1:] == 1
    if layout.format.uses_break:  # text <break> image
        gap = bounds[1:, 0] - bounds[:-1, 1] == 1
        ends = np.minimum(bounds[:-1, 1], tokens.size - 1)
        adjacent = gap & (tokens[ends] == layout.break_id)
    else:  # the image's own opening marker follows the text directly
        adjacent = bounds[1:, 0] == bounds[:-1, 1]
    candidates = bounds[:-1][text & image & adjacent]
    keep = rng.random(candidates.shape[0]) < prob
    return candidates[keep].astype(np.int64)


def _without_overlaps(spans: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """Rows of `spans` that overlap no row of `taken` (both [k, 2] half-open)."""
    if spans.shape[0] == 0 or taken.shape[0] == 0:
        return spans
    overlap = (spans[:, None, 0] < taken[None, :, 1]) & (taken[None, :, 0] < spans[:, None, 1])
    return spans[~overlap.any(axis=1)]


def segment_table(tokens: np.ndarray, layout: VocabLayout, context: Optional[np.ndarray] = None
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Maskable segments of `tokens` (vectorised).

    Returns (next_ok, seg_of, seg_bounds, seg_maskable_image):
    next_ok[t] (t in [0, m]) is the first non-separator index >= t (m if none);
    seg_of[t] the segment id of token t (-1 for separators); seg_bounds [S, 2]
    the half-open bounds of each segment; seg_image[s] is 0 for a text
    segment, 1 for a complete image, -1 for a partial image (not maskable).

    In the `ours` image format an image is a run of image codes; in formats with
    markers (`emu3`) it is the whole structure the format finds (markers, size
    text, codes, end-of-line tokens), one segment that spans always cover whole.
    `context` (structured formats only) is the window `tokens` was cut from: images
    are found in it, so the size text of an image cut by `tokens`' end is never
    mistaken for text.
    """
    tokens = np.asarray(tokens)
    m = tokens.size
    sep = layout.is_special(tokens) | (tokens == layout.eos_id) | (tokens < 0) | (tokens >= layout.vocab_size)
    if layout.format.name != "ours":
        return _structured_segment_table(tokens, sep, layout, tokens if context is None else context)
    img = layout.is_image(tokens)
    prev_sep = np.concatenate([[True], sep[:-1]])
    next_sep = np.concatenate([sep[1:], [True]])
    prev_img = np.concatenate([[False], img[:-1]])
    next_img = np.concatenate([img[1:], [False]])
    starts = np.flatnonzero(~sep & (prev_sep | (img != prev_img)))
    ends = np.flatnonzero(~sep & (next_sep | (img != next_img))) + 1
    seg_of = np.cumsum(np.isin(np.arange(m), starts)) - 1
    seg_of[sep] = -1
    ok_idx = np.where(sep, m, np.arange(m))
    next_ok = np.minimum.accumulate(np.concatenate([ok_idx, [m]])[::-1])[::-1]
    seg_image = np.zeros(starts.size, dtype=np.int64)
    is_img_seg = img[starts] if starts.size else np.zeros(0, dtype=bool)
    seg_image[is_img_seg] = np.where(ends[is_img_seg] - starts[is_img_seg] == layout.tokens_per_image, 1, -1)
    return next_ok, seg_of, np.stack([starts, ends], axis=1), seg_image


def _structured_segment_table(tokens: np.ndarray, sep: np.ndarray, layout: VocabLayout, context: np.ndarray
                              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`segment_table` for image formats whose images are marker-delimited structures."""
    m = tokens.size
    img_bounds, complete = layout.format.image_spans(context)
    keep = img_bounds[:, 0] < m  # images found in the context, clipped to `tokens`: a clipped one is partial
    img_bounds, complete = img_bounds[keep], complete[keep] & (img_bounds[keep, 1] <= m)
    img_bounds[:, 1] = np.minimum(img_bounds[:, 1], m)
    in_img = np.zeros(m, dtype=bool)
    for a, b in img_bounds.tolist():
        in_img[a:b] = True
    sep = sep & ~in_img
    text = ~sep & ~in_img
    prev_text = np.concatenate([[False], text[:-1]])
    next_text = np.concatenate([text[1:], [False]])
    starts = np.concatenate([np.flatnonzero(text & ~prev_text), img_bounds[:, 0]]).astype(np.int64)
    ends = np.concatenate([np.flatnonzero(text & ~next_text) + 1, img_bounds[:, 1]]).astype(np.int64)
    kinds = np.concatenate([np.zeros(starts.size - complete.size, dtype=np.int64), np.where(complete, 1, -1)])
    order = np.argsort(starts, kind="stable")
    bounds, seg_image = np.stack([starts[order], ends[order]], axis=1), kinds[order]
    seg_of = np.full(m, -1, dtype=np.int64)
    for k, (a, b) in enumerate(bounds.tolist()):
        seg_of[a:b] = k
    ok_idx = np.where(sep, m, np.arange(m))
    next_ok = np.minimum.accumulate(np.concatenate([ok_idx, [m]])[::-1])[::-1]
    return next_ok, seg_of, bounds.reshape(-1, 2), seg_image


def place_spans(tokens: np.ndarray, n: int, rng: np.random.Generator, layout: VocabLayout,
                max_attempts: int = 8, context: Optional[np.ndarray] = None) -> np.ndarray:
    """Up to n non-overlapping spans ([k, 2], position order) that obey the modality rule (`context`: see
    `segment_table`)."""
    m = int(np.asarray(tokens).size)
    if n == 0 or m == 0:
        return np.zeros((0, 2), dtype=np.int64)
    next_ok, seg_of, bounds, seg_image = segment_table(tokens, layout, context)
    if bounds.shape[0] == 0 or not ((seg_image == 0).any() or (seg_image == 1).any()):
        return np.zeros((0, 2), dtype=np.int64)
    n = min(n, (m + 1) // 2)
    best = np.zeros((0, 2), dtype=np.int64)
    for _ in range(max_attempts):
        points = np.sort(rng.choice(m + 1, size=2 * n, replace=False))
        spans = _snap(points[0::2], points[1::2], next_ok, seg_of, bounds, seg_image, m)
        if spans.shape[0] > best.shape[0]:
            best = spans
        if best.shape[0] == n:
            break
    return best


def _snap(s: np.ndarray, e: np.ndarray, next_ok: np.ndarray, seg_of: np.ndarray, bounds: np.ndarray,
          seg_image: np.ndarray, m: int) -> np.ndarray:
    """Clip drawn spans to their start's segment, widen image hits to the image, drop collisions."""
    start = next_ok[s]
    inside = start < m
    seg = np.where(inside, seg_of[np.minimum(start, m - 1)], 0)
    seg_start, seg_end, kind = bounds[seg, 0], bounds[seg, 1], seg_image[seg]
    end = np.where(kind == 1, seg_end, np.minimum(e, seg_end))
    start = np.where(kind == 1, seg_start, start)
    valid = inside & (kind >= 0) & (start < end)
    spans = np.stack([start[valid], end[valid]], axis=1).astype(np.int64)
    if spans.shape[0] > 1:  # two draws that hit the same image collide: keep the first
        keep = np.concatenate([[True], spans[1:, 0] >= spans[:-1, 1]])
        spans = spans[keep]
    return spans


def assemble(num_input: int, spans: np.ndarray, layout: VocabLayout) -> np.ndarray:
    """Output layout as one int64 array: index >= 0 copies input[index]; -1 - id inserts token `id`."""
    parts: List[np.ndarray] = []
    tail: List[np.ndarray] = []
    prev = 0
    for i, (s, e) in enumerate(spans.tolist()):
        sentinel = np.array([-1 - layout.sentinel_id(i)], dtype=np.int64)
        parts += [np.arange(prev, s, dtype=np.int64), sentinel]
        tail += [sentinel, np.arange(s, e, dtype=np.int64), np.array([-1 - layout.eos_span_id], dtype=np.int64)]
        prev = e
    parts.append(np.arange(prev, num_input, dtype=np.int64))
    return np.concatenate(parts + tail)


def cm3_transform(tokens: np.ndarray, layout: VocabLayout, rng: np.random.Generator, config: CM3Config,
                  max_length: Optional[int] = None) -> CM3Sample:
    """Apply the CM3 objective to one sample (see the module docstring for the rules).

    Args:
        tokens: raw token ids of the sample (1-D); padding must not be included.
        layout: the vocabulary layout (separators, image range, sentinel ids).
        rng: the sample's generator (the dataset seeds it from (seed, dataset, sample index)).
        config: the objective's knobs.
        max_length: output length cap; default len(tokens). The raw input is cut to
            `max_length - 3 * num_spans` before masking, so the output never exceeds it.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    max_length = tokens.size if max_length is None else int(max_length)
    n = draw_num_spans(rng, config, layout)
    forced = np.zeros((0, 2), dtype=np.int64)
    if config.enabled and config.caption_mask_prob > 0:
        forced = caption_spans(tokens[:max_length], layout, rng, config.caption_mask_prob)
        n = min(n + forced.shape[0], span_cap(config, layout))
    n_fit = min(n, max(0, (max_length - 1) // 4))  # keep >= 1 raw token per span + its 3 extra tokens
    budget = min(tokens.size, max_length - 3 * n_fit)
    forced = forced[forced[:, 1] <= budget][:n_fit]
    spans = place_spans(tokens[:budget], n_fit - forced.shape[0], rng, layout, config.max_attempts,
                        context=tokens[:max_length])
    if forced.shape[0]:
        spans = np.concatenate([forced, _without_overlaps(spans, forced)])
        spans = spans[np.argsort(spans[:, 0], kind="stable")]
    used = min(tokens.size, max_length - 3 * spans.shape[0])
    index = assemble(used, spans, layout)
    out = np.where(index >= 0, tokens[np.maximum(index, 0)] if tokens.size else 0, -1 - index)
    return CM3Sample(tokens=out.astype(np.int64), source=np.where(index >= 0, index, -1), spans=spans,
                     num_drawn=n)


def cm3_restore(tokens: np.ndarray, layout: VocabLayout) -> np.ndarray:
    """Invert `cm3_transform`: the raw tokens the sample was made from (trailing padding excluded).

    Raw data never contains sentinel or `<eos_span>` ids, so the masked part
    ends at the second `<sentinel:0>`; each appended group is
    `<sentinel:i> span <eos_span>`.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    s0 = layout.sentinel_id(0) if layout.num_sentinels else -2
    hits = np.flatnonzero(tokens == s0)
    if hits.size < 2:
        return tokens.copy()
    prefix, tail = tokens[:hits[1]], tokens[hits[1]:]
    ends = np.flatnonzero(tail == layout.eos_span_id)
    spans, start = {}, 0
    for end in ends.tolist():
        spans[int(tail[start])] = tail[start + 1:end]
        start = end + 1
    is_sentinel = np.isin(prefix, list(spans))
    pieces, prev = [], 0
    for pos in np.flatnonzero(is_sentinel).tolist():
        pieces += [prefix[prev:pos], spans[int(prefix[pos])]]
        prev = pos + 1
    pieces.append(prefix[prev:])
    return np.concatenate(pieces)
