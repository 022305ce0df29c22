"""Convert parent checkpoints into megatron-jam checkpoints (and back to Hugging Face format).

    python tools/convert_checkpoint.py --method import  --load hf/llama-7b --save ckpt/llm
    python tools/convert_checkpoint.py --method uniform --llm hf/llm --img hf/cm3leon --save ckpt/uniform
    python tools/convert_checkpoint.py --method width   --llm hf/llm --img hf/cm3leon --width-init average \
        --save ckpt/width
    python tools/convert_checkpoint.py --method cross   --llm hf/llm --img hf/cm3leon --cross-every 2 \
        --vocab-layout shards/mix.vocab.json --save ckpt/cross
    python tools/convert_checkpoint.py --method export  --load ckpt/uniform --save hf/uniform

See tools/README.md and docs/convert.md. Exit codes: 0 done, 2 the conversion is
impossible (the message names the tensor, file or setting), nothing written.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_jam.utils.cli import add_debug_arg, require_path, run_cli  # noqa: E402  (light: no torch)

METHODS = ("import", "uniform", "width", "cross", "export")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="megatron-jam checkpoint conversion (JAM paper section 2.1)")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--load", help="import: a Hugging Face folder; export: a megatron-jam checkpoint")
    p.add_argument("--llm", help="the text LLM parent (HF folder or megatron-jam checkpoint)")
    p.add_argument("--img", help="the image-text parent (HF folder or megatron-jam checkpoint)")
    p.add_argument("--save", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--llm-weight", type=float, default=0.5, help="uniform: w in w*llm + (1-w)*img (eq. 1)")
    p.add_argument("--width-init", choices=["copy", "average"], default="copy", help="width: eq. 2 or eq. 3")
    p.add_argument("--cross-every", type=int, default=2, help="cross: k, a pair of cross blocks every k layers")
    p.add_argument("--vocab-layout", help="the dataset's PREFIX.vocab.json (text / special / image rows)")
    p.add_argument("--text-vocab-size", type=int, help="text rows T when there is no --vocab-layout")
    p.add_argument("--seq-length", type=int, help="training sequence length stored in the model config")
    p.add_argument("--bf16", action="store_true", help="store bf16 weights (default fp32)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1,
                   help="only checked: the checkpoint loads at any layout")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1, help="only checked, as above")
    p.add_argument("--seed", type=int, default=1234, help="initialisation of new parts (cross blocks)")
    add_debug_arg(p)
    return p


def run(args: argparse.Namespace) -> dict:
    from megatron_jam.convert.common import ConvertError
    from megatron_jam.utils.paths import output_dir_problem

    problem = output_dir_problem(args.save)
    if problem:  # before any parent is read
        raise ConvertError(f"--save {args.save}: {problem}")
    if args.method in ("import", "export"):
        if not args.load or args.llm or args.img:
            raise ConvertError(f"--method {args.method} takes --load (and no --llm / --img)")
        load = (args.load,)
    else:
        if not (args.llm and args.img) or args.load:
            raise ConvertError(f"--method {args.method} takes --llm and --img (and no --load)")
        load = (args.llm, args.img)
    for flag, path in zip(("--load",) if args.load else ("--llm", "--img"), load):
        require_path(flag, path, directory=True)  # before torch and Megatron-Core are imported
    from megatron_jam.convert.export import export_hf
    from megatron_jam.convert.pipeline import ConvertOptions, convert

    if args.method == "export":
        return {"method": "export", "hf_config": export_hf(args.load, args.save)}
    opts = ConvertOptions(
        method=args.method, load=load, save=args.save, llm_weight=args.llm_weight, width_init=args.width_init,
        cross_every=args.cross_every, vocab_layout=args.vocab_layout, text_vocab_size=args.text_vocab_size,
        seq_length=args.seq_length, bf16=args.bf16, target_tensor_parallel_size=args.target_tensor_parallel_size,
        target_pipeline_parallel_size=args.target_pipeline_parallel_size, seed=args.seed)
    return convert(opts)


def main(argv: list[str] | None = None) -> int:
    """The command line; a bad input is one line on stderr and exit code 2 (megatron_jam.utils.cli)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    record = run(args)
    summary = {"save": args.save, "method": record["method"], "vocab": record.get("vocab")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":  # dist_checkpointing's writer re-imports entry scripts with spawn
    from megatron_jam.utils.memory import return_large_frees_to_os

    return_large_frees_to_os()  # this process only: freed parts give their pages back (docs/convert.md)
    sys.exit(main())
