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
fraction exceeds ``--max-reject-fraction``; an error that is not a bad document (in a
worker too) ends the run with one line naming the file and line (exit 2). The files appear
as one set when the run is complete (megatron_jam/data/publish.py); an existing set is
refused unless ``--overwrite`` is given, and is replaced only then. See tools/README.md
for the exact commands.
"""

import argparse
import collections
import glob
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from megatron_jam.data.documents import (IMAGE, IMAGE_TOKENS, TEXT, BatchAccumulator, EncodingFailure,
                                         RejectedDocument, build_sequences, content_items, encode_texts,
                                         failure_names, image_codes_to_ids)
from megatron_jam.data.image_tokenizer import ImageError, VQImageTokenizer, load_image
from megatron_jam.data.indexed_builder import DocumentBatch
from megatron_jam.data.publish import (OutputExistsError, RejectLog, ShardWriter, StagedOutput,  # noqa: F401
                                       check_output_prefix)
from megatron_jam.data.text_tokenizer import TextTokenizer, add_tokenizer_args, load_text_tokenizer
from megatron_jam.data.vocab import DEFAULT_NUM_SENTINELS, VocabLayout, layout_path
from megatron_jam.utils.cli import add_debug_arg, run_cli
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
    g.add_argument("--num-sentinels", type=int, default=None,
                   help="CM3 sentinel tokens in the layout (default: --vocab-layout's, else 32)")
    g.add_argument("--dedicated-eos", action="store_true", default=None,
                   help="give <eos> its own id even if the text tokenizer has one (default: as --vocab-layout)")
    g.add_argument("--vocab-layout", help="existing layout JSON the output must match; flags left out (sentinels, "
                                          "codebook, tokens per image, grid, native format) take its values")
    g.add_argument("--vocab-layout-kind", choices=("appended", "native", "mixed"), default="appended",
                   help="appended: our specials and image codes after the text ids (default); native: keep the "
                        "image parent's own ids (an Emu3, Chameleon or Lumina-mGPT model folder as "
                        "--tokenizer-model: codes, image markers and its image format, --native-format; see "
                        "docs/data.md); mixed: text ids of the LLM's "
                        "--tokenizer-model, the image parent's image part (--image-parent-tokenizer) re-indexed "
                        "after them, for JAM-Cross of parents with different tokenizers (docs/real_parents.md)")
    g.add_argument("--image-parent-tokenizer",
                   help="mixed: the image parent's Hugging Face folder (Emu3: tokenizer.json, config.json)")
    g.add_argument("--image-grid", type=int, nargs=2, metavar=("H", "W"),
                   help="native and mixed: default latent grid of an image (flat image_tokens, VQ codes, generation); "
                        "default: the square of --tokens-per-image or the VQ's, else Emu3's 90 90")
    g.add_argument("--native-format", choices=("emu3", "chameleon", "lumina", "liquid"), default=None,
                   help="native and mixed: the image parent's format (default: from its config.json model_type, "
                        "else its tokenizer; Lumina-mGPT is told from Chameleon by its ChameleonXLLMX architecture)")
    g.add_argument("--native-specials", choices=("reserved", "appended"), default=None,
                   help="native and mixed: CM3 sentinels, <eos_span> and <mask> on the parent's reserved tokens "
                        "(Emu3 <|extra_N|>, Chameleon <reserved08900>...; default), or as rows appended after "
                        "its vocabulary")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True)
    g.add_argument("--shard-size", type=int, default=0, help="documents (or tokens) per shard; 0 = one output")
    g.add_argument("--shard-unit", choices=("documents", "tokens"), default="documents")
    g.add_argument("--merge", action="store_true", help="merge the shards into PREFIX.bin/.idx at the end")
    g.add_argument("--durable", action="store_true", help="fsync shards before publishing them")
    g.add_argument("--overwrite", action="store_true", help="replace an existing set at --output-prefix (its files "
                   "are removed only once the new set is complete; without this flag an existing set is refused)")
    g.add_argument("--max-reject-fraction", type=float, default=0.01)
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (1 = in-process)")
    g.add_argument("--chunk-size", type=int, default=256, help="lines per worker task")
    g.add_argument("--log-interval", type=int, default=10000, help="log progress every N documents")
    g.add_argument("--no-progress-bar", action="store_true")
    add_debug_arg(p)
    args = p.parse_args(argv)
    if args.shard_size < 0 or args.workers < 1 or args.chunk_size < 1 or not 0 <= args.max_reject_fraction <= 1:
        p.error("--shard-size >= 0, --workers >= 1, --chunk-size >= 1, 0 <= --max-reject-fraction <= 1")
    return args


# --------------------------------------------------------------------------- layout
def build_layout(args: argparse.Namespace, text: TextTokenizer, vq: Optional[VQImageTokenizer]) -> VocabLayout:
    """The vocabulary layout from the tokenizers and flags (and checked against --vocab-layout)."""
    reference = VocabLayout.from_json(args.vocab_layout) if args.vocab_layout else None
    resolve_from_layout(args, reference)
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


def resolve_from_layout(args: argparse.Namespace, reference: Optional[VocabLayout]) -> None:
    """Flags left out take --vocab-layout's values (else the defaults); a flag given explicitly that
    contradicts the layout is a one-line error naming both, not a run refused for a default."""
    if reference is not None:
        grid = getattr(args, "image_grid", None)
        given = [("--num-sentinels", args.num_sentinels, reference.num_sentinels),
                 ("--codebook-size", args.codebook_size, reference.codebook_size),
                 ("--tokens-per-image", args.tokens_per_image, reference.tokens_per_image),
                 ("--image-grid", tuple(grid) if grid else None, reference.image_grid or None),
                 ("--native-format", getattr(args, "native_format", None),
                  reference.image_format if reference.native else None)]
        for flag, mine, theirs in given:
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(f"{flag} {_flag_value(mine)} contradicts --vocab-layout {args.vocab_layout} "
                                 f"({_flag_value(theirs)}); leave the flag out to take the layout's")
        if args.dedicated_eos and not reference.native and not reference.dedicated_eos:
            raise ValueError(f"--dedicated-eos contradicts --vocab-layout {args.vocab_layout} (its <eos> is the text "
                             f"tokenizer's id {reference.eos_id}); leave the flag out to take the layout's")
    sentinels = reference.num_sentinels if reference is not None else DEFAULT_NUM_SENTINELS
    args.num_sentinels = sentinels if args.num_sentinels is None else args.num_sentinels
    same_eos = reference is not None and not reference.native and reference.dedicated_eos
    args.dedicated_eos = bool(args.dedicated_eos) or same_eos


def _flag_value(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def build_native_layout(args: argparse.Namespace, text: TextTokenizer, vq: Optional[VQImageTokenizer],
                        reference: Optional[VocabLayout] = None) -> VocabLayout:
    """--vocab-layout-kind native (or a native --vocab-layout, e.g. for tools/preprocess_instruct.py): the
    image parent's own ids, from its tokenizer folder (Emu3, Chameleon, Lumina-mGPT)."""
    from megatron_jam.data.native_vocab import native_layout

    if text.type != "HuggingFaceTokenizer":
        raise ValueError(f"--vocab-layout-kind native needs the parent's Hugging Face tokenizer folder as "
                         f"--tokenizer-model, got {text.type} {args.tokenizer_model}")
    if args.dedicated_eos:
        raise ValueError("--dedicated-eos applies to --vocab-layout-kind appended (native <eos> is the parent's)")
    own_size = vq is not None and vq.own_size  # each image has its own grid: the VQ sets no default
    per_image = vq.tokens_per_image if vq is not None and not own_size else args.tokens_per_image
    side = math.isqrt(per_image) if per_image else 0
    grid = getattr(args, "image_grid", None) or (reference.image_grid if reference is not None else None) or (
        (side, side) if per_image and side * side == per_image else None)  # None: the parent's default grid
    specials = getattr(args, "native_specials", None) or (
        "appended" if reference is not None and reference.appended_specials else "reserved")
    fmt = getattr(args, "native_format", None) or (reference.image_format if reference is not None else None)
    layout = native_layout(args.tokenizer_model, fmt, num_sentinels=args.num_sentinels, image_grid=grid,
                           specials=specials, image_tokenizer=vq.identity if vq is not None else "")
    if vq is not None and vq.codebook_size != layout.codebook_size:
        raise ValueError(f"--image-tokenizer {args.image_tokenizer} has {vq.codebook_size} codes but the tokenizer "
                         f"{args.tokenizer_model} has {layout.codebook_size} image code tokens: not this parent's VQ")
    for flag, given in (("--codebook-size", vq.codebook_size if vq is not None else args.codebook_size),
                        ("--tokens-per-image", per_image)):
        actual = layout.codebook_size if flag == "--codebook-size" else layout.tokens_per_image
        if given is not None and given != actual:
            raise ValueError(f"{flag} {given} (or the VQ model's) disagrees with the native layout's {actual} "
                             f"(tokenizer {args.tokenizer_model}, --image-grid {list(layout.image_grid)})")
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
                              image_tokenizer=vq.identity if vq is not None else "",
                              image_format=getattr(args, "native_format", None))
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
        """Bad documents become rejects; any other error becomes an EncodingFailure naming the file and
        line(s), so that it reaches the parent (from a worker process too) as one line, not a traceback."""
        path, first_line, lines = task
        try:
            return self._encode_chunk(path, first_line, lines)
        except EncodingFailure:
            raise
        except Exception as e:
            raise EncodingFailure(f"{path} lines {first_line}-{first_line + len(lines) - 1}: "
                                  f"{type(e).__name__}: {e}") from e

    def _encode_chunk(self, path: str, first_line: int, lines: List[bytes]):
        acc, rejects, docs = BatchAccumulator(self.layout), [], []
        for k, raw in enumerate(lines):
            if not raw.strip():
                continue
            with failure_names(path, first_line + k):
                try:
                    record = json.loads(raw)
                    docs.append((first_line + k, record, content_items(record, self.json_keys)))
                except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError: a ValueError
                    rejects.append(reject(path, first_line + k, RejectedDocument("malformed_json", str(e)), raw))
                except RejectedDocument as e:
                    rejects.append(reject(path, first_line + k, e, raw))
        texts = encode_texts(self.text, [(line, [v for kind, v in items if kind == TEXT]) for line, _, items in docs])
        grids = self._encode_images(docs, os.path.dirname(os.path.abspath(path)))
        for line, record, items in docs:
            with failure_names(path, line):
                try:
                    for found in (texts[line], grids.get(line)):
                        if isinstance(found, Exception):
                            raise found
                    acc.add(*build_sequences(self._segments(items, texts[line], grids.get(line, [])), self.layout))
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


def iter_tasks(files: List[str], chunk_lines: int) -> Iterator[Tuple[str, int, list]]:
    """(file, first line number, raw lines) chunks, read lazily (the caller bounds what is in flight)."""
    for path in files:
        with open(path, "rb") as f:
            lines, first = [], 1
            for number, line in enumerate(f, start=1):
                lines.append(line)
                if len(lines) == chunk_lines:
                    yield path, first, lines
                    lines, first = [], number + 1
            if lines:
                yield path, first, lines


def encode_in_pool(tasks: Iterator[tuple], workers: int, config: Dict[str, Any]) -> Iterator[tuple]:
    """Results of `tasks` in order from `workers` processes, at most 4 x workers + 4 chunks in flight.

    Why a ProcessPoolExecutor and not multiprocessing.Pool.imap: a worker's exception (an
    EncodingFailure naming file and line) reaches the parent as that exception, a worker that dies
    (killed, out of memory) is a BrokenProcessPool instead of a silent hang, and on any error the
    pending chunks are cancelled (Pool.terminate used to wait forever on a feeder thread blocked
    by the in-flight bound)."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    window: collections.deque = collections.deque()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(config,)) as pool:
        try:
            for task in tasks:
                window.append((task, pool.submit(_encode_in_worker, task)))
                if len(window) >= 4 * workers + 4:
                    yield _pool_result(window)
            while window:
                yield _pool_result(window)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _pool_result(window: collections.deque) -> tuple:
    """The oldest chunk's result. A dead worker process fails every chunk in flight, so the one-line
    EncodingFailure names all their lines (the one that killed it is among them)."""
    task, future = window.popleft()
    try:
        return future.result()
    except BrokenProcessPool as e:
        (path, first, _), (last_path, last_first, last_lines) = task, (window[-1][0] if window else task)
        end = last_first + len(last_lines) - 1
        span = f"{path} lines {first}-{end}" if last_path == path else f"{path} line {first} to {last_path} line {end}"
        raise EncodingFailure(f"{span}: a worker process died (killed, or out of memory?) while encoding these "
                              f"lines: {e}") from e


# --------------------------------------------------------------------------- main
class Progress:
    """A bar on a terminal (megatron_jam.utils.progress) plus a log line every `interval` documents (timed
    log lines instead when `interval` is 0 and stderr is not a terminal)."""

    def __init__(self, interval: int, bar: bool) -> None:
        from megatron_jam.utils.progress import progress

        self.interval, self.start, self.next_log = interval, time.time(), interval
        self.docs = self.tokens = 0
        self.bar = progress(desc="documents", unit="doc", enabled=bar, log_lines=not interval)

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
    tasks = iter_tasks(files, args.chunk_size)
    progress = Progress(args.log_interval, not args.no_progress_bar)
    if args.workers > 1:
        results = encode_in_pool(tasks, args.workers, config)
    else:
        results = map(Encoder(config).encode_chunk, tasks)
    for batch, counts, bad in results:
        writer.add_batch(batch)
        rejects.write(bad)
        for key in COUNTERS:
            totals[key] += counts[key]
        progress.update(counts["documents"], batch.num_tokens)
    totals["elapsed_s"] = progress.close()
    return totals


def summarize(totals: Dict[str, Any], rejects: RejectLog, shards: List[str], files: List[str]) -> Dict[str, Any]:
    elapsed = max(totals["elapsed_s"], 1e-9)
    tokens = totals["text_tokens"] + totals["image_tokens"] + totals["special_tokens"]
    return {**totals, "tokens": tokens, "skipped": rejects.count, "skipped_by_reason": rejects.by_reason,
            "documents_per_s": totals["documents"] / elapsed, "tokens_per_s": tokens / elapsed,
            "inputs": files, "outputs": shards, "rejects_file": rejects.path}


def open_inputs(args):
    """(input files, text tokenizer, VQ tokenizer or None, layout); a bad flag or file, or an existing output
    set without --overwrite, raises (`INPUT_ERRORS`: one line and exit 2 through `main`). Shared with
    tools/preprocess_instruct.py."""
    check_output_prefix(args.output_prefix, args.overwrite)  # before minutes of tokenizer loading
    files = expand_inputs(args.input)
    text = load_text_tokenizer(args.tokenizer_model, args.tokenizer_type)
    vq = VQImageTokenizer(args.image_tokenizer) if args.image_tokenizer else None
    layout = build_layout(args, text, vq)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    return files, text, vq, layout


# What a bad input raises here besides the project's own errors: a tokenizer or VQ folder that does not
# load (transformers and sentencepiece raise OSError / ValueError / RuntimeError subclasses of their own).
INPUT_ERRORS = (ValueError, OSError)


def staged_run(args: argparse.Namespace, write) -> Optional[Dict[str, Any]]:
    """`write(staged_prefix, stage)` -> summary, into a staging folder published as one set at the end
    (megatron_jam/data/publish.py); None after an EncodingFailure or a set that appeared meanwhile
    (printed, the caller exits 2). Any failure leaves the old set, if any, as it was."""
    try:
        stage = StagedOutput(args.output_prefix, durable=getattr(args, "durable", False))
    except OSError as e:  # an unwritable output folder
        print(f"error: --output-prefix {args.output_prefix}: {e}", file=sys.stderr)
        return None
    try:
        summary = write(stage.prefix, stage)
        with open(stage.prefix + ".stats.json", "w", encoding="utf-8") as f:
            json.dump(summary | tokenizer_record(args), f, indent=2)
        stage.publish(args.overwrite)
    except (EncodingFailure, OutputExistsError) as e:
        stage.abort()
        print(f"error: {e}", file=sys.stderr)
        return None
    except BaseException:
        stage.abort()
        raise
    return summary


def tokenizer_record(args: argparse.Namespace) -> Dict[str, str]:
    """Where the tokenizers were (absolute paths, in PREFIX.stats.json): the trainer copies them into its run
    folder from there (megatron_jam.data.run_files), so a run needs no tokenizer flag later."""
    return {flag: os.path.abspath(getattr(args, flag)) for flag in ("tokenizer_model", "image_tokenizer")
            if getattr(args, flag, None)}


def write_interleaved(args: argparse.Namespace, files: List[str], config: Dict[str, Any], layout: VocabLayout,
                      prefix: str, stage: StagedOutput) -> Dict[str, Any]:
    """Layout, shards and rejects of the whole input under the staged `prefix`; returns the summary."""
    layout.to_json(layout_path(prefix))
    writer = ShardWriter(prefix, layout.dtype, args.shard_size, args.shard_unit, args.durable)
    rejects = RejectLog(prefix)
    try:
        totals = run_encoding(args, files, config, writer, rejects)
        shards = writer.finish(args.merge)
    finally:
        writer.abort()  # no-op once finished
        rejects.close()
    summary = summarize(totals, rejects, [stage.final(s) for s in shards], files)
    return {**summary, "rejects_file": stage.final(rejects.path)}


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; a bad input is one line on stderr and exit code 2 (megatron_jam.utils.cli)."""
    return run_cli(_main, argv, extra_errors=INPUT_ERRORS)


def _main(argv: List[str]) -> int:
    args = get_args(argv)
    files, text, vq, layout = open_inputs(args)
    config = {"tokenizer_model": args.tokenizer_model, "tokenizer_type": text.type,
              "image_tokenizer": args.image_tokenizer,
              "layout": layout.to_dict(), "json_keys": args.json_keys}
    summary = staged_run(args, lambda prefix, stage: write_interleaved(args, files, config, layout, prefix, stage))
    if summary is None:
        return 2
    print_summary(summary)
    seen = summary["documents"] + summary["skipped"]
    if seen and summary["skipped"] / seen > args.max_reject_fraction:
        print(f"error: {summary['skipped']} of {seen} documents rejected ({summary['skipped'] / seen:.1%}), more than "
              f"--max-reject-fraction {args.max_reject_fraction}; the {summary['documents']} good documents were "
              f"written, see {summary['rejects_file']} for the reasons", file=sys.stderr)
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
