"""Training throughput of each JAM method at one parent shape: tokens/s, model TFLOP/s and MFU per rank.

The three models share the parents' shape (Llama-style; default d=64, 4
layers, seq 128, the CPU figures of docs/training.md; `--hidden-size`,
`--num-layers`, ... for a GPU-sized run): JAM-Uniform has one parent's shape,
JAM-Width doubles width, heads, query groups and MLP, JAM-Cross keeps two
stacks plus cross blocks every `--cross-every` layers. Each runs the real
trainer (`megatron_jam.training.loop.main`, mock data, Adam, clipping) for
`--iters` steps; the first `--warmup` are dropped and the median is reported.
`--baseline` adds plain Megatron-Core: a `GPTModel` of the parent shape with
Megatron's own local layer spec, driven by a minimal loop (DDP, Megatron
optimizer, `get_forward_backward_func`, random tokens already on the device),
the yardstick for the trainer's overhead.

MFU = achieved model FLOP/s / peak FLOP/s, with the model FLOPs of
`megatron_jam/models/flops.py`: 6 x (matmul parameters) + 12 x layers x s x d
per token for forward and backward (plus the cross blocks' attention for
JAM-Cross). Peak is the accelerator's dense bf16 figure (`--peak-tflops`, e.g.
989 for an H100/H200 SXM); on CPU no peak is assumed and only TFLOP/s is printed.
On a GPU the peak allocated memory of each run is reported too.

    python benchmarks/bench_training_throughput.py               # one process, CPU, fp32
    python benchmarks/bench_training_throughput.py --attention-backends auto,unfused   # SDPA vs unfused
    python benchmarks/bench_training_throughput.py --bf16 --peak-tflops 989 --hidden-size 2048 \
        --num-layers 8 --num-attention-heads 16 --num-query-groups 4 --seq-length 2048 \
        --micro-batch-size 2 --global-batch-size 8 --vocab-size 32000 --baseline     # one GPU (docs/gpu.md)
    torchrun --nproc_per_node 8 benchmarks/bench_training_throughput.py --peak-tflops 989 --bf16
"""

import argparse
import gc
import json
import os
import statistics
import tempfile
import time

PARENT = {"family": "llama", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
          "ffn_hidden_size": 128, "max_position_embeddings": 256, "add_bias_linear": False}


def _parent(a) -> dict:
    return PARENT | {"num_layers": a.num_layers, "hidden_size": a.hidden_size,
                     "num_attention_heads": a.num_attention_heads, "num_query_groups": a.num_query_groups,
                     "ffn_hidden_size": a.ffn_hidden_size or 2 * a.hidden_size,
                     "max_position_embeddings": max(256, a.seq_length)}


def _configs(parent: dict, vocab: int, seq: int, cross_every: int) -> dict:
    wide = parent | {k: 2 * parent[k] for k in ("hidden_size", "num_attention_heads", "num_query_groups",
                                                "ffn_hidden_size")}
    gpt = lambda p: {"model_type": "gpt", "parent": p, "vocab_size": vocab, "seq_length": seq}  # noqa: E731
    return {"uniform": gpt(parent), "width": gpt(wide),
            "cross": {"model_type": "jam_cross", "llm": parent, "img": parent, "vocab_size": vocab,
                      "cross_every": cross_every, "seq_length": seq}}


def _forget_attention_backend() -> None:
    """Runs here switch backends within one process (Megatron-Core pins one per process)."""
    from megatron_jam.models.attention import forget_attention_backend

    forget_attention_backend()


def _reset_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_gib():
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _baseline(a, parent: dict) -> dict:
    """Plain Megatron-Core: GPTModel (local spec) of the parent shape, a minimal training loop."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from megatron_jam.models.builders import parent_transformer_config
    from megatron_jam.models.config import JamCrossConfig, ParentConfig
    from megatron_jam.models.flops import parent_flops_per_token
    from megatron_jam.parallel.initialize import initialize_distributed, initialize_model_parallel

    initialize_distributed()
    initialize_model_parallel(1, 1, seed=1234)
    p = ParentConfig(**parent)
    vocab = JamCrossConfig(llm=p, img=p, vocab_size=a.vocab_size).padded_vocab_size
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    config = parent_transformer_config(p, bf16=a.bf16, params_dtype=dtype)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=vocab,
                     max_sequence_length=p.max_position_embeddings, position_embedding_type="rope",
                     share_embeddings_and_output_weights=True)
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model.to(dev)
    if a.bf16:
        model = Float16Module(config, model)
    ddp = DistributedDataParallel(config=config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=a.use_distributed_optimizer))
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, bf16=a.bf16, params_dtype=dtype,
                                                 clip_grad=1.0, use_distributed_optimizer=a.use_distributed_optimizer),
                                 [ddp])
    b, s = a.micro_batch_size, a.seq_length
    n_micro = a.global_batch_size // b
    g = torch.Generator(device=dev).manual_seed(0)
    batches = [{"tokens": torch.randint(0, a.vocab_size, (b, s + 1), device=dev, generator=g)}
               for _ in range(n_micro)]
    pos = torch.arange(s, device=dev).expand(b, s)

    def step_fn(it, m):
        t = next(it)["tokens"]
        out = m(t[:, :-1], pos, None, labels=t[:, 1:])
        return out, lambda o: (o.float().mean(), {"lm loss": o.float().mean().detach()})

    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        ddp.zero_grad_buffer()
        opt.zero_grad()
        get_forward_backward_func()(forward_step_func=step_fn, data_iterator=iter(batches), model=ddp,
                                    num_microbatches=n_micro, seq_length=s, micro_batch_size=b)
        opt.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times[a.warmup:])
    tokens = a.global_batch_size * s
    flops = parent_flops_per_token(p, vocab, s) * tokens
    return {"tokens_per_sec": tokens / dt, "tflops_per_gpu": flops / dt / 1e12, "iteration_time_ms": dt * 1e3}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=PARENT["hidden_size"], help="parent width d")
    p.add_argument("--num-layers", type=int, default=PARENT["num_layers"], help="parent depth")
    p.add_argument("--num-attention-heads", type=int, default=PARENT["num_attention_heads"])
    p.add_argument("--num-query-groups", type=int, default=PARENT["num_query_groups"])
    p.add_argument("--ffn-hidden-size", type=int, default=None, help="parent SwiGLU width (default 2 d)")
    p.add_argument("--cross-every", type=int, default=2, help="JAM-Cross: a cross block pair every k layers")
    p.add_argument("--methods", default="uniform,width,cross", help="comma-separated subset")
    p.add_argument("--baseline", action="store_true", help="also plain Megatron-Core GPTModel (parent shape)")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--attention-backends", default="auto",
                   help="comma-separated --attention-backend values run side by side (e.g. auto,unfused: SDPA "
                        "vs Megatron-Core's unfused attention; speed ratios against the last one)")
    p.add_argument("--num-workers", default="0",
                   help="comma-separated --num-workers values run side by side (e.g. 0,2: micro-batches built on "
                        "the training thread vs by background workers)")
    p.add_argument("--data-path", nargs="+", default=None,
                   help="train on these shards (the trainer's --data-path) instead of mock data: what the data "
                        "workers are for")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from megatron_jam.training.loop import main as train
    from megatron_jam.utils.logging import global_rank

    out = {}
    parent = _parent(a)
    configs = _configs(parent, a.vocab_size, a.seq_length, a.cross_every)
    backends = a.attention_backends.split(",")
    worker_counts = [int(w) for w in a.num_workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.methods.split(","):
            cfg = configs[name]
            path = os.path.join(tmp, f"{name}.json")
            with open(path, "w") as f:
                json.dump(cfg, f)
            argv = ["--model-config", path, "--train-iters", str(a.iters), "--seq-length", str(a.seq_length),
                    "--micro-batch-size", str(a.micro_batch_size), "--global-batch-size", str(a.global_batch_size),
                    "--log-interval", str(10**6)] + (["--data-path", *a.data_path, "--split", "100,0,0"]
                                                     if a.data_path else []) + (["--bf16"] if a.bf16 else []) + (
                   ["--use-distributed-optimizer"] if a.use_distributed_optimizer else [])
            for backend, workers in [(b, w) for b in backends for w in worker_counts]:
                label = name + (f" [{backend}]" if len(backends) > 1 else "") + (
                    f" [workers {workers}]" if len(worker_counts) > 1 else "")
                _reset_memory()
                _forget_attention_backend()
                hist = train(argv + ["--attention-backend", backend, "--num-workers", str(workers)])[a.warmup:]
                out[label] = {"tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in hist),
                              "tflops_per_gpu": statistics.median(r["tflops_per_gpu"] for r in hist),
                              "iteration_time_ms": statistics.median(r["iteration_time_ms"] for r in hist),
                              "final_lm_loss": hist[-1]["lm_loss"], "peak_memory_gib": _peak_memory_gib()}
            if len(worker_counts) > 1 and len(backends) == 1:
                base = out[f"{name} [workers {worker_counts[0]}]"]["tokens_per_sec"]
                for workers in worker_counts[1:]:
                    r = out[f"{name} [workers {workers}]"]
                    r[f"speed_vs_workers_{worker_counts[0]}"] = r["tokens_per_sec"] / base
            if len(backends) > 1 and len(worker_counts) == 1:
                base = out[f"{name} [{backends[-1]}]"]["tokens_per_sec"]
                for backend in backends[:-1]:
                    out[f"{name} [{backend}]"][f"speed_vs_{backends[-1]}"] = (
                        out[f"{name} [{backend}]"]["tokens_per_sec"] / base)
    if a.baseline:
        _reset_memory()
        _forget_attention_backend()
        out["megatron-core GPTModel"] = _baseline(a, parent) | {"peak_memory_gib": _peak_memory_gib()}
    for r in out.values():
        if a.peak_tflops:
            r["mfu"] = r["tflops_per_gpu"] / a.peak_tflops
    if global_rank() == 0:
        for name, r in out.items():
            mfu = f"  MFU {r['mfu']:.1%}" if "mfu" in r else ""
            mem = f"  peak {r['peak_memory_gib']:.1f} GiB" if r.get("peak_memory_gib") is not None else ""
            ratio = "".join(f"  x{v:.2f} {k[len('speed_'):].replace('_', ' ')}" for k, v in r.items()
                            if k.startswith("speed_vs_"))
            print(f"{name:>8}: {r['tokens_per_sec']:9.0f} tokens/s  {r['tflops_per_gpu']:.4f} TFLOP/s per rank  "
                  f"{r['iteration_time_ms']:.1f} ms/iteration{mfu}{mem}{ratio}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(vars(a) | {"results": out}, f, indent=2)


if __name__ == "__main__":
    main()
