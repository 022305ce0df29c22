#!/usr/bin/env python
"""FAISS index build and query throughput on random normalised embeddings (default 100,000 x 512).

Exact (IndexFlatIP) and IVF (IndexIVFFlat, nlist = 4 sqrt(N), nprobe 16) indices, plus the
numpy fallback's exact search; queries are batches of bank vectors plus noise, and
recall@10 of IVF against the exact result is printed.
"""

import argparse
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    from megatron_jam.data.retrieval import MipsIndex, have_faiss, normalize_rows

    if have_faiss():
        import faiss

        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    bank = normalize_rows(rng.standard_normal((args.num, args.dim), dtype=np.float32))
    queries = normalize_rows(bank[rng.integers(0, args.num, args.queries)] +
                             0.5 * normalize_rows(rng.standard_normal((args.queries, args.dim), dtype=np.float32)))
    print(f"bank {args.num} x {args.dim}, {args.queries} queries, k={args.k}, threads={args.threads}, "
          f"backend {'faiss' if have_faiss() else 'numpy'}")
    exact_ids = None
    kinds = ["flat", "ivf"] if have_faiss() else ["flat"]
    for kind in kinds:
        t = time.perf_counter()
        index = MipsIndex.build(bank, kind=kind, nprobe=args.nprobe)
        build = time.perf_counter() - t
        t = time.perf_counter()
        _, ids = index.search(queries, args.k)
        search = time.perf_counter() - t
        recall = "" if exact_ids is None else \
            f", recall@10 vs exact {np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(ids, exact_ids)]):.3f}"
        exact_ids = ids if exact_ids is None else exact_ids
        extra = f" (nlist {index.nlist}, nprobe {args.nprobe})" if kind == "ivf" else ""
        print(f"{kind:5s}{extra}: build {build:.2f} s; query {args.queries / search:,.0f} queries/s{recall}")


if __name__ == "__main__":
    main()
