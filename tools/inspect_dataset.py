#!/usr/bin/env python
"""Inspect a JAM indexed dataset: counts per modality, dtype, vocabulary layout, and one decoded document.

Usage: python tools/inspect_dataset.py PREFIX [--document N] [--tokenizer-model spm.model | hf_folder]

Reads PREFIX.idx/.bin in Megatron-Core's IndexedDataset format (with numpy: no Megatron-Core import) and
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
from megatron_jam.data.integrity import index_arrays
from megatron_jam.data.text_tokenizer import add_tokenizer_args, check_layout, load_text_tokenizer
from megatron_jam.data.vocab import VocabLayout, find_layout, load_layout
from megatron_jam.utils.cli import add_debug_arg, run_cli


def get_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("prefix", help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    p.add_argument("--document", type=int, action="append", help="decode document N (repeatable)")
    add_tokenizer_args(p, required=False, help_suffix=" to decode text (default: the one PREFIX.stats.json "
                                                      "records, when it is the layout's)")
    p.add_argument("--json", action="store_true", help="print statistics as JSON")
    add_debug_arg(p)
    return p.parse_args(argv)


def dataset_stats(prefix: str, layout: VocabLayout) -> Dict[str, Any]:
    """Counts per modality from the index alone (token classes need one pass over .bin)."""
    index = index_arrays(prefix)  # .bin against .idx: a damaged pair is exit 2 naming the file
    header, lengths, modes = index["header"], index["lengths"].astype(np.int64), index["modes"]
    image = modes == MODE_IMAGE
    tokens = np.memmap(prefix + ".bin", dtype=header["dtype"], mode="r")
    in_text = ~np.repeat(image, lengths)  # image sequences may hold format markers (Emu3): not counted here
    special = int(np.count_nonzero(layout.is_special(tokens) & in_text))
    if not layout.dedicated_eos:
        special += int(np.count_nonzero((tokens == layout.eos_id) & in_text))
    return {"prefix": prefix, "dtype": header["dtype"].name, "multimodal": header["has_modes"],
            "documents": int(len(index["documents"]) - 1), "sequences": int(len(lengths)),
            "text_sequences": int(np.count_nonzero(~image)), "image_sequences": int(np.count_nonzero(image)),
            "tokens": int(lengths.sum()), "image_tokens": int(lengths[image].sum()),
            "text_tokens": int(lengths[~image].sum()) - special, "special_tokens": special,
            "max_token_id": int(tokens.max()) if tokens.size else None}


def document_segments(prefix: str, index: int, layout: VocabLayout) -> List:
    """Segments of document `index` (see megatron_jam.data.documents.split_segments)."""
    arrays = index_arrays(prefix)
    docs, lengths, modes = arrays["documents"], arrays["lengths"], arrays["modes"]
    n = len(docs) - 1
    if not 0 <= index < n:
        raise IndexError(f"--document {index}: {prefix} has {n} documents")
    first, last = int(docs[index]), int(docs[index + 1])
    dtype = arrays["header"]["dtype"]
    start = int(arrays["pointers"][first]) // dtype.itemsize if last > first else 0
    tokens = np.array(np.memmap(prefix + ".bin", dtype=dtype, mode="r")[start:start + int(lengths[first:last].sum())],
                      dtype=np.int64)
    return split_segments(tokens, [int(m) for m in modes[first:last]], [int(x) for x in lengths[first:last]], layout)


def recorded_tokenizer(prefix: str, layout: VocabLayout) -> Optional[str]:
    """The text tokenizer PREFIX.stats.json records (tools/preprocess_interleaved.py), when it still exists
    and is the layout's: the default of --tokenizer-model."""
    from megatron_jam.data.run_files import matching_tokenizer, recorded_tokenizers

    return matching_tokenizer([recorded_tokenizers(prefix).get("tokenizer_model")], layout)


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; a bad input is one line on stderr and exit code 2 (megatron_jam.utils.cli)."""
    return run_cli(_main, argv, extra_errors=(OSError, ValueError))


def _main(argv: List[str]) -> int:
    args = get_args(argv)
    layout = load_layout(args.prefix)
    stats = dataset_stats(args.prefix, layout)
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    if args.tokenizer_model:
        text = load_text_tokenizer(args.tokenizer_model, args.tokenizer_type)
        check_layout(text, layout)
        decode = text.decode
    elif recorded := recorded_tokenizer(args.prefix, layout):  # preprocessing's, if still the layout's
        decode = load_text_tokenizer(recorded).decode
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
