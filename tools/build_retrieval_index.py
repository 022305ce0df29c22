#!/usr/bin/env python
"""Embed every document of a memory bank with CLIP and build a FAISS inner-product index over them.

The bank is a dataset written by tools/preprocess_interleaved.py (``--data-path PREFIX``);
its documents are re-read from the JSONL inputs named in ``PREFIX.stats.json`` (minus
``PREFIX.rejects.jsonl``) because CLIP needs pixels, not VQ codes. Each document's text
and images go through a local ``transformers`` CLIP model (``--clip-model``, a
``save_pretrained`` folder); text and image embeddings are averaged and normalised
(see megatron_jam/data/clip_embed.py). Writes::

    INDEX                  the FAISS index (exact IndexFlatIP, or IndexIVFFlat for large banks)
    INDEX.json             index metadata (dimension, kind, nlist, nprobe, size, backend)
    INDEX.bank.json        the bank prefix, CLIP model, document count (read by tools/retrieve.py)
    INDEX.emb/emb_*.npy    embedding shards (an interrupted run resumes from them)
"""

import argparse
import json
import os
import sys
import time
from typing import List, Optional

from megatron_jam.data.clip_embed import ClipEmbedder, embed_dataset
from megatron_jam.data.integrity import check_dataset_files
from megatron_jam.data.retrieval import DEFAULT_IVF_THRESHOLD, MipsIndex, have_faiss
from megatron_jam.models.config import ConfigError
from megatron_jam.utils.cli import add_debug_arg, require_path, run_cli
from megatron_jam.utils.logging import get_logger

logger = get_logger("megatron_jam.tools.build_retrieval_index")


def get_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-path", required=True, help="memory-bank dataset prefix (preprocess_interleaved output)")
    p.add_argument("--input", nargs="+", help="its JSONL inputs, in preprocessing order (default: PREFIX.stats.json)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="text keys of text-only records")
    p.add_argument("--clip-model", required=True, help="folder of a transformers CLIP model + processor")
    p.add_argument("--output", required=True, help="index path; metadata and embeddings go next to it")
    p.add_argument("--index-type", choices=("auto", "flat", "ivf"), default="auto")
    p.add_argument("--ivf-threshold", type=int, default=DEFAULT_IVF_THRESHOLD, help="auto: IVF from this many docs")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (0 = about 4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=16, help="IVF lists searched per query")
    p.add_argument("--micro-batch-size", type=int, default=64, help="documents per CLIP forward")
    p.add_argument("--embed-shard-size", type=int, default=100000, help="documents per saved embedding shard")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="IVF training sample")
    p.add_argument("--no-progress-bar", action="store_true")
    add_debug_arg(p)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; a bad input is one line on stderr and exit code 2 (megatron_jam.utils.cli)."""
    return run_cli(_main, argv)


def _main(argv: List[str]) -> int:
    args = get_args(argv)
    if args.index_type == "ivf" and not have_faiss():
        raise ConfigError("--index-type ivf needs faiss (pip install faiss-cpu)")
    check_dataset_files(args.data_path)  # a missing or damaged bank: one line before CLIP is loaded
    require_path("--clip-model", args.clip_model, directory=True)
    t0 = time.time()
    embedder = ClipEmbedder(args.clip_model, args.device)
    emb = embed_dataset(args.data_path, embedder, inputs=args.input, json_keys=args.json_keys,
                        batch_size=args.micro_batch_size, shard_dir=args.output + ".emb",
                        shard_size=args.embed_shard_size, progress=not args.no_progress_bar)
    t1 = time.time()
    index = MipsIndex.build(emb, kind=args.index_type, nlist=args.nlist or None, nprobe=args.nprobe,
                            ivf_threshold=args.ivf_threshold, seed=args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    index.save(args.output)
    meta = {"bank": os.path.abspath(args.data_path), "clip_model": os.path.abspath(args.clip_model),
            "documents": int(emb.shape[0]), "dim": int(emb.shape[1]), "kind": index.kind}
    with open(args.output + ".bank.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    print(f"documents        {emb.shape[0]}")
    print(f"index            {index.kind} ({'faiss' if have_faiss() else 'numpy'}), dim {emb.shape[1]}")
    print(f"embedding        {t1 - t0:.2f} s ({emb.shape[0] / max(t1 - t0, 1e-9):.1f} docs/s)")
    print(f"index build      {time.time() - t1:.2f} s")
    print(f"output           {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
