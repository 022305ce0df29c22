#!/usr/bin/env python
"""Time to produce one CM3 training sample on one core (the transform alone and a full dataset sample).

Documents are synthetic interleaved documents (text runs of 20-400 tokens, images of
1024 codes, a few per document) in the JAM layout; a sample is a window of
seq_length + 1 tokens. Prints microseconds per sample for: the CM3 transform
(lambda = 1), `make_sample` (CM3 + loss weights + torch tensors), and `JamDataset[i]`
(reading the window from a memory-mapped shard + all of the above).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--poisson-lambda", type=float, default=1.0)
    args = p.parse_args()
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from jam_data_helpers import write_dataset
    from megatron_jam.data.cm3 import CM3Config, cm3_transform
    from megatron_jam.data.cm3_dataset import build_train_valid_test_datasets, make_sample
    from megatron_jam.data.documents import IMAGE, TEXT, build_sequences
    from megatron_jam.data.vocab import VocabLayout

    layout = VocabLayout(text_vocab_size=32000, codebook_size=8192, tokens_per_image=1024)
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(600):
        segs = [(TEXT, rng.integers(0, 32000, int(rng.integers(20, 400)))) if rng.random() < 0.6 else
                (IMAGE, layout.image_offset + rng.integers(0, 8192, 1024)) for _ in range(int(rng.integers(1, 6)))]
        docs.append(build_sequences(segs, layout))
    stream = np.concatenate([np.concatenate(d[0]) for d in docs])
    total = args.seq_length + 1
    starts = rng.integers(0, stream.size - total, args.samples)
    cfg = CM3Config(poisson_lambda=args.poisson_lambda)
    ones = np.ones(total, np.float32)
    for name, fn in (("cm3_transform", lambda x, r: cm3_transform(x, layout, r, cfg)),
                     ("make_sample (CM3 + weights + tensors)", lambda x, r: make_sample(x, ones, args.seq_length,
                                                                                        layout, cfg, r))):
        t = time.perf_counter()
        for i, s in enumerate(starts):
            fn(stream[s:s + total], np.random.default_rng([0, i]))
        us = (time.perf_counter() - t) / args.samples * 1e6
        print(f"{name:45s} {us:8.1f} us/sample  ({args.seq_length} tokens, lambda {args.poisson_lambda})")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = write_dataset(os.path.join(tmp, "bench"), docs, layout)
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)
        train, _, _ = build_train_valid_test_datasets([prefix], "100,0,0", args.seq_length, 1,
                                                      (args.samples, None, None),
                                                      cfg, data_cache_path=os.path.join(tmp, "cache"))
        t = time.perf_counter()
        for i in range(args.samples):
            train[i]
        us = (time.perf_counter() - t) / args.samples * 1e6
        print(f"{'JamDataset[i] (mmap read + CM3 + tensors)':45s} {us:8.1f} us/sample")
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
