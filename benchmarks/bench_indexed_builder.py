#!/usr/bin/env python
"""Benchmark the C++ indexed-dataset builder and merger against Megatron-Core's Python ones.

Part 1 (build): the same in-memory uint16 documents written by Megatron-Core's
`IndexedDatasetBuilder.add_document`, by ours per document, and by ours in
batches (`add_documents`, 10,000 documents per call, concatenation included).

Part 2 (merge): N shards merged by Megatron-Core's `add_index` loop, by our
builder's `add_index` (metadata in C++ memory) and by the streaming
`merge_datasets`. Each method runs in its own subprocess; peak memory is the
growth of the process's RSS (psutil, sampled every 2 ms) over its value after imports
(--tracemalloc adds tracemalloc's peak for the Python method in a separate
run). Megatron's add_index calls gc.collect() per shard (~0.2 s each once torch
is imported); by default it runs with gc.collect disabled, which only helps it,
and --megatron-gc adds a run as shipped.

Prints figures and ratios; asserts nothing. Example:
    python benchmarks/bench_indexed_builder.py --documents 200000 --shards 1000
"""

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder as MegatronBuilder

from megatron_jam.data.indexed_builder import IndexedDatasetBuilder, merge_datasets


JAM_BUILDS = ("jam_cpp_per_document", "jam_cpp_batched_list", "jam_cpp_flat_array")


def make_documents(n, mean_tokens, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 2 * mean_tokens, size=n)
    flat = rng.integers(0, 65000, size=int(lengths.sum()), dtype=np.uint16)
    return np.split(flat, np.cumsum(lengths)[:-1]), flat, lengths


def build_megatron(prefix, docs, flat, lengths):
    b = MegatronBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs:
        b.add_document(d, [d.size])
    b.finalize(prefix + ".idx")


def build_jam_per_document(prefix, docs, flat, lengths):
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for d in docs:
        b.add_document(d, [d.size])
    b.finalize(prefix + ".idx")


def build_jam_flat(prefix, docs, flat, lengths):
    """The documents as one flat token array + lengths (what a batch tokenizer returns): one call."""
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    b.add_documents(flat, lengths, np.ones(len(lengths), dtype=np.int64))
    b.finalize(prefix + ".idx")


def build_jam_batched(prefix, docs, flat, lengths, batch=10000):
    """A list of per-document arrays, concatenated 10,000 documents per call (concatenation timed)."""
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for start in range(0, len(docs), batch):
        chunk = docs[start:start + batch]
        lengths = np.fromiter((d.size for d in chunk), dtype=np.int64, count=len(chunk))
        b.add_documents(np.concatenate(chunk), lengths, np.ones(len(chunk), dtype=np.int64))
    b.finalize(prefix + ".idx")


def bench_build(folder, n_docs, mean_tokens, repeats):
    docs, flat, lengths = make_documents(n_docs, mean_tokens)
    tokens = int(lengths.sum())
    print(f"\n== build: {n_docs} documents, {tokens / 1e6:.1f}M uint16 tokens in memory (best of {repeats})")
    results = {}
    for name, fn in (("megatron_python", build_megatron), ("jam_cpp_per_document", build_jam_per_document),
                     ("jam_cpp_batched_list", build_jam_batched), ("jam_cpp_flat_array", build_jam_flat)):
        best = float("inf")
        for _ in range(repeats):
            prefix = os.path.join(folder, name)
            for ext in (".bin", ".idx"):
                if os.path.exists(prefix + ext):
                    os.remove(prefix + ext)
            t = time.perf_counter()
            fn(prefix, docs, flat, lengths)
            best = min(best, time.perf_counter() - t)
        results[name] = best
        print(f"{name:24s} {best:7.3f} s  {tokens / best / 1e6:8.1f}M tokens/s  {n_docs / best:10.0f} docs/s")
    for ext in (".bin", ".idx"):
        for name in JAM_BUILDS:
            same = filecmp.cmp(os.path.join(folder, "megatron_python" + ext), os.path.join(folder, name + ext), False)
            print(f"identical {name}{ext}: {same}")
    for name in JAM_BUILDS:
        print(f"speed-up {name} vs megatron_python: {results['megatron_python'] / results[name]:.1f}x")
    return results


def make_shards(folder, n_shards, docs_per_shard, mean_tokens):
    rng = np.random.default_rng(1)
    prefixes = []
    for i in range(n_shards):
        lengths = rng.integers(1, 2 * mean_tokens, size=docs_per_shard)
        prefix = os.path.join(folder, f"shard_{i:05d}")
        b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16, multimodal=True)
        b.add_documents(rng.integers(0, 65000, size=int(lengths.sum())), lengths, np.ones(docs_per_shard),
                        rng.integers(0, 2, size=docs_per_shard))
        b.finalize(prefix + ".idx")
        prefixes.append(prefix)
    return prefixes


class RssSampler:
    """Samples this process's RSS every 2 ms in a thread; stop() returns peak - RSS at start (bytes)."""

    def __init__(self):
        import threading

        import psutil

        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def stop(self):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        return self.peak - self.base


def merge_child(method, list_file, out_prefix, trace, megatron_gc):
    """Runs in a subprocess: one merge method, reports time and memory as JSON on stdout."""
    import gc
    import tracemalloc

    if not megatron_gc:
        gc.collect = lambda *a: 0  # Megatron's add_index calls it per shard: ~0.2 s each with torch loaded
    prefixes = open(list_file).read().split()
    sampler = RssSampler()
    if trace:
        tracemalloc.start()
    t = time.perf_counter()
    if method.startswith("megatron_add_index"):
        b = MegatronBuilder(out_prefix + ".bin", dtype=np.uint16, multimodal=True)
        for p in prefixes:
            b.add_index(p)
        b.finalize(out_prefix + ".idx")
    elif method == "jam_builder_add_index":
        b = IndexedDatasetBuilder(out_prefix + ".bin", dtype=np.uint16, multimodal=True)
        for p in prefixes:
            b.add_index(p)
        b.finalize(out_prefix + ".idx")
    else:
        merge_datasets(prefixes, out_prefix, multimodal=True)
    elapsed = time.perf_counter() - t
    peak_trace = tracemalloc.get_traced_memory()[1] if trace else None
    print(json.dumps({"time_s": elapsed, "rss_peak_delta_mb": sampler.stop() / 2 ** 20,
                      "tracemalloc_peak_mb": peak_trace / 2 ** 20 if trace else None}))


def run_child(method, list_file, out_prefix, trace=False, megatron_gc=False):
    cmd = [sys.executable, os.path.abspath(__file__), "--merge-child", method, list_file, out_prefix]
    cmd += ["--trace"] if trace else []
    cmd += ["--megatron-gc"] if megatron_gc else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_merge(folder, n_shards, docs_per_shard, mean_tokens, trace, megatron_gc):
    prefixes = make_shards(folder, n_shards, docs_per_shard, mean_tokens)
    list_file = os.path.join(folder, "shards.txt")
    with open(list_file, "w") as f:
        f.write("\n".join(prefixes))
    sequences = n_shards * docs_per_shard
    size = sum(os.path.getsize(p + ".bin") for p in prefixes)
    print(f"\n== merge: {n_shards} shards, {sequences} sequences, {size / 2 ** 20:.0f} MiB of tokens")
    results = {}
    methods = ["megatron_add_index", "jam_builder_add_index", "jam_streaming_merge"]
    methods += ["megatron_add_index_as_shipped"] if megatron_gc else []
    for method in methods:
        out = os.path.join(folder, method)
        shipped = method.endswith("as_shipped")
        r = run_child(method, list_file, out, megatron_gc=shipped)
        if method == "megatron_add_index" and trace:
            r["tracemalloc_peak_mb"] = run_child(method, list_file, out + "_traced", trace=True)["tracemalloc_peak_mb"]
        results[method] = r
        traced = f", tracemalloc peak {r['tracemalloc_peak_mb']:.1f} MiB" if r["tracemalloc_peak_mb"] else ""
        print(f"{method:30s} {r['time_s']:8.3f} s  peak RSS +{r['rss_peak_delta_mb']:7.1f} MiB{traced}")
    print("(megatron_add_index runs with gc.collect disabled, which only speeds it up; "
          "--megatron-gc adds the as-shipped run)")
    for method in ("jam_builder_add_index", "jam_streaming_merge"):
        same = all(filecmp.cmp(os.path.join(folder, "megatron_add_index" + e), os.path.join(folder, method + e), False)
                   for e in (".bin", ".idx"))
        m, j = results["megatron_add_index"], results[method]
        print(f"{method}: identical to megatron {same}, {m['time_s'] / j['time_s']:.1f}x faster, "
              f"peak RSS growth {m['rss_peak_delta_mb']:.1f} vs {j['rss_peak_delta_mb']:.1f} MiB "
              f"({m['rss_peak_delta_mb'] / max(j['rss_peak_delta_mb'], 0.1):.1f}x)")
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--documents", type=int, default=200000)
    p.add_argument("--mean-tokens", type=int, default=256, help="mean tokens per document (build)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shards", type=int, default=1000)
    p.add_argument("--docs-per-shard", type=int, default=2000)
    p.add_argument("--shard-mean-tokens", type=int, default=16)
    p.add_argument("--folder", help="scratch folder (default: a temporary one, removed)")
    p.add_argument("--merge-child", nargs=3, metavar=("METHOD", "LIST", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tracemalloc", action="store_true", help="also measure Megatron's tracemalloc peak (slow)")
    p.add_argument("--megatron-gc", action="store_true", help="also run Megatron's add_index as shipped (gc.collect "
                   "per shard, ~0.2 s each)")
    args = p.parse_args()
    if args.merge_child:
        return merge_child(*args.merge_child, args.trace, args.megatron_gc)
    folder = args.folder or tempfile.mkdtemp(prefix="bench_indexed_")
    os.makedirs(folder, exist_ok=True)
    try:
        bench_build(folder, args.documents, args.mean_tokens, args.repeats)
        merge_folder = os.path.join(folder, "merge")
        os.makedirs(merge_folder, exist_ok=True)
        bench_merge(merge_folder, args.shards, args.docs_per_shard, args.shard_mean_tokens, args.tracemalloc,
                    args.megatron_gc)
    finally:
        if not args.folder:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
