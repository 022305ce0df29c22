#!/usr/bin/env python
"""Text-only preprocessing throughput against sentencepiece's own encode speed.

Generates a JSONL corpus of Zipf-distributed pseudo-words, trains a
sentencepiece model on a sample, then measures on the same text and the same
number of cores (W):

- sentencepiece: `sp.encode(texts, num_threads=W)` on the texts already in
  memory (no JSON, no I/O): the ceiling;
- the tool: `tools/preprocess_interleaved.py --workers W` as a subprocess,
  reading JSONL, tokenizing in W worker processes and writing the shard. Its
  encoding-loop throughput comes from PREFIX.stats.json; the wall time of the
  whole process (imports, tokenizer loading) is printed too.

Prints figures and the ratio; asserts nothing. Example:
    python benchmarks/bench_preprocess.py --documents 40000 --workers 2
"""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_corpus(folder, n_docs, words_per_doc, seed=0):
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(20000)]
    ranks = np.minimum(rng.zipf(1.2, size=n_docs * words_per_doc), len(vocab)) - 1
    words = np.array(vocab)[ranks].reshape(n_docs, words_per_doc)
    texts = [" ".join(row) for row in words]
    path = os.path.join(folder, "corpus.jsonl")
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
    return path, texts


def train_tokenizer(folder, texts, vocab_size):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts[:2000]), model_writer=model, vocab_size=vocab_size,
                                   model_type="bpe", max_sentence_length=1 << 16, minloglevel=2)
    path = os.path.join(folder, "spm.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def bench_sentencepiece(model, texts, threads, repeats):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        t = time.perf_counter()
        ids = sp.encode(texts, num_threads=threads)
        best = min(best, time.perf_counter() - t)
        tokens = sum(len(x) for x in ids)
    return best, tokens


def bench_tool(folder, corpus, model, workers, repeats):
    best = None
    for r in range(repeats):
        prefix = os.path.join(folder, f"out{r}")
        cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_interleaved.py"), "--input", corpus,
               "--output-prefix", prefix, "--tokenizer-model", model, "--codebook-size", "8192",
               "--tokens-per-image", "1024", "--workers", str(workers), "--no-progress-bar", "--log-interval", "0",
               "--overwrite"]  # the same scratch prefixes for every --workers value
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.perf_counter() - t
        stats = json.load(open(prefix + ".stats.json"))
        if best is None or stats["elapsed_s"] < best[1]["elapsed_s"]:
            best = (wall, stats)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--documents", type=int, default=40000)
    p.add_argument("--words-per-doc", type=int, default=200)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--folder", help="scratch folder (default: a temporary one, removed)")
    args = p.parse_args()
    folder = args.folder or tempfile.mkdtemp(prefix="bench_preprocess_")
    os.makedirs(folder, exist_ok=True)
    try:
        corpus, texts = make_corpus(folder, args.documents, args.words_per_doc)
        model = train_tokenizer(folder, texts, args.vocab_size)
        mb = os.path.getsize(corpus) / 2 ** 20
        print(f"corpus: {args.documents} documents, {mb:.1f} MiB JSONL; sentencepiece BPE {args.vocab_size}; "
              f"W = {args.workers} cores (machine has {os.cpu_count()})")
        sp_time, sp_tokens = bench_sentencepiece(model, texts, args.workers, args.repeats)
        sp1_time, _ = bench_sentencepiece(model, texts, 1, 1)
        print(f"sentencepiece encode, 1 thread      {sp1_time:7.2f} s  {sp_tokens / sp1_time / 1e6:6.2f}M tokens/s")
        print(f"sentencepiece encode, {args.workers} threads     {sp_time:7.2f} s  {sp_tokens / sp_time / 1e6:6.2f}M "
              f"tokens/s  {args.documents / sp_time:8.0f} docs/s")
        wall, stats = bench_tool(folder, corpus, model, args.workers, args.repeats)
        rate = stats["text_tokens"] / stats["elapsed_s"]
        print(f"preprocess_interleaved, {args.workers} workers  {stats['elapsed_s']:7.2f} s  {rate / 1e6:6.2f}M "
              f"tokens/s  {stats['documents_per_s']:8.0f} docs/s  (whole process incl. start-up {wall:.2f} s)")
        if stats["text_tokens"] != sp_tokens:
            print(f"WARNING: token counts differ: tool {stats['text_tokens']} vs sentencepiece {sp_tokens}")
        print(f"ratio tool / sentencepiece (same {args.workers} cores): {rate / (sp_tokens / sp_time):.2f}x "
              f"(whole process: {sp_tokens / wall / (sp_tokens / sp_time):.2f}x)")
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
