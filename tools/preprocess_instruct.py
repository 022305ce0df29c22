#!/usr/bin/env python
"""Turn instruction-tuning JSON Lines (prompt/response pairs or role-tagged turns) into JAM shards.

Like tools/preprocess_interleaved.py (same tokenizers, same vocabulary layout, same
document layout), plus ``PREFIX.loss_mask.npy``: one uint8 per stored sequence, 1 on
response turns (loss), 0 on prompt turns. Turn boundaries are sequence boundaries, so
the shards stay plain Megatron multimodal datasets (see megatron_jam/data/instruct.py).
Input lines::

    {"prompt": "How to ...?", "response": [{"text": "The following answer ..."}, {"image": "a.png"}]}
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": [...]}]}

Instruction sets are small (LIMA: 1k, wikiHow: 3k documents), so this runs in one
process and writes one dataset. The paper's wikiHow curation (rating filter, at most N
images, "This article" -> "The following answer") are options, off by default
(megatron_jam/data/instruct_curation.py); what they filter is in the rejects, what they
change is counted in the stats. Writes PREFIX.bin/.idx, PREFIX.vocab.json,
PREFIX.loss_mask.npy, PREFIX.rejects.jsonl, PREFIX.stats.json, as one set when complete (an
existing set is refused unless ``--overwrite``; see megatron_jam/data/publish.py).
"""

import argparse
import collections
import json
import os
import sys
from typing import Any, List, Optional

import numpy as np

from megatron_jam.data.documents import (IMAGE, IMAGE_TOKENS, TEXT, BatchAccumulator, RejectedDocument, encode_texts,
                                         failure_names, image_codes_to_ids)
from megatron_jam.data.image_tokenizer import ImageError, VQImageTokenizer
from megatron_jam.data.indexed_builder import IndexedDatasetBuilder
from megatron_jam.data.instruct import DEFAULT_LOSS_ROLES, build_instruct_sequences, instruction_turns, loss_mask_path
from megatron_jam.data.instruct_curation import FILTER_REASONS, Curation, Curator, add_curation_args, curation_from_args
from megatron_jam.data.text_tokenizer import TextTokenizer, add_tokenizer_args
from megatron_jam.data.vocab import layout_path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from preprocess_interleaved import INPUT_ERRORS, RejectLog, open_inputs, reject, staged_run  # noqa: E402

from megatron_jam.utils.cli import add_debug_arg, run_cli  # noqa: E402


def get_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="JSONL files or glob patterns")
    p.add_argument("--output-prefix", required=True)
    add_tokenizer_args(p)
    p.add_argument("--image-tokenizer", help="folder of a transformers VQ model")
    p.add_argument("--codebook-size", type=int)
    p.add_argument("--tokens-per-image", type=int)
    p.add_argument("--num-sentinels", type=int, default=None, help="default: --vocab-layout's, else 32")
    p.add_argument("--dedicated-eos", action="store_true", default=None, help="default: as --vocab-layout")
    p.add_argument("--vocab-layout", help="layout JSON the output must match (e.g. the pretraining shards')")
    p.add_argument("--loss-roles", nargs="+", default=list(DEFAULT_LOSS_ROLES), help="roles whose turns get loss")
    p.add_argument("--max-reject-fraction", type=float, default=0.01,
                   help="fail when more records than this are bad input (curation filters do not count)")
    add_curation_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing set at --output-prefix (only once "
                   "the new set is complete)")
    add_debug_arg(p)
    return p.parse_args(argv)


class InstructEncoder:
    """Encodes one instruction record into (sequences, modes, loss flags, curation counts)."""

    def __init__(self, text: TextTokenizer, vq: Optional[VQImageTokenizer], layout: Any,
                 loss_roles: List[str], curation: Optional[Curation] = None) -> None:
        self.text, self.vq, self.layout, self.loss_roles = text, vq, layout, loss_roles
        self.curator = Curator(curation or Curation())

    def encode(self, record: Any, folder: str):
        turns = instruction_turns(record, self.loss_roles)
        self.curator.check_rating(record)
        turns, counts = self.curator.turns(turns)
        sequences, modes, loss = self.encode_turns(turns, folder)
        self.curator.check_length(sum(int(s.size) for s in sequences))
        return sequences, modes, loss, counts

    def encode_turns(self, turns, folder: str):
        segments = []
        for loss, items in turns:
            for i, (kind, value) in enumerate(items):
                if kind == TEXT:
                    ids = encode_texts(self.text, [(0, [value])])[0]  # a RejectedDocument if it cannot take it
                    if isinstance(ids, RejectedDocument):
                        raise ids
                    segments.append((loss, TEXT, ids[0]))
                elif kind == IMAGE_TOKENS:
                    segments.append((loss, IMAGE, image_codes_to_ids(value, self.layout, i)))
                else:
                    if self.vq is None:
                        raise RejectedDocument("no_image_tokenizer", "image files but no --image-tokenizer")
                    path = value if os.path.isabs(value) else os.path.join(folder, value)
                    codes = self.vq.encode_file_grids([path])[0]  # [h, w]: its own grid (Emu3)
                    segments.append((loss, IMAGE, image_codes_to_ids(codes, self.layout, i)))
        return build_instruct_sequences(segments, self.layout)


def encode_files(files: List[str], encoder: InstructEncoder, rejects: RejectLog):
    """(BatchAccumulator, per-sequence loss flags, curation counts) of every good record; bad and filtered
    ones go to `rejects`, anything else is an EncodingFailure naming the file and line."""
    acc, flags, curated = BatchAccumulator(encoder.layout), [], collections.Counter()
    for path in files:
        folder = os.path.dirname(os.path.abspath(path))
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                with failure_names(path, number):
                    try:
                        record = json.loads(raw)
                        sequences, modes, loss, counts = encoder.encode(record, folder)
                    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: deep nesting
                        rejects.write([reject(path, number, RejectedDocument("malformed_json", str(e)), raw)])
                        continue
                    except (RejectedDocument, ImageError) as e:
                        rejects.write([reject(path, number, e, raw)])
                        continue
                acc.add(sequences, modes)
                flags.extend(loss)
                curated.update(counts)
    return acc, flags, curated


def write_instruct(args, files: List[str], encoder: InstructEncoder, prefix: str, stage) -> dict:
    """Layout, dataset, loss flags and rejects under the staged `prefix`; returns the summary."""
    encoder.layout.to_json(layout_path(prefix))
    rejects = RejectLog(prefix)
    try:
        acc, flags, curated = encode_files(files, encoder, rejects)
    finally:
        rejects.close()
    batch = acc.batch()
    builder = IndexedDatasetBuilder(prefix + ".bin", encoder.layout.dtype, multimodal=True)
    builder.add_batch(batch)
    builder.finalize(prefix + ".idx")
    np.save(loss_mask_path(prefix), np.asarray(flags, dtype=np.uint8))
    loss_tokens = int(np.asarray(flags, dtype=np.int64) @ batch.sequence_lengths) if flags else 0
    return {**acc.counts, "tokens": batch.num_tokens, "loss_tokens": loss_tokens, "skipped": rejects.count,
            "skipped_by_reason": rejects.by_reason, "curation": curation_summary(curated, rejects.by_reason),
            "inputs": files, "outputs": [args.output_prefix],
            "rejects_file": stage.final(rejects.path)}


def curation_summary(curated: collections.Counter, by_reason: dict) -> dict:
    """What the curation options did: records filtered (by reason, also in the rejects) and changes made."""
    filtered = {r: n for r, n in by_reason.items() if r in FILTER_REASONS}
    return {"filtered": sum(filtered.values()), "filtered_by_reason": filtered, **dict(sorted(curated.items()))}


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; a bad input is one line on stderr and exit code 2 (megatron_jam.utils.cli)."""
    return run_cli(_main, argv, extra_errors=INPUT_ERRORS)


def _main(argv: List[str]) -> int:
    args = get_args(argv)
    files, text, vq, layout = open_inputs(args)
    encoder = InstructEncoder(text, vq, layout, args.loss_roles, curation_from_args(args))
    summary = staged_run(args, lambda prefix, stage: write_instruct(args, files, encoder, prefix, stage))
    if summary is None:
        return 2
    skipped = summary["skipped"]
    print(f"documents        {summary['documents']}")
    print(f"tokens           {summary['tokens']} ({summary['loss_tokens']} with loss)")
    print(f"skipped          {skipped} {json.dumps(summary['skipped_by_reason'], sort_keys=True)}")
    print(f"curation         {json.dumps(summary['curation'], sort_keys=True)}")
    print(f"outputs          {args.output_prefix}")
    skipped -= summary["curation"]["filtered"]  # wanted: only bad input counts against --max-reject-fraction
    seen = summary["documents"] + skipped
    if seen and skipped / seen > args.max_reject_fraction:
        print(f"error: {skipped} of {seen} documents rejected, more than --max-reject-fraction "
              f"{args.max_reject_fraction}; see {summary['rejects_file']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
