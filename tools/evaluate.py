"""Perplexity of a megatron-jam checkpoint over all, text and image tokens of a dataset.

    python tools/evaluate.py --load ckpt/cross --data-path shards/coco_val --seq-length 4096 \
        --output results/cross_coco.json
    torchrun --nproc-per-node 4 tools/evaluate.py --load ckpt/cross --data-path shards/wiki_val \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

Reads the architecture from the checkpoint's model_config.json (JAM-Cross or a
single stack). Every document is scored on its own, a long one in strided windows
(--eval-stride, default seq-length // 2; megatron_jam/evaluation.py). Prints the
result as JSON and writes it to --output. See tools/README.md.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_jam.utils.cli import add_debug_arg, require_path, run_cli  # noqa: E402  (light: no torch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="per-modality perplexity (paper: Wikipedia PPL, MS-COCO PPL)")
    p.add_argument("--load", required=True, help="checkpoint folder (converted or trained)")
    p.add_argument("--ckpt-step", type=int, default=None, help="a training folder's iteration (default: latest)")
    p.add_argument("--data-path", required=True, help="Megatron indexed dataset prefix (PREFIX.bin/.idx)")
    p.add_argument("--seq-length", type=int, default=None, help="window length (default: the model config's)")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--eval-stride", type=int, default=None,
                   help="a document longer than the window is scored in windows starting every this many tokens, "
                        "each token once with as much left context as fits (default: seq-length // 2)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--output", default=None, help="write the JSON result here (rank 0)")
    add_debug_arg(p)
    return p


def evaluate(args: argparse.Namespace) -> dict:
    import torch.distributed as dist

    from megatron_jam.convert.checkpoint import load_checkpoint
    from megatron_jam.evaluation import check_data, default_stride, perplexity
    from megatron_jam.models.kinds import load_model_config, model_class, validate_model_parallel
    from megatron_jam.parallel.initialize import initialize_distributed, initialize_model_parallel
    from megatron_jam.parallel.model import build_model_chunks, parallel_kwargs

    cfg = load_model_config(args.load)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    validate_model_parallel(cfg, tp=tp, pp=pp)  # before any process group
    seq = args.seq_length or cfg.seq_length
    default_stride(seq, args.eval_stride)  # a bad stride: one line before anything is loaded
    if seq != cfg.seq_length:  # allowed (e.g. the paper's longer eval windows), but never silently
        from megatron_jam.utils.logging import get_logger, log_rank0

        log_rank0(get_logger("megatron_jam.tools.evaluate"), "evaluating with windows of --seq-length %d; %s "
                  "records %d (the length it was trained or converted at)", seq, args.load, cfg.seq_length)
    check_data(args.data_path, args.load, cfg.vocab_size)  # before any process group or weight is touched
    initialize_distributed()
    if dist.get_world_size() % (tp * pp):
        raise ValueError(f"world size {dist.get_world_size()} is not divisible by TP x PP = {tp} x {pp}")
    initialize_model_parallel(tp, pp)
    chunks = build_model_chunks(model_class(cfg), cfg, parallel_kwargs(tp, pp, perform_initialization=False),
                                wrap_ddp=False)
    load_checkpoint(chunks, args.load, args.ckpt_step)
    result = perplexity(chunks, cfg.vocab_size, args.data_path, seq, args.micro_batch_size, args.max_windows,
                        args.eval_stride)
    return {"load": args.load, "data_path": args.data_path, "seq_length": seq,
            "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp} | result


def main(argv: list[str] | None = None) -> int:
    """The command line; a bad input is one line on stderr and exit code 2 (megatron_jam.utils.cli)."""
    return run_cli(_main, argv, extra_errors=(ValueError,))


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    require_path("--load", args.load, directory=True)  # the common mistake: one line before Megatron-Core loads
    from megatron_jam.models.config import ConfigError
    from megatron_jam.utils.logging import global_rank
    from megatron_jam.utils.paths import output_file_problem

    problem = args.output and output_file_problem(args.output)
    if problem:  # before the model is loaded, not after the whole evaluation
        raise ConfigError(f"--output {args.output}: {problem}")
    result = evaluate(args)
    if global_rank() == 0:
        text = json.dumps(result, indent=2)
        print(text)
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
