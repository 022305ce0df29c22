"""The pretraining loop: Megatron-Core's optimizer, LR scheduler and schedules around a JAM model.

First version (foundation issue): mock data, no checkpointing or evaluation;
those grow with the training issue. What is here already is the real path of
a cluster run: DDP-wrapped chunks, `get_forward_backward_func` schedules,
`finalize_model_grads`, `get_megatron_optimizer` with gradient clipping and
`OptimizerParamScheduler`.
"""

import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_jam.models.jam_cross import JamCrossModel
from megatron_jam.models.param_count import jam_cross_params
from megatron_jam.parallel.initialize import initialize_distributed, initialize_model_parallel
from megatron_jam.parallel.model import build_model_chunks, parallel_kwargs
from megatron_jam.parallel.schedule import forward_backward
from megatron_jam.training.arguments import build_parser, validate_args
from megatron_jam.training.mock_data import MockInterleavedData
from megatron_jam.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)


def _optimizer(args, chunks):
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, clip_grad=args.clip_grad,
        use_distributed_optimizer=args.use_distributed_optimizer), chunks)
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters,
        wd_incr_style="constant")
    return opt, sched


def _iteration_batches(data: MockInterleavedData, args, iteration: int) -> list[dict]:
    """This data-parallel rank's micro-batches of one global batch."""
    dp_rank = parallel_state.get_data_parallel_rank()
    first = iteration * args.global_batch_size + dp_rank * args.num_microbatches * args.micro_batch_size
    return [data.microbatch(first + m * args.micro_batch_size, args.micro_batch_size)
            for m in range(args.num_microbatches)]


def _dp_mean_loss(reports: list) -> float:
    """Mean loss of the step on the last pipeline stage, averaged over data-parallel ranks; NaN elsewhere."""
    if not reports:
        return float("nan")
    loss = torch.stack([r["lm loss"] for r in reports]).mean().reshape(1)
    dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
    return float(loss) / parallel_state.get_data_parallel_world_size()


def train(args, cfg) -> list[float]:
    chunks = build_model_chunks(
        JamCrossModel, cfg,
        parallel_kwargs(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                        args.virtual_pipeline_model_parallel_size, args.sequence_parallel),
        use_te=args.transformer_impl == "transformer_engine")
    log_rank0(logger, "JAM-Cross: %.3fM parameters (k=%d); TP=%d PP=%d DP=%d SP=%s; %d micro-batches of %d",
              jam_cross_params(cfg) / 1e6, cfg.cross_every, args.tensor_model_parallel_size,
              args.pipeline_model_parallel_size, args.data_parallel_size, args.sequence_parallel,
              args.num_microbatches, args.micro_batch_size)
    opt, sched = _optimizer(args, chunks)
    data = MockInterleavedData(cfg.vocab_size, args.seq_length, seed=args.seed)
    losses = []
    for it in range(args.train_iters):
        t0 = time.perf_counter()
        iters = [iter(_iteration_batches(data, args, it)) for _ in chunks]
        reports = forward_backward(chunks, iters, args.num_microbatches, args.seq_length, args.micro_batch_size)
        _, grad_norm, _ = opt.step()
        sched.step(increment=1)
        loss = _dp_mean_loss(reports)
        losses.append(loss)
        if (it + 1) % args.log_interval == 0 and parallel_state.is_pipeline_last_stage(ignore_virtual=True) \
                and parallel_state.get_tensor_model_parallel_rank() == 0 \
                and parallel_state.get_data_parallel_rank() == 0:
            dt = time.perf_counter() - t0
            logger.info(" iteration %6d/%6d | consumed samples: %9d | elapsed time per iteration (ms): %.1f | "
                        "learning rate: %.3E | global batch size: %5d | lm loss: %.6E | grad norm: %.3f | "
                        "tokens/s: %.0f", it + 1, args.train_iters, (it + 1) * args.global_batch_size, dt * 1e3,
                        opt.param_groups[0]["lr"], args.global_batch_size, loss, grad_norm or 0.0,
                        args.global_batch_size * args.seq_length / dt)
    return losses


def main(argv=None) -> list[float]:
    args = build_parser().parse_args(argv)
    cfg = validate_args(args)  # before any process group starts
    initialize_distributed()
    initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                              args.virtual_pipeline_model_parallel_size, seed=args.seed)
    losses = train(args, cfg)
    log_rank0(logger, "done: %d iterations", args.train_iters)
    return losses
