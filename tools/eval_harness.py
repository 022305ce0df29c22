"""Zero-shot benchmarks with lm-eval (EleutherAI lm-evaluation-harness) on a JAM checkpoint, at any TP.

    python tools/eval_harness.py --load ckpt/jam --tasks piqa,arc_easy --output results/jam.json
    torchrun --nproc-per-node 2 tools/eval_harness.py --load ckpt/jam --tensor-model-parallel-size 2 \
        --tasks piqa,arc_challenge,arc_easy,storycloze_2016,winogrande,wsc273 --output results/jam.json

Why a wrapper when `python -m megatron_jam.harness` is lm-eval's own command line: under torchrun every rank
must build its shard and issue the same forwards, and exactly one process may write. Here every rank runs
`lm_eval.simple_evaluate` on the same task list with the same seeds (so their requests, batches and
collectives match: lm-eval's own convention for tensor parallelism, every rank reporting rank 0), and global
rank 0 alone writes the results JSON and prints the table. The adapter is `megatron_jam/harness/adapter.py`;
scores are renormalised over the text ids of the fused vocabulary (docs/evaluation.md).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_jam.utils.cli import add_debug_arg, require_path, run_cli  # noqa: E402  (light: no torch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="lm-eval tasks on a megatron-jam checkpoint (TP under torchrun)")
    p.add_argument("--load", required=True, help="checkpoint folder (converted or trained)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (lm_eval ls tasks)")
    p.add_argument("--output", help="results JSON (written by rank 0); default: print only")
    p.add_argument("--tensor-model-parallel-size", type=int, default=None,
                   help="default: the number of processes (no data parallelism: it must equal them)")
    p.add_argument("--ckpt-step", type=int, default=None, help="a training folder's iteration (default: latest)")
    p.add_argument("--vocab-layout", help="default: vocab_layout.json in --load")
    p.add_argument("--tokenizer-model", help="default: the --load folder's tokenizer/")
    p.add_argument("--num-fewshot", type=int, default=None, help="default: each task's own (0 for Table 1's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1); for tries")
    p.add_argument("--include-path", help="a folder of your own task YAMLs")
    p.add_argument("--model-args", default="", help="more adapter args, lm-eval style: k=v,k=v "
                                                    "(max_length, max_gen_toks, add_eos_prefix, tokenizer_type)")
    p.add_argument("--seed", type=int, default=1234, help="lm-eval's seeds (few-shot sampling)")
    add_debug_arg(p)
    return p


def model_args(args) -> dict:
    """The adapter's keyword arguments from the flags (a dict: paths may hold commas)."""
    from lm_eval.utils import simple_parse_args_string

    given = {"load": args.load, "tp": args.tensor_model_parallel_size, "ckpt_step": args.ckpt_step,
             "vocab_layout": args.vocab_layout, "tokenizer_model": args.tokenizer_model}
    return {k: v for k, v in given.items() if v is not None} | simple_parse_args_string(args.model_args)


def evaluate(args) -> dict | None:
    """Run the tasks on every rank; the results on global rank 0, None elsewhere."""
    import megatron_jam.harness  # noqa: F401  (registers --model megatron_jam)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from megatron_jam.utils.logging import global_rank

    tasks = [t for t in args.tasks.split(",") if t]
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    out = simple_evaluate(model="megatron_jam", model_args=model_args(args), tasks=tasks,
                          num_fewshot=args.num_fewshot, batch_size=args.batch_size, limit=limit,
                          task_manager=TaskManager(include_path=args.include_path), random_seed=args.seed,
                          numpy_random_seed=args.seed, torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    return out if global_rank() == 0 else None


def write(results: dict, path: str | None) -> None:
    """The lm-eval results JSON (its own format) at `path`, whole or not at all; the table on stdout."""
    from lm_eval.utils import handle_non_serializable, make_table

    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
        os.replace(tmp, path)
    print(make_table(results))


def main(argv: list[str] | None = None) -> int:
    """The command line; a setup mistake is one line on stderr and exit code 2 (megatron_jam.utils.cli)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    require_path("--load", args.load, directory=True)
    if args.include_path:
        require_path("--include-path", args.include_path, directory=True)
    results = evaluate(args)
    if results is not None:
        write(results, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
