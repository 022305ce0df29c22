"""Time a JAM-Cross training step against the two parent GPT steps, side by side in one run.

Goal (foundation issue): the fused step costs no more than the parents' steps
plus the cross blocks' FLOP share, within 15%, i.e.
    overhead = (t_jam / (t_llm + t_img)) / (F_jam / (F_llm + F_img)) - 1 <= 0.15
with F the analytic training FLOPs (megatron_jam/models/flops.py). Each step is
forward + backward through Megatron-Core's schedule (DDP-wrapped model,
`finalize_model_grads`), no optimizer; the three models are timed round-robin
so machine noise hits all of them alike, and medians are reported.

    python benchmarks/bench_jam_cross_step.py                    # CPU, fp32
    python benchmarks/bench_jam_cross_step.py --hidden-size 1024 --num-layers 8 --seq-length 1024  # GPU
"""

import argparse
import json
import statistics
import time

import torch


def _parser():
    p = argparse.ArgumentParser()
    p.add_argument("--family", choices=["opt", "llama"], default="opt")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--num-microbatches", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--cross-every", type=int, default=2)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    return p


def _parent_cls(vocab):
    from megatron_jam.models.builders import build_parent_gpt

    def make(p, pre_process, post_process, vp_stage=None, **parallel):
        return build_parent_gpt(p, vocab, pre_process, post_process, vp_stage=vp_stage, **parallel)

    return make


def _batches(args, device):
    from megatron_jam.testing.equivalence import make_batches

    out = make_batches(args.vocab_size, args.num_microbatches, args.micro_batch_size, args.seq_length)
    return [{k: v.to(device) for k, v in b.items()} for b in out]


def _time_step(chunks, batches, args) -> float:
    from megatron_jam.parallel.schedule import forward_backward

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    forward_backward(chunks, iter(batches), args.num_microbatches, args.seq_length, args.micro_batch_size)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    args = _parser().parse_args()
    from megatron_jam.models.config import JamCrossConfig, ParentConfig
    from megatron_jam.models.flops import cross_blocks_flops_per_token, jam_cross_flops_per_token, \
        parent_flops_per_token
    from megatron_jam.models.jam_cross import JamCrossModel
    from megatron_jam.parallel.initialize import initialize_distributed, initialize_model_parallel
    from megatron_jam.parallel.model import build_model_chunks, parallel_kwargs

    initialize_distributed()
    initialize_model_parallel(1, 1, seed=0)
    p = ParentConfig(family=args.family, num_layers=args.num_layers, hidden_size=args.hidden_size,
                     num_attention_heads=args.num_attention_heads, max_position_embeddings=args.seq_length,
                     add_bias_linear=False)
    cfg = JamCrossConfig(llm=p, img=p, vocab_size=args.vocab_size, cross_every=args.cross_every,
                         seq_length=args.seq_length, make_vocab_size_divisible_by=128)
    par = parallel_kwargs(bf16=args.bf16)
    models = {
        "llm": build_model_chunks(_parent_cls(cfg.padded_vocab_size), p, par),
        "img": build_model_chunks(_parent_cls(cfg.padded_vocab_size), p, par),
        "jam_cross": build_model_chunks(JamCrossModel, cfg, par),
    }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches = _batches(args, device)
    times = {k: [] for k in models}
    for it in range(args.warmup + args.iters):
        for name, chunks in models.items():
            dt = _time_step(chunks, batches, args)
            if it >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    s = args.seq_length
    f_parent = parent_flops_per_token(p, cfg.padded_vocab_size, s)
    f_jam = jam_cross_flops_per_token(cfg, s)
    tokens = args.num_microbatches * args.micro_batch_size * s
    t_parents = med["llm"] + med["img"]
    out = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "config": vars(args),
        "step_seconds_median": med,
        "tokens_per_step": tokens,
        "tokens_per_second": {k: tokens / v for k, v in med.items()},
        "cross_blocks_flop_share_of_parents": cross_blocks_flops_per_token(cfg, s) / (2 * f_parent),
        "flop_ratio_jam_over_parents": f_jam / (2 * f_parent),
        "time_ratio_jam_over_parents": med["jam_cross"] / t_parents,
    }
    out["overhead_vs_flop_budget"] = out["time_ratio_jam_over_parents"] / out["flop_ratio_jam_over_parents"] - 1
    out["goal_met(<=0.15)"] = out["overhead_vs_flop_budget"] <= 0.15
    for k, v in med.items():
        print(f"{k:>10}: {v * 1e3:8.1f} ms/step  {tokens / v:9.0f} tokens/s")
    print(f"time ratio JAM / (LLM + IMG) = {out['time_ratio_jam_over_parents']:.3f}; "
          f"FLOP ratio = {out['flop_ratio_jam_over_parents']:.3f} "
          f"(cross blocks = {out['cross_blocks_flop_share_of_parents']:.1%} of the parents' FLOPs); "
          f"overhead vs FLOP budget = {out['overhead_vs_flop_budget']:+.1%} (goal <= +15%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
