"""The pretraining loop: Megatron-Core's optimizer, LR scheduler and schedules around a JAM model.

What a cluster run does, in the order it does it: DDP-wrapped chunks
(`build_model_chunks`), `get_megatron_optimizer` + `OptimizerParamScheduler`,
optional `--load` (model, optimizer, scheduler, RNG, data position), then per
iteration one `get_forward_backward_func` step, a non-finite check (the update
is skipped and counted; `--max-skipped-steps` in a row stops the run with a
checkpoint), the optimizer step with gradient clipping, logging
(`metrics.py`), periodic evaluation and checkpoints, and a checkpoint plus a
clean exit on SIGTERM.

Data (`training/data.py`): Megatron indexed shards with the CM3 objective, or
`--mock-data`. Sample positions come from the consumed-sample count, so a
resumed run reads exactly what the uninterrupted run would have read.
"""

import dataclasses
import math
import os
import time
import warnings
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_jam.models.flops import model_flops_per_token
from megatron_jam.models.kinds import kind_of, model_class
from megatron_jam.models.param_count import model_params
from megatron_jam.parallel.initialize import initialize_distributed, initialize_model_parallel
from megatron_jam.parallel.model import build_model_chunks, parallel_kwargs
from megatron_jam.parallel.schedule import forward_backward, lm_forward_step
from megatron_jam.training.arguments import build_parser, log_args, save_args, validate_args
from megatron_jam.training.best_checkpoint import BestCheckpoint
from megatron_jam.checkpointing import load_checkpoint, read_latest, save_checkpoint
from megatron_jam.training.metrics import (MetricsWriter, any_rank_true, format_line, format_modality_loss,
                                            reduce_step_losses)
from megatron_jam.training.data import build_data_sources, check_data
from megatron_jam.training.prefetch import BatchPrefetcher
from megatron_jam.training.run_lock import lock_run_dir
from megatron_jam.training.signals import SigtermFlag
from megatron_jam.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)


class TrainingStopped(RuntimeError):
    """Too many non-finite steps in a row; a checkpoint was written if --save was given."""


def _optimizer(args, chunks):
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, clip_grad=args.clip_grad,
        bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer), chunks)
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters,
        wd_incr_style="constant")
    return opt, sched


def _batches(data, args, consumed_samples: int, dp_rank: int | None = None) -> list[dict]:
    """This data-parallel rank's micro-batches of the global batch starting at `consumed_samples`."""
    dp_rank = parallel_state.get_data_parallel_rank() if dp_rank is None else dp_rank
    first = consumed_samples + dp_rank * args.num_microbatches * args.micro_batch_size
    return [data.microbatch(first + m * args.micro_batch_size, args.micro_batch_size)
            for m in range(args.num_microbatches)]


def _optimizer_step(opt, loss_is_finite: bool) -> tuple[float, bool]:
    """One pass of Megatron-Core's step, split where the skip decision goes: prepare the gradients, take the
    global norm once, skip the update when the loss or the norm is not finite, else clip with that norm
    (`clip_grad_by_total_norm_fp32`, as `ChainedOptimizer.step`) and `step_with_ready_grads`.

    Why not `opt.step()`: it computes the norm again (a second all-reduce over every gradient) and has no
    hook between norm and update. Same update as `opt.step()` (tests/test_training_resume.py)."""
    from megatron.core.optimizer import optimizer as mcore_optimizer

    optimizers = getattr(opt, "chained_optimizers", [opt])
    for o in optimizers:
        # Without a loss scaler (fp32, bf16) prepare_grads only moves gradients; fp16 scaling is not supported here.
        assert getattr(o, "grad_scaler", None) is None, "fp16 loss scaling is not supported by this loop"
    opt.prepare_grads()
    grad_norm = opt.get_grad_norm()
    if not loss_is_finite or grad_norm is None or not math.isfinite(grad_norm):
        opt.zero_grad()
        return float("nan") if grad_norm is None else grad_norm, False
    for o in optimizers:
        params = [] if getattr(o, "is_stub_optimizer", False) else o.get_parameters()
        if params and o.config.clip_grad > 0.0:
            mcore_optimizer.clip_grad_by_total_norm_fp32(  # the module's name: the CPU layer patches it there
                params, max_norm=o.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=o.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return grad_norm, bool(opt.step_with_ready_grads())


def _sample_validation(chunks, args, data, iteration: int) -> dict:
    """Mean losses over `--eval-iters` global batches of a sample source (CM3 samples, mock data), new
    samples at each evaluation as Megatron-LM."""
    start = (iteration // args.eval_interval) * args.eval_iters * args.global_batch_size
    if getattr(args, "epoch_iters", None):
        start = 0  # --train-epochs: the same samples every epoch, so the best checkpoint compares like with like
    totals = []
    for i in range(args.eval_iters):
        iters = [iter(_batches(data, args, start + i * args.global_batch_size)) for _ in chunks]
        totals.append(reduce_step_losses(forward_backward(
            chunks, iters, args.num_microbatches, args.seq_length, args.micro_batch_size, forward_only=True)))
    return {k: sum(t[k] for t in totals) / len(totals) for k in totals[0]}


def _evaluate(chunks, args, valid_sets: dict, iteration: int, writer: MetricsWriter) -> dict:
    """Loss and perplexity on every validation set (over all, text and image targets): per document as
    tools/evaluate.py (`DocumentValidation`), or on samples (`--cm3-validation`, mock data)."""
    for c in chunks:
        c.eval()
    results = {}
    for name, data in valid_sets.items():
        per_document = hasattr(data, "evaluate")  # megatron_jam.evaluation.DocumentValidation
        mean = data.evaluate(chunks, args.micro_batch_size) if per_document else \
            _sample_validation(chunks, args, data, iteration)
        record = {"iteration": iteration, "valid_set": name, **{f"valid_{k}": v for k, v in mean.items()},
                  "valid_ppl": math.exp(min(mean["lm_loss"], 50.0))}
        writer.write(record, f" validation {name} at iteration {iteration} | lm loss: {mean['lm_loss']:.6E} | "
                             f"PPL: {record['valid_ppl']:.3f} | text loss: {format_modality_loss(mean['text_loss'])} | "
                             f"image loss: {format_modality_loss(mean['image_loss'])}")
        results[name] = mean
    for c in chunks:
        c.train()
    return results


class _Run:
    """Mutable state of one training run (what a checkpoint restores)."""

    def __init__(self, args, cfg, chunks, opt, sched):
        self.args, self.cfg, self.chunks, self.opt, self.sched = args, cfg, chunks, opt, sched
        self.iteration = self.consumed = 0
        self.skipped_total = self.skipped_in_row = 0
        self.history: list[dict] = []
        self.saved_at: int | None = None  # the iteration last saved: a second save of it would change nothing
        self.best = BestCheckpoint(args) if args.save and getattr(args, "train_epochs", None) else None
        self.async_queue = None
        if args.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()

    def save(self) -> None:
        if self.args.save and self.saved_at != self.iteration:
            self.saved_at = self.iteration
            save_checkpoint(self.args.save, self.iteration, self.consumed, self.chunks, self.opt, self.sched,
                            model_config=self.trained_config(), args=vars(self.args), async_queue=self.async_queue,
                            skipped_iterations=self.skipped_total)

    def trained_config(self) -> dict:
        """The model config with the sequence length this run trains at (what evaluation and generation
        should use), not the one the checkpoint was converted with."""
        return dataclasses.replace(self.cfg, seq_length=self.args.seq_length).to_dict()

    def finalize_saves(self, blocking: bool) -> None:
        """Publish finished background saves (all of them when `blocking`)."""
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=blocking)
            if blocking:
                self.async_queue.close()


def _ddp_config(args, cfg) -> DistributedDataParallelConfig:
    """Megatron-Core's DDP options from the flags. `align_param_gather` only under interleaved pipelining: it
    hands the parameter all-gathers to the schedule, and only the interleaved schedule starts them; otherwise
    each bucket's forward pre-hook prefetches the next bucket. JAM-Cross runs its two streams' layers
    interleaved, an order the prefetch (registration order) does not know: some gathers start before their
    turn, which Megatron-Core reports once per rank ("already been dispatched"); expected here, so silenced."""
    align = args.overlap_param_gather and args.virtual_pipeline_model_parallel_size is not None
    if args.overlap_param_gather and not align and cfg.MODEL_TYPE == "jam_cross":
        warnings.filterwarnings("ignore", message=r"The next bucket's parameter all-gather operation has already")
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce, overlap_param_gather=args.overlap_param_gather,
        align_param_gather=align, bucket_size=args.ddp_bucket_size)


def _build(args, cfg):
    from megatron.core.transformer.enums import AttnBackend

    extra = {"fp8": args.fp8_format} if args.fp8_format else {}
    extra["attention_backend"] = AttnBackend[args.attention_backend]
    extra |= {k: getattr(args, k) for k in ("recompute_granularity", "recompute_method", "recompute_num_layers")}
    chunks = build_model_chunks(
        model_class(cfg), cfg,
        parallel_kwargs(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                        args.virtual_pipeline_model_parallel_size, args.sequence_parallel, args.bf16, **extra),
        ddp_config=_ddp_config(args, cfg),
        use_te=args.transformer_impl == "transformer_engine")
    log_rank0(logger, "%s: %.3fM parameters; TP=%d PP=%d DP=%d SP=%s; %d micro-batches of %d; attention %s",
              kind_of(cfg).describe(cfg), model_params(cfg) / 1e6, args.tensor_model_parallel_size,
              args.pipeline_model_parallel_size, args.data_parallel_size, args.sequence_parallel,
              args.num_microbatches, args.micro_batch_size, _attention(args))
    return chunks


def _attention(args) -> str:
    if args.transformer_impl == "transformer_engine":
        return f"Transformer Engine ({args.attention_backend})"
    unfused = args.attention_backend in ("unfused", "local")
    return "Megatron-Core unfused" if unfused else f"PyTorch SDPA ({args.attention_backend})"


def _record(run: _Run, losses: dict, grad_norm: float, dt: float) -> dict:
    a = run.args
    tokens = a.global_batch_size * a.seq_length
    flops = model_flops_per_token(run.cfg, a.seq_length) * tokens
    world = torch.distributed.get_world_size()
    return {"iteration": run.iteration, "consumed_samples": run.consumed, "lm_loss": losses["lm_loss"],
            "text_loss": losses["text_loss"], "image_loss": losses["image_loss"],
            "lr": run.opt.param_groups[0]["lr"], "grad_norm": float(grad_norm),
            "iteration_time_ms": dt * 1e3, "tokens_per_sec": tokens / dt, "tflops_per_gpu": flops / dt / world / 1e12,
            "global_batch_size": a.global_batch_size, "skipped_iterations": run.skipped_total}


def _train_step(run: _Run, data: BatchPrefetcher, forward_step_func) -> dict:
    a = run.args
    t0 = time.perf_counter()
    # Megatron-LM's order: zero the DDP grad buffers (inside forward_backward) and the
    # optimizer's grads. FP32Optimizer aliases param.grad to main_grad; a stale alias would
    # make autograd accumulate into main_grad and the DDP hook add it a second time.
    run.opt.zero_grad()
    batches = data.next(run.consumed)
    iters = [iter(batches) for _ in run.chunks]
    reports = forward_backward(run.chunks, iters, a.num_microbatches, a.seq_length, a.micro_batch_size,
                               forward_step_func=forward_step_func)
    losses = reduce_step_losses(reports)
    nonfinite = any_rank_true(bool(reports) and not math.isfinite(losses["lm_loss"]))
    grad_norm, ok = _optimizer_step(run.opt, not nonfinite)
    run.iteration += 1
    run.consumed += a.global_batch_size
    if ok:
        run.sched.step(increment=1)
        run.skipped_in_row = 0
    else:
        run.skipped_total += 1
        run.skipped_in_row += 1
        log_rank0(logger, "iteration %d: non-finite loss or gradient, update skipped (%d in a row)",
                  run.iteration, run.skipped_in_row)
    return _record(run, losses, grad_norm, time.perf_counter() - t0)


def _resume_dir(args) -> str | None:
    """A `--save` directory that already holds a checkpoint wins over `--load`: resubmitting the same
    command (Slurm requeue, pre-emption) continues the run instead of restarting from `--load`."""
    if args.save and read_latest(args.save) is not None:
        if args.load and os.path.abspath(args.load) != os.path.abspath(args.save):
            log_rank0(logger, "resuming from --save %s (it holds a checkpoint); --load %s is not used",
                      args.save, args.load)
        return args.save
    return args.load


RESUME_SETTINGS = ("global_batch_size", "seq_length")


def train(args, cfg, forward_step_func=lm_forward_step) -> list[dict]:
    """Run `args.train_iters` iterations (from a checkpoint if `--load`); returns the step records.
    The `--save` folder is locked for the run (`run_lock`): a second run on it fails at once."""
    lock = lock_run_dir(args.save) if args.save else None
    try:
        save_args(args)
        return _train(args, cfg, forward_step_func)
    finally:
        if lock is not None:
            lock.release()


def _train(args, cfg, forward_step_func) -> list[dict]:
    resume_from = _resume_dir(args)
    check_data(args, cfg, resume_from)  # bad or mismatched data: one line before the model is built
    chunks = _build(args, cfg)
    opt, sched = _optimizer(args, chunks)
    run = _Run(args, cfg, chunks, opt, sched)
    if resume_from:
        finetune = args.finetune and resume_from == args.load
        run.iteration, run.consumed, run.skipped_total = load_checkpoint(
            resume_from, chunks, opt, sched, load_rng=not args.no_load_rng, finetune=finetune,
            iteration=args.ckpt_step, run_args={k: getattr(args, k) for k in RESUME_SETTINGS})
    metrics_file = args.metrics_file or (os.path.join(args.save, "metrics.jsonl") if args.save else None)
    writer = MetricsWriter(metrics_file, args.tensorboard_dir, args.wandb_project, vars(args),
                           start_iteration=run.iteration)
    data, valid_sets = build_data_sources(args, cfg, resume_from)
    prefetch = BatchPrefetcher(partial(_batches, data, args, dp_rank=parallel_state.get_data_parallel_rank()),
                               run.consumed, args.global_batch_size, args.train_iters - run.iteration,
                               args.num_workers)
    sigterm = SigtermFlag() if args.exit_signal_handler else None
    try:
        _loop(run, prefetch, valid_sets, writer, sigterm, forward_step_func)
        run.finalize_saves(blocking=True)
    finally:
        prefetch.close()
        writer.close()
        if sigterm:
            sigterm.restore()
    return run.history


def _loop(run: _Run, data, valid_sets: dict, writer, sigterm, forward_step_func) -> None:
    a = run.args
    start = run.iteration
    while run.iteration < a.train_iters:
        run.finalize_saves(blocking=False)
        record = _train_step(run, data, forward_step_func)
        run.history.append(record)
        if run.iteration % a.log_interval == 0:
            writer.write(record, format_line(record, a.train_iters))
        if run.skipped_in_row >= a.max_skipped_steps:
            run.save()
            run.finalize_saves(blocking=True)
            raise TrainingStopped(f"{run.skipped_in_row} non-finite steps in a row (--max-skipped-steps="
                                  f"{a.max_skipped_steps}) at iteration {run.iteration}; "
                                  f"{'checkpoint saved to ' + a.save if a.save else 'no --save given'}")
        if a.eval_interval and run.iteration % a.eval_interval == 0:
            results = _evaluate(run.chunks, a, valid_sets, run.iteration, writer)
            if run.best is not None:  # --train-epochs: keep the lowest average validation perplexity named
                run.best.observe(run, results)
        if a.save and a.save_interval and run.iteration % a.save_interval == 0:
            run.save()
        if sigterm is not None and sigterm.received():
            log_rank0(logger, "SIGTERM received: checkpoint at iteration %d and exit", run.iteration)
            _save_unless_saved(run)
            return
        if a.exit_interval and run.iteration % a.exit_interval == 0:
            log_rank0(logger, "--exit-interval %d: exiting at iteration %d", a.exit_interval, run.iteration)
            _save_unless_saved(run)
            return
    first_save = start == 0 and not a.load  # iteration 0 of a fresh run is worth saving (a common start)
    if a.save and (run.iteration > start or first_save) and not (
            a.save_interval and run.iteration % a.save_interval == 0 and run.iteration > start):
        run.save()


def _save_unless_saved(run: _Run) -> None:
    """A checkpoint of this iteration before an early exit, unless --save-interval just wrote it."""
    a = run.args
    if not (a.save_interval and run.iteration % a.save_interval == 0):
        run.save()


def main(argv=None) -> list[dict]:
    """Parse `argv` (Megatron-LM's flags) and train; returns the step records."""
    return pretrain(build_parser().parse_args(argv))


def pretrain(args, cfg=None) -> list[dict]:
    """Train with parsed flags: validated before any process group starts (unless `cfg`, the result of
    `validate_args(args)`, is given), printed once, then run."""
    cfg = validate_args(args) if cfg is None else cfg
    log_args(args)
    initialize_distributed()
    initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                              args.virtual_pipeline_model_parallel_size, seed=args.seed)
    history = train(args, cfg)
    log_rank0(logger, "done: iteration %d", history[-1]["iteration"] if history else 0)
    return history
