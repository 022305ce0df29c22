"""Generation speed: KV cache against full recomputation, and batched CFG against two passes.

    python benchmarks/bench_generation.py                      # JAM-Cross, 1,024-token image
    python benchmarks/bench_generation.py --hidden 256 --layers 4 --tokens-per-image 1024

1. One image of `--tokens-per-image` tokens (the paper's 1,024) from a prompt that
   ends with `<break>`, greedy, no CFG: tokens/s with the KV cache and without it
   (every step recomputes all slots). The ids must be equal.
2. `--cfg-batch` prompts each generating an image with classifier-free guidance:
   conditional and unconditional rows in one batch (what the generator does)
   against two separate passes per token (conditional batch, then unconditional
   batch, each with its own cache). The ids must be equal.

3. The weight-read bound: a decode step must read every weight once, so bytes of weights / memory
   bandwidth (measured here: a large tensor copy, read + write) is the least a token can cost; each
   decode step's ms/token is reported against it (`vs_weight_read_bound`: 1.0 is the bound), for every
   `--decode-steps` mode (inference/static_decode.py: eager, static = fixed shapes, cuda-graph = static
   captured once and replayed; default eager,static on a CPU, and cuda-graph too on CUDA). The ids of
   every mode must equal eager's.

Random weights (speed does not depend on them), fp32 (or --bf16), CPU unless CUDA is present.
Prints one JSON object; docs/generation.md has the figures.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build(args):
    import torch

    from megatron_jam.convert.checkpoint import build_single, ensure_single_rank
    from megatron_jam.data.vocab import VocabLayout
    from megatron_jam.models.config import JamCrossConfig, ParentConfig

    ensure_single_rank()
    layout = VocabLayout(text_vocab_size=args.text_vocab, codebook_size=args.codebook,
                         tokens_per_image=args.tokens_per_image, num_sentinels=2)
    ctx = args.prompt_len + args.tokens_per_image + 8
    parent = dict(family="opt", num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                  max_position_embeddings=ctx, add_bias_linear=False, learnable_norm=False)
    cfg = JamCrossConfig(llm=ParentConfig(**parent), img=ParentConfig(**parent), vocab_size=layout.vocab_size,
                         cross_every=args.cross_every, cross_zero_init=False, seq_length=ctx)
    torch.manual_seed(0)
    return build_single(cfg, bf16=args.bf16).eval(), cfg, layout


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def cache_vs_recompute(model, cfg, layout, args) -> dict:
    from megatron_jam.inference.decoding import InterleavedGenerator
    from megatron_jam.inference.sampling import SamplingParams

    prompt = [[i % layout.text_vocab_size for i in range(args.prompt_len - 1)] + [layout.break_id]]
    n = layout.tokens_per_image
    InterleavedGenerator(model, cfg, layout).generate([prompt[0][:-1]], SamplingParams.greedy(), 4)  # warm-up
    res = {}
    for name, use_cache in (("cache", True), ("no_cache", False)):
        gen = InterleavedGenerator(model, cfg, layout, use_cache=use_cache)
        out, sec = timed(lambda: gen.generate(prompt, SamplingParams.greedy(), n)[0])
        res[name] = {"seconds": round(sec, 2), "tokens_per_s": round(len(out.ids) / sec, 1), "ids": out.ids}
    assert res["cache"].pop("ids") == res["no_cache"].pop("ids"), "cache and recompute disagree"
    res["speedup"] = round(res["cache"]["tokens_per_s"] / res["no_cache"]["tokens_per_s"], 1)
    return res


def two_passes(stepper, layout, prompts, n, scale):
    """Greedy CFG image with separate conditional and unconditional batches (two forwards per token)."""
    import torch

    from megatron_jam.inference.decoding import unconditional_id
    from megatron_jam.inference.kv_cache import KVCache, SlotTable
    from megatron_jam.inference.sampling import VocabMasks, cfg_combine, restrict

    masks = VocabMasks(layout, stepper.model.cfg.padded_vocab_size)
    b = len(prompts)
    runs = []
    for seqs in (prompts, [[unconditional_id(layout), layout.break_id]] * b):  # the generator's unconditional row
        width = max(map(len, seqs))
        slots, cache = SlotTable(b, width + n), KVCache(width + n)
        tok = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
        pos = torch.tensor([[0] * (width - len(s)) + list(range(len(s))) for s in seqs])
        val = torch.tensor([[False] * (width - len(s)) + [True] * len(s) for s in seqs])
        runs.append([slots, cache, slots.add(tok, pos, val), width, [len(s) for s in seqs]])
    out = []
    for _ in range(n):
        cond, uncond = (stepper.step(s, c, st, w) for s, c, st, w, _ in runs)
        ids = restrict(cfg_combine(cond, uncond, scale), masks.image).argmax(-1)
        out.append(ids)
        for r in runs:
            s = r[0]
            r[2], r[3] = s.add(ids[:, None], torch.tensor(r[4])[:, None], torch.ones(b, 1, dtype=torch.bool)), 1
            r[4] = [p + 1 for p in r[4]]
    return torch.stack(out, 1).tolist()


def batched_vs_two_passes(model, cfg, layout, args) -> dict:
    from megatron_jam.inference.decoding import InterleavedGenerator
    from megatron_jam.inference.sampling import SamplingParams

    n = min(args.cfg_tokens, layout.tokens_per_image)
    prompts = [[(7 * j + i) % layout.text_vocab_size for i in range(args.prompt_len - 1)] + [layout.break_id]
               for j in range(args.cfg_batch)]
    gen = InterleavedGenerator(model, cfg, layout)
    full = layout.tokens_per_image
    batched, sec_b = timed(lambda: gen.generate(prompts, SamplingParams.greedy(args.cfg_scale), full))
    two, sec_t = timed(lambda: two_passes(gen.stepper, layout, prompts, n, args.cfg_scale))
    assert [o.ids[:n] for o in batched] == two, "batched CFG and two passes disagree"
    per_tok_b, per_tok_t = sec_b / full, sec_t / n
    return {"prompts": args.cfg_batch, "image_tokens": full, "two_pass_tokens_timed": n,
            "batched_ms_per_step": round(1000 * per_tok_b, 1), "two_passes_ms_per_step": round(1000 * per_tok_t, 1),
            "batched_tokens_per_s": round(args.cfg_batch / per_tok_b, 1),
            "two_passes_tokens_per_s": round(args.cfg_batch / per_tok_t, 1),
            "speedup": round(per_tok_t / per_tok_b, 2)}


def memory_bandwidth_gbs(device: str, mib: int = 512, repeats: int = 5) -> float:
    """Copy bandwidth of this device (GB/s counting the read and the write), best of `repeats`."""
    import torch

    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def decode_steps(model, cfg, layout, args, modes: list[str]) -> dict:
    """The same greedy image (KV cache, no CFG) with each decode-step mode: seconds, ms per token (the
    capture of a CUDA graph included: once per generate call)."""
    import torch

    from megatron_jam.inference.decoding import InterleavedGenerator
    from megatron_jam.inference.sampling import SamplingParams

    prompt = [[i % layout.text_vocab_size for i in range(args.prompt_len - 1)] + [layout.break_id]]
    res, ids = {}, {}
    for mode in modes:
        gen = InterleavedGenerator(model, cfg, layout, decode_step=mode)
        gen.generate(prompt, SamplingParams.greedy(), layout.tokens_per_image)  # warm-up (allocator, kernels)
        out, sec = timed(lambda: _synced(lambda: gen.generate(prompt, SamplingParams.greedy(),
                                                              layout.tokens_per_image)[0]))
        ids[mode] = out.ids
        res[mode] = {"seconds": round(sec, 3), "ms_per_token": round(1e3 * sec / len(out.ids), 3)}
    fp32 = next(model.parameters()).dtype == torch.float32
    for mode in modes:
        same = next((i for i, (a, b) in enumerate(zip(ids[mode], ids[modes[0]])) if a != b), None)
        if fp32:  # exact there; in bf16 a near-tie may flip a greedy choice (other kernel lengths), reported only
            assert same is None, f"decode step {mode} gives other ids than {modes[0]} from token {same}"
        res[mode]["first_token_unlike_" + modes[0]] = same
    return res


def _synced(fn):
    import torch

    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def weight_read_bound(model, device: str, steps: dict) -> dict:
    """ms/token if a step only read the weights at the measured bandwidth, against each mode's step."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gbs = memory_bandwidth_gbs(device)
    bound_ms = weight_bytes / (gbs * 1e9) * 1e3
    return {"weight_bytes": weight_bytes, "bandwidth_gb_s": round(gbs, 1), "bound_ms_per_token": round(bound_ms, 4),
            "vs_weight_read_bound": {m: round(r["ms_per_token"] / bound_ms, 2) for m, r in steps.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--cross-every", type=int, default=2)
    p.add_argument("--text-vocab", type=int, default=1000)
    p.add_argument("--codebook", type=int, default=1024)
    p.add_argument("--tokens-per-image", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--cfg-batch", type=int, default=4)
    p.add_argument("--cfg-scale", type=float, default=3.5)
    p.add_argument("--cfg-tokens", type=int, default=1024, help="image tokens timed for the two-pass baseline")
    p.add_argument("--skip-no-cache", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 weights (the weight-read bound halves)")
    p.add_argument("--decode-steps", help="comma list of eager, static, cuda-graph (default: eager,static, "
                                          "and cuda-graph on CUDA)")
    args = p.parse_args(argv)
    import torch

    import megatron_jam  # noqa: F401

    model, cfg, layout = build(args)
    result = {"model": {"kind": "jam_cross", "hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                        "cross_every": args.cross_every, "vocab": layout.vocab_size,
                        "dtype": "bf16" if args.bf16 else "fp32"},
              "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
              "tokens_per_image": layout.tokens_per_image}
    if not args.skip_no_cache:
        result["cache_vs_no_cache"] = cache_vs_recompute(model, cfg, layout, args)
    modes = args.decode_steps.split(",") if args.decode_steps else \
        ["eager", "static"] + (["cuda-graph"] if torch.cuda.is_available() else [])
    result["decode_steps"] = decode_steps(model, cfg, layout, args, modes)
    result["weight_read_bound"] = weight_read_bound(model, result["device"], result["decode_steps"])
    result["cfg_batched_vs_two_passes"] = batched_vs_two_passes(model, cfg, layout, args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
