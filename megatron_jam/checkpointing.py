"""Checkpoints with Megatron-Core `dist_checkpointing`: save, `latest`, and exact resume.

Layout (Megatron-LM's): `<save>/iter_0000005/` holds one `dist_checkpointing`
checkpoint with the model chunks, the optimizer (sharded by the model's
checkpoint metadata, so weights load at another TP/PP), the LR scheduler, every
rank's RNG states and the data position; `<save>/model_config.json` is the
architecture; `<save>/latest_checkpointed_iteration.txt` names the newest
*complete* checkpoint. It is replaced atomically only after every rank finished
writing, so a crash during a save leaves the previous checkpoint as `latest`.

Why at the package's top level: the trainer saves and resumes, but the converter (megatron-jam parents,
export), evaluation and generation load the same checkpoints (`load_checkpoint(..., finetune=True)`); it
depends only on models/, parallel/ and utils/, so none of them imports training/.
"""

import functools
import json
import logging
import os
import random
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_jam.models.config import ConfigError
from megatron_jam.parallel.model import unwrap
from megatron_jam.utils import safe_checkpoint
from megatron_jam.utils.logging import get_logger, log_rank0

logger = get_logger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_CONFIG = "model_config.json"


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest(root: str) -> int | None:
    """The iteration named by `<root>/latest_checkpointed_iteration.txt`, or None."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise safe_checkpoint.CheckpointError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def resolve_checkpoint_dir(root: str, iteration: int | None = None) -> tuple[str, int | None]:
    """The dist_checkpointing folder of `root`: `root` itself when it is one (what the converter
    writes), else `root/iter_N` for the given or latest complete iteration N (what training writes)."""
    iteration = read_latest(root) if iteration is None else iteration
    if iteration is None and os.path.exists(os.path.join(root, "metadata.json")):
        return root, None
    if iteration is None:
        raise safe_checkpoint.CheckpointError(f"--load {root}: neither a checkpoint (metadata.json) nor a training "
                                f"directory with {TRACKER}")
    return checkpoint_dir(root, iteration), iteration


def _rng_state() -> dict:
    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rank_coords() -> tuple[tuple[int, ...], tuple[int, ...]]:
    ps = parallel_state
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return shape, offset


def _model_state_keys(n: int) -> list[str]:
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def _model_state(chunks: list) -> dict:
    return {k: unwrap(c).sharded_state_dict() for k, c in zip(_model_state_keys(len(chunks)), chunks)}


def _optimizer_metadata(optimizer) -> dict | None:
    """How the distributed optimizer's state is sharded in the checkpoint (None: a plain optimizer).

    Megatron-Core 0.16's own default for `DistributedOptimizer.sharded_state_dict`,
    'fully_sharded_model_space', builds `ShardedTensor`s with a `flattened_range`, which its
    checkpoint validation then refuses ("ShardedTensor.flattened_range is not supported"); Megatron-LM
    always passes a format. We take Megatron-LM's default, 'dp_reshardable' (each rank writes its
    own optimizer shard; the state reloads at another data-parallel size, not another TP/PP).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if any(isinstance(o, DistributedOptimizer) for o in getattr(optimizer, "chained_optimizers", [optimizer])):
        return {"distrib_optim_sharding_type": "dp_reshardable"}
    return None


def _allocate_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer its Adam state before a checkpoint is built or loaded.

    Without Apex or Transformer Engine, Megatron-Core 0.16's `DistributedOptimizer.state_dict()`
    reads the `step` of torch's Adam state and asserts there is exactly one value: on an optimizer
    that has not stepped yet (every resume) there is none. Megatron-LM never meets this because it
    runs with TE or Apex. The zeros allocated here are what the first step would allocate; the
    checkpoint's values overwrite them.
    """
    from megatron.core.optimizer import distrib_optimizer as dopt

    if dopt.HAVE_APEX_OR_TE:
        return
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(o, dopt.DistributedOptimizer) or len(o.optimizer.state) > 0:
            continue
        for group in o.optimizer.param_groups:
            for p in group["params"]:
                o.optimizer.state[p].update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p),
                                            step=torch.tensor(0.0))


def _restore_distributed_optimizer_step(optimizer, loaded: dict) -> None:
    """Put back Adam's `step` after a distributed optimizer loaded its state (no Apex / TE).

    The step is saved in the optimizer's param groups; the 'dp_reshardable' parameter state keeps
    it as a `LocalNonpersistentObject`, so `load_state_dict` first sets the checkpoint's step and
    then copies the *local* step of the freshly built optimizer (0) over it: the first resumed
    update would use step 1's bias correction (seen on an H200: losses drifted from the second
    resumed step on).
    """
    from megatron.core.optimizer import distrib_optimizer as dopt

    if dopt.HAVE_APEX_OR_TE:
        return
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [loaded[i] for i in range(len(chained))] if len(chained) > 1 else [loaded]
    for o, sd in zip(chained, states):
        if not isinstance(o, dopt.DistributedOptimizer):
            continue
        steps = {g["step"] for g in sd["optimizer"]["param_groups"] if "step" in g}
        if len(steps) != 1:
            raise RuntimeError(f"distributed optimizer checkpoint: expected one Adam step, found {sorted(steps)}")
        step = float(steps.pop())
        for st in o.optimizer.state.values():
            st["step"] = torch.tensor(step)


def _gather_updated_parameters(chunks: list) -> None:
    """With `--overlap-param-gather` the distributed optimizer leaves the all-gather of the parameters it updated
    to the next forward pass (its forward pre-hooks): until then each data-parallel rank holds only its own shard
    up to date, and a checkpoint would store the others' shards one step old (the optimizer state, which a resume
    restores, is right; the weights that `--finetune`, conversion and inference read are not). Gather them now,
    synchronously, as Megatron-LM does before it saves (`disable_forward_pre_hook(param_sync=True)`); the next
    forward finds them gathered (`param_gather_dispatched`) until the next backward resets it."""
    for chunk in chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.use_distributed_optimizer and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def _sharded_state(chunks, optimizer, scheduler, loading: bool) -> dict:
    state = _model_state(chunks)
    if optimizer is not None:
        _allocate_distributed_optimizer_state(optimizer)  # a no-op once it has stepped
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=loading,
                                                          metadata=_optimizer_metadata(optimizer))
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    shape, offset = _rank_coords()
    state["rng_state"] = ShardedObject("rng_state", _rng_state(), shape, offset, replica_id=0)
    return state


class Position(NamedTuple):
    """Where a run stands: what a resume restores besides the weights and optimizer."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0
    """Updates skipped for non-finite gradients over the whole run (Megatron-LM's counter)."""


def save_checkpoint(root: str, iteration: int, consumed_samples: int, chunks: list, optimizer=None,
                    scheduler=None, model_config: dict | None = None, args: dict | None = None,
                    async_queue=None, skipped_iterations: int = 0) -> str:
    """Save everything needed to resume; update `latest` only once the checkpoint is complete.

    With `async_queue` (a Megatron `AsyncCallsQueue`, `--async-save`) the tensors are written by
    background processes while training goes on; `latest` is updated by the request's finalize
    step, which Megatron runs on every rank only after all ranks finished writing.
    """
    path = checkpoint_dir(root, iteration)
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    _gather_updated_parameters(chunks)
    state = _sharded_state(chunks, optimizer, scheduler, loading=False)
    state["iteration"] = iteration
    state["consumed_samples"] = consumed_samples
    state["skipped_iterations"] = skipped_iterations
    state["parallel_layout"] = list(_rank_coords()[0])  # (PP, TP, DP): what a resume at another layout checks
    state["args"] = json.dumps(args or {}, default=str, sort_keys=True)
    publish = functools.partial(_publish, root, path, iteration, consumed_samples, model_config)
    if async_queue is not None:
        request = dist_checkpointing.save(state, path, async_sharded_save=True)
        request.add_finalize_fn(publish)
        async_queue.schedule_async_request(request)
        log_rank0(logger, "saving checkpoint %s in the background (iteration %d)", path, iteration)
        return path
    dist_checkpointing.save(state, path)
    dist.barrier()  # every rank has finished writing
    publish()
    dist.barrier()
    return path


def _publish(root: str, path: str, iteration: int, consumed_samples: int, model_config: dict | None) -> None:
    """Mark a complete checkpoint as `latest` (rank 0 writes; called once all ranks finished writing)."""
    if dist.get_rank() == 0:
        if model_config is not None:
            _write_atomic(os.path.join(root, MODEL_CONFIG), json.dumps(model_config, indent=2, sort_keys=True))
        _write_atomic(os.path.join(root, TRACKER), str(iteration))
    log_rank0(logger, "saved checkpoint %s (iteration %d, %d samples consumed)", path, iteration, consumed_samples)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_layout(path: str, saved: list | None, optimizer, load_rng: bool) -> bool:
    """Resuming at another parallel layout: weights, Adam state and scheduler reshard (Megatron's sharded
    state dicts), each rank's RNG state has no counterpart (not loaded, said once), and the distributed
    optimizer's dp_reshardable state reloads at another DP size only (a clear error). Returns load_rng."""
    now = list(_rank_coords()[0])
    if saved is None or saved == now:
        return load_rng
    layout = "(PP, TP, DP) = ({}, {}, {})"
    if saved[:2] != now[:2] and _optimizer_metadata(optimizer) is not None:
        raise RuntimeError(f"{path}: the distributed optimizer's state was saved at {layout.format(*saved)} and "
                           f"reloads at another data-parallel size only; this run is {layout.format(*now)}. "
                           "Resume at the saved TP/PP, or load the weights alone with --finetune")
    if load_rng:
        log_rank0(logger, "resuming %s, saved at %s, at %s: weights, optimizer and scheduler are resharded; "
                  "the per-rank RNG states are not loaded", path, layout.format(*saved), layout.format(*now))
    return False


def _earlier_complete(root: str, iteration: int | None) -> str:
    """What to say about the other checkpoints of `root` when iteration `iteration` cannot be read."""
    if iteration is None:
        return ""
    earlier = sorted((int(d[5:]) for d in os.listdir(root) if d.startswith("iter_") and d[5:].isdigit()
                      and int(d[5:]) < iteration), reverse=True)
    for it in earlier:
        try:
            safe_checkpoint.verify(checkpoint_dir(root, it))
        except safe_checkpoint.CheckpointError:
            continue
        return f"; the earlier checkpoint {checkpoint_dir(root, it)} is complete: load it with --ckpt-step {it}"
    return f"; {root} holds no earlier complete checkpoint"


RESUME_KEPT = ("seq_length",)
"""Settings a resume must keep: sample N of another sequence length is other tokens, so the exact data
position (and so the bit-identical continuation) would be lost."""
RESUME_CHANGEABLE = ("global_batch_size",)
"""Settings a resume may change (logged): the data position is a sample count, kept exactly."""


def _check_resume_args(path: str, saved_json: str | None, now: dict | None) -> None:
    """Compare the run's settings with those the checkpoint was trained with (Megatron-LM logs changes)."""
    if not saved_json or not now:
        return
    saved = json.loads(saved_json)
    for key in RESUME_KEPT:
        if key in saved and saved[key] != now.get(key):
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"{path}: trained with {flag} {saved[key]}, this run has {now.get(key)}: a resume keeps the data "
                f"position only at the same {flag}; keep it, or start a new phase from these weights with --finetune")
    for key in RESUME_CHANGEABLE:
        if key in saved and saved[key] != now.get(key):
            log_rank0(logger, "resuming %s with --%s %s (trained with %s): training continues from the same "
                      "consumed-sample count, each iteration now takes %s samples", path, key.replace("_", "-"),
                      now.get(key), saved[key], now.get(key), level=logging.WARNING)


def load_checkpoint(root: str, chunks: list, optimizer=None, scheduler=None, load_rng: bool = True,
                    iteration: int | None = None, finetune: bool = False, run_args: dict | None = None) -> Position:
    """Restore model (and optimizer, scheduler, RNG if given/asked); returns where the run stands.

    `finetune` (Megatron's `--finetune`) loads the model weights only and starts at iteration 0.
    A checkpoint that holds only a model (what `tools/convert_checkpoint.py` writes) is loaded
    that way automatically. `run_args` (the run's settings) are checked against the checkpoint's on a
    resume. A file that is missing, cut short or not safe to read raises `CheckpointError` naming it and
    the newest earlier checkpoint that is complete.
    """
    path, iteration = resolve_checkpoint_dir(root, iteration)
    try:
        return _load(path, chunks, optimizer, scheduler, load_rng, finetune, run_args)
    except safe_checkpoint.CheckpointMismatchError:
        raise  # every checkpoint of the run would mismatch alike
    except safe_checkpoint.CheckpointError as e:
        raise safe_checkpoint.CheckpointError(f"{e}{_earlier_complete(root, iteration)}") from e


def _load(path: str, chunks: list, optimizer, scheduler, load_rng: bool, finetune: bool,
          run_args: dict | None) -> Position:
    common = safe_checkpoint.load_common_state_dict(path)
    model_only = finetune or "opt_param_scheduler" not in common
    fresh_optimizer = None
    if model_only:
        log_rank0(logger, "loading model weights only from %s (%s)", path,
                  "weights only requested" if finetune else "the checkpoint has no optimizer state")
        fresh_optimizer, optimizer, scheduler = optimizer, None, None
        load_rng = False
    else:
        _check_resume_args(path, common.get("args"), run_args)
        load_rng = _check_layout(path, common.get("parallel_layout"), optimizer, load_rng)
    state = _sharded_state(chunks, optimizer, scheduler, loading=True)
    if not load_rng:
        state.pop("rng_state")
    loaded = safe_checkpoint.load(state, path)
    for key, chunk in zip(_model_state_keys(len(chunks)), chunks):
        unwrap(chunk).load_state_dict(loaded[key])
    if optimizer is not None:
        # no_grad: in fp32 the distributed optimizer's main parameters are views of the model parameters
        # (leaves that require grad), which Megatron-Core 0.16 fills with an in-place `copy_`; autograd
        # refuses that outside no_grad ("a view of a leaf Variable that requires grad is being used in an
        # in-place operation"). bf16 main parameters are detached fp32 copies: no change there.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_distributed_optimizer_step(optimizer, loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if load_rng:
        _set_rng_state(loaded["rng_state"])
    if model_only:
        if fresh_optimizer is not None:
            # bf16: the optimizer copied the *initial* weights into its fp32 main parameters when it
            # was built; without this its first step writes them back over the loaded ones
            # (Megatron-LM calls the same after a weights-only load). A no-op for fp32.
            fresh_optimizer.reload_model_params()
        return Position()
    log_rank0(logger, "loaded checkpoint %s (iteration %d)", path, common["iteration"])
    # checkpoints written before the counter was saved have none: count from 0
    return Position(int(common["iteration"]), int(common["consumed_samples"]),
                    int(common.get("skipped_iterations", 0)))
