"""JAM-Cross activation memory and step time with and without recomputation, side by side in one run.

Activation memory is measured as the bytes autograd keeps for the backward pass during one training forward
(`torch.autograd.graph.saved_tensors_hooks` on every tensor saved: exact on any device, parameters excluded),
plus, on a GPU, the peak allocated memory of the forward-backward step. Step time is the median of `--iters`
forward-backward passes after one warm-up. Variants: none, selective (core attention), full uniform
(1 layer per unit) and full block (all layers of the stage), all from the same weights.

    OMP_NUM_THREADS=1 python benchmarks/bench_recompute.py                     # CPU, fp32, tiny shape
    python benchmarks/bench_recompute.py --hidden-size 4096 --num-layers 4 --num-attention-heads 32 \\
        --num-query-groups 8 --ffn-hidden-size 14336 --seq-length 4096 --bf16            # GPU (gpu_check.sh)
"""

import argparse
import json
import statistics
import time

VARIANTS = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full uniform 1": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "full block all": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": None},
}


def _cfg(a):
    from megatron_jam.models.config import JamCrossConfig, ParentConfig

    p = ParentConfig(family="llama", num_layers=a.num_layers, hidden_size=a.hidden_size,
                     num_attention_heads=a.num_attention_heads, num_query_groups=a.num_query_groups,
                     ffn_hidden_size=a.ffn_hidden_size, max_position_embeddings=a.seq_length, add_bias_linear=False)
    return JamCrossConfig(llm=p, img=p, vocab_size=a.vocab_size, cross_every=a.cross_every, seq_length=a.seq_length,
                          cross_zero_init=False)


def _saved_bytes(model, ids, pos) -> int:
    """Bytes of the tensors autograd saves in one forward (parameters excluded, each storage counted once)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, pos, labels=ids).float().mean()
    loss.backward()
    return total[0]


def _step_ms(model, ids, pos, iters: int) -> float:
    import torch

    times = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        model(ids, pos, labels=ids).float().mean().backward()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _variant(a, cfg, fields, weights):
    import torch

    from megatron_jam.models.jam_cross import JamCrossModel
    from megatron_jam.parallel.model import parallel_kwargs

    if fields.get("recompute_method") == "block" and fields.get("recompute_num_layers") is None:
        fields = fields | {"recompute_num_layers": cfg.num_layers}
    model = JamCrossModel(cfg, **parallel_kwargs(bf16=a.bf16, **fields))
    model.load_state_dict(weights, strict=False)
    if torch.cuda.is_available():
        model.cuda()
    model.train()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (a.micro_batch_size, a.seq_length), generator=g).to(dev)
    pos = torch.arange(a.seq_length, device=dev).expand_as(ids)
    saved = _saved_bytes(model, ids, pos)
    peak = None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        model(ids, pos, labels=ids).float().mean().backward()
        peak = torch.cuda.max_memory_allocated() / 2**30
    return {"saved_activation_gib": saved / 2**30, "step_ms": _step_ms(model, ids, pos, a.iters), "peak_gib": peak}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-query-groups", type=int, default=2)
    p.add_argument("--ffn-hidden-size", type=int, default=128)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--cross-every", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()

    import megatron_jam  # noqa: F401
    from megatron_jam.models.jam_cross import JamCrossModel
    from megatron_jam.parallel.initialize import initialize_distributed, initialize_model_parallel
    from megatron_jam.parallel.model import parallel_kwargs

    initialize_distributed()  # one process: NCCL on a GPU, gloo otherwise, a free port
    initialize_model_parallel(1, 1, None, seed=1)
    cfg = _cfg(a)
    weights = JamCrossModel(cfg, **parallel_kwargs(bf16=a.bf16)).state_dict()
    out = {name: _variant(a, cfg, fields, weights) for name, fields in VARIANTS.items()}
    base = out["none"]
    for name, r in out.items():
        r["activation_vs_none"] = r["saved_activation_gib"] / base["saved_activation_gib"]
        r["time_vs_none"] = r["step_ms"] / base["step_ms"]
        peak = f"  peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""
        print(f"{name:>15}: saved activations {r['saved_activation_gib']:.4f} GiB (x{r['activation_vs_none']:.2f})  "
              f"step {r['step_ms']:.1f} ms (x{r['time_vs_none']:.2f}){peak}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(vars(a) | {"results": out}, f, indent=2)


if __name__ == "__main__":
    main()
