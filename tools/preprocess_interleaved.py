#!/usr/bin/env python
"""Turn interleaved (text + image) and text-only JSON Lines documents into Megatron indexed shards.

Input lines are either ``{"id": ..., "content": [{"text": ...}, {"image": "a.png"},
{"image_tokens": [...]}, ...]}`` (image paths relative to the JSONL file's folder or
absolute) or text-only records whose text is under ``--json-keys`` (default ``text``).
Text goes through a sentencepiece model or a Hugging Face ``tokenizer.json`` (``--tokenizer-model``,
``--tokenizer-type``; see :mod:`megatron_jam.data.text_tokenizer`), images through a VQ model from `transformers`
(``--image-tokenizer``), and the token stream of each document follows the CM3leon
layout described in :mod:`megatron_jam.data.documents`. Writes::

    PREFIX.bin / PREFIX.idx            (or PREFIX_00000.bin ... with --shard-size)
    PREFIX.vocab.json                  vocabulary layout, checked by every reader
    PREFIX.rejects.jsonl               skipped documents: file, line, reason, detail
    PREFIX.stats.json                  the summary also printed at the end

Bad documents are skipped and recorded; the run fails (exit 1) only when the rejected
fraction exceeds ``--max-reject-fraction``. Shards appear only when complete. See
tools/README.md for the exact commands.
"""

import argparse
import glob
import json
import math
import multiprocessing
import os
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from megatron_jam.data.documents import (IMAGE, IMAGE_TOKENS, TEXT, BatchAccumulator, RejectedDocument,
                                         build_sequences, content_items, image_codes_to_ids)
from megatron_jam.data.image_tokenizer import ImageError, VQImageTokenizer, load_image
from megatron_jam.data.indexed_builder import DocumentBatch, IndexedDatasetBuilder, merge_datasets
from megatron_jam.data.text_tokenizer import TextTokenizer, add_tokenizer_args, load_text_tokenizer
from megatron_jam.data.vocab import VocabLayout, VocabLayoutError, layout_path
from megatron_jam.utils.logging import get_logger

logger = get_logger("megatron_jam.tools.preprocess_interleaved")
VQ_BATCH = 32  # images per VQ call: 32 images of 512 px are 100 MB of fp32 pixels
COUNTERS = ("documents", "text_tokens", "image_tokens", "images", "special_tokens")


def get_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, help="JSONL files or glob patterns")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="text keys of text-only records")
    g = p.add_argument_group("tokenizers")
    add_tokenizer_args(g)
    g.add_argument("--image-tokenizer", help="folder of a transformers VQ model (save_pretrained)")
    g.add_argument("--codebook-size", type=int, help="codebook size when image_tokens are given (no VQ model)")
    g.add_argument("--tokens-per-image", type=int, help="codes per image when image_tokens are given")
    g.add_argument("--num-sentinels", type=int, default=32, help="CM3 sentinel tokens in the layout")
    g.add_argument("--dedicated-eos", action="store_true",
                   help="give <eos> its own id even if the text tokenizer has one")
    g.add_argument("--vocab-layout", help="existing layout JSON the output must match")
    g.add_argument("--vocab-layout-kind", choices=("appended", "native", "mixed"), default="appended",
                   help="appended: our specials and image codes after the text ids (default); native: keep the "
                        "image parent's own ids (an Emu3 tokenizer folder as --tokenizer-model: codes, image "
                        "markers and the Emu3 image format; see docs/data.md); mixed: text ids of the LLM's "
                        "--tokenizer-model, the image parent's image part (--image-parent-tokenizer) re-indexed "
                        "after them, for JAM-Cross of parents with different tokenizers (docs/real_parents.md)")
    g.add_argument("--image-parent-tokenizer",
                   help="mixed: the image parent's Hugging Face folder (Emu3: tokenizer.json, config.json)")
    g.add_argument("--image-grid", type=int, nargs=2, metavar=("H", "W"),
                   help="native and mixed: default latent grid of an image (flat image_tokens, VQ codes, generation); "
                        "default: the square of --tokens-per-image or the VQ's, else Emu3's 90 90")
    g.add_argument("--native-specials", choices=("reserved", "appended"), default=None,
                   help="native and mixed: CM3 sentinels, <eos_span> and <mask> on the parent's reserved <|extra_N|> "
                        "tokens (default), or as rows appended after its vocabulary")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True)
    g.add_argument("--shard-size", type=int, default=0, help="documents (or tokens) per shard; 0 = one output")
    g.add_argument("--shard-unit", choices=("documents", "tokens"), default="documents")
    g.add_argument("--merge", action="store_true", help="merge the shards into PREFIX.bin/.idx at the end")
    g.add_argument("--durable", action="store_true", help="fsync shards before publishing them")
    g.add_argument("--max-reject-fraction", type=float, default=0.01)
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (1 = in-process)")
    g.add_argument("--chunk-size", type=int, default=256, help="lines per worker task")
    g.add_argument("--log-interval", type=int, default=10000, help="log progress every N documents")
    g.add_argument("--no-progress-bar", action="store_true")
    args = p.parse_args(argv)
    if args.shard_size < 0 or args.workers < 1 or args.chunk_size < 1 or not 0 <= args.max_reject_fraction <= 1:
        p.error("--shard-size >= 0, --workers >= 1, --chunk-size >= 1, 0 <= --max-reject-fraction <= 1")
    return args


# --------------------------------------------------------------------------- layout
def build_layout(args: argparse.Namespace, text: TextTokenizer, vq: Optional[VQImageTokenizer]) -> VocabLayout:
    """The vocabulary layout from the tokenizers and flags (and checked against --vocab-layout)."""
    reference = VocabLayout.from_json(args.vocab_layout) if args.vocab_layout else None
    kind = getattr(args, "vocab_layout_kind", "appended")
    if kind == "mixed" or (reference is not None and reference.mixed):
        return build_mixed_layout(args, text, vq, reference)
    if kind == "native" or (reference is not None and reference.native):
        layout = build_native_layout(args, text, vq, reference)
        if reference is not None:
            layout.check_compatible(reference, "this run", args.vocab_layout)
        return layout
    codebook, per_image = args.codebook_size, args.tokens_per_image
    if vq is not None and vq.own_size:
        raise ValueError(f"--image-tokenizer {args.image_tokenizer} encodes each image at its own size (Emu3), "
                         "which only a format that writes the grid holds: use --vocab-layout-kind native")
    if vq is not None:
        for flag, given, actual in (("--codebook-size", codebook, vq.codebook_size),
                                    ("--tokens-per-image", per_image, vq.tokens_per_image)):
            if given is not None and given != actual:
                raise ValueError(f"{flag} {given} disagrees with --image-tokenizer ({actual})")
        codebook, per_image = vq.codebook_size, vq.tokens_per_image
    if (codebook is None or per_image is None) and args.vocab_layout is None:
        raise ValueError("give --image-tokenizer, or --codebook-size and --tokens-per-image, or --vocab-layout")
    if codebook is None or per_image is None:
        reference = VocabLayout.from_json(args.vocab_layout)
        codebook, per_image = reference.codebook_size, reference.tokens_per_image
    eos = None if args.dedicated_eos else text.eos_id
    layout = VocabLayout(text_vocab_size=text.vocab_size, codebook_size=codebook, tokens_per_image=per_image,
                         num_sentinels=args.num_sentinels, text_eos_id=eos, text_tokenizer=text.identity,
                         image_tokenizer=vq.identity if vq is not None else "")
    if args.vocab_layout:
        layout.check_compatible(VocabLayout.from_json(args.vocab_layout), "this run", args.vocab_layout)
    return layout


def build_native_layout(args: argparse.Namespace, text: TextTokenizer, vq: Optional[VQImageTokenizer],
                        reference: Optional[VocabLayout] = None) -> VocabLayout:
    """--vocab-layout-kind native (or a native --vocab-layout, e.g. for tools/preprocess_instruct.py): the
    image parent's own ids, from its tokenizer folder (Emu3)."""
    from megatron_jam.data.native_vocab import EMU3_DEFAULT_GRID, emu3_layout

    if text.type != "HuggingFaceTokenizer":
        raise ValueError(f"--vocab-layout-kind native needs the parent's Hugging Face tokenizer folder as "
                         f"--tokenizer-model, got {text.type} {args.tokenizer_model}")
    if args.dedicated_eos:
        raise ValueError("--dedicated-eos applies to --vocab-layout-kind appended (native <eos> is the parent's)")
    own_size = vq is not None and vq.own_size  # each image has its own grid: the VQ sets no default
    per_image = vq.tokens_per_image if vq is not None and not own_size else args.tokens_per_image
    side = math.isqrt(per_image) if per_image else 0
    grid = getattr(args, "image_grid", None) or (reference.image_grid if reference is not None else None) or (
        (side, side) if per_image and side * side == per_image else EMU3_DEFAULT_GRID)
    specials = getattr(args, "native_specials", None) or (
        "appended" if reference is not None and reference.appended_specials else "reserved")
    layout = emu3_layout(args.tokenizer_model, num_sentinels=args.num_sentinels, image_grid=grid,
                         specials=specials, image_tokenizer=vq.identity if vq is not None else "")
    if vq is not None and vq.codebook_size != layout.codebook_size:
        raise ValueError(f"--image-tokenizer {args.image_tokenizer} has {vq.codebook_size} codes but the tokenizer "
                         f"{args.tokenizer_model} has {layout.codebook_size} image code tokens: not this parent's VQ")
    for flag, given in (("--codebook-size", vq.codebook_size if vq is not None else args.codebook_size),
                        ("--tokens-per-image", per_image)):
        actual = layout.codebook_size if flag == "--codebook-size" else layout.tokens_per_image
        if given is not None and given != actual:
            raise ValueError(f"{flag} {given} (or the VQ model's) disagrees with the native layout's {actual} "
                             f"(tokenizer {args.tokenizer_model}, --image-grid {list(grid)})")
    return layout


def build_mixed_layout(args: argparse.Namespace, text: TextTokenizer, vq: Optional[VQImageTokenizer],
                       reference: Optional[VocabLayout] = None) -> VocabLayout:
    """--vocab-layout-kind mixed (or a mixed --vocab-layout): the LLM's text ids, the image parent's image part
    after them. A mixed --vocab-layout alone is followed as is (its text tokenizer must be --tokenizer-model)."""
    from megatron_jam.data.mixed_vocab import mixed_layout
    from megatron_jam.data.text_tokenizer import check_layout

    parent = getattr(args, "image_parent_tokenizer", None)
    if args.dedicated_eos:
        raise ValueError("--dedicated-eos applies to --vocab-layout-kind appended (mixed <eos> is the LLM's)")
    if parent is None and reference is None:
        raise ValueError("--vocab-layout-kind mixed needs --image-parent-tokenizer (the image parent's folder)")
    own_size = vq is not None and getattr(vq, "own_size", False)  # each image has its own grid (Emu3's VQ)
    per_image = vq.tokens_per_image if vq is not None and not own_size else args.tokens_per_image
    if parent is None:
        check_layout(text, reference)
        layout = reference
    else:
        side = math.isqrt(per_image) if per_image else 0
        grid = getattr(args, "image_grid", None) or (reference.image_grid if reference is not None else None) or (
            (side, side) if per_image and side * side == per_image else None)
        specials = getattr(args, "native_specials", None) or (
            "appended" if reference is not None and reference.appended_specials else "reserved")
        layout = mixed_layout(args.tokenizer_model, parent, llm_tokenizer_type=text.type,
                              num_sentinels=args.num_sentinels, image_grid=grid, specials=specials,
                              image_tokenizer=vq.identity if vq is not None else "")
        if reference is not None:
            layout.check_compatible(reference, "this run", args.vocab_layout)
    for flag, given, actual in (("--codebook-size", vq.codebook_size if vq is not None else args.codebook_size,
                                 layout.codebook_size), ("--tokens-per-image", per_image, layout.tokens_per_image)):
        if given is not None and given != actual:
            raise ValueError(f"{flag} {given} (or the VQ model's) disagrees with the mixed layout's {actual} "
                             f"(--image-parent-tokenizer {parent or reference.image_parent_tokenizer})")
    return layout


# --------------------------------------------------------------------------- workers
class Encoder:
    """Per-process tokenizers; `encode_chunk` turns raw JSONL lines into a DocumentBatch."""

    def __init__(self, config: Dict[str, Any]) -> None:
        self.text = load_text_tokenizer(config["tokenizer_model"], config["tokenizer_type"])  # per process
        self.layout = VocabLayout.from_dict(config["layout"])
        self.json_keys = config["json_keys"]
        self.vq = VQImageTokenizer(config["image_tokenizer"]) if config["image_tokenizer"] else None

    def encode_chunk(self, task: Tuple[str, int, List[bytes]]) -> Tuple[DocumentBatch, Dict[str, int], List[dict]]:
        path, first_line, lines = task
        acc, rejects, docs = BatchAccumulator(self.layout), [], []
        for k, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                docs.append((first_line + k, record, content_items(record, self.json_keys)))
            except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                rejects.append(reject(path, first_line + k, RejectedDocument("malformed_json", str(e)), raw))
            except RejectedDocument as e:
                rejects.append(reject(path, first_line + k, e, raw))
        texts = [v for _, _, items in docs for kind, v in items if kind == TEXT]
        encoded = iter(self.text.encode_batch(texts))  # one thread: parallelism = --workers
        grids = self._encode_images(docs, os.path.dirname(os.path.abspath(path)))
        for line, record, items in docs:
            text_ids = [np.asarray(next(encoded), dtype=np.int64) for kind, _ in items if kind == TEXT]
            try:
                if isinstance(grids.get(line), Exception):
                    raise grids[line]
                acc.add(*build_sequences(self._segments(items, text_ids, grids.get(line, [])), self.layout))
            except (RejectedDocument, ImageError) as e:
                rejects.append(reject(path, line, e, None, record))
        return acc.batch(), acc.counts, rejects

    def _encode_images(self, docs: List[Tuple[int, Any, List[Tuple[str, Any]]]], folder: str) -> Dict[int, Any]:
        """line -> the document's code grids ([h, w] each; the format writes the grid), or the error that
        rejects it. Images of several documents share one VQ call (VQ_BATCH images, loaded batch by batch):
        14x faster than a call per document for the picture world's 32-pixel images on one core."""
        out: Dict[int, Any] = {}
        todo = []  # (line, path) in document order
        for line, _, items in docs:
            paths = [os.path.join(folder, v) for kind, v in items if kind == IMAGE]
            if paths and self.vq is None:
                out[line] = RejectedDocument("no_image_tokenizer", "document has image files but no --image-tokenizer")
            else:
                todo += [(line, p) for p in paths]
        for b in range(0, len(todo), VQ_BATCH):
            batch = []
            for line, p in todo[b:b + VQ_BATCH]:
                if isinstance(out.get(line), Exception):
                    continue
                try:
                    batch.append((line, load_image(p)))
                except ImageError as e:
                    out[line] = e
            batch = [(line, im) for line, im in batch if not isinstance(out.get(line), Exception)]
            for line, grid in self._encode_batch(batch):
                if isinstance(grid, Exception):
                    out[line] = grid
                elif not isinstance(out.get(line), Exception):
                    out.setdefault(line, []).append(grid)
        return out

    def _encode_batch(self, batch: List[Tuple[int, Any]]) -> List[Tuple[int, Any]]:
        """(line, grid) per image; when the batch fails (an image the VQ refuses, e.g. Emu3's size limits),
        its images are encoded one at a time so only the owner of the bad image gets the error."""
        if not batch:
            return []
        try:
            return list(zip([line for line, _ in batch], self.vq.encode_grids([im for _, im in batch])))
        except ImageError:
            out = []
            for line, im in batch:
                try:
                    out.append((line, self.vq.encode_grids([im])[0]))
                except ImageError as e:
                    out.append((line, e))
            return out

    def _segments(self, items: List[Tuple[str, Any]], text_ids: List[np.ndarray], grids: List[np.ndarray]
                  ) -> List[Tuple[str, np.ndarray]]:
        texts = iter(text_ids)
        images = iter(grids)
        segments = []
        for i, (kind, value) in enumerate(items):
            if kind == TEXT:
                segments.append((TEXT, next(texts)))
            elif kind == IMAGE:
                segments.append((IMAGE, image_codes_to_ids(next(images), self.layout, i)))
            elif kind == IMAGE_TOKENS:
                segments.append((IMAGE, image_codes_to_ids(value, self.layout, i)))
        return segments


def reject(path: str, line: int, error: Any, raw: Optional[bytes], record: Any = None) -> dict:
    entry = {"file": path, "line": line, "reason": error.reason, "detail": error.detail}
    if isinstance(record, dict) and "id" in record:
        entry["id"] = record["id"]
    if raw is not None:
        entry["excerpt"] = raw[:200].decode("utf-8", errors="replace")
    return entry


_ENCODER: Optional[Encoder] = None


def _init_worker(config: Dict[str, Any]) -> None:
    global _ENCODER
    import torch

    torch.set_num_threads(1)
    _ENCODER = Encoder(config)


def _encode_in_worker(task):
    return _ENCODER.encode_chunk(task)


# --------------------------------------------------------------------------- input
def expand_inputs(patterns: List[str]) -> List[str]:
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise FileNotFoundError(f"--input {pattern}: no such file")
        files.extend(matches)
    return files


def iter_tasks(files: List[str], chunk_lines: int, gate: threading.Semaphore) -> Iterator[Tuple[str, int, list]]:
    """(file, first line number, raw lines) chunks; `gate` bounds how many are in flight."""
    for path in files:
        with open(path, "rb") as f:
            lines, first = [], 1
            for number, line in enumerate(f, start=1):
                lines.append(line)
                if len(lines) == chunk_lines:
                    gate.acquire()
                    yield path, first, lines
                    lines, first = [], number + 1
            if lines:
                gate.acquire()
                yield path, first, lines


# --------------------------------------------------------------------------- output
class ShardWriter:
    """Writes DocumentBatches into one output or into shards of `shard_size` documents/tokens."""

    def __init__(self, prefix: str, dtype: Any, shard_size: int, unit: str, durable: bool) -> None:
        self.prefix, self.dtype, self.shard_size, self.unit, self.durable = prefix, dtype, shard_size, unit, durable
        self.shards: List[str] = []
        self.builder: Optional[IndexedDatasetBuilder] = None
        self.filled = 0

    def _open(self) -> None:
        name = self.prefix if not self.shard_size else f"{self.prefix}_{len(self.shards):05d}"
        self.shards.append(name)
        self.builder = IndexedDatasetBuilder(name + ".bin", self.dtype, multimodal=True, durable=self.durable)
        self.filled = 0

    def _close(self) -> None:
        self.builder.finalize(self.shards[-1] + ".idx")
        self.builder = None

    def _room(self, batch: DocumentBatch) -> int:
        """How many documents of `batch` fit into the current shard."""
        left = self.shard_size - self.filled
        if self.unit == "documents":
            return left
        starts = np.concatenate([[0], np.cumsum(batch.document_lengths)[:-1]]).astype(np.int64)
        seq_tokens = np.concatenate([[0], np.cumsum(batch.sequence_lengths)])
        doc_tokens = seq_tokens[starts + batch.document_lengths] - seq_tokens[starts]
        return int(np.searchsorted(np.cumsum(doc_tokens), left, side="left")) + 1

    def add_batch(self, batch: DocumentBatch) -> None:
        while batch.num_documents:
            if self.builder is None:
                self._open()
            if not self.shard_size:
                self.builder.add_batch(batch)
                return
            head, batch = batch.split(self._room(batch))
            self.builder.add_batch(head)
            self.filled += head.num_documents if self.unit == "documents" else head.num_tokens
            if self.filled >= self.shard_size:
                self._close()

    def finish(self, merge: bool) -> List[str]:
        """Finalize; a single shard is renamed to PREFIX, `merge` joins several into PREFIX."""
        if self.builder is None and not self.shards:
            self._open()
        if self.builder is not None:
            self._close()
        if self.shard_size and len(self.shards) == 1:
            publish_rename(self.shards[0], self.prefix)
            self.shards = [self.prefix]
        elif merge and len(self.shards) > 1:
            merge_datasets(self.shards, self.prefix, multimodal=True, durable=self.durable)
            for shard in self.shards:
                os.remove(shard + ".idx")
                os.remove(shard + ".bin")
            self.shards = [self.prefix]
        return self.shards

    def abort(self) -> None:
        if self.builder is not None:
            self.builder.abort()


def publish_rename(src: str, dst: str) -> None:
    """Move dataset src -> dst so that dst.idx never describes another .bin."""
    if os.path.exists(dst + ".idx"):
        os.remove(dst + ".idx")
    os.replace(src + ".bin", dst + ".bin")
    os.replace(src + ".idx", dst + ".idx")


class RejectLog:
    """Streams rejects to PREFIX.rejects.jsonl (published at close) and counts them by reason."""

    def __init__(self, prefix: str) -> None:
        self.path = prefix + ".rejects.jsonl"
        self.tmp = f"{self.path}.tmp-{os.getpid()}"
        self.file = open(self.tmp, "w", encoding="utf-8")
        self.by_reason: Dict[str, int] = {}

    def write(self, entries: List[dict]) -> None:
        for entry in entries:
            self.file.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self.by_reason[entry["reason"]] = self.by_reason.get(entry["reason"], 0) + 1

    @property
    def count(self) -> int:
        return sum(self.by_reason.values())

    def close(self, publish: bool = True) -> None:
        self.file.close()
        if publish:
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)


# --------------------------------------------------------------------------- main
class Progress:
    """tqdm bar on a terminal plus a log line every `interval` documents."""

    def __init__(self, interval: int, bar: bool) -> None:
        from tqdm import tqdm

        self.interval, self.start, self.next_log = interval, time.time(), interval
        self.docs = self.tokens = 0
        self.bar = tqdm(unit="doc", disable=not (bar and sys.stderr.isatty()), file=sys.stderr)

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        rate = self.tokens / max(time.time() - self.start, 1e-9)
        self.bar.update(docs)
        self.bar.set_postfix_str(f"{rate / 1e6:.2f}M tok/s", refresh=False)
        if self.interval and self.docs >= self.next_log:
            elapsed = time.time() - self.start
            logger.info("processed %d documents (%.0f docs/s, %.2fM tokens/s)", self.docs,
                        self.docs / elapsed, self.tokens / elapsed / 1e6)
            self.next_log = (self.docs // self.interval + 1) * self.interval

    def close(self) -> float:
        self.bar.close()
        return time.time() - self.start


def run_encoding(args: argparse.Namespace, files: List[str], config: Dict[str, Any], writer: ShardWriter,
                 rejects: RejectLog) -> Dict[str, Any]:
    totals = dict.fromkeys(COUNTERS, 0)
    gate = threading.Semaphore(4 * args.workers + 4)
    tasks = iter_tasks(files, args.chunk_size, gate)
    progress = Progress(args.log_interval, not args.no_progress_bar)
    pool = None
    if args.workers > 1:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        pool = ctx.Pool(args.workers, initializer=_init_worker, initargs=(config,))
        results = pool.imap(_encode_in_worker, tasks, chunksize=1)
    else:
        encoder = Encoder(config)
        results = map(encoder.encode_chunk, tasks)
    try:
        for batch, counts, bad in results:
            gate.release()
            writer.add_batch(batch)
            rejects.write(bad)
            for key in COUNTERS:
                totals[key] += counts[key]
            progress.update(counts["documents"], batch.num_tokens)
    finally:
        if pool is not None:
            pool.terminate()
    totals["elapsed_s"] = progress.close()
    return totals


def summarize(totals: Dict[str, Any], rejects: RejectLog, shards: List[str], files: List[str]) -> Dict[str, Any]:
    elapsed = max(totals["elapsed_s"], 1e-9)
    tokens = totals["text_tokens"] + totals["image_tokens"] + totals["special_tokens"]
    return {**totals, "tokens": tokens, "skipped": rejects.count, "skipped_by_reason": rejects.by_reason,
            "documents_per_s": totals["documents"] / elapsed, "tokens_per_s": tokens / elapsed,
            "inputs": files, "outputs": shards, "rejects_file": rejects.path}


def open_inputs(args):
    """(input files, text tokenizer, VQ tokenizer or None, layout); prints and returns None
    on a bad flag or file (the caller exits 2). Shared with tools/preprocess_instruct.py."""
    try:
        files = expand_inputs(args.input)
        text = load_text_tokenizer(args.tokenizer_model, args.tokenizer_type)
        vq = VQImageTokenizer(args.image_tokenizer) if args.image_tokenizer else None
        layout = build_layout(args, text, vq)
    except (ValueError, OSError, VocabLayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    return files, text, vq, layout


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args(argv)
    opened = open_inputs(args)
    if opened is None:
        return 2
    files, text, vq, layout = opened
    config = {"tokenizer_model": args.tokenizer_model, "tokenizer_type": text.type,
              "image_tokenizer": args.image_tokenizer,
              "layout": layout.to_dict(), "json_keys": args.json_keys}
    layout.to_json(layout_path(args.output_prefix))  # first: shards finished before an interruption are usable
    writer = ShardWriter(args.output_prefix, layout.dtype, args.shard_size, args.shard_unit, args.durable)
    rejects = RejectLog(args.output_prefix)
    try:
        totals = run_encoding(args, files, config, writer, rejects)
        shards = writer.finish(args.merge)
    except BaseException:
        writer.abort()
        rejects.close(publish=False)
        raise
    rejects.close()
    summary = summarize(totals, rejects, shards, files)
    with open(args.output_prefix + ".stats.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print_summary(summary)
    seen = summary["documents"] + summary["skipped"]
    if seen and summary["skipped"] / seen > args.max_reject_fraction:
        print(f"error: {summary['skipped']} of {seen} documents rejected ({summary['skipped'] / seen:.1%}), more than "
              f"--max-reject-fraction {args.max_reject_fraction}; the {summary['documents']} good documents were "
              f"written, see {rejects.path} for the reasons", file=sys.stderr)
        return 1
    return 0


def print_summary(s: Dict[str, Any]) -> None:
    print(f"documents        {s['documents']}")
    print(f"text tokens      {s['text_tokens']}")
    print(f"image tokens     {s['image_tokens']} ({s['images']} images)")
    print(f"special tokens   {s['special_tokens']}")
    print(f"skipped          {s['skipped']} {json.dumps(s['skipped_by_reason'], sort_keys=True)}")
    print(f"throughput       {s['documents_per_s']:.0f} docs/s, {s['tokens_per_s'] / 1e6:.3f}M tokens/s "
          f"({s['elapsed_s']:.2f} s)")
    print(f"outputs          {', '.join(s['outputs'])}")


if __name__ == "__main__":
    sys.exit(main())
