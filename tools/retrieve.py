#!/usr/bin/env python
"""Retrieve memory-bank neighbours for every document of a training dataset.

Each query document (``--data-path PREFIX``, re-read from its JSONL inputs like
tools/build_retrieval_index.py does) is embedded with CLIP after query dropout
(``--query-dropout``, 20% of text tokens and image patches dropped), searched in the
index built by tools/build_retrieval_index.py (``--index``), and its
``--num-candidates`` best candidates are filtered: the document itself is skipped when
the queries are the bank; candidates whose score against the *clean* query (no
dropout) is above ``--max-score`` are near duplicates and skipped (dropout must not
let a duplicate through); the first ``--num-neighbors`` survivors are kept. Writes
``PREFIX.neighbors.npy`` (int64 [documents, k], bank document ids, -1 = none) and
``PREFIX.neighbors.json``; the JAM dataset prepends them when retrieval is on.
"""

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import numpy as np

from megatron_jam.data.clip_embed import ClipEmbedder, embed_dataset
from megatron_jam.data.integrity import check_dataset_files
from megatron_jam.data.retrieval import EmbeddingShards, MipsIndex, neighbors_path, save_neighbors, select_neighbors
from megatron_jam.utils.cli import add_debug_arg, require_path, run_cli


def get_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-path", required=True, help="query dataset prefix")
    p.add_argument("--input", nargs="+", help="its JSONL inputs, in preprocessing order (default: PREFIX.stats.json)")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--index", required=True, help="index written by build_retrieval_index.py")
    p.add_argument("--clip-model", help="CLIP folder (default: the one the index was built with)")
    p.add_argument("--num-neighbors", type=int, default=3, help="neighbours kept per document")
    p.add_argument("--num-candidates", type=int, default=0, help="candidates searched (0 = 4k + 8)")
    p.add_argument("--max-score", type=float, default=0.9, help="skip candidates scoring above (near duplicates)")
    p.add_argument("--query-dropout", type=float, default=0.2, help="fraction of query tokens dropped")
    p.add_argument("--nprobe", type=int, default=0, help="IVF lists searched (0 = the index's)")
    p.add_argument("--micro-batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=1234, help="query dropout draws")
    p.add_argument("--no-progress-bar", action="store_true")
    add_debug_arg(p)
    args = p.parse_args(argv)
    if args.num_neighbors < 1 or not 0 <= args.query_dropout < 1:
        p.error("--num-neighbors >= 1 and 0 <= --query-dropout < 1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; a bad input is one line on stderr and exit code 2 (megatron_jam.utils.cli)."""
    return run_cli(_main, argv)


def _main(argv: List[str]) -> int:
    args = get_args(argv)
    check_dataset_files(args.data_path)  # a missing or damaged query set: one line before CLIP is loaded
    require_path("--index", args.index + ".bank.json")
    if args.clip_model:
        require_path("--clip-model", args.clip_model, directory=True)
    with open(args.index + ".bank.json", encoding="utf-8") as f:
        bank = json.load(f)
    t0 = time.time()
    embedder = ClipEmbedder(args.clip_model or bank["clip_model"], args.device)
    queries = embed_dataset(args.data_path, embedder, inputs=args.input, json_keys=args.json_keys,
                            batch_size=args.micro_batch_size, dropout=args.query_dropout, seed=args.seed,
                            progress=not args.no_progress_bar)
    t1 = time.time()
    index = MipsIndex.load(args.index)
    if args.nprobe:
        index.nprobe = args.nprobe
    candidates = args.num_candidates or 4 * args.num_neighbors + 8
    scores, ids = index.search(queries, min(candidates, max(index.size, 1)))
    same = os.path.realpath(bank["bank"] + ".idx") == os.path.realpath(args.data_path + ".idx")
    query_ids = np.arange(queries.shape[0]) if same else None
    bank_emb = EmbeddingShards(args.index + ".emb")
    if same:
        clean = bank_emb.gather(np.arange(queries.shape[0]))
    else:
        clean = embed_dataset(args.data_path, embedder, inputs=args.input, json_keys=args.json_keys,
                              batch_size=args.micro_batch_size, progress=not args.no_progress_bar)
    duplicate_scores = np.concatenate([np.einsum("qd,qcd->qc", clean[b:b + 4096], bank_emb.gather(ids[b:b + 4096]))
                                       for b in range(0, ids.shape[0], 4096)]) if ids.size else scores
    neighbors = select_neighbors(scores, ids, args.num_neighbors, query_ids, args.max_score, duplicate_scores)
    save_neighbors(args.data_path, neighbors, {
        "bank": bank["bank"], "index": os.path.abspath(args.index), "k": args.num_neighbors,
        "max_score": args.max_score, "query_dropout": args.query_dropout, "seed": args.seed,
        "self_excluded": same, "candidates": candidates})
    found = (neighbors >= 0).sum(axis=1)
    print(f"queries          {queries.shape[0]}")
    print(f"neighbours       mean {found.mean() if found.size else 0:.2f} of {args.num_neighbors} per document")
    print(f"embedding        {t1 - t0:.2f} s; search {time.time() - t1:.2f} s")
    print(f"output           {neighbors_path(args.data_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
