"""Command-line arguments of `python -m megatron_jam.pretrain`, with Megatron-LM's flag names.

Validation that needs no process group (parallel layout against the model,
batch sizes against the world size) happens in `validate_args`, before
`torch.distributed` starts, so a bad layout fails in one clear line instead
of a hang or a shape error on some rank.
"""

import argparse
import dataclasses
import json
import math
import os

from megatron_jam.models.config import ConfigError
from megatron_jam.models.kinds import kind_of, load_model_config, validate_model_parallel
from megatron_jam.utils.cli import add_debug_arg
from megatron_jam.utils.logging import get_logger, global_rank, log_rank0
from megatron_jam.utils.paths import output_dir_problem, output_file_problem

logger = get_logger(__name__)

TINY_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "configs", "jam_cross_tiny.json")

ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")

DESCRIPTION = ("JAM continued pretraining: JAM-Cross, JAM-Width, JAM-Uniform or a single parent, per "
               "--model-config / --load (Megatron-LM's flag names; exit code 2 with one line on a bad flag)")

DEFAULT_TRAIN_ITERS = 20
DEFAULT_LR = 3e-4
DEFAULT_WARMUP_ITERS = 2
# The three defaults above are tiny-run values (examples/tiny); the paper's
# hyper-parameters live in examples/launch.sh (PAPER_PRETRAIN, PAPER_INSTRUCT), and a run that leaves any
# of lr / warm-up / iterations at its default says so in one log line (`_note_tiny_defaults`).

ARGS_FILE = "args.json"

# Megatron-LM's model-shape flags, applied to the `parent` of a single-stack model config.
SHAPE_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
               "ffn_hidden_size", "max_position_embeddings")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron_jam.pretrain", description=DESCRIPTION)
    g = p.add_argument_group("model")
    g.add_argument("--model-config", default=None,
                   help="model-config JSON, JAM-Cross or single-stack (default: the model_config.json of --load, "
                        "else the embedded tiny JAM-Cross, examples/configs/jam_cross_tiny.json)")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local")
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                   help="Megatron-LM's choices. With --transformer-impl local: auto (default) = PyTorch's "
                        "scaled_dot_product_attention, flash / fused = its flash / memory-efficient kernel (CUDA), "
                        "unfused / local = Megatron-Core's DotProductAttention; with transformer_engine: TE's backends")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="activation recomputation (Megatron-LM): full = whole layers (for JAM-Cross a step: the "
                        "cross pair and layer l of both streams), selective = core attention only")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="with full: uniform = every chunk of --recompute-num-layers layers, block = the first "
                        "--recompute-num-layers layers of each pipeline stage")
    g.add_argument("--recompute-num-layers", type=int, default=None)
    _add_shape_args(p)
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data-parallel size")
    g.add_argument("--seq-length", type=int, default=None, help="default: the model config's seq_length")
    g.add_argument("--train-iters", type=int, default=None,
                   help=f"default: {DEFAULT_TRAIN_ITERS}, or from --train-samples")
    g.add_argument("--train-samples", type=int, default=None,
                   help="train on this many samples instead: iterations = ceil(samples / global batch size), "
                        "as Megatron-LM (excludes --train-iters)")
    g.add_argument("--train-epochs", type=int, default=None,
                   help="train this many passes over the --data-path training split instead, with a validation "
                        "and a checkpoint after each and the best one named in <save>/best_checkpointed_iteration"
                        ".txt (megatron_jam/training/epochs.py; excludes --train-iters and --train-samples)")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="exit when the iteration is a multiple of N (with a checkpoint if --save), as Megatron-LM")
    g.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate, a tiny-run default: the paper recipes of examples/launch.sh pass the "
                        f"paper's (default: {DEFAULT_LR})")
    g.add_argument("--min-lr", type=float, default=3e-5)
    g.add_argument("--lr-warmup-iters", type=int, default=None,
                   help="default: 2, shortened (with a log line) when --lr-decay-iters leaves no room for it")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="all-reduce (reduce-scatter) gradient buckets during the backward pass (Megatron-Core DDP)")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="all-gather updated parameters during the next forward (needs --use-distributed-optimizer)")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="parameters per gradient bucket (default: Megatron-Core's, one bucket without overlap)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and compute, fp32 main weights")
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default=None,
                   help="FP8 through Transformer Engine (needs TE and a GPU)")
    g.add_argument("--max-skipped-steps", type=int, default=10,
                   help="stop (with a checkpoint) after this many non-finite steps in a row")
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory (also holds metrics.jsonl)")
    g.add_argument("--save-interval", type=int, default=None,
                   help="checkpoint every N iterations (default: only at the end, with --save)")
    g.add_argument("--load", default=None, help="resume from the latest complete checkpoint in this directory")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="load this iteration (iter_NNNNNNN) instead of the latest, as Megatron-LM")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints from background processes; `latest` moves once all ranks finished")
    g.add_argument("--finetune", action="store_true",
                   help="load model weights only (no optimizer, scheduler, RNG or iteration), as Megatron-LM")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM, save a checkpoint and exit cleanly (on by default with --save)")
    g = p.add_argument_group("data and logging")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="Megatron blend: PREFIX, or WEIGHT PREFIX WEIGHT PREFIX ... (shards from "
                        "tools/preprocess_interleaved.py); without it, --mock-data")
    g.add_argument("--mock-data", action="store_true",
                   help="synthetic interleaved documents (the default without --data-path)")
    g.add_argument("--mock-data-samples", type=int, default=None,
                   help="cycle over this many mock samples (= global batch size: train on one fixed batch)")
    g.add_argument("--split", default="969,30,1", help="train,valid,test document fractions of each prefix")
    g.add_argument("--valid-data-path", nargs="*", default=None,
                   help="extra validation sets, each NAME=PREFIX (e.g. text=wiki_valid image=coco_valid)")
    g.add_argument("--data-cache-path", default=None, help="where Megatron's dataset index cache goes")
    g.add_argument("--num-workers", type=int, default=0,
                   help="background processes building the next steps' micro-batches (Megatron-LM's flag; 2 on "
                        "GPU machines through examples/launch.sh); 0: built on the training thread")
    g.add_argument("--no-cm3", action="store_true", help="plain causal LM instead of the CM3 objective")
    g.add_argument("--whole-documents", choices=["auto", "always", "never"], default="auto",
                   help="one whole document per sample (cut at --seq-length + 1 tokens, padded), never a window "
                        "across documents: auto = instruction prefixes (with PREFIX.loss_mask.npy), so a response is "
                        "never seen without its prompt; always = every prefix; never = every prefix packed")
    g.add_argument("--prompt-loss", action="store_true",
                   help="train on the prompt tokens of instruction data too (default: responses only, as "
                        "PREFIX.loss_mask.npy says; the paper does not say which)")
    g.add_argument("--cm3-lambda", type=float, default=1.0, help="Poisson mean of masked spans per sample")
    g.add_argument("--cm3-caption-mask-prob", type=float, default=0.1,
                   help="probability that an image's caption is masked whole (a CM3 span): teaches the "
                        "unconditional context of classifier-free guidance (docs/generation.md); 0 = plain CM3")
    g.add_argument("--sentinel-loss-weight", type=float, default=1.0)
    g.add_argument("--retrieval-k", type=int, default=0,
                   help="prepend up to k retrieved documents (neighbours from tools/retrieve.py); every image-text "
                        "--data-path prefix (not text-only, not instruction data) must then have PREFIX.neighbors.npy")
    g.add_argument("--retrieval-optional", nargs="*", default=[], metavar="PREFIX",
                   help="image-text prefixes that may lack neighbours (trained packed, without retrieval)")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--eval-interval", type=int, default=None, help="validate every N iterations (default: never)")
    g.add_argument("--eval-iters", type=int, default=2,
                   help="per validation set: at most eval-iters x global-batch-size windows (default: 2)")
    g.add_argument("--eval-stride", type=int, default=None,
                   help="validation scores each document on its own, a long one in windows starting every this "
                        "many tokens, as tools/evaluate.py (default: seq-length // 2)")
    g.add_argument("--cm3-validation", action="store_true",
                   help="validate on CM3-transformed packed samples (the training objective) instead of per "
                        "document without CM3 (the numbers of tools/evaluate.py)")
    g.add_argument("--metrics-file", default=None, help="JSON lines per logged step (default: <save>/metrics.jsonl)")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--wandb-project", default=None)
    add_debug_arg(p)
    _show_defaults(p)
    return p


def _add_shape_args(p: argparse.ArgumentParser) -> None:
    """Megatron-LM's model-shape flags, for a single-stack model trained from scratch (`SHAPE_FLAGS`)."""
    g = p.add_argument_group("model shape", "override the model config's parent, for a single-stack model "
                                            "trained from scratch (no --load; JAM-Cross: edit its config)")
    for field in SHAPE_FLAGS:
        g.add_argument("--" + field.replace("_", "-"), type=int, default=None,
                       help=f"the parent's {field} (default: the model config's)")


def _show_defaults(p: argparse.ArgumentParser) -> None:
    """'(default: X)' after every flag whose help does not say its default already (None / off say nothing).
    Not `ArgumentDefaultsHelpFormatter`: it skips flags without a help text and repeats written defaults."""
    for action in p._actions:
        said = action.help and "default" in action.help
        off = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and not off and not said:  # `is`: a default of 0 is shown, False is not
            action.help = f"{action.help or ''} (default: %(default)s)".strip()


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def validate_args(args: argparse.Namespace):
    """Load the model config and check the run's layout; raise ConfigError naming the values."""
    path = args.model_config
    if path is None and args.load and os.path.exists(os.path.join(args.load, "model_config.json")):
        path = os.path.join(args.load, "model_config.json")  # the architecture travels with the checkpoint
    path = path or os.path.normpath(TINY_CONFIG)
    if not os.path.exists(path):
        raise ConfigError(f"--model-config {path}: no such file")
    try:
        cfg = _apply_shape_flags(args, load_model_config(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"--model-config {path}: not valid JSON ({e})") from None
    args.model_config = path
    args.seq_length = args.seq_length or cfg.seq_length
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    vpp = None
    if args.num_layers_per_virtual_pipeline_stage:
        per_stage = cfg.num_layers // pp
        if per_stage % args.num_layers_per_virtual_pipeline_stage:
            raise ConfigError(f"--num-layers-per-virtual-pipeline-stage={args.num_layers_per_virtual_pipeline_stage}"
                              f" does not divide the {per_stage} layers of each pipeline stage")
        vpp = per_stage // args.num_layers_per_virtual_pipeline_stage
    args.virtual_pipeline_model_parallel_size = vpp
    for name, p in kind_of(cfg).parents(cfg).items():
        if p.family == "opt" and args.seq_length > p.max_position_embeddings:
            raise ConfigError(f"--seq-length {args.seq_length} exceeds {name or 'parent'}.max_position_embeddings="
                              f"{p.max_position_embeddings} (learned positions)")
    validate_model_parallel(cfg, tp=tp, pp=pp, vpp=vpp, sequence_parallel=args.sequence_parallel,
                            seq_length=args.seq_length)
    world = _world_size()
    if world % (tp * pp):
        raise ConfigError(f"world size {world} is not divisible by tensor x pipeline = {tp} x {pp}")
    dp = world // (tp * pp)
    args.data_parallel_size = dp
    args.global_batch_size = args.global_batch_size or args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size={args.global_batch_size} is not divisible by "
                          f"--micro-batch-size={args.micro_batch_size} x data-parallel size={dp}")
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    _note_tiny_defaults(args)
    _resolve_train_iters(args)
    _resolve_schedule(args)
    if args.eval_stride is not None and not 1 <= args.eval_stride <= args.seq_length:
        raise ConfigError(f"--eval-stride {args.eval_stride} must be between 1 and --seq-length {args.seq_length}")
    if args.save:
        args.exit_signal_handler = True
    import torch

    if args.bf16 and not torch.cuda.is_available():
        raise ConfigError("--bf16 needs a GPU: Megatron-Core's mixed-precision optimizer keeps CUDA tensors only; "
                          "CPU runs train in fp32 (drop --bf16)")
    if args.transformer_impl == "transformer_engine":
        from megatron_jam.models.specs import HAVE_TE

        if not HAVE_TE:
            raise ConfigError("--transformer-impl transformer_engine: transformer_engine is not importable "
                              "(install it, or use --transformer-impl local)")
    if args.fp8_format:
        from megatron_jam.models.specs import HAVE_TE

        if not HAVE_TE or args.transformer_impl != "transformer_engine":
            raise ConfigError("--fp8-format needs Transformer Engine (--transformer-impl transformer_engine) and a GPU")
    _check_recompute(args)
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer (it gathers the parameters the "
                          "distributed optimizer updated)")
    if args.mock_data and args.data_path:
        raise ConfigError("--mock-data and --data-path exclude each other")
    if args.valid_data_path and not args.data_path:
        raise ConfigError("--valid-data-path needs --data-path (mock data has its own synthetic validation set)")
    if args.load and not os.path.isdir(args.load):
        raise ConfigError(f"--load {args.load}: no such directory")
    if args.ckpt_step is not None and args.ckpt_step < 0:
        raise ConfigError(f"--ckpt-step {args.ckpt_step}: expected an iteration >= 0")
    for flag in ("save", "tensorboard_dir"):
        problem = getattr(args, flag) and output_dir_problem(getattr(args, flag))
        if problem:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: {problem}")
    if args.metrics_file and output_file_problem(args.metrics_file):
        raise ConfigError(f"--metrics-file {args.metrics_file}: {output_file_problem(args.metrics_file)}")
    return cfg


def _apply_shape_flags(args: argparse.Namespace, cfg):
    """The config with `SHAPE_FLAGS` given on the command line written into its parent; refused for JAM-Cross
    (two parents: which one?) and with --load (the checkpoint's shape is fixed)."""
    given = {f: getattr(args, f) for f in SHAPE_FLAGS if getattr(args, f, None) is not None}
    if not given:
        return cfg
    flags = " ".join("--" + f.replace("_", "-") for f in given)
    if args.load:
        raise ConfigError(f"{flags}: the model shape comes from the --load checkpoint; these flags only apply "
                          "to a model trained from scratch (drop them, or drop --load)")
    if not kind_of(cfg).single_stack:
        raise ConfigError(f"{flags}: {kind_of(cfg).describe(cfg)} has two parents (llm, img); the shape flags "
                          "apply to a single-stack model config (edit the JAM-Cross config's parents instead)")
    try:
        return dataclasses.replace(cfg, parent=dataclasses.replace(cfg.parent, **given))
    except ConfigError as e:
        raise ConfigError(f"{flags}: {e}") from None


def _note_tiny_defaults(args: argparse.Namespace) -> None:
    """--lr default; and one log line naming the tiny-run defaults a run did not override (lr, warm-up,
    iterations), so a direct `python -m megatron_jam.pretrain` never trains with them silently."""
    defaults = {"--lr": (args.lr, DEFAULT_LR), "--lr-warmup-iters": (args.lr_warmup_iters, DEFAULT_WARMUP_ITERS),
                "--train-iters": (args.train_iters if args.train_samples is None and getattr(args, "train_epochs", None)
                                  is None else 0, DEFAULT_TRAIN_ITERS)}
    unset = [f"{flag} {default}" for flag, (value, default) in defaults.items() if value is None]
    if unset:
        log_rank0(logger, "tiny-run defaults in use: %s (not given); the paper's values are in examples/launch.sh "
                  "PAPER_PRETRAIN / PAPER_INSTRUCT", ", ".join(unset))
    if args.lr is None:
        args.lr = DEFAULT_LR


def _resolve_train_iters(args: argparse.Namespace) -> None:
    """--train-iters, or from --train-samples (Megatron-LM: ceil(samples / global batch size)), or from
    --train-epochs (megatron_jam/training/epochs.py)."""
    if getattr(args, "train_epochs", None) is not None:
        from megatron_jam.training.epochs import resolve_train_epochs

        resolve_train_epochs(args)
    elif args.train_samples is not None:
        if args.train_iters is not None:
            raise ConfigError("--train-iters and --train-samples exclude each other (give one)")
        if args.train_samples < 1:
            raise ConfigError(f"--train-samples {args.train_samples}: expected at least 1")
        args.train_iters = math.ceil(args.train_samples / args.global_batch_size)
    elif args.train_iters is None:
        args.train_iters = DEFAULT_TRAIN_ITERS
    if args.exit_interval is not None and args.exit_interval < 1:
        raise ConfigError(f"--exit-interval {args.exit_interval}: expected at least 1")


def format_args(args: argparse.Namespace) -> str:
    """Megatron-LM's block of effective arguments (sorted, dotted), as its `_print_args` prints it."""
    lines = [f"  {k} {'.' * (48 - len(k))} {v}" for k, v in vars(args).items()]
    return "\n".join(["------------------------ arguments ------------------------",
                      *sorted(lines, key=str.lower),
                      "-------------------- end of arguments ---------------------"])


def log_args(args: argparse.Namespace) -> None:
    """The effective arguments, once (rank 0), before anything starts."""
    log_rank0(logger, "effective arguments:\n%s", format_args(args))


def save_args(args: argparse.Namespace) -> None:
    """`<save>/args.json`: the effective arguments of the run (rank 0; the trainer holds the run lock)."""
    if args.save and global_rank() == 0:
        with open(os.path.join(args.save, ARGS_FILE), "w") as f:
            json.dump(vars(args), f, indent=2, sort_keys=True, default=str)


def _resolve_schedule(args: argparse.Namespace) -> None:
    """--lr-decay-iters (default --train-iters) and --lr-warmup-iters, which Megatron's scheduler needs
    smaller than it (it asserts, without a message). The default warm-up is shortened to fit a short run,
    with a log line; an explicit one that does not fit is an error."""
    if args.lr_decay_iters is None:
        args.lr_decay_iters = max(args.train_iters, 1)  # the scheduler needs at least one decay step
    if args.lr_decay_iters < 1:
        raise ConfigError(f"--lr-decay-iters={args.lr_decay_iters} must be at least 1")
    if args.lr_warmup_iters is None:
        args.lr_warmup_iters = min(DEFAULT_WARMUP_ITERS, args.lr_decay_iters - 1)
        if args.lr_warmup_iters < DEFAULT_WARMUP_ITERS:
            log_rank0(logger, "--lr-warmup-iters: the default %d does not fit --lr-decay-iters=%d; warming up "
                      "for %d iterations", DEFAULT_WARMUP_ITERS, args.lr_decay_iters, args.lr_warmup_iters)
    if args.lr_warmup_iters >= args.lr_decay_iters:
        raise ConfigError(f"--lr-warmup-iters={args.lr_warmup_iters} must be smaller than --lr-decay-iters="
                          f"{args.lr_decay_iters} (default: --train-iters)")


def _check_recompute(args) -> None:
    """Megatron-LM's rules for the recomputation flags, as one-line errors before anything starts."""
    if args.recompute_granularity == "full" and (args.recompute_method is None or not args.recompute_num_layers):
        raise ConfigError("--recompute-granularity full needs --recompute-method uniform|block and "
                          "--recompute-num-layers N (N >= 1)")
    if args.recompute_granularity != "full" and (args.recompute_method or args.recompute_num_layers):
        raise ConfigError("--recompute-method / --recompute-num-layers apply to --recompute-granularity full only")
