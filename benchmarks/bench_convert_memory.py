"""Peak resident memory of tools/convert_checkpoint.py against the size of the largest parent on disk.

    python benchmarks/bench_convert_memory.py                  # 1.3 GB fp32 Llama-shaped parents (24 x d=1024)
    python benchmarks/bench_convert_memory.py --from-megatron  # the same, parents as megatron-jam checkpoints
    python benchmarks/bench_convert_memory.py --num-layers 8   # 0.6 GB parents: the vocabulary tables weigh more

Writes two random Llama-shaped parents (safetensors, fp32, one file per layer
as big HF checkpoints are sharded), runs each conversion in a fresh process
and reads its peak RSS (`ru_maxrss` of the waited child). This script itself
never imports torch and writes the parents in a child process: a forked child's
`ru_maxrss` starts at its parent's RSS (the kernel keeps the pre-exec peak), so
a benchmark that held the parents would inflate every figure it measures.
`baseline` is a process that only imports torch, Megatron-Core and
megatron_jam: the part of the peak that does not depend on the model.
Goal (issue 5): peak / largest parent <= 1.5. Results: docs/convert.md.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_parent(path: str, args, seed: int) -> int:
    """Runs in a child process (see the module docstring)."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    d, f, h, g, v = args.hidden_size, args.ffn_hidden_size, args.num_heads, args.num_kv_heads, args.vocab_size
    hd = d // h
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=v, hidden_size=d,
               intermediate_size=f, num_hidden_layers=args.num_layers, num_attention_heads=h,
               num_key_value_heads=g, max_position_embeddings=4096, rms_norm_eps=1e-5,
               tie_word_embeddings=False, hidden_act="silu")
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen) * 0.02  # noqa: E731
    # One file per layer, as big HF checkpoints are sharded, plus an index.
    weight_map = {}
    files = {"model-embed.safetensors": {"model.embed_tokens.weight": rnd(v, d), "lm_head.weight": rnd(v, d),
                                         "model.norm.weight": torch.ones(d)}}
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        files[f"model-{i:05d}.safetensors"] = {
            p + "self_attn.q_proj.weight": rnd(h * hd, d), p + "self_attn.k_proj.weight": rnd(g * hd, d),
            p + "self_attn.v_proj.weight": rnd(g * hd, d), p + "self_attn.o_proj.weight": rnd(d, h * hd),
            p + "mlp.gate_proj.weight": rnd(f, d), p + "mlp.up_proj.weight": rnd(f, d),
            p + "mlp.down_proj.weight": rnd(d, f), p + "input_layernorm.weight": torch.ones(d),
            p + "post_attention_layernorm.weight": torch.ones(d)}
    for name, tensors in files.items():
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map |= {k: name for k in tensors}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    return sum(os.path.getsize(os.path.join(path, n)) for n in files)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _shape_flags(args) -> list[str]:
    return ["--hidden-size", str(args.hidden_size), "--ffn-hidden-size", str(args.ffn_hidden_size),
            "--num-layers", str(args.num_layers), "--num-heads", str(args.num_heads),
            "--num-kv-heads", str(args.num_kv_heads), "--vocab-size", str(args.vocab_size)]


def peak_rss_of(cmd: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes of the child process, seconds)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return usage.ru_maxrss * 1024, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden-size", type=int, default=1024)
    ap.add_argument("--ffn-hidden-size", type=int, default=2816)
    ap.add_argument("--num-layers", type=int, default=24)
    ap.add_argument("--num-heads", type=int, default=16)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--methods", nargs="+", default=["import", "uniform", "cross", "width"])
    ap.add_argument("--from-megatron", action="store_true",
                    help="import both parents first (not measured) and merge the megatron-jam checkpoints")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--output", default=None, help="write the results as JSON")
    ap.add_argument("--write-parent", nargs=2, metavar=("DIR", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_parent:
        write_parent(args.write_parent[0], args, int(args.write_parent[1]))
        return
    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    try:
        for name, seed in (("llm", 1), ("img", 2)):
            subprocess.run([sys.executable, os.path.abspath(__file__), *_shape_flags(args),
                            "--write-parent", os.path.join(work, name), str(seed)], check=True)
        tool = os.path.join(ROOT, "tools", "convert_checkpoint.py")
        names = ("llm", "img")
        if args.from_megatron:
            for n in names:
                subprocess.run([sys.executable, tool, "--method", "import", "--load", os.path.join(work, n),
                                "--save", os.path.join(work, f"{n}_mj")], check=True, capture_output=True)
                shutil.rmtree(os.path.join(work, n))
            names = ("llm_mj", "img_mj")
        sizes = [_dir_bytes(os.path.join(work, n)) for n in names]
        largest = max(sizes)
        base, _ = peak_rss_of([sys.executable, "-c", "import torch, megatron.core, megatron_jam"])
        rows = []
        for m in args.methods:
            out = os.path.join(work, f"out_{m}")
            load = ["--load", os.path.join(work, names[0])] if m == "import" else \
                ["--llm", os.path.join(work, names[0]), "--img", os.path.join(work, names[1])]
            peak, secs = peak_rss_of([sys.executable, tool, "--method", m, *load, "--save", out])
            out_bytes = _dir_bytes(out)
            rows.append(dict(method=m, peak_rss_mb=peak / 2**20, ratio=peak / largest,
                             ratio_net_of_baseline=(peak - base) / largest, output_mb=out_bytes / 2**20,
                             seconds=round(secs, 1)))
            shutil.rmtree(out)
        result = dict(largest_parent_mb=largest / 2**20, baseline_rss_mb=base / 2**20, rows=rows,
                      parents="megatron-jam checkpoints" if args.from_megatron else "Hugging Face safetensors",
                      shape=vars(args) | {"workdir": None, "output": None, "write_parent": None})
        print(f"parents: {result['parents']}; largest on disk: {largest / 2**20:.0f} MB; "
              f"import-only baseline RSS {base / 2**20:.0f} MB")
        print(f"{'method':8} {'peak RSS MB':>12} {'peak/parent':>12} {'(peak-base)/parent':>19} "
              f"{'output MB':>10} {'s':>6}")
        for r in rows:
            print(f"{r['method']:8} {r['peak_rss_mb']:12.0f} {r['ratio']:12.2f} {r['ratio_net_of_baseline']:19.2f} "
                  f"{r['output_mb']:10.0f} {r['seconds']:6.1f}")
        if args.output:
            with open(args.output, "w") as fh:
                json.dump(result, fh, indent=2)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
