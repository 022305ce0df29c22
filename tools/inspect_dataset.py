#!/usr/bin/env python
"""Inspect a JAM indexed dataset: counts per modality, dtype, vocabulary layout, and one decoded document.

Usage: python tools/inspect_dataset.py PREFIX [--document N] [--tokenizer-model spm.model | hf_folder]

Reads PREFIX.idx/.bin through Megatron-Core's IndexedDataset (multimodal=True) and
the layout PREFIX.vocab.json (a shard PREFIX_00003 falls back to PREFIX.vocab.json),
which is checked against the index dtype. With --document, prints that document as
text with `<break>`, `<eos>` and `<image: N codes [...]>` placeholders; text needs
the layout's text tokenizer, sentencepiece or Hugging Face (otherwise token ids are printed).
"""

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

import numpy as np

from megatron_jam.data.documents import IMAGE, TEXT, render_document, split_segments
from megatron_jam.data.indexed_builder import MODE_IMAGE
from megatron_jam.data.integrity import check_dataset_files
from megatron_jam.data.text_tokenizer import add_tokenizer_args, check_layout, load_text_tokenizer
from megatron_jam.data.vocab import VocabLayout, VocabLayoutError, find_layout, load_layout


def get_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("prefix", help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    p.add_argument("--document", type=int, action="append", help="decode document N (repeatable)")
    add_tokenizer_args(p, required=False, help_suffix=" to decode text")
    p.add_argument("--json", action="store_true", help="print statistics as JSON")
    return p.parse_args(argv)


def dataset_stats(prefix: str, layout: VocabLayout) -> Dict[str, Any]:
    """Counts per modality from the index alone (token classes need one pass over .bin)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    header = check_dataset_files(prefix)  # .bin against .idx: a damaged pair is exit 2 naming the file
    ds = IndexedDataset(prefix, multimodal=header["has_modes"])
    lengths = ds.index.sequence_lengths.astype(np.int64)
    modes = ds.index.sequence_modes if header["has_modes"] else np.zeros(len(lengths), np.int8)
    image = modes == MODE_IMAGE
    tokens = np.memmap(prefix + ".bin", dtype=header["dtype"], mode="r")
    in_text = ~np.repeat(image, lengths)  # image sequences may hold format markers (Emu3): not counted here
    special = int(np.count_nonzero(layout.is_special(tokens) & in_text))
    if not layout.dedicated_eos:
        special += int(np.count_nonzero((tokens == layout.eos_id) & in_text))
    return {"prefix": prefix, "dtype": header["dtype"].name, "multimodal": header["has_modes"],
            "documents": int(len(ds.index.document_indices) - 1), "sequences": int(len(lengths)),
            "text_sequences": int(np.count_nonzero(~image)), "image_sequences": int(np.count_nonzero(image)),
            "tokens": int(lengths.sum()), "image_tokens": int(lengths[image].sum()),
            "text_tokens": int(lengths[~image].sum()) - special, "special_tokens": special,
            "max_token_id": int(tokens.max()) if tokens.size else None}


def document_segments(prefix: str, index: int, layout: VocabLayout) -> List:
    """Segments of document `index` (see megatron_jam.data.documents.split_segments)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, multimodal=True)
    n = len(ds.index.document_indices) - 1
    if not 0 <= index < n:
        raise IndexError(f"--document {index}: {prefix} has {n} documents")
    first, last = ds.index.document_indices[index], ds.index.document_indices[index + 1]
    seqs = [ds[int(i)] for i in range(first, last)]
    tokens = np.concatenate([s[0] for s in seqs]) if seqs else np.zeros(0, np.int64)
    return split_segments(tokens, [int(s[1]) for s in seqs], [len(s[0]) for s in seqs], layout)


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args(argv)
    try:
        layout = load_layout(args.prefix)
        stats = dataset_stats(args.prefix, layout)
        decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
        if args.tokenizer_model:
            text = load_text_tokenizer(args.tokenizer_model, args.tokenizer_type)
            check_layout(text, layout)
            decode = text.decode
    except (OSError, ValueError, VocabLayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if stats["max_token_id"] is not None and stats["max_token_id"] >= layout.vocab_size:
        print(f"error: token id {stats['max_token_id']} >= vocab_size {layout.vocab_size}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"stats": stats, "layout": layout.to_dict()}, indent=2))
    else:
        print_stats(stats, layout, find_layout(args.prefix))
    for index in args.document or []:
        try:
            segments = document_segments(args.prefix, index, layout)
        except IndexError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        images = sum(1 for s in segments if s[0] == IMAGE)
        texts = sum(1 for s in segments if s[0] == TEXT)
        print(f"\n--- document {index}: {texts} text segments, {images} images")
        print(render_document(segments, layout, decode))
    return 0


def print_stats(stats: Dict[str, Any], layout: VocabLayout, path: str) -> None:
    print(f"dataset          {stats['prefix']} (dtype {stats['dtype']}, multimodal {stats['multimodal']})")
    print(f"documents        {stats['documents']}")
    print(f"sequences        {stats['sequences']} ({stats['text_sequences']} text, "
          f"{stats['image_sequences']} image)")
    print(f"tokens           {stats['tokens']}: text {stats['text_tokens']}, image {stats['image_tokens']}, "
          f"special {stats['special_tokens']}")
    print(f"layout           {path}")
    print(f"  text ids       [0, {layout.text_vocab_size})  ({layout.text_tokenizer or 'unknown tokenizer'})")
    print(f"  <break> {layout.break_id}  <eos> {layout.eos_id}{'' if layout.dedicated_eos else ' (text tokenizer)'}"
          f"  <mask> {layout.mask_id}  <eos_span> {layout.eos_span_id}  "
          f"sentinels {layout.num_sentinels} from {layout.sentinel_id(0) if layout.num_sentinels else '-'}")
    if layout.native:  # the parent's own ids: say where codes and markers are, and what was appended
        print(f"  native layout  {layout.vocab_size} ids (parent {layout.parent_vocab_size}, appended "
              f"{sorted(layout.appended_specials) or 'none'}), image format {layout.image_format}, "
              f"markers {layout.image_markers}")
        print(f"  image ids      code 0 at {layout.image_offset}{'' if layout.image_code_offset >= 0 else ' (mapped)'}"
              f"  codebook {layout.codebook_size}, default grid {list(layout.image_grid)} "
              f"({layout.image_tokenizer or 'codes given'})")
        return
    print(f"  image ids      [{layout.image_offset}, {layout.vocab_size})  codebook {layout.codebook_size}, "
          f"{layout.tokens_per_image} tokens/image ({layout.image_tokenizer or 'codes given'})")


if __name__ == "__main__":
    sys.exit(main())
