"""Training throughput of each JAM method at one fixed tiny size: tokens/s and model TFLOP/s per rank.

The three models share the parents' shape (Llama-style, d=64, 4 layers,
seq 128): JAM-Uniform has one parent's shape, JAM-Width doubles width, heads
and MLP, JAM-Cross keeps two stacks plus cross blocks every 2 layers. Each
runs the real trainer (`megatron_jam.training.loop.main`, mock data, Adam,
clipping) for `--iters` steps; the first `--warmup` are dropped and the median
is reported.

MFU = achieved model FLOP/s / peak FLOP/s, with the model FLOPs of
`megatron_jam/models/flops.py`: 6 x (matmul parameters) + 12 x layers x s x d
per token for forward and backward (plus the cross blocks' attention for
JAM-Cross). Peak is the accelerator's dense bf16 figure (`--peak-tflops`, e.g.
989 for an H100 SXM); on CPU no peak is assumed and only TFLOP/s is printed.

    python benchmarks/bench_training_throughput.py               # one process, CPU, fp32
    torchrun --nproc_per_node 8 benchmarks/bench_training_throughput.py --peak-tflops 989 --bf16
"""

import argparse
import json
import os
import statistics
import tempfile

PARENT = {"family": "llama", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
          "ffn_hidden_size": 128, "max_position_embeddings": 256, "add_bias_linear": False}


def _configs(vocab: int, seq: int) -> dict:
    wide = PARENT | {"hidden_size": 128, "num_attention_heads": 8, "num_query_groups": 4, "ffn_hidden_size": 256}
    gpt = lambda p: {"model_type": "gpt", "parent": p, "vocab_size": vocab, "seq_length": seq}  # noqa: E731
    return {"uniform": gpt(PARENT), "width": gpt(wide),
            "cross": {"model_type": "jam_cross", "llm": PARENT, "img": PARENT, "vocab_size": vocab,
                      "cross_every": 2, "seq_length": seq}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from megatron_jam.training.loop import main as train
    from megatron_jam.utils.logging import global_rank

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in _configs(a.vocab_size, a.seq_length).items():
            path = os.path.join(tmp, f"{name}.json")
            with open(path, "w") as f:
                json.dump(cfg, f)
            argv = ["--model-config", path, "--train-iters", str(a.iters), "--seq-length", str(a.seq_length),
                    "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size", str(a.global_batch_size),
                    "--log-interval", str(10**6)] + (["--bf16"] if a.bf16 else [])
            hist = train(argv)[a.warmup:]
            out[name] = {"tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in hist),
                         "tflops_per_gpu": statistics.median(r["tflops_per_gpu"] for r in hist),
                         "iteration_time_ms": statistics.median(r["iteration_time_ms"] for r in hist)}
            if a.peak_tflops:
                out[name]["mfu"] = out[name]["tflops_per_gpu"] / a.peak_tflops
    if global_rank() == 0:
        for name, r in out.items():
            mfu = f"  MFU {r['mfu']:.1%}" if "mfu" in r else ""
            print(f"{name:>8}: {r['tokens_per_sec']:9.0f} tokens/s  {r['tflops_per_gpu']:.4f} TFLOP/s per rank  "
                  f"{r['iteration_time_ms']:.1f} ms/iteration{mfu}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
